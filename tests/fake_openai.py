"""A deterministic fake OpenAI-compatible server on loopback, for tests and benchmarks.

A tiny HTTP/1.1 server on asyncio streams (not an ASGI app) so it can misbehave the way real
endpoints do: drop a connection mid-request, hang past the client's timeout, answer 429 with
Retry-After, 500/503, an invalid JSON body, empty content or `finish_reason=length`.

Answers depend only on the request (stage header + messages), so two builds against the fake
produce the same plans and paragraphs. Fault injection uses its own seeded RNG.

Markers inside an instruction steer the answers: `[[garbage-plan]]`, `[[flaky-plan]]` (the
plan repeats one main point unless the request carries a `seed`), `[[refuse]]`,
`[[repeat]]`, `[[short]]`, `[[terse]]` (paragraphs a quarter of the asked length),
`[[error-text]]`, `[[markers]]` (paragraphs labelled "Paragraph N:").

Counts every request by `X-Longwriter-Request-Id`, so tests can prove no stored call was paid
twice. Run standalone (for subprocess builds and benchmarks):
    python -m tests.fake_openai --port 0 --latency 0.05   (prints the port on stdout)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

FAULT_KINDS = ("429", "500", "503", "drop", "hang", "bad_json", "empty", "length")

_SYLLABLES = (
    "ka lo mi ra ten sol vir den pra qui mon tal ser bel dor fin gal hes jun lur nav pel rom sta "
    "tor ul ven wel yar zen"
).split()
VOCAB = sorted(
    {a + b + c for a in _SYLLABLES[:18] for b in _SYLLABLES[6:24] for c in ("", "s", "ing")}
)
CJK_COMMON = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]


@dataclass
class FakeConfig:
    latency_s: float = 0.0
    plan_steps: int = 6
    step_words: int = 400
    fault_rate: float = 0.0
    fault_kinds: tuple[str, ...] = FAULT_KINDS
    retry_after_s: float = 0.05
    hang_s: float = 5.0
    seed: int = 1234
    fail_status: int | None = None  # every request answers this status (401, 404, 503...)
    context_limit_chars: int | None = None  # answer 400 "context length" above this prompt size
    api_key: str | None = None  # when set, requests without this bearer key get 401
    # Behave like llama-cpp-python's server: 500 for the OpenAI json_schema response_format.
    llama_cpp_json: bool = False


@dataclass
class FakeStats:
    requests: int = 0
    by_stage: Counter[str] = field(default_factory=Counter)
    by_request_id: Counter[str] = field(default_factory=Counter)
    successes_by_request_id: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    missing_headers: int = 0
    prompts: list[tuple[str, str]] = field(default_factory=list)  # (stage, last user message)
    auth_headers: set[str] = field(default_factory=set)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "by_stage": dict(self.by_stage),
            "faults": dict(self.faults),
            "missing_headers": self.missing_headers,
            "unique_request_ids": len(self.by_request_id),
            "successes_by_request_id": dict(self.successes_by_request_id),
        }


def _rng_for(text: str) -> random.Random:
    return random.Random(int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:16], 16))


def _is_cjk(text: str) -> bool:
    return bool(re.search(r"[\u4e00-\u9fff]", text))


def prose(seed_text: str, words: int, chinese: bool = False) -> str:
    """`words` units of varied deterministic text (low n-gram repetition)."""
    rng = _rng_for(seed_text)
    if chinese:
        chars = [rng.choice(CJK_COMMON) for _ in range(words)]
        sentences = ["".join(chars[i : i + 20]) + "。" for i in range(0, len(chars), 20)]
        return "".join(sentences)
    toks = [rng.choice(VOCAB) for _ in range(words)]
    sentences = [" ".join(toks[i : i + 12]).capitalize() + "." for i in range(0, len(toks), 12)]
    return " ".join(sentences)


def _instruction_of(prompt: str) -> str:
    m = re.search(r"<instruction>\s*(.*?)\s*</instruction>", prompt, re.DOTALL)
    return m.group(1) if m else prompt


def default_answer(stage: str, body: dict[str, Any], cfg: FakeConfig) -> str:
    messages = body.get("messages") or []
    prompt = messages[-1]["content"] if messages else ""
    instruction = _instruction_of(prompt)
    if stage == "plan":
        if "[[garbage-plan]]" in instruction:
            return "I think this piece should be great and long, with many ideas."
        lang_zh = _is_cjk(instruction)
        steps = [
            {
                "main_point": (
                    f"第{i}部分：围绕主题展开论述"
                    if lang_zh
                    else f"Part {i}: develop the theme, aspect {i}"
                )
                + f" ({hashlib.sha1(instruction.encode()).hexdigest()[:6]})"
                if "[[flaky-plan]]" not in instruction or body.get("seed") is not None
                else "The same main point again",
                "word_count": cfg.step_words,
            }
            for i in range(1, cfg.plan_steps + 1)
        ]
        if body.get("response_format"):
            return json.dumps({"paragraphs": steps}, ensure_ascii=False)
        return "\n".join(
            f"Paragraph {i} - Main Point: {s['main_point']} - Word Count: {s['word_count']} words"
            for i, s in enumerate(steps, start=1)
        )
    if stage == "write":
        m = re.search(r"Aim for about (\d+) words", prompt)
        words = int(m.group(1)) if m else cfg.step_words // 2  # continuation: a shorter tail
        if "[[short]]" in instruction:
            words = 20
        elif "[[terse]]" in instruction and m:
            words //= 4  # stops early, like small models: the factory must continue it
        zh = _is_cjk(instruction)
        if "[[refuse]]" in instruction:
            return "I'm sorry, but I can't help with writing this."
        if "[[repeat]]" in instruction:
            return " ".join(["the same words again and again and again"] * (words // 7 + 1))
        text = prose(prompt, words, chinese=zh)
        if "[[error-text]]" in instruction:
            text += " Max tries. Failed."
        if "[[markers]]" in instruction:
            n = re.search(r"Now write paragraph (\d+)", prompt)
            text = f"Paragraph {n.group(1) if n else 1}:\n{text}"
        return text
    return prose(prompt, 50)


class FakeOpenAIServer:
    """Run with `with FakeOpenAIServer(cfg).running() as server: server.base_url`."""

    def __init__(
        self,
        config: FakeConfig | None = None,
        answer: Callable[[str, dict[str, Any], FakeConfig], str] | None = None,
    ) -> None:
        self.config = config or FakeConfig()
        self.answer = answer or default_answer
        self.stats = FakeStats()
        self._fault_rng = random.Random(self.config.seed)
        self._lock = threading.Lock()
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- HTTP ---------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while True:
                    h = await reader.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    k, v = h.decode("latin-1").split(":", 1)
                    headers[k.strip().lower()] = v.strip()
                n = int(headers.get("content-length", "0"))
                raw = await reader.readexactly(n) if n else b""
                keep = await self._respond(method, path, headers, raw, writer)
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            writer.close()

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        extra_headers: dict[str, str] | None = None,
    ) -> None:
        reason = {
            200: "OK",
            400: "Bad Request",
            401: "Unauthorized",
            404: "Not Found",
            429: "Too Many Requests",
            500: "Internal Server Error",
            503: "Service Unavailable",
        }.get(status, "Status")
        head = [
            f"HTTP/1.1 {status} {reason}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
        ]
        for k, v in (extra_headers or {}).items():
            head.append(f"{k}: {v}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()

    async def _respond(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        raw: bytes,
        writer: asyncio.StreamWriter,
    ) -> bool:
        cfg = self.config
        if method == "GET" and path.rstrip("/").endswith("/models"):
            await self._send(writer, 200, json.dumps({"data": [{"id": "fake-model"}]}).encode())
            return True
        if method == "GET" and path == "/_stats":
            await self._send(writer, 200, json.dumps(self.stats.as_dict()).encode())
            return True
        if not path.rstrip("/").endswith("/chat/completions"):
            await self._send(writer, 404, b'{"error": {"message": "not found"}}')
            return True
        body = json.loads(raw or b"{}")
        stage = headers.get("x-longwriter-stage", "")
        rid = headers.get("x-longwriter-request-id", "")
        with self._lock:
            self.stats.requests += 1
            self.stats.by_stage[stage] += 1
            self.stats.by_request_id[rid] += 1
            if not stage or not rid:
                self.stats.missing_headers += 1
            if "authorization" in headers:
                self.stats.auth_headers.add(headers["authorization"])
            msgs = body.get("messages") or [{"content": ""}]
            self.stats.prompts.append((stage, msgs[-1].get("content", "")))
            fault = None
            if cfg.fault_rate and self._fault_rng.random() < cfg.fault_rate:
                kinds = [k for k in cfg.fault_kinds if k != "length" or stage == "write"]
                fault = self._fault_rng.choice(kinds) if kinds else None
            if fault:
                self.stats.faults[fault] += 1
        if cfg.api_key and headers.get("authorization") != f"Bearer {cfg.api_key}":
            await self._send(writer, 401, b'{"error": {"message": "invalid api key"}}')
            return True
        if cfg.fail_status:
            await self._send(
                writer,
                cfg.fail_status,
                json.dumps({"error": {"message": f"forced {cfg.fail_status}"}}).encode(),
                {"Retry-After": str(cfg.retry_after_s)} if cfg.fail_status in (429, 503) else None,
            )
            return True
        rf = body.get("response_format") or {}
        if cfg.llama_cpp_json and rf.get("type") == "json_schema":
            await self._send(
                writer,
                500,
                b'{"error": {"message": "response_format type must be \'text\' or \'json_object\'"}}',
            )
            return True
        prompt_chars = sum(len(m.get("content", "")) for m in body.get("messages") or [])
        if cfg.context_limit_chars and prompt_chars > cfg.context_limit_chars:
            await self._send(
                writer,
                400,
                json.dumps(
                    {
                        "error": {
                            "message": f"Requested tokens exceed context window of {cfg.context_limit_chars}"
                        }
                    }
                ).encode(),
            )
            return True
        if cfg.latency_s:
            await asyncio.sleep(cfg.latency_s)
        if fault == "drop":
            return False  # close without a response
        if fault == "hang":
            await asyncio.sleep(cfg.hang_s)
            return False
        if fault in ("429", "500", "503"):
            extra = {"Retry-After": str(cfg.retry_after_s)} if fault == "429" else None
            await self._send(writer, int(fault), b'{"error": {"message": "injected fault"}}', extra)
            return True
        if fault == "bad_json":
            await self._send(writer, 200, b'{"choices": [ {"message": ')
            return True
        content = self.answer(stage, body, cfg)
        finish = "stop"
        if fault == "empty":
            content = ""
        elif fault == "length":
            words = content.split(" ")
            content = " ".join(words[: max(1, len(words) // 2)])
            finish = "length"
        prompt_tokens = prompt_chars // 4
        completion_tokens = max(1, len(content) // 4)
        payload = {
            "id": f"chatcmpl-{rid[:12]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "fake-model"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": finish,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        # A cut answer (finish_reason=length) is still a paid answer the client stores.
        if content and fault in (None, "length"):
            with self._lock:
                self.stats.successes_by_request_id[rid] += 1
        await self._send(writer, 200, json.dumps(payload, ensure_ascii=False).encode("utf-8"))
        return True

    # -- lifecycle ----------------------------------------------------------------------

    async def serve(self, port: int = 0, ready: Callable[[int], None] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        if ready:
            ready(self.port)
        async with self._server:
            await self._server.serve_forever()

    @contextmanager
    def running(self) -> Iterator[FakeOpenAIServer]:
        started = threading.Event()
        thread = threading.Thread(
            target=lambda: asyncio.run(self._serve_quietly(started)), daemon=True
        )
        thread.start()
        if not started.wait(10):
            raise RuntimeError("fake server did not start")
        try:
            yield self
        finally:
            if self._loop and self._server:
                self._loop.call_soon_threadsafe(self._server.close)
            thread.join(5)

    async def _serve_quietly(self, started: threading.Event) -> None:
        try:
            await self.serve(0, lambda _p: started.set())
        except asyncio.CancelledError:
            pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--fault-rate", type=float, default=0.0)
    ap.add_argument("--plan-steps", type=int, default=6)
    ap.add_argument("--step-words", type=int, default=400)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    server = FakeOpenAIServer(
        FakeConfig(
            latency_s=args.latency,
            fault_rate=args.fault_rate,
            plan_steps=args.plan_steps,
            step_words=args.step_words,
            seed=args.seed,
            hang_s=2.0,
        )
    )
    asyncio.run(server.serve(args.port, lambda p: print(p, flush=True)))


if __name__ == "__main__":
    main()
