"""The one HTTP client every LLM call goes through.

One policy, one retry layer (tenacity): timeouts; retries on 408/409/429/5xx, dropped
connections, timeouts and unusable bodies, with capped jittered exponential backoff that
honours `Retry-After`; a concurrency limit per endpoint; and on every request the headers
`X-Longwriter-Stage` and `X-Longwriter-Request-Id` (the call's idempotency key: the same
logical call always sends the same id, so an endpoint or proxy can de-duplicate). Prefect task
retries are kept for whole-task failures so attempts never multiply.

Several endpoints (vLLM replicas) are load-balanced: each request goes to the healthy endpoint
with the most free slots; an endpoint that keeps failing is set aside for a cool-down.

Secrets: the API key lives only in the `Authorization` header; it is excluded from every repr
and never part of an error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import hashlib
import json
import logging
import random
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    retry_if_not_exception_type,
)

from tasks.settings import BUILD

try:  # httpx's API over aiohttp's connection pool (httpx-aiohttp, a project dependency)
    import aiohttp
    from httpx_aiohttp import AiohttpTransport
except ImportError:  # pragma: no cover - the client falls back to httpcore
    aiohttp = None  # type: ignore[assignment]
    AiohttpTransport = None  # type: ignore[assignment,misc]

try:  # Prefect depends on orjson; a few times faster than json on the request and answer
    import orjson

    _dumps: Any = orjson.dumps
    _loads: Any = orjson.loads
except ImportError:  # pragma: no cover - the same bytes, slower

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    _loads = json.loads

T = TypeVar("T")
_log = logging.getLogger(__name__)

# A dropped connection, a timeout, a refused connect: retried. httpx-aiohttp maps aiohttp's
# errors to httpx's; any it leaves unmapped (aiohttp.ClientError) are transport faults too.
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    httpx.TimeoutException,
    httpx.TransportError,
) + ((aiohttp.ClientError,) if aiohttp is not None else ())
POOL_CONNECTIONS = 2  # connections per httpx pool (see LLMClient.__init__)
POOL_KEEPALIVE = 2  # of those kept open between requests (0: a new connection each time)
MAX_AFFINITIES = 4096  # endpoint bindings remembered (chains in flight are far fewer)
# 520-524: Cloudflare in front of an endpoint (unknown error, down, unreachable, timed out).
RETRYABLE_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524})
# Context-length errors as the servers word them: OpenAI/vLLM/OpenRouter "maximum context
# length", vLLM V1 "(decoder) prompt ... longer than the maximum model length", TGI "`inputs`
# tokens + `max_new_tokens` must be <= N", SGLang "longer than the model's context length",
# llama.cpp "exceeds the available context size" (type exceed_context_size_error).
_CONTEXT_ERROR_RE = re.compile(
    r"context.?(length|window|size)|maximum context|n_ctx|too many tokens|prompt is too long"
    r"|exceeds? the (model'?s? )?(max|context)|longer than the maximum model length"
    r"|max_model_len|tokens \+ `?max_new_tokens`? must be|input is too long"
    r"|context_length_exceeded|exceed_context_size",
    re.IGNORECASE,
)
# OpenAI's invalid_prompt, Azure's content_filter, litellm's content_policy_violation.
_POLICY_CODES = frozenset({"invalid_prompt", "content_filter", "content_policy_violation"})
_POLICY_TEXT_RE = re.compile(
    r"content management policy|violating our usage policy|content_policy|content filter",
    re.IGNORECASE,
)
_QUOTA_RE = re.compile(
    r"insufficient_quota|exceeded your current quota|billing|insufficient credits",
    re.IGNORECASE,
)
_UNSUPPORTED_RE = re.compile(r"unsupported (parameter|value):\s*'([A-Za-z_]+)'", re.IGNORECASE)
# Never dropped by dialect learning: the call would no longer be the same call (the plan
# stage has its own ladder for response_format).
_NEVER_DROP = frozenset({"model", "messages", "response_format", "stream", "max_tokens"})
# finish_reason values that are not a complete answer (besides "length", which the write
# stage continues): vLLM's abort/error are retried, content_filter is a policy refusal.
_RETRY_FINISH = frozenset({"abort", "error"})


# -- errors ---------------------------------------------------------------------------------


class LLMError(Exception):
    """Base of the client's errors."""


