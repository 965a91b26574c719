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

Real endpoints' behaviours (issue 16), each off by default:
  reasoning_mode      think blocks in `content` ("think", "think_open": the template opened the
                      block, so the content holds a lone closing tag), or the reasoning in a
                      field ("reasoning_content": DeepSeek/SGLang, "reasoning": vLLM, Ollama);
                      reasoning_tokens of thinking count against max_tokens as they do for real
  openai_reasoning    400s of OpenAI's reasoning models for `max_tokens` and non-default
                      `temperature`/`top_p`/penalties (the exact bodies OpenAI sends)
  [[policy]] / [[azure-policy]] / [[filtered]] markers: OpenAI invalid_prompt 400, Azure
                      content_filter 400, finish_reason=content_filter with a cut answer
  quota_exhausted     429 insufficient_quota (never clears)
  rpm / tpm           OpenAI-style limits with x-ratelimit-* headers and no Retry-After
                      (tokens counted as prompt estimate + max_tokens, as OpenAI does)
  streaming           `stream: true` answers as SSE chunks, usage last with include_usage
  proxy_timeout_s     a gateway that cuts a silent (non-streamed) response with a 524
  ollama_num_ctx      drops the front of prompts over this many tokens and answers 200
  context_error_style the context-length wording of vllm, tgi, sglang, llamacpp, openai
  prompt_cache        usage.prompt_tokens_details.cached_tokens for a shared prefix

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
# Not in the default mix (tests that count the default kinds stay as they are): Cloudflare's
# 520/524 and vLLM's finish_reason=abort with a partial answer.
EXTRA_FAULT_KINDS = ("520", "524", "abort")

# Context-length errors as each server words them (status, message).
CONTEXT_ERRORS = {
    "default": (400, "Requested tokens exceed context window of {n}"),
    "openai": (
        400,
        "This model's maximum context length is {n} tokens. However, your messages resulted "
        "in {p} tokens. Please reduce the length of the messages.",
    ),
    "vllm": (
        400,
        "The decoder prompt (length {p}) is longer than the maximum model length of {n}. Make "
        "sure that `max_model_len` is no smaller than the number of text tokens.",
    ),
    "tgi": (
        422,
        "Input validation error: `inputs` tokens + `max_new_tokens` must be <= {n}. Given: {p} "
        "`inputs` tokens and 2048 `max_new_tokens`",
    ),
    "sglang": (
        400,
        "The input ({p} tokens) is longer than the model's context length ({n} tokens).",
    ),
    "llamacpp": (400, "request ({p} tokens) exceeds the available context size ({n} tokens)"),
}

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
    context_error_style: str = "default"  # a key of CONTEXT_ERRORS
    # Reasoning models (see the module docstring).
    reasoning_mode: str | None = None
    reasoning_tokens: int = 40
    openai_reasoning: bool = False
    quota_exhausted: bool = False
    # OpenAI-style rate limits, per minute; a bucket holding rate_window_s of the limit (the
    # limit is enforced over short windows, not as one burst per minute).
    rpm: int | None = None
    tpm: int | None = None
    rate_window_s: float = 10.0
    stream_chunks: int = 8  # content chunks of a streamed answer, latency spread over them
    proxy_timeout_s: float | None = None
    ollama_num_ctx: int | None = None  # tokens (4 characters each, as the fake counts)
    prompt_cache: bool = False


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
    bodies: list[dict[str, Any]] = field(default_factory=list)  # every request body, in order
    throttled: int = 0  # 429s for rpm/tpm
    streamed: int = 0
    truncated_prompts: int = 0  # ollama_num_ctx cut the front of a prompt
    reasoning_texts: list[str] = field(default_factory=list)  # every reasoning text sent
    by_status: Counter[int] = field(default_factory=Counter)
    admitted_at: list[float] = field(default_factory=list)  # monotonic times of 200s
    charged_tokens: int = 0  # rpm/tpm: tokens admitted (prompt estimate + max_tokens)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "by_stage": dict(self.by_stage),
            "faults": dict(self.faults),
            "missing_headers": self.missing_headers,
            "unique_request_ids": len(self.by_request_id),
            "successes_by_request_id": dict(self.successes_by_request_id),
            "throttled": self.throttled,
            "by_status": dict(self.by_status),
            "charged_tokens": self.charged_tokens,
            "admitted": len(self.admitted_at),
            "admitted_span_s": (
                self.admitted_at[-1] - self.admitted_at[0] if len(self.admitted_at) > 1 else 0.0
            ),
        }


