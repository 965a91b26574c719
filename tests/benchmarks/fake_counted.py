"""The fake OpenAI server, counting what the endpoint sees: requests in flight (now and at the
peak) and when the first chat request arrived (epoch seconds), at `GET /_counts`.

The throughput benchmarks need both from the server's side: the peak says whether the
factory really kept its concurrency busy (the issue's LongWriter-6k run saw 55 of 128), and
the first request's arrival ends the build's start-up (the one-instruction start-up figure).

    python -m tests.benchmarks.fake_counted --port 0 --latency 0.1   (prints the port)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from tests.fake_openai import FakeConfig, FakeOpenAIServer


class CountingFakeServer(FakeOpenAIServer):
    """FakeOpenAIServer that counts chat requests between arrival and answer."""

    def __init__(self, config: FakeConfig) -> None:
        super().__init__(config)
        self.in_flight = 0
        self.peak_in_flight = 0
        self.first_request_at: float | None = None
        self.chat_requests = 0

    async def _respond(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        raw: bytes,
        writer: asyncio.StreamWriter,
    ) -> bool:
        if method == "GET" and path == "/_counts":
            counts = {
                "in_flight": self.in_flight,
                "peak_in_flight": self.peak_in_flight,
                "first_request_at": self.first_request_at,
                "chat_requests": self.chat_requests,
            }
            await self._send(writer, 200, json.dumps(counts).encode())
            return True
        if not path.rstrip("/").endswith("/chat/completions"):
            return await super()._respond(method, path, headers, raw, writer)
        # One event loop serves every connection: plain counters are exact.
        if self.first_request_at is None:
            self.first_request_at = time.time()
        self.chat_requests += 1
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            return await super()._respond(method, path, headers, raw, writer)
        finally:
            self.in_flight -= 1


def counts(port: int) -> dict[str, Any]:
    """The server's counters (from another process)."""
    import httpx

    with httpx.Client(trust_env=False, timeout=30) as c:
        return dict(c.get(f"http://127.0.0.1:{port}/_counts").json())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--plan-steps", type=int, default=6)
    ap.add_argument("--step-words", type=int, default=400)
    args = ap.parse_args()
    server = CountingFakeServer(
        FakeConfig(latency_s=args.latency, plan_steps=args.plan_steps, step_words=args.step_words)
    )
    asyncio.run(server.serve(args.port, lambda p: print(p, flush=True)))


if __name__ == "__main__":
    main()