class TransientLLMError(LLMError):
    """Worth retrying: throttled, overloaded, dropped, timed out."""

    def __init__(
        self, message: str, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class BadOutputError(TransientLLMError):
    """The endpoint answered 200 with something unusable (invalid JSON body, no content).
    Retried like a transient fault; when retries run out the item is rejected, not the build."""


class EndpointDownError(LLMError):
    """Transient faults outlasted the retry budget: stop the build; a rerun resumes."""


class FatalLLMError(LLMError):
    """A client error retrying cannot fix (401, 403, 404, bad request): stop the build."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class QuotaExceededError(FatalLLMError):
    """The account is out of quota or credit (OpenAI's `insufficient_quota` 429, a 402): it
    never clears by waiting, so it is not retried; the build stops with one line."""


class ContextLengthError(LLMError):
    """The prompt does not fit the model's context window; the caller shrinks and retries."""


class SilentTruncationError(ContextLengthError):
    """The endpoint answered 200 but reported far fewer prompt tokens than were sent: it cut
    the prompt to fit its context (Ollama's /v1 runs at its default num_ctx and drops the
    front, the instruction and plan). Handled like a context-length error."""


class ContentPolicyError(LLMError):
    """The endpoint refused this prompt or its answer on content policy (OpenAI
    `invalid_prompt`, Azure `content_filter`, finish_reason=content_filter). It is about one
    instruction, not the endpoint: the stage stores a rejection and the build goes on."""

    reason = "content_policy"


class ReasoningBudgetError(BadOutputError):
    """The token budget ran out inside the model's reasoning: finish_reason=length, an empty
    answer, reasoning present. Resending at the same budget would pay for the same thinking
    again, so the retry layer never retries it; `LLMClient.chat` resends once with a larger
    budget and then lets it reach the stage, which rejects the item with this reason."""

    reason = "reasoning_budget"


# -- configuration --------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # e.g. http://127.0.0.1:8080/v1
    api_key: str | None = field(default=None, repr=False, compare=False)
    max_concurrency: int = 16

    @property
    def chat_url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"


@dataclass(frozen=True)
class RetryPolicy:
    """Plain data so tests can assert the policy, not just its effects."""

    # The commands' settings (tasks/settings.py) say how often and how long by default.
    max_attempts: int = BUILD.max_attempts
    initial_backoff_s: float = BUILD.initial_backoff_s
    max_backoff_s: float = BUILD.max_backoff_s
    max_retry_after_s: float = 120.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = BUILD.request_timeout_s
    # 429s are not counted against max_attempts: a throttled call keeps waiting (as the
    # server asks, capped) until it has waited this long in all.
    max_throttle_wait_s: float = BUILD.max_throttle_wait_min * 60.0
    # A 429 with no hint of how long to wait pauses its endpoint this long.
    throttle_pause_s: float = 1.0
    # Streamed answers: the longest silence between two chunks (the read timeout of a stream).
    stream_idle_timeout_s: float = 60.0
    # A 200 whose usage.prompt_tokens is under this share of a low estimate of the prompt's
    # tokens (5 characters per token, 0.4 per CJK character: fewer than any real tokenizer
    # counts) was cut by the server.
    min_prompt_token_share: float = 0.6
    min_checked_prompt_tokens: int = 512  # shorter prompts are not checked
    # An endpoint with this many consecutive failures is set aside for `cooldown_s`.
    failures_before_cooldown: int = 3
    cooldown_s: float = 30.0
    # A call whose budget ran out inside the reasoning is resent once with twice the
    # max_tokens, at most this many.
    max_reasoning_tokens: int = 32768
    # The transport under httpx's API: "aiohttp" (httpx-aiohttp) or httpx's own "httpcore".
    http_transport: str = BUILD.http_transport

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before attempt `attempt + 1`: Retry-After when the server gave one
        (capped, plus a little jitter so clients do not return in lockstep), else full-jitter
        exponential backoff."""
        if retry_after is not None and retry_after >= 0:
            # Jitter from the capped wait, and the total capped too: jitter computed from an
            # uncapped Retry-After: 86400 waited up to 8,738 s under a 120 s cap.
            wait = min(retry_after, self.max_retry_after_s)
            return min(self.max_retry_after_s, wait + random.uniform(0, 0.1 * wait))
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * (2 ** (attempt - 1)))
        return random.uniform(0, ceiling)


@dataclass(frozen=True)
class ChatRequest:
    """One logical LLM call. Its key is a hash of everything that determines the answer."""

    stage: str
    messages: tuple[tuple[str, str], ...]  # (role, content) pairs
    prompt_version: str
    max_tokens: int | None = None
    temperature: float = 0.7
    top_p: float | None = None
    response_format: dict[str, Any] | None = None
    extra: tuple[tuple[str, Any], ...] = ()  # other sampling params, e.g. frequency_penalty
    # Routing hint, not part of the key: calls with the same affinity (one instruction's
    # paragraphs) go to the endpoint that served the last of them, whose prompt cache holds
    # their shared prefix (see LLMClient._acquire).
    affinity: str | None = field(default=None, compare=False)

    @staticmethod
    def of(
        stage: str,
        messages: Sequence[dict[str, str]],
        prompt_version: str,
        **params: Any,
    ) -> ChatRequest:
        known = {"max_tokens", "temperature", "top_p", "response_format", "affinity"}
        return ChatRequest(
            stage=stage,
            messages=tuple((m["role"], m["content"]) for m in messages),
            prompt_version=prompt_version,
            extra=tuple(sorted((k, v) for k, v in params.items() if k not in known)),
            **{k: v for k, v in params.items() if k in known},
        )

    def key(self, model: str, body_extras: dict[str, Any] | None = None) -> str:
        """`body_extras`: fields the client adds to every request (`--reasoning-effort`,
        `--extra-body`); they change the answer, so they are part of the key, but only when
        set, so the keys of stores built without them stay the same."""
        payload: dict[str, Any] = {
            "stage": self.stage,
            "prompt_version": self.prompt_version,
            "model": model,
            "params": self.sampling_params(),
            "messages": self.messages,
        }
        if body_extras:
            payload["body"] = body_extras
        blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:40]

    def sampling_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"temperature": self.temperature}
        if self.max_tokens is not None:
            params["max_tokens"] = self.max_tokens
        if self.top_p is not None:
            params["top_p"] = self.top_p
        if self.response_format is not None:
            params["response_format"] = self.response_format
        params.update(dict(self.extra))
        return params


@dataclass(frozen=True)
class ChatResult:
    key: str
    content: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_ms: int
    attempts: int
    model: str
    endpoint: str
    # Reasoning split off the answer (think blocks, reasoning fields): stored beside the
    # answer, never used as one (ARCHITECTURE invariant 10).
    reasoning: str | None = None
    cached_tokens: int = 0
    reasoning_tokens: int = 0


# -- reasoning output -----------------------------------------------------------------------

# Think blocks as reasoning models emit them inside `content` when the server has no reasoning
# parser (vLLM without --reasoning-parser, llama.cpp --reasoning-format none, Ollama's /v1
# for some models): DeepSeek-R1 and Qwen3 use <think>, others <thinking>.
_THINK_BLOCK_RE = re.compile(r"<(think|thinking)>(.*?)</\1>", re.IGNORECASE | re.DOTALL)
_THINK_OPEN_RE = re.compile(r"<(think|thinking)>", re.IGNORECASE)
_THINK_CLOSE_RE = re.compile(r"</(think|thinking)>", re.IGNORECASE)


def split_reasoning(content: str | None, message: dict[str, Any]) -> tuple[str, str | None]:
    """(answer, reasoning) of one chat message. Reasoning comes in three shapes: a separate
    field (`reasoning_content`: DeepSeek, SGLang, older vLLM; `reasoning`: vLLM since #27752,
    OpenRouter, Ollama), closed think blocks inside `content`, and a think block whose opening
    tag the chat template already sent (the content starts inside it and holds a lone closing
    tag) or that never closed (the budget ran out while thinking: all of it is reasoning)."""
    parts: list[str] = []
    for name in ("reasoning_content", "reasoning"):
        value = message.get(name)
        if isinstance(value, str) and value.strip():
            parts.append(value.strip())
            break  # some servers send both names with the same text
    text = content if isinstance(content, str) else ""
    had_tags = False

    def take(m: re.Match[str]) -> str:
        nonlocal had_tags
        had_tags = True
        if m.group(2).strip():
            parts.append(m.group(2).strip())
        return ""

    text = _THINK_BLOCK_RE.sub(take, text)
    closes = list(_THINK_CLOSE_RE.finditer(text))
    close = closes[-1] if closes else None
    if close is not None:  # the template opened the block: everything before it is thinking
        had_tags = True
        before = _THINK_OPEN_RE.sub("", text[: close.start()]).strip()
        if before:
            parts.append(before)
        text = text[close.end() :]
    opened = _THINK_OPEN_RE.search(text)
    if opened is not None:  # never closed: the rest is thinking (cut by max_tokens)
        had_tags = True
        rest = text[opened.end() :].strip()
        if rest:
            parts.append(rest)
        text = text[: opened.start()]
    if had_tags:
        text = text.strip()
    return text, ("\n\n".join(parts) if parts else None)


def _usage_details(usage: dict[str, Any]) -> tuple[int, int]:
    """(cached prompt tokens, reasoning tokens) from OpenAI-style usage details; servers
    that do not report them give zeros."""

    def detail(section: str, name: str) -> int:
        d = usage.get(section)
        value = d.get(name) if isinstance(d, dict) else None
        return int(value) if isinstance(value, int | float) else 0

    return (
        detail("prompt_tokens_details", "cached_tokens"),
        detail("completion_tokens_details", "reasoning_tokens"),
    )


# -- client ---------------------------------------------------------------------------------


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(value: str | None) -> float | None:
    """Seconds from OpenAI's x-ratelimit-reset-* values ("6m0s", "1.5s", "20ms", "1h2m3s"),
    or a plain number of seconds."""
    if not value:
        return None
    value = value.strip().lower()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    parts = _DURATION_RE.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        return None
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


def retry_hint(headers: httpx.Headers) -> float | None:
    """How long the server asks us to wait, in the order openai-python reads it:
    `retry-after-ms`, `Retry-After`, then OpenAI's rate-limit headers (sent on 429s without a
    Retry-After): the reset of each limit that is used up, else the later of the resets."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    after = parse_retry_after(headers.get("retry-after"))
    if after is not None:
        return after
    resets: list[float] = []
    exhausted: list[float] = []
    for kind in ("requests", "tokens"):
        reset = parse_duration(headers.get(f"x-ratelimit-reset-{kind}"))
        if reset is None:
            continue
        resets.append(reset)
        if headers.get(f"x-ratelimit-remaining-{kind}", "").strip() == "0":
            exhausted.append(reset)
    if exhausted:
        return max(exhausted)
    return max(resets) if resets else None


@dataclass(frozen=True)
class Dialect:
    """How one endpoint wants its parameters: OpenAI's reasoning and GPT-5-family models take
    `max_completion_tokens` and refuse `max_tokens` and non-default sampling parameters, while
    llama-cpp-python ignores `max_completion_tokens` (unbounded output) and older servers
    reject it. So it is learned per endpoint from the 400 that names the parameter, or forced
    (`--api-dialect`)."""

    max_tokens_field: str = "max_tokens"
    dropped: frozenset[str] = frozenset()
    learn: bool = True  # auto: switch on the 400s

    @staticmethod
    def named(name: str) -> Dialect:
        if name == "auto":
            return Dialect()
        if name == "chat":  # classic Chat Completions: max_tokens, every parameter as given
            return Dialect(learn=False)
        if name == "openai-reasoning":
            return Dialect(
                "max_completion_tokens",
                frozenset({"temperature", "top_p", "presence_penalty", "frequency_penalty"}),
                learn=False,
            )
        raise ValueError(f"unknown API dialect {name!r}; one of {', '.join(API_DIALECTS)}")


API_DIALECTS = ("auto", "chat", "openai-reasoning")


class RateLimiter:
    """Client-side pacing under the account's limits (`--rpm`, `--tpm`): a token bucket per
    limit, charged before each request, counting the prompt estimate plus max_tokens for the
    tokens limit as OpenAI does. Reservations are made in arrival order on the event loop,
    so callers queue fairly without a lock. The bucket holds half a second of the limit:
    the servers enforce limits over short windows (a minute's burst would be refused), and a
    bucket smaller than the server's keeps arrival jitter from tipping it over."""

    def __init__(self, rpm: float | None, tpm: float | None, burst_s: float = 0.5) -> None:
        self.burst_s = burst_s
        self._limits: list[tuple[float, float]] = [(0.0, 0.0), (0.0, 0.0)]  # (rate/s, capacity)
        self._tat: list[float] = [0.0, 0.0]  # theoretical arrival time per limit (GCRA)
        self._given = (bool(rpm), bool(tpm))
        for i, per_minute in enumerate((rpm, tpm)):
            if per_minute:
                self._set(i, per_minute)
        self.rpm, self.tpm = rpm, tpm

    def _set(self, i: int, per_minute: float) -> None:
        rate = per_minute / 60.0
        self._limits[i] = (rate, max(1.0, rate * self.burst_s))

    @property
    def active(self) -> bool:
        return any(rate for rate, _ in self._limits)

    def learn(self, headers: httpx.Headers) -> None:
        """Adopt the limits the server announces (OpenAI's x-ratelimit-limit-requests and
        -tokens, on every answer) for any limit the user did not give, as curator fills its
        buckets from them: the client then paces itself instead of finding the limit by 429s.
        """
        for i, kind in enumerate(("requests", "tokens")):
            if self._given[i]:
                continue
            value = headers.get(f"x-ratelimit-limit-{kind}")
            try:
                per_minute = float(value) if value else 0.0
            except ValueError:
                continue
            if per_minute > 0 and abs(per_minute / 60.0 - self._limits[i][0]) > 1e-9:
                self._set(i, per_minute)
                if i == 0:
                    self.rpm = per_minute
                else:
                    self.tpm = per_minute

    def push_back(self, seconds: float) -> None:
        """A 429 said the limits are spent for `seconds`: no reservation starts before."""
        until = time.monotonic() + seconds
        for i, (rate, capacity) in enumerate(self._limits):
            if rate:
                self._tat[i] = max(self._tat[i], until + capacity / rate)

    def reserve(self, tokens: int) -> float:
        """Charge one request of `tokens` and return how long to wait before sending it."""
        now = time.monotonic()
        wait = 0.0
        for i, cost in enumerate((1.0, float(tokens))):
            rate, capacity = self._limits[i]
            if not rate:
                continue
            tat = max(self._tat[i], now)
            # Sendable once the bucket (emptied at `tat`) holds `cost`, minus the burst room.
            start = tat + (min(cost, capacity) - capacity) / rate
            wait = max(wait, start - now)
            self._tat[i] = tat + cost / rate
        return max(0.0, wait)


def estimate_prompt_tokens(messages: Sequence[tuple[str, str]]) -> int:
    """A high token estimate of a prompt (~3 characters per token, 1.5 per CJK character, as
    tasks.write.estimate_tokens): rate budgets then err on the safe side."""
    total = 0.0
    for _role, content in messages:
        cjk = len(_CJK_RE.findall(content))
        total += (len(content) - cjk) / 3 + cjk * 1.5 + 4
    return int(total) + 1


def low_prompt_tokens(messages: Sequence[tuple[str, str]]) -> int:
    """A low token estimate of a prompt (5 characters per token, 0.4 per CJK character):
    below what real tokenizers count (about 4 per token on English, 0.6-1.5 per Chinese
    character), so a server reporting far fewer tokens than this did not see the prompt."""
    total = 0.0
    for _role, content in messages:
        cjk = len(_CJK_RE.findall(content))
        total += (len(content) - cjk) / 5 + cjk * 0.4
    return int(total)


_CJK_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def _environment_proxies() -> bool:
    """Whether the environment names an HTTP(S) proxy (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, as
    httpx reads them). httpx mounts those only on its own transport: a client given another
    transport ignores them, and the aiohttp one would go around the proxy."""
    import urllib.request

    return any(k in ("http", "https", "all") for k in urllib.request.getproxies())


def _tls_context(base_urls: Iterable[str]) -> ssl.SSLContext:
    """The verifying TLS context the pools share. With only plain-http endpoints TLS is never
    used: a client context without CA certificates (cheap to make) fails closed should a
    request ever meet TLS."""
    if any(url.lower().startswith("https:") for url in base_urls):
        return httpx.create_ssl_context()
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


class _EndpointState:
    def __init__(self, endpoint: Endpoint, dialect: Dialect) -> None:
        self.endpoint = endpoint
        self.chat_url = httpx.URL(endpoint.chat_url)  # parsed once, not on every request
        self.in_flight = 0  # slots taken, counted under LLMClient._slot_freed
        self.bound = 0  # affinities bound here and not yet released
        self.consecutive_failures = 0
        self.set_aside_until = 0.0
        self.dialect = dialect
        # Adaptive concurrency (AIMD, as NVIDIA Data Designer's client): halved on a 429,
        # +1 after a window of `limit` successes, never above max_concurrency.
        self.limit = float(endpoint.max_concurrency)
        self.successes = 0
        self.last_decrease = 0.0
        self.paused_until = 0.0  # a 429 said when to come back: no request before then

    def free(self) -> int:
        return int(self.limit) - self.in_flight

    def throttled(self, sent_at: float, pause_s: float) -> None:
        """A 429 for a request sent at `sent_at`. Only the first 429 of a burst halves the
        limit: requests sent before the last decrease were sent under the old limit."""
        now = time.monotonic()
        self.paused_until = max(self.paused_until, now + pause_s)
        if sent_at >= self.last_decrease:
            self.limit = max(1.0, self.limit / 2)
            self.last_decrease = now
            self.successes = 0

    def succeeded(self) -> None:
        self.successes += 1
        if self.successes >= max(1, int(self.limit)):
            self.limit = min(float(self.endpoint.max_concurrency), self.limit + 1)
            self.successes = 0


@dataclass
class ClientStats:
    requests: int = 0  # HTTP requests sent, retries included
    retries: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    throttled: int = 0  # 429s
    throttle_wait_s: float = 0.0  # time calls spent waiting out 429s
    rate_wait_s: float = 0.0  # time calls waited for the client's own --rpm/--tpm pacing
    dialect_switches: int = 0
    truncated_prompts: int = 0  # 200s whose prompt the server silently cut
    streamed: int = 0


class LLMClient:
    """Async OpenAI-compatible chat client. Create it inside the event loop that uses it
    (httpx pools are bound to one loop) and use it as an async context manager."""

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        model: str,
        policy: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        reasoning_effort: str | None = None,
        extra_body: dict[str, Any] | None = None,
        api_dialect: str = BUILD.api_dialect,
        rpm: float | None = None,
        tpm: float | None = None,
        stream: bool = False,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one endpoint is required")
        self.model = model
        self.policy = policy or RetryPolicy()
        # Fields sent with every request (and part of every key): OpenAI's reasoning_effort,
        # and whatever a server takes beyond the OpenAI schema (chat_template_kwargs for
        # vLLM/SGLang's enable_thinking, OpenRouter's provider routing, ...).
        self.body_extras: dict[str, Any] = dict(extra_body or {})
        if reasoning_effort:
            self.body_extras["reasoning_effort"] = reasoning_effort
        dialect = Dialect.named(api_dialect)
        self._states = [_EndpointState(e, dialect) for e in endpoints]
        # One limiter for the client: an account's limits cover every endpoint using its key.
        self.limiter = RateLimiter(rpm, tpm)
        self.stream = stream
        # affinity -> endpoint that served its last call (bounded: oldest bindings dropped)
        self._affinity: OrderedDict[str, _EndpointState] = OrderedDict()
        self._slot_freed = asyncio.Condition()
        # Set when the build stops: calls waiting to retry give up; calls on the wire finish.
        self.halted = False
        self._in_flight: set[asyncio.Task[Any]] = set()
        timeout = httpx.Timeout(
            self.policy.read_timeout_s, connect=self.policy.connect_timeout_s, pool=None
        )
        capacity = sum(e.max_concurrency for e in endpoints)
        # One TLS context for every pool: httpx builds one per client otherwise, loading the
        # CA bundle each time (32 clients took 4.4 s of start-up on the loaded 2-core box).
        verify = _tls_context(e.base_url for e in endpoints)
        if (
            transport is None
            and self.policy.http_transport == "aiohttp"
            and AiohttpTransport
            and not _environment_proxies()
        ):
            # One aiohttp pool holds every connection at a flat cost per request: about half
            # the CPU of the best httpcore layout below (bench_http_pool.py). Our own slots
            # (_acquire) bound the requests; the pool's limit only has to stay out of the way.
            # With a proxy in the environment, httpx's own transport below: httpx mounts env
            # proxies (and NO_PROXY) only there, and would send around the proxy here.
            aio = AiohttpTransport(verify=verify, limits=httpx.Limits(max_connections=capacity + 2))
            self._pools = [httpx.AsyncClient(timeout=timeout, transport=aio, verify=verify)]
        else:
            # Several small httpcore pools instead of one big one: httpcore scans every pooled
            # connection on each request, so the CPU per request grows with the pool's size
            # (bench_http_pool.py: 1 pool of 64 cost ~3x what 32 pools of 2 did). Requests go
            # to the least busy pool.
            n_pools = max(1, -(-capacity // POOL_CONNECTIONS))
            limits = httpx.Limits(
                max_connections=POOL_CONNECTIONS + 2, max_keepalive_connections=POOL_KEEPALIVE
            )
            self._pools = [
                httpx.AsyncClient(
                    timeout=timeout, limits=limits, transport=transport, verify=verify
                )
                for _ in range(n_pools)
            ]
        n_pools = len(self._pools)
        self._pool_busy = [0] * n_pools
        # What httpx's build_request would merge into every request, merged once (see _post).
        self._default_headers = {k.decode(): v.decode() for k, v in self._pools[0].headers.raw}
        self._timeout = timeout.as_dict()
        self.stats = ClientStats()

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.drain()
        for pool in self._pools:
            await pool.aclose()

    def halt(self) -> None:
        """The build is stopping: no call retries again (each raises its last error at its
        next retry decision); requests already sent finish (see `shielded`)."""
        self.halted = True

    def shielded(self, work: Coroutine[Any, Any, T]) -> Awaitable[T]:
        """Run `work` (a call and the store write of its answer) so that cancelling the
        caller does not cancel it: when a build stops, the calls in flight are paid for
        already, so they finish and are stored (`drain` waits for them) before it ends."""
        task = asyncio.ensure_future(work)
        self._in_flight.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._in_flight.discard(t)
            if not t.cancelled():
                t.exception()  # retrieved: a halted call's error is not an unhandled one

        task.add_done_callback(done)
        return asyncio.shield(task)

    async def drain(self) -> None:
        """Wait (bounded) for shielded calls still running, then cancel what is left."""
        pending = {t for t in self._in_flight if not t.done()}
        if not pending:
            return
        self.halt()
        limit = min(self.policy.read_timeout_s, 300.0)
        _done, late = await asyncio.wait(pending, timeout=limit)
        for t in late:
            t.cancel()

    def __repr__(self) -> str:  # never shows keys
        urls = [s.endpoint.base_url for s in self._states]
        return f"LLMClient(model={self.model!r}, endpoints={urls!r})"

    @property
    def endpoints(self) -> list[Endpoint]:
        return [s.endpoint for s in self._states]

    def dialect(self, base_url: str) -> Dialect:
        """The dialect learned (or forced) for an endpoint."""
        return next(s.dialect for s in self._states if s.endpoint.base_url == base_url)

    async def _acquire(self, affinity: str | None = None) -> _EndpointState:
        """Take a slot on the healthy endpoint with the most free slots, or on the endpoint
        bound to `affinity` when it has one free: that endpoint's prompt cache holds the
        prefix the affinity's calls share (AgentWrite's instruction, plan and text so far),
        so another endpoint would process the whole prompt again. A new affinity binds to the
        open endpoint with the fewest live bindings, so it does not take the endpoint of a
        chain that is between calls. Preferring never waits: if the bound endpoint is full,
        the call goes elsewhere and the binding moves with it. When every slot is busy, wait
        for whichever endpoint frees one first: choosing an endpoint before waiting would
        queue every waiter on the one that looked best then. An endpoint paused by a 429
        (until the time it gave) and the slots its adaptive limit withholds are not free."""
        async with self._slot_freed:
            while True:
                now = time.monotonic()
                healthy = [s for s in self._states if s.set_aside_until <= now]
                pool = healthy or self._states  # all set aside: still try rather than stall
                open_ = [s for s in pool if s.free() > 0 and s.paused_until <= now]
                if open_:
                    bound = self._affinity.get(affinity) if affinity is not None else None
                    if bound is not None and bound in open_:
                        state = bound
                    elif affinity is not None:
                        state = max(
                            open_, key=lambda s: (-s.bound, s.free(), -s.consecutive_failures)
                        )
                    else:
                        state = max(open_, key=lambda s: (s.free(), -s.consecutive_failures))
                    state.in_flight += 1
                    if affinity is not None and len(self._states) > 1:
                        if state is bound:
                            self._affinity.move_to_end(affinity)
                        else:
                            self._bind(affinity, state)
                    return state
                # An endpoint returning from its cool-down or pause adds capacity: wake then.
                back = [s.set_aside_until - now for s in self._states if s.set_aside_until > now]
                back += [s.paused_until - now for s in self._states if s.paused_until > now]
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot_freed.wait(), min(back) if back else None)

    def _bind(self, affinity: str, state: _EndpointState) -> None:
        self.release_affinity(affinity)
        self._affinity[affinity] = state
        state.bound += 1
        if len(self._affinity) > MAX_AFFINITIES:  # never released: forget the oldest
            _, oldest = self._affinity.popitem(last=False)
            oldest.bound -= 1

    def release_affinity(self, affinity: str) -> None:
        """The affinity's calls are over (an instruction is written): its endpoint no longer
        counts it when binding new ones."""
        state = self._affinity.pop(affinity, None)
        if state is not None:
            state.bound -= 1

    async def _release(self, state: _EndpointState) -> None:
        async with self._slot_freed:
            state.in_flight -= 1
            self._slot_freed.notify()

    def key_for(self, request: ChatRequest) -> str:
        """The stored key of `request` as this client sends it (the dialect is not in it: the
        same logical call, whichever parameter names the endpoint wants)."""
        return request.key(self.model, self.body_extras)

    async def chat(self, request: ChatRequest, key: str | None = None) -> ChatResult:
        """Send one logical call, retrying transient faults; raises FatalLLMError (its
        QuotaExceededError when the account is out of quota), ContentPolicyError,
        ContextLengthError (its SilentTruncationError when the server cut the prompt),
        BadOutputError (retries exhausted on unusable bodies; its ReasoningBudgetError when
        the budget ran out inside the reasoning) or EndpointDownError (retries exhausted on
        transport/5xx, or 429s outlasting max_throttle_wait_s). `key`: `key_for(request)` when
        the caller already has it (the store lookup needed it first; hashed once per call)."""
        key = key or self.key_for(request)
        try:
            return await self._chat(request, key, request.max_tokens)
        except ReasoningBudgetError:
            # The same budget would buy the same unfinished thinking: one more try with
            # twice the room (the key stays: the logical call is the same), then give up.
            budget = request.max_tokens
            if budget is None or budget >= self.policy.max_reasoning_tokens:
                raise
            return await self._chat(request, key, min(2 * budget, self.policy.max_reasoning_tokens))

    async def _chat(self, request: ChatRequest, key: str, max_tokens: int | None) -> ChatResult:
        attempts = 0
        faults = 0  # failed attempts other than 429s, bounded by max_attempts
        throttle_waited = 0.0  # time spent waiting out 429s, bounded by max_throttle_wait_s

        def throttled(exc: BaseException | None) -> bool:
            return (
                isinstance(exc, TransientLLMError)
                and not isinstance(exc, BadOutputError)
                and exc.status == 429
            )

        def stop(state: RetryCallState) -> bool:
            nonlocal faults
            exc = state.outcome.exception() if state.outcome else None
            if self.halted:
                return True
            if throttled(exc):
                return throttle_waited >= self.policy.max_throttle_wait_s
            faults += 1
            return faults >= self.policy.max_attempts

        def wait(state: RetryCallState) -> float:
            nonlocal throttle_waited
            exc = state.outcome.exception() if state.outcome else None
            retry_after = exc.retry_after if isinstance(exc, TransientLLMError) else None
            if throttled(exc):
                # The endpoint is paused until then too (see _acquire); never sleep past the
                # throttle budget.
                left = self.policy.max_throttle_wait_s - throttle_waited
                w = min(self.policy.backoff(1, retry_after), max(0.0, left))
                if retry_after is None:
                    w = min(max(w, self.policy.throttle_pause_s), max(0.0, left))
                throttle_waited += w
                self.stats.throttle_wait_s += w
                return w
            return self.policy.backoff(faults, retry_after)

        # The first attempt runs outside tenacity: nearly every call succeeds at once, and
        # setting up and stepping the retry loop cost more CPU than the rest of the call's
        # bookkeeping (profile, issue 12). A retryable failure is handed to the loop, which
        # decides on it exactly as on any later one.
        first: TransientLLMError | None = None
        attempts = 1
        try:
            return await self._send_once(request, key, 1, max_tokens)
        except ReasoningBudgetError:
            raise
        except TransientLLMError as exc:
            first = exc
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TransientLLMError)
            & retry_if_not_exception_type(ReasoningBudgetError),
            stop=stop,
            wait=wait,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if first is not None:
                        failed, first = first, None
                        raise failed
                    attempts += 1
                    self.stats.retries += 1
                    return await self._send_once(request, key, attempts, max_tokens)
        except BadOutputError:
            raise
        except TransientLLMError as exc:
            what = (
                f"throttled (429) for {throttle_waited:.0f} s"
                if throttled(exc) and not self.halted
                else f"failed after {attempts} attempts"
            )
            raise EndpointDownError(f"{request.stage} call {what}: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _body(
        self, request: ChatRequest, max_tokens: int | None, dialect: Dialect
    ) -> dict[str, Any]:
        params = request.sampling_params()
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": r, "content": c} for r, c in request.messages],
            **params,
            **self.body_extras,
        }
        if dialect.max_tokens_field != "max_tokens" and "max_tokens" in body:
            body[dialect.max_tokens_field] = body.pop("max_tokens")
        for name in dialect.dropped:
            body.pop(name, None)
        if self.stream:
            body["stream"] = True
            # The usage arrives in a last chunk only when asked for (OpenAI, vLLM, SGLang).
            if "stream_options" not in dialect.dropped:
                body["stream_options"] = {"include_usage": True}
        return body

    async def _send_once(
        self, request: ChatRequest, key: str, attempt: int, max_tokens: int | None
    ) -> ChatResult:
        state = await self._acquire(request.affinity)
        endpoint = state.endpoint
        headers = {
            "X-Longwriter-Stage": request.stage,
            "X-Longwriter-Request-Id": key,
            "X-Longwriter-Attempt": str(attempt),
        }
        if endpoint.api_key:
            headers["Authorization"] = f"Bearer {endpoint.api_key}"
        try:
            # A dialect 400 is answered at once with the parameters the endpoint named: the
            # same slot, not a retry (a handful of parameters, so a few rounds at most).
            for _ in range(6):
                body = self._body(request, max_tokens, state.dialect)
                if self.limiter.active:
                    out = body.get(state.dialect.max_tokens_field) or 0
                    pause = self.limiter.reserve(
                        estimate_prompt_tokens(request.messages) + int(out)
                    )
                    if pause > 0:
                        self.stats.rate_wait_s += pause
                        await asyncio.sleep(pause)
                self.stats.requests += 1
                started = time.perf_counter()
                sent_at = time.monotonic()
                try:
                    if self.stream:
                        return await self._stream_once(
                            state, request, key, attempt, body, headers, started
                        )
                    response = await self._post(state.chat_url, body, headers)
                except _DialectLearned:
                    continue
                except _TRANSPORT_ERRORS as exc:
                    self._failed(state, "transport")
                    raise TransientLLMError(
                        f"{type(exc).__name__} from {endpoint.base_url}"
                    ) from None
                status = response.status_code
                self.stats.by_status[str(status)] = self.stats.by_status.get(str(status), 0) + 1
                self.limiter.learn(response.headers)
                if status == 400 and self._learn_dialect(state, body, response):
                    continue
                break
        finally:
            await self._release(state)
        latency_ms = int((time.perf_counter() - started) * 1000)
        if status != 200:
            self._classify_http_error(state, response, sent_at)
        try:
            data = _loads(response.content)
            choice = data["choices"][0]
            message = choice["message"]
            content = message.get("content")
            finish_reason = choice.get("finish_reason")
            usage = data.get("usage") or {}
            if not isinstance(message, dict) or not isinstance(usage, dict):
                raise TypeError("message or usage is not an object")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            self._failed(state, "bad_body")
            raise BadOutputError(f"unparseable response body from {endpoint.base_url}") from None
        return self._result(
            state, request, key, attempt, latency_ms, data, content, message, finish_reason, usage
        )

    async def _stream_once(
        self,
        state: _EndpointState,
        request: ChatRequest,
        key: str,
        attempt: int,
        body: dict[str, Any],
        headers: dict[str, str],
        started: float,
    ) -> ChatResult:
        """One streamed request (SSE): the deltas assembled into the same message a whole
        body carries, checked and stored the same way. The read timeout is the idle limit
        between chunks, so a long generation that keeps sending is never cut, while a
        proxy that would cut a silent non-streamed response (Cloudflare's 524 at ~100 s)
        sees bytes all along."""
        endpoint = state.endpoint
        timeout = httpx.Timeout(
            self.policy.stream_idle_timeout_s, connect=self.policy.connect_timeout_s, pool=None
        )
        i = min(range(len(self._pools)), key=self._pool_busy.__getitem__)
        self._pool_busy[i] += 1
        try:
            async with self._pools[i].stream(
                "POST", endpoint.chat_url, json=body, headers=headers, timeout=timeout
            ) as response:
                status = response.status_code
                self.stats.by_status[str(status)] = self.stats.by_status.get(str(status), 0) + 1
                self.limiter.learn(response.headers)
                if status != 200:
                    await response.aread()
                    if status == 400 and self._learn_dialect(state, body, response):
                        raise _DialectLearned
                    self._classify_http_error(state, response, time.monotonic())
                content: list[str] = []
                reasoning: dict[str, list[str]] = {"reasoning_content": [], "reasoning": []}
                finish_reason = None
                usage: dict[str, Any] = {}
                model = None
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # comments (keep-alives), event names, blank separators
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    try:
                        chunk = json.loads(payload)
                    except ValueError:
                        self._failed(state, "bad_body")
                        raise BadOutputError(
                            f"unparseable stream chunk from {endpoint.base_url}"
                        ) from None
                    if isinstance(chunk.get("error"), dict):  # an error after the 200
                        self._failed(state, "stream_error")
                        raise TransientLLMError(
                            f"error inside the stream from {endpoint.base_url}: "
                            f"{_one_line(str(chunk['error'].get('message', '')), 160)}"
                        )
                    model = chunk.get("model") or model
                    if isinstance(chunk.get("usage"), dict):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or []:
                        delta = choice.get("delta") or {}
                        if isinstance(delta.get("content"), str):
                            content.append(delta["content"])
                        for name, parts in reasoning.items():
                            if isinstance(delta.get(name), str):
                                parts.append(delta[name])
                        finish_reason = choice.get("finish_reason") or finish_reason
        except _TRANSPORT_ERRORS as exc:
            self._failed(state, "transport")
            raise TransientLLMError(f"{type(exc).__name__} from {endpoint.base_url}") from None
        finally:
            self._pool_busy[i] -= 1
        self.stats.streamed += 1
        message: dict[str, Any] = {k: "".join(v) for k, v in reasoning.items() if v}
        text = "".join(content)
        latency_ms = int((time.perf_counter() - started) * 1000)
        data = {"model": model}
        return self._result(
            state, request, key, attempt, latency_ms, data, text, message, finish_reason, usage
        )

    def _result(
        self,
        state: _EndpointState,
        request: ChatRequest,
        key: str,
        attempt: int,
        latency_ms: int,
        data: dict[str, Any],
        content: Any,
        message: dict[str, Any],
        finish_reason: str | None,
        usage: dict[str, Any],
    ) -> ChatResult:
        """One answer checked and split: the same path for a streamed and a whole body."""
        endpoint = state.endpoint
        if finish_reason == "content_filter":
            # The provider's filter stopped the answer: a cut text, refused for this prompt.
            raise ContentPolicyError(
                f"the answer was stopped by the content filter of {endpoint.base_url}"
            )
        if finish_reason in _RETRY_FINISH:
            # vLLM aborted the request (preempted, engine error): a partial answer.
            self._failed(state, f"finish_{finish_reason}")
            raise BadOutputError(f"finish_reason={finish_reason} from {endpoint.base_url}")
        answer, reasoning = split_reasoning(content, message)
        if not answer.strip():
            self._failed(state, "empty")
            if finish_reason == "length" and reasoning:
                raise ReasoningBudgetError(
                    f"max_tokens ran out inside the reasoning ({len(reasoning)} characters "
                    f"of it, no answer) from {endpoint.base_url}"
                )
            raise BadOutputError(f"empty content from {endpoint.base_url}")
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        # The low estimate counts at most 0.4 tokens per character (all CJK): a count above
        # that share of the prompt's length cannot be a cut, and the CJK scan of the whole
        # prompt (a regex over every character, on every answer) is skipped.
        ceiling = 0.4 * sum(len(text) for _role, text in request.messages)
        cleared = prompt_tokens >= self.policy.min_prompt_token_share * ceiling
        estimate = 0 if cleared else low_prompt_tokens(request.messages)
        if (
            prompt_tokens
            and not cleared
            and estimate >= self.policy.min_checked_prompt_tokens
            and prompt_tokens < self.policy.min_prompt_token_share * estimate
        ):
            self.stats.truncated_prompts += 1
            raise SilentTruncationError(
                f"{endpoint.base_url} reported {prompt_tokens} prompt tokens for a prompt of "
                f"at least {estimate}: it cut the prompt to fit its context (Ollama: set "
                "num_ctx / OLLAMA_CONTEXT_LENGTH, see README) "
            )
        state.consecutive_failures = 0
        state.succeeded()
        cached, reasoning_tokens = _usage_details(usage)
        return ChatResult(
            key=key,
            content=answer,
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=int(usage.get("completion_tokens") or 0),
            latency_ms=latency_ms,
            attempts=attempt,
            model=str(data.get("model") or self.model),
            endpoint=endpoint.base_url,
            reasoning=reasoning,
            cached_tokens=cached,
            reasoning_tokens=reasoning_tokens,
        )

    async def _post(
        self, url: httpx.URL | str, body: dict[str, Any], headers: dict[str, str]
    ) -> httpx.Response:
        # The body encoded here (orjson) rather than by httpx's json= (the stdlib encoder);
        # the URL arrives parsed once per endpoint, not once per request.
        content = _dumps(body)
        headers = {**headers, "Content-Type": "application/json"}
        i = min(range(len(self._pools)), key=self._pool_busy.__getitem__)
        self._pool_busy[i] += 1
        pool = self._pools[i]
        try:
            if pool.cookies:  # an endpoint set cookies: httpx's whole path sends them back
                return await pool.post(url, content=content, headers=headers)
            return await self._send_direct(pool, url, content, headers)
        finally:
            self._pool_busy[i] -= 1

    async def _send_direct(
        self, pool: httpx.AsyncClient, url: httpx.URL | str, content: bytes, headers: dict[str, str]
    ) -> httpx.Response:
        """`pool.post(url, content=..., headers=...)` without the client's layers that do
        nothing for these requests: the auth flow (none: the key is a header), the redirect
        loop (never followed), event hooks (none), cookies (none yet: `_post` takes the
        whole path once an endpoint sets one, and this path keeps any it sets), and the
        per-request merging of the client's headers and timeout (merged once). The same
        request on the wire (tests/tasks/llm/test_client.py compares them byte for byte) for
        ~0.18 ms less CPU a request, a tenth of the factory's per call (issue 12). Proxies
        are still the client's: the transport is the one it would pick for the URL."""
        url = httpx.URL(url) if isinstance(url, str) else url
        request = httpx.Request(
            "POST",
            url,
            content=content,
            headers={**self._default_headers, **headers},
            extensions={"timeout": self._timeout},
        )
        response = await pool._transport_for_url(url).handle_async_request(request)
        response.request = request
        try:
            await response.aread()
        except BaseException:
            await response.aclose()
            raise
        if "set-cookie" in response.headers:
            pool.cookies.extract_cookies(response)
        return response

    def _failed(self, state: _EndpointState, _kind: str) -> None:
        state.consecutive_failures += 1
        if (
            state.consecutive_failures >= self.policy.failures_before_cooldown
            and len(self._states) > 1
        ):
            state.set_aside_until = time.monotonic() + self.policy.cooldown_s

    def _learn_dialect(
        self, state: _EndpointState, body: dict[str, Any], response: httpx.Response
    ) -> bool:
        """On OpenAI's 400s for a parameter the model refuses ("Unsupported parameter:
        'max_tokens' ... Use 'max_completion_tokens' instead", "Unsupported value:
        'temperature' ... Only the default (1) value is supported"), switch this endpoint's
        dialect for the rest of the run and say so; True when the request should be resent."""
        if not state.dialect.learn:
            return False
        code, _type, param, message = _error_fields(response)
        m = _UNSUPPORTED_RE.search(message)
        if m is None and code not in ("unsupported_parameter", "unsupported_value"):
            return False
        name = param or (m.group(2) if m else "")
        if not name or name not in body:
            return False
        if name == "max_tokens":
            if "max_completion_tokens" not in message:
                return False
            new = dataclasses.replace(state.dialect, max_tokens_field="max_completion_tokens")
        elif name in _NEVER_DROP:
            return False
        else:
            new = dataclasses.replace(state.dialect, dropped=state.dialect.dropped | {name})
        if new != state.dialect:
            state.dialect = new
            self.stats.dialect_switches += 1
            _log.warning(
                "%s refuses %r: sending %s for the rest of the run",
                state.endpoint.base_url,
                name,
                "max_completion_tokens" if name == "max_tokens" else f"no {name}",
            )
        return True

    def _classify_http_error(
        self, state: _EndpointState, response: httpx.Response, sent_at: float
    ) -> None:
        status = response.status_code
        # Some proxies echo the credential they refused; it must not reach our error line.
        text = _redact(response.text, state.endpoint.api_key)[:500]
        code, type_, _param, message = _error_fields(response)
        where = state.endpoint.base_url
        if status == 402 or (status == 429 and _QUOTA_RE.search(f"{code} {type_} {message}")):
            # Waiting never clears an empty account (BerriAI/litellm #32785): stop at once.
            raise QuotaExceededError(
                f"HTTP {status} from {where}: out of quota or credit: {_one_line(text)}",
                status=status,
            )
        if status in (400, 403, 422) and (
            code in _POLICY_CODES or type_ in _POLICY_CODES or _POLICY_TEXT_RE.search(message)
        ):
            raise ContentPolicyError(f"HTTP {status} from {where}: refused: {_one_line(text)}")
        if status in RETRYABLE_STATUSES:
            self._failed(state, str(status))
            hint = retry_hint(response.headers)
            if status == 429:
                self.stats.throttled += 1
                pause = min(
                    hint if hint is not None else self.policy.throttle_pause_s,
                    self.policy.max_retry_after_s,
                )
                state.throttled(sent_at, pause)
                self.limiter.push_back(pause)
            # The body goes into the message (one line, redacted): when retries run out it is
            # the only clue to what the server disliked.
            raise TransientLLMError(
                f"HTTP {status} from {where}: {_one_line(text, 160)}",
                status=status,
                retry_after=hint,
            )
        if status in (400, 413, 422) and _CONTEXT_ERROR_RE.search(text):
            raise ContextLengthError(f"HTTP {status}: context window exceeded: {_one_line(text)}")
        raise FatalLLMError(f"HTTP {status} from {where}: {_one_line(text)}", status=status)


class _DialectLearned(Exception):
    """Internal: a streamed request's 400 taught the endpoint's dialect; resend."""


def _error_fields(response: httpx.Response) -> tuple[str, str, str, str]:
    """(code, type, param, message) of an OpenAI-shaped error body, lower-cased codes; empty
    strings when the body is not one (a proxy's HTML page, plain text)."""
    try:
        data = response.json()
    except ValueError:
        return "", "", "", response.text[:500]
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, str):
        return "", "", "", err
    if not isinstance(err, dict):
        return "", "", "", str(data.get("message", "")) if isinstance(data, dict) else ""

    def text(name: str) -> str:
        value = err.get(name)
        return str(value) if value is not None else ""

    return text("code").lower(), text("type").lower(), text("param"), text("message")


def _redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"