def format_duration(seconds: float) -> str:
    """OpenAI's x-ratelimit-reset-* format: "6m0s", "1.5s", "20ms"."""
    if seconds < 1:
        return f"{max(1, int(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    if minutes:
        return f"{int(minutes)}m{int(rest)}s"
    return f"{rest:.3g}s"


class _Bucket:
    """One rate limit as a token bucket: `limit` per minute, holding `window_s` of it."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.rate = limit / 60.0
        self.capacity = max(1.0, self.rate * window_s)
        self.level = self.capacity
        self.at = time.monotonic()

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now

    def reset_s(self, cost: float) -> float:
        """Seconds until `cost` fits."""
        return max(0.0, (min(cost, self.capacity) - self.level) / self.rate)


def _reasoning_text(stage: str, words: int) -> str:
    """Thinking that looks like an answer, so a client that read it as one is caught: a plan
    in the line format and in JSON, a score, prose."""
    plan_like = (
        "Paragraph 1 - Main Point: LEAKED-THOUGHT outline - Word Count: 9999 words\n"
        '{"paragraphs": [{"main_point": "LEAKED-THOUGHT", "word_count": 9999}]}\n'
        "Score: 1/10 LEAKED-THOUGHT\n"
    )
    filler = " ".join(f"hmm{i}" for i in range(max(0, words - 30)))
    return f"Let me think about the {stage} step. {plan_like}LEAKED-THOUGHT {filler}".strip()


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


def _instruction_of(prompt: str, messages: list[dict[str, Any]] | None = None) -> str:
    m = re.search(r"<instruction>\s*(.*?)\s*</instruction>", prompt, re.DOTALL)
    if m:
        return m.group(1)
    # The "turns" write prompt: the instruction opens the first ask, before the outline.
    for msg in messages or []:
        content = msg.get("content") or ""
        if msg.get("role") == "user" and "\n\nThe piece follows this outline:" in content:
            return content.split("\n\nThe piece follows this outline:")[0]
    return prompt


def default_answer(stage: str, body: dict[str, Any], cfg: FakeConfig) -> str:
    messages = body.get("messages") or []
    prompt = messages[-1]["content"] if messages else ""
    instruction = _instruction_of(prompt, messages)
    if stage == "plan":
        if "[[garbage-plan]]" in instruction:
            return "I think this piece should be great and long, with many ideas."
        lang_zh = _is_cjk(instruction)
        steps = [
            {
                # Distinct main points (the plan checks reject repeated ones), fixed per
                # instruction and step.
                "main_point": (
                    f"第{i}部分：" + prose(f"{instruction}#{i}", 8, chinese=True)
                    if lang_zh
                    else f"Part {i}: " + prose(f"{instruction}#{i}", 5).rstrip(".")
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
        # "Aim for about N words" (paper prompt) or "About N words." (turns prompt).
        m = re.search(
            r"Aim for about (\d+) words|^Write part \d+: .*About (\d+) words\.", prompt, re.M
        )
        words = int(m.group(1) or m.group(2)) if m else cfg.step_words // 2  # a shorter tail
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
        if "[[chatter]]" in instruction:
            # Assistant chatter at both edges, as small models write it: cleaned, not redrafted.
            text = f"Sure! Here is the next paragraph:\n\n{text}\n\nI hope this helps!"
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
        # What the answer hook raised (a test's assertion about a request): `running()`
        # raises the first one when it exits, so the test fails with the hook's message
        # instead of the client's view of it (a dropped connection, then retries).
        self.hook_errors: list[BaseException] = []
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
            422: "Unprocessable Entity",
            429: "Too Many Requests",
            500: "Internal Server Error",
            503: "Service Unavailable",
            520: "Unknown Error",
            524: "A Timeout Occurred",
        }.get(status, "Status")
        with self._lock:
            self.stats.by_status[status] += 1
        head = [
            f"HTTP/1.1 {status} {reason}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
        ]
        for k, v in (extra_headers or {}).items():
            head.append(f"{k}: {v}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()

    async def _send_error(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
        err = {"message": message, "type": type_, "param": param, "code": code}
        await self._send(writer, status, json.dumps({"error": err}).encode(), headers)

    def _rate_limit(self, body: dict[str, Any], prompt_chars: int) -> dict[str, str] | None:
        """None when the request is admitted; else the 429's headers (OpenAI sends the
        x-ratelimit-* family and, on these, no Retry-After)."""
        cfg = self.config
        if cfg.rpm is None and cfg.tpm is None:
            return None
        now = time.monotonic()
        max_out = body.get("max_completion_tokens") or body.get("max_tokens") or 0
        cost = prompt_chars // 4 + int(max_out)  # OpenAI counts max_tokens up front
        with self._lock:
            if not hasattr(self, "_buckets"):
                self._buckets = {
                    "requests": _Bucket(cfg.rpm, cfg.rate_window_s) if cfg.rpm else None,
                    "tokens": _Bucket(cfg.tpm, cfg.rate_window_s) if cfg.tpm else None,
                }
            req, tok = self._buckets["requests"], self._buckets["tokens"]
            for b in (req, tok):
                if b is not None:
                    b.refill(now)
            ok = (req is None or req.level >= 1) and (
                tok is None or tok.level >= min(cost, tok.capacity)
            )
            if ok:
                if req is not None:
                    req.level -= 1
                if tok is not None:
                    tok.level -= cost
                self.stats.charged_tokens += cost
            headers: dict[str, str] = {}
            for name, b, need in (("requests", req, 1), ("tokens", tok, cost)):
                if b is None:
                    continue
                headers[f"x-ratelimit-limit-{name}"] = str(b.limit)
                headers[f"x-ratelimit-remaining-{name}"] = str(max(0, int(b.level)))
                headers[f"x-ratelimit-reset-{name}"] = format_duration(
                    b.reset_s(need) if not ok else (b.capacity - b.level) / b.rate
                )
            if ok:
                return None
            self.stats.throttled += 1
            return headers

    def _dialect_error(self, body: dict[str, Any]) -> tuple[str, str, str] | None:
        """OpenAI's reasoning models: (message, code, param) of the 400 for a parameter they
        refuse (texts as the API sends them: teilomillet/gollm #33, johny-b/llmcomp #69)."""
        if not self.config.openai_reasoning:
            return None
        if "max_tokens" in body:
            return (
                "Unsupported parameter: 'max_tokens' is not supported with this model. "
                "Use 'max_completion_tokens' instead.",
                "unsupported_parameter",
                "max_tokens",
            )
        t = body.get("temperature")
        if t is not None and t != 1:
            return (
                f"Unsupported value: 'temperature' does not support {t} with this model. "
                "Only the default (1) value is supported.",
                "unsupported_value",
                "temperature",
            )
        for name in ("top_p", "presence_penalty", "frequency_penalty"):
            if name in body:
                return (
                    f"Unsupported parameter: '{name}' is not supported with this model.",
                    "unsupported_parameter",
                    name,
                )
        return None

    def _cached_tokens(self, prompt: str) -> int:
        """Prefix caching as OpenAI reports it: the prefix shared with an earlier prompt,
        counted when it is 1,024 tokens or more, in steps of 128."""
        if not self.config.prompt_cache:
            return 0
        with self._lock:
            seen: list[str] = getattr(self, "_seen_prompts", [])
            self._seen_prompts = seen
            best = 0
            for old in seen[-64:]:
                n = 0
                for a, b in zip(old, prompt, strict=False):
                    if a != b:
                        break
                    n += 1
                best = max(best, n)
            seen.append(prompt)
        tokens = best // 4
        return (tokens // 128) * 128 if tokens >= 1024 else 0

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
            self.stats.bodies.append(body)
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
        if cfg.quota_exhausted:  # OpenAI's body (BerriAI/litellm #32785)
            await self._send_error(
                writer,
                429,
                "You exceeded your current quota, please check your plan and billing details.",
                type_="insufficient_quota",
                code="insufficient_quota",
            )
            return True
        dialect = self._dialect_error(body)
        if dialect is not None:
            message, code, param = dialect
            await self._send_error(writer, 400, message, code=code, param=param)
            return True
        prompt_text = msgs[-1].get("content", "") if msgs else ""
        instruction = _instruction_of(prompt_text)
        if "[[policy]]" in instruction:  # OpenAI (alan-turing-institute/t0-1 #69)
            await self._send_error(
                writer,
                400,
                "Invalid prompt: your prompt was flagged as potentially violating our usage "
                "policy. Please try again with a different prompt.",
                code="invalid_prompt",
            )
            return True
        if "[[azure-policy]]" in instruction:  # Azure OpenAI (tatsu-lab/alpaca_eval #430)
            await self._send_error(
                writer,
                400,
                "The response was filtered due to the prompt triggering Azure OpenAI's content "
                "management policy. Please modify your prompt and retry.",
                type_="invalid_request_error",
                code="content_filter",
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
            status, template = CONTEXT_ERRORS[cfg.context_error_style]
            message = template.format(n=cfg.context_limit_chars, p=prompt_chars // 4)
            await self._send_error(writer, status, message, code="context_length_exceeded")
            return True
        throttle = self._rate_limit(body, prompt_chars)
        if throttle is not None:
            await self._send_error(
                writer,
                429,
                "Rate limit reached for requests. Please try again later.",
                type_="requests",
                code="rate_limit_exceeded",
                headers=throttle,
            )
            return True
        answer_body = body
        prompt_tokens = prompt_chars // 4
        if cfg.ollama_num_ctx and prompt_tokens > cfg.ollama_num_ctx:
            # Ollama's /v1 keeps the end of the prompt that fits its context and says nothing
            # (ollama/ollama #17889): the model never sees the instruction and plan.
            keep = cfg.ollama_num_ctx * 4
            cut = (msgs[-1].get("content", "") if msgs else "")[-keep:]
            answer_body = {**body, "messages": [{"role": "user", "content": cut}]}
            prompt_tokens = cfg.ollama_num_ctx
            with self._lock:
                self.stats.truncated_prompts += 1
        streaming = bool(body.get("stream"))
        if (
            cfg.proxy_timeout_s is not None
            and not streaming
            and cfg.latency_s > cfg.proxy_timeout_s
        ):
            # A gateway (Cloudflare: ~100 s) gives up on a response that sends nothing.
            await asyncio.sleep(cfg.proxy_timeout_s)
            await self._send(writer, 524, b"error code: 524")
            return True
        if cfg.latency_s and not streaming:
            await asyncio.sleep(cfg.latency_s)
        if fault == "drop":
            return False  # close without a response
        if fault == "hang":
            await asyncio.sleep(cfg.hang_s)
            return False
        if fault in ("429", "500", "503", "520", "524"):
            extra = {"Retry-After": str(cfg.retry_after_s)} if fault == "429" else None
            await self._send(writer, int(fault), b'{"error": {"message": "injected fault"}}', extra)
            return True
        if fault == "bad_json":
            await self._send(writer, 200, b'{"choices": [ {"message": ')
            return True
        try:
            content = self.answer(stage, answer_body, cfg)
        except Exception as exc:  # noqa: BLE001 - kept for running() to raise in the test
            self.hook_errors.append(exc)
            # 422 is not retried: the call fails at once and the build stops.
            msg = f"fake server: the answer hook raised {type(exc).__name__}: {exc}"
            await self._send(writer, 422, json.dumps({"error": {"message": msg}}).encode())
            return True
        finish = "stop"
        if fault == "empty":
            content = ""
        elif fault in ("length", "abort"):
            words = content.split(" ")
            content = " ".join(words[: max(1, len(words) // 2)])
            finish = fault
        if "[[filtered]]" in instruction and stage == "write":
            content = " ".join(content.split(" ")[:12])  # cut mid-sentence by the filter
            finish = "content_filter"
        reasoning = None
        reasoning_tokens = 0
        if cfg.reasoning_mode:
            reasoning = _reasoning_text(stage, cfg.reasoning_tokens)
            reasoning_tokens = cfg.reasoning_tokens
            budget = body.get("max_completion_tokens") or body.get("max_tokens")
            if budget is not None and int(budget) <= cfg.reasoning_tokens:
                # Thinking counts against max_tokens: the budget ran out inside it.
                reasoning = " ".join(reasoning.split(" ")[: int(budget)])
                reasoning_tokens = int(budget)
                content, finish = "", "length"
            with self._lock:
                self.stats.reasoning_texts.append(reasoning)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if reasoning is not None:
            if cfg.reasoning_mode == "think":
                message["content"] = f"<think>\n{reasoning}\n" + (
                    f"</think>\n\n{content}" if content else ""
                )
            elif cfg.reasoning_mode == "think_open":
                message["content"] = f"{reasoning}\n" + (
                    f"</think>\n\n{content}" if content else ""
                )
            else:  # "reasoning_content" or "reasoning"
                message[cfg.reasoning_mode] = reasoning
                message["content"] = content or None
        completion_tokens = max(1, len(content) // 4) + reasoning_tokens
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        cached = self._cached_tokens(prompt_text)
        if cfg.prompt_cache or cfg.reasoning_mode:
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
            usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
        # A cut answer (finish_reason=length) is still a paid answer the client stores.
        if content and fault in (None, "length"):
            with self._lock:
                self.stats.successes_by_request_id[rid] += 1
                self.stats.admitted_at.append(time.monotonic())
        if streaming:
            with self._lock:
                self.stats.streamed += 1
            await self._stream(writer, body, rid, message, finish, usage)
            return False
        payload = {
            "id": f"chatcmpl-{rid[:12]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "fake-model"),
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": usage,
        }
        await self._send(writer, 200, json.dumps(payload, ensure_ascii=False).encode("utf-8"))
        return True

    async def _stream(
        self,
        writer: asyncio.StreamWriter,
        body: dict[str, Any],
        rid: str,
        message: dict[str, Any],
        finish: str,
        usage: dict[str, Any],
    ) -> None:
        """The answer as OpenAI streams it: SSE `data:` chunks of deltas, the finish reason
        on the last choice chunk, then (with stream_options.include_usage) a chunk with empty
        choices and the usage, then `data: [DONE]`. The connection closes after it."""
        cfg = self.config
        with self._lock:
            self.stats.by_status[200] += 1
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\nConnection: close\r\n\r\n"
        )
        base = {
            "id": f"chatcmpl-{rid[:12]}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model", "fake-model"),
        }

        async def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> None:
            data = {
                **base,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            }
            writer.write(b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n")
            await writer.drain()

        def pieces(text: str, n: int) -> list[str]:
            step = max(1, -(-len(text) // n))
            return [text[i : i + step] for i in range(0, len(text), step)]

        await chunk({"role": "assistant", "content": ""})
        n = max(1, cfg.stream_chunks)
        for field_name in ("reasoning_content", "reasoning"):
            if isinstance(message.get(field_name), str):
                for piece in pieces(message[field_name], 2):
                    await chunk({field_name: piece})
        content = message.get("content") or ""
        parts = pieces(content, n) if content else []
        for piece in parts:
            if cfg.latency_s:
                await asyncio.sleep(cfg.latency_s / n)
            await chunk({"content": piece})
        await chunk({}, finish)
        if (body.get("stream_options") or {}).get("include_usage"):
            data = {**base, "choices": [], "usage": usage}
            writer.write(b"data: " + json.dumps(data).encode() + b"\n\n")
        writer.write(b"data: [DONE]\n\n")
        await writer.drain()

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
            if self.hook_errors:
                # Replaces whatever the test body raised on the client side (that error is
                # kept as its __context__); a hook that failed fails the test.
                raise self.hook_errors[0]

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
    ap.add_argument("--rpm", type=int, default=None)
    ap.add_argument("--tpm", type=int, default=None)
    ap.add_argument("--rate-window", type=float, default=10.0)
    args = ap.parse_args()
    server = FakeOpenAIServer(
        FakeConfig(
            latency_s=args.latency,
            fault_rate=args.fault_rate,
            plan_steps=args.plan_steps,
            step_words=args.step_words,
            seed=args.seed,
            hang_s=2.0,
            rpm=args.rpm,
            tpm=args.tpm,
            rate_window_s=args.rate_window,
        )
    )
    asyncio.run(server.serve(args.port, lambda p: print(p, flush=True)))


if __name__ == "__main__":
    main()
