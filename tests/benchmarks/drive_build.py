"""Run one build in this process from a JSON BuildSettings, optionally recording every chat
request the factory puts on the wire (for benchmark 3, which replays them directly).

The recorder wraps `httpx.AsyncClient.post` and only watches: it stores the URL, the JSON body,
the status and the answer of each `/chat/completions` call in the order requests were sent.

    python -m tests.benchmarks.drive_build SETTINGS_JSON [--record FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx


def install_recorder(path: Path) -> None:
    original = httpx.AsyncClient.post
    fh = path.open("w", encoding="utf-8")

    async def post(self: httpx.AsyncClient, url: Any, *args: Any, **kwargs: Any) -> Any:
        if not str(url).endswith("/chat/completions"):
            return await original(self, url, *args, **kwargs)
        started = time.time()
        response = await original(self, url, *args, **kwargs)
        ended = time.time()
        try:
            answer = response.json()
        except ValueError:
            answer = None
        fh.write(
            json.dumps(
                {
                    "url": str(url),
                    # LLMClient sends the body encoded (content=), older code as json=
                    "body": kwargs.get("json") or json.loads(kwargs.get("content") or b"null"),
                    "status": response.status_code,
                    "answer": answer,
                    "started": started,
                    "ended": ended,
                },
                ensure_ascii=False,
            )
            + "\n"
        )
        fh.flush()
        return response

    httpx.AsyncClient.post = post  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("settings", help="BuildSettings as JSON")
    ap.add_argument("--record", default=None)
    args = ap.parse_args(argv)
    from flows.cli import _quiet_prefect_defaults

    _quiet_prefect_defaults()
    if args.record:
        install_recorder(Path(args.record))
    from flows.build import BuildSettings, run_build

    summary = run_build(BuildSettings(**json.loads(args.settings)))
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
