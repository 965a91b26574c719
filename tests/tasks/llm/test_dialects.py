"""Real endpoints at their limits (issue 16): reasoning output, API dialects, errors read from
the body, rate limits, streaming, silent truncation. Each behaviour is emulated by the fake
OpenAI server on loopback (tests/fake_openai.py) the way the real server does it (sources in
/work/shared/docs/ENDPOINTS.md); each test here fails on the client before issue 16."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import httpx
import pytest
import respx

from tasks.llm.client import (
    BadOutputError,
    ChatRequest,
    ContentPolicyError,
    ContextLengthError,
    Endpoint,
    EndpointDownError,
    FatalLLMError,
    LLMClient,
    QuotaExceededError,
    ReasoningBudgetError,
    RetryPolicy,
    parse_duration,
    retry_hint,
    split_reasoning,
)
from tests.fake_openai import CONTEXT_ERRORS, FakeConfig, FakeOpenAIServer

# The fake-server tests run the default (aiohttp) transport, as builds do; the respx ones
# need httpcore (respx intercepts httpx's own transport).
FAST = RetryPolicy(max_attempts=4, initial_backoff_s=0.001, max_backoff_s=0.01)
FAST_RESPX = dataclasses.replace(FAST, http_transport="httpcore")


def request(text: str = "write something", stage: str = "write", **params: object) -> ChatRequest:
    params.setdefault("max_tokens", 64)
    return ChatRequest.of(stage, [{"role": "user", "content": text}], "v@1", **params)


def fake_client(fake: FakeOpenAIServer, policy: RetryPolicy = FAST, **kw: object) -> LLMClient:
    return LLMClient([Endpoint(fake.base_url, max_concurrency=8)], "fake", policy, **kw)


# -- 1. reasoning output --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message", "answer", "reasoning"),
    [
        ("plain answer", {}, "plain answer", None),
        ("<think>\nplan it\n</think>\n\nThe answer.", {}, "The answer.", "plan it"),
        ("<thinking>hm</thinking>The answer.", {}, "The answer.", "hm"),
        ("<THINK>a</THINK> one <think>b</think> two", {}, "one  two", "a\n\nb"),
        # the chat template opened the block: content starts inside it
        ("first I consider...\n</think>\n\nThe answer.", {}, "The answer.", "first I consider..."),
        # never closed: the budget ran out while thinking, there is no answer
        ("<think>\nstill thinking about", {}, "", "still thinking about"),
        ("Intro. <think>cut off", {}, "Intro.", "cut off"),
        ("The answer.", {"reasoning_content": "deep thought"}, "The answer.", "deep thought"),
        ("The answer.", {"reasoning": "vllm thought"}, "The answer.", "vllm thought"),
        (None, {"reasoning": "only thought"}, "", "only thought"),
        ("A < b and c > d, no tags", {}, "A < b and c > d, no tags", None),
    ],
)
def test_split_reasoning(content, message, answer, reasoning):
    assert split_reasoning(content, message) == (answer, reasoning)


@pytest.mark.parametrize("mode", ["think", "think_open", "reasoning_content", "reasoning"])
async def test_reasoning_is_split_from_the_answer(mode):
    with FakeOpenAIServer(FakeConfig(reasoning_mode=mode, reasoning_tokens=40)).running() as fake:
        async with fake_client(fake) as c:
            result = await c.chat(request(max_tokens=400))
    assert "LEAKED-THOUGHT" not in result.content
    assert "</think>" not in result.content and "<think>" not in result.content
    assert result.content.strip()
    assert result.reasoning is not None and "LEAKED-THOUGHT" in result.reasoning
    assert result.reasoning_tokens == 40


async def test_budget_spent_thinking_is_resent_once_with_twice_the_room():
    # 40 tokens of thinking: at max_tokens=30 the budget runs out inside it; at 60 it fits.
    cfg = FakeConfig(reasoning_mode="reasoning_content", reasoning_tokens=40)
    with FakeOpenAIServer(cfg).running() as fake:
        async with fake_client(fake) as c:
            req = request(max_tokens=30)
            result = await c.chat(req)
        bodies = fake.stats.bodies
        ids = list(fake.stats.by_request_id)
    assert [b["max_tokens"] for b in bodies] == [30, 60]
    assert ids == [c.key_for(req)]  # one logical call, one key
    assert result.content.strip() and "LEAKED-THOUGHT" not in result.content


async def test_budget_spent_thinking_twice_fails_without_blind_retries():
    cfg = FakeConfig(reasoning_mode="think", reasoning_tokens=400)
    with FakeOpenAIServer(cfg).running() as fake:
        async with fake_client(fake) as c:
            with pytest.raises(ReasoningBudgetError) as info:
                await c.chat(request(max_tokens=50))
        sent = [b["max_tokens"] for b in fake.stats.bodies]
    assert sent == [50, 100]  # not six tries at 50
    assert info.value.reason == "reasoning_budget"


async def test_reasoning_effort_and_extra_body_reach_the_endpoint_and_the_key():
    seen: list[dict] = []

    def record(req: httpx.Request) -> httpx.Response:
        seen.append(json.loads(req.content))
        return httpx.Response(
            200,
            json={"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]},
        )

    extra = {"chat_template_kwargs": {"enable_thinking": False}}
    with respx.mock() as mock:
        mock.post("http://x.test/v1/chat/completions").mock(side_effect=record)
        plain = LLMClient([Endpoint("http://x.test/v1")], "m", FAST_RESPX)
        tuned = LLMClient(
            [Endpoint("http://x.test/v1")],
            "m",
            FAST_RESPX,
            reasoning_effort="low",
            extra_body=extra,
        )
        async with plain, tuned:
            await tuned.chat(request())
            await plain.chat(request())
    assert seen[0]["reasoning_effort"] == "low"
    assert seen[0]["chat_template_kwargs"] == {"enable_thinking": False}
    assert "reasoning_effort" not in seen[1]
    # Extras change the answer, so they change the key; without them the key is as before.
    assert plain.key_for(request()) == request().key("m")
    assert tuned.key_for(request()) != plain.key_for(request())


# -- 2. dialects learned --------------------------------------------------------------------


async def test_openai_reasoning_400s_switch_the_dialect_and_it_is_remembered():
    with FakeOpenAIServer(FakeConfig(openai_reasoning=True)).running() as fake:
        async with fake_client(fake) as c:
            req = request(temperature=0.7, top_p=0.9)
            first = await c.chat(req)
            second = await c.chat(request("another", temperature=0.7, top_p=0.9))
            dialect = c.dialect(fake.base_url)
        bodies = fake.stats.bodies
        ids = [rid for rid in fake.stats.by_request_id]
    assert first.content and second.content
    # max_tokens -> max_completion_tokens, then temperature, then top_p dropped: 4 requests
    assert "max_tokens" in bodies[0] and "max_completion_tokens" in bodies[1]
    assert [("temperature" in b, "top_p" in b) for b in bodies[:4]] == [
        (True, True),
        (True, True),
        (False, True),
        (False, False),
    ]
    assert len(bodies) == 5  # the second call went out in the learned dialect at once
    assert bodies[4]["max_completion_tokens"] == 64 and "temperature" not in bodies[4]
    assert dialect.max_tokens_field == "max_completion_tokens"
    assert dialect.dropped == {"temperature", "top_p"}
    assert ids[0] == c.key_for(req) == req.key("fake")  # the key does not see the dialect


async def test_forced_dialects():
    with FakeOpenAIServer(FakeConfig(openai_reasoning=True)).running() as fake:
        async with fake_client(fake, api_dialect="chat") as c:
            with pytest.raises(FatalLLMError, match="max_completion_tokens"):
                await c.chat(request())
        assert fake.stats.requests == 1
        async with fake_client(fake, api_dialect="openai-reasoning") as c:
            await c.chat(request(temperature=0.3))
        assert fake.stats.requests == 2  # right the first time
    assert "max_completion_tokens" in fake.stats.bodies[-1]
    with pytest.raises(ValueError, match="unknown API dialect"):
        LLMClient([Endpoint("http://x.test/v1")], "m", api_dialect="gpt")


# -- 3. errors classified from the body -----------------------------------------------------


@pytest.mark.parametrize("marker", ["[[policy]]", "[[azure-policy]]"])
async def test_content_policy_400_is_about_the_prompt(marker):
    with FakeOpenAIServer(FakeConfig()).running() as fake:
        async with fake_client(fake) as c:
            with pytest.raises(ContentPolicyError) as info:
                await c.chat(request(f"<instruction>Write {marker}</instruction>"))
            ok = await c.chat(request("<instruction>Write calmly</instruction>"))
    assert fake.stats.requests == 2 and ok.content  # not retried; the endpoint is fine
    assert info.value.reason == "content_policy" and "\n" not in str(info.value)


async def test_finish_reason_content_filter_is_not_a_complete_answer():
    with FakeOpenAIServer(FakeConfig()).running() as fake:
        async with fake_client(fake) as c:
            with pytest.raises(ContentPolicyError, match="content filter"):
                await c.chat(request("<instruction>Write [[filtered]]</instruction>"))
    assert fake.stats.requests == 1


async def test_vllm_abort_is_retried_not_accepted():
    cfg = FakeConfig(fault_rate=1.0, fault_kinds=("abort",))
    with FakeOpenAIServer(cfg).running() as fake:
        async with fake_client(fake) as c:
            with pytest.raises(BadOutputError, match="finish_reason=abort"):
                await c.chat(request())
    assert fake.stats.requests == FAST.max_attempts


async def test_insufficient_quota_stops_at_once():
    with FakeOpenAIServer(FakeConfig(quota_exhausted=True)).running() as fake:
        async with fake_client(fake) as c:
            with pytest.raises(QuotaExceededError, match="quota") as info:
                await c.chat(request())
    assert fake.stats.requests == 1  # a 429, but one that never clears
    assert isinstance(info.value, FatalLLMError) and "\n" not in str(info.value)


@pytest.mark.parametrize("style", sorted(CONTEXT_ERRORS))
async def test_context_errors_in_each_servers_wording(style):
    cfg = FakeConfig(context_limit_chars=100, context_error_style=style)
    with FakeOpenAIServer(cfg).running() as fake:
        async with fake_client(fake) as c:
            with pytest.raises(ContextLengthError):
                await c.chat(request("x" * 200))
    assert fake.stats.requests == 1


@pytest.mark.parametrize("status", [520, 521, 522, 523, 524])
async def test_cloudflare_statuses_are_transient(status):
    answers = [httpx.Response(status, text=f"error code: {status}")]
    answers.append(
        httpx.Response(
            200, json={"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]}
        )
    )
    with respx.mock() as mock:
        route = mock.post("http://x.test/v1/chat/completions").mock(side_effect=answers)
        async with LLMClient([Endpoint("http://x.test/v1")], "m", FAST_RESPX) as c:
            assert (await c.chat(request())).content == "ok"
    assert route.call_count == 2


# -- 4. Retry-After capped, every server hint read ------------------------------------------


def test_backoff_never_exceeds_the_cap():
    p = RetryPolicy(max_retry_after_s=120.0)
    waits = [p.backoff(1, 86400.0) for _ in range(500)]
    assert max(waits) <= 120.0 and min(waits) >= 119.0
    small = [p.backoff(1, 2.0) for _ in range(500)]
    assert all(2.0 <= w <= 2.2 for w in small)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("6m0s", 360.0), ("1.5s", 1.5), ("20ms", 0.02), ("1h2m3s", 3723.0), ("2", 2.0)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", None, "soon", "5x", "1s junk"])
def test_parse_duration_rejects(bad):
    assert parse_duration(bad) is None


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after": "3"}, 3.0),
        (
            {
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "1.5s",
                "x-ratelimit-remaining-tokens": "900",
                "x-ratelimit-reset-tokens": "6m0s",
            },
            1.5,
        ),
        ({"x-ratelimit-reset-requests": "20ms", "x-ratelimit-reset-tokens": "2s"}, 2.0),
        ({}, None),
    ],
)
def test_retry_hint(headers, seconds):
    assert retry_hint(httpx.Headers(headers)) == seconds


# -- 5. rate limits -------------------------------------------------------------------------


def rate(fake: FakeOpenAIServer) -> float:
    """Admitted answers per minute over the run."""
    t = fake.stats.admitted_at
    return 60.0 * (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else 0.0


async def test_rpm_pacing_stays_under_the_limit_without_429s():
    cfg = FakeConfig(rpm=1200, rate_window_s=1.0)  # 20/s, a bucket of 20
    with FakeOpenAIServer(cfg).running() as fake:
        async with fake_client(fake, rpm=1200) as c:
            await asyncio.gather(*(c.chat(request(f"r{i}")) for i in range(80)))
        assert fake.stats.throttled == 0
        # a half-second burst (10), then 20/s: the 80 calls take at least 3.5 s
        t = fake.stats.admitted_at
        assert t[-1] - t[0] >= 3.5 * 0.95


async def test_rpm_limit_with_headers_only_is_waited_out_not_a_failure():
    """OpenAI's 429s carry x-ratelimit-* headers and no Retry-After; before issue 16 the
    client retried them on its own schedule six times (~15 s at most) and then stopped the
    build. Now every call finishes and most requests are not refused."""
    cfg = FakeConfig(rpm=600, rate_window_s=1.0)  # 10/s
    policy = RetryPolicy(max_attempts=2, initial_backoff_s=0.001, max_backoff_s=0.01)
    with FakeOpenAIServer(cfg).running() as fake:
        async with LLMClient([Endpoint(fake.base_url, max_concurrency=16)], "f", policy) as c:
            results = await asyncio.gather(*(c.chat(request(f"r{i}")) for i in range(40)))
            limit = c._states[0].limit
    assert len(results) == 40
    assert fake.stats.throttled > 0  # the limit was hit (and waited out) ...
    assert fake.stats.throttled < 40  # ... far less than once per call
    assert limit < 16  # adaptive concurrency backed off


async def test_throttle_budget_is_time_not_attempts():
    cfg = FakeConfig(fail_status=429, retry_after_s=0.05)
    policy = RetryPolicy(max_attempts=2, max_throttle_wait_s=0.5, max_retry_after_s=0.1)
    with FakeOpenAIServer(cfg).running() as fake:
        async with fake_client(fake, policy) as c:
            with pytest.raises(EndpointDownError, match="throttled"):
                await c.chat(request())
    assert fake.stats.requests > policy.max_attempts  # 429s did not count as attempts


def test_aimd_halves_once_per_burst_and_probes_back_up():
    from tasks.llm.client import Dialect, _EndpointState

    st = _EndpointState(Endpoint("http://x.test/v1", max_concurrency=16), Dialect())
    sent = time.monotonic()
    st.throttled(sent, 0.0)
    st.throttled(sent, 0.0)  # same burst: sent before the decrease
    assert st.limit == 8
    for _ in range(8):
        st.succeeded()
    assert st.limit == 9
    st.throttled(time.monotonic(), 0.0)
    assert st.limit == 4.5


def test_rate_limiter_paces_requests_and_tokens():
    from tasks.llm.client import RateLimiter

    lim = RateLimiter(rpm=600, tpm=None)  # 10/s, a bucket of 5
    waits = [lim.reserve(100) for _ in range(25)]
    assert waits[:5] == [0.0] * 5 and waits[-1] == pytest.approx(2.0, abs=0.05)
    tok = RateLimiter(rpm=None, tpm=60_000)  # 1,000 tokens/s
    assert tok.reserve(1000) == 0.0
    assert tok.reserve(1000) == pytest.approx(1.0, abs=0.05)


async def test_halted_build_stores_calls_in_flight(tmp_path):
    from storage.store import Store
    from tasks.runtime import gather_all, generate

    store = Store(str(tmp_path / "s.db"))

    async def failing() -> None:
        await asyncio.sleep(0.05)
        raise FatalLLMError("another chain failed")

    with FakeOpenAIServer(FakeConfig(latency_s=0.4)).running() as fake:
        async with fake_client(fake) as c:
            reqs = [request(f"slow {i}") for i in range(3)]
            with pytest.raises(FatalLLMError):
                await gather_all([*(generate(store, c, r) for r in reqs), failing()])
        # leaving the client drained the calls on the wire: all three are stored
    assert all(store.get_call(c.key_for(r)) is not None for r in reqs)
    store.close()


# -- 6. streaming, silent truncation, accounting --------------------------------------------


@pytest.mark.parametrize("mode", [None, "reasoning_content", "think"])
async def test_streamed_answer_is_the_same_answer(mode):
    cfg = FakeConfig(reasoning_mode=mode, prompt_cache=True)
    with FakeOpenAIServer(cfg).running() as fake:
        async with fake_client(fake) as c:
            whole = await c.chat(request("same prompt", max_tokens=400))
        async with fake_client(fake, stream=True) as c:
            streamed = await c.chat(request("same prompt", max_tokens=400))
            assert c.stats.streamed == 1
        body = fake.stats.bodies[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert streamed.content == whole.content and streamed.reasoning == whole.reasoning
    assert (streamed.prompt_tokens, streamed.completion_tokens, streamed.finish_reason) == (
        whole.prompt_tokens,
        whole.completion_tokens,
        whole.finish_reason,
    )
    assert streamed.key == whole.key


async def test_proxy_cuts_silent_long_calls_but_not_streamed_ones():
    # A gateway that gives up after 0.3 s of silence (Cloudflare: ~100 s, then 524).
    cfg = FakeConfig(latency_s=0.6, proxy_timeout_s=0.3)
    policy = RetryPolicy(max_attempts=2, initial_backoff_s=0.0, max_backoff_s=0.0)
    with FakeOpenAIServer(cfg).running() as fake:
        async with fake_client(fake, policy) as c:
            with pytest.raises(EndpointDownError, match="524"):
                await c.chat(request())  # retried (transient), cut again
        async with fake_client(fake, policy, stream=True) as c:
            assert (await c.chat(request())).content
    assert fake.stats.by_status[524] == 2


async def test_stream_idle_timeout():
    cfg = FakeConfig(fault_rate=1.0, fault_kinds=("hang",), hang_s=3.0)
    policy = RetryPolicy(max_attempts=1, stream_idle_timeout_s=0.2)
    with FakeOpenAIServer(cfg).running() as fake:
        async with fake_client(fake, policy, stream=True) as c:
            started = time.monotonic()
            with pytest.raises(EndpointDownError, match="ReadTimeout"):
                await c.chat(request())
    assert time.monotonic() - started < 2.0


async def test_ollama_that_cuts_the_prompt_is_caught():
    from tasks.llm.client import SilentTruncationError

    long_prompt = "<instruction>Write about dunes</instruction> " + "context words " * 2000
    with FakeOpenAIServer(FakeConfig(ollama_num_ctx=1024)).running() as fake:
        async with fake_client(fake) as c:
            with pytest.raises(SilentTruncationError, match="num_ctx"):
                await c.chat(request(long_prompt))
            assert (await c.chat(request("a short prompt"))).content  # fits: accepted
    assert fake.stats.truncated_prompts == 1
    assert issubclass(SilentTruncationError, ContextLengthError)  # the writer shrinks


async def test_cached_and_reasoning_tokens_are_recorded():
    shared = "The shared prefix of one instruction's calls. " * 200
    cfg = FakeConfig(prompt_cache=True, reasoning_mode="reasoning", reasoning_tokens=30)
    with FakeOpenAIServer(cfg).running() as fake:
        async with fake_client(fake) as c:
            first = await c.chat(request(shared + "step 1", max_tokens=400))
            second = await c.chat(request(shared + "step 2", max_tokens=400))
    assert first.cached_tokens == 0 and second.cached_tokens >= 1024
    assert second.reasoning_tokens == 30


def test_an_older_store_gains_the_new_columns_and_stats_count_them(tmp_path):
    import sqlite3

    from storage.models import LLMCall
    from storage.store import Store

    path = tmp_path / "old.db"
    con = sqlite3.connect(path)  # llm_call as it was before issue 16
    con.execute(
        "CREATE TABLE llm_call (key VARCHAR PRIMARY KEY, stage VARCHAR NOT NULL, model VARCHAR "
        "NOT NULL, prompt_version VARCHAR NOT NULL, content TEXT NOT NULL, finish_reason "
        "VARCHAR, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, "
        "latency_ms INTEGER NOT NULL, attempts INTEGER NOT NULL, endpoint VARCHAR NOT NULL, "
        "created_at DATETIME NOT NULL)"
    )
    con.execute(
        "INSERT INTO llm_call VALUES ('old', 'write', 'm', 'v', 'text', 'stop', 5, 7, 1, 1, "
        "'e', '2026-01-01 00:00:00')"
    )
    con.commit()
    con.close()
    store = Store(str(path))
    try:
        old = store.get_call("old")
        assert old is not None and old.reasoning is None and old.cached_tokens == 0
        store.insert(
            LLMCall(
                key="new",
                stage="write",
                model="m",
                prompt_version="v",
                content="answer",
                reasoning="thought",
                cached_tokens=1024,
                reasoning_tokens=30,
            )
        )
        stats = store.stats()["llm_calls"]["write"]
    finally:
        store.close()
    assert stats["cached_tokens"] == 1024 and stats["reasoning_tokens"] == 30


async def test_a_long_chinese_prompt_is_not_taken_for_a_cut_one():
    # The fake counts 4 characters per token, as no tokenizer counts Chinese: still no alarm.
    zh = "<instruction>写一篇关于黄河文化的长篇散文</instruction>" + "黄河文化源远流长。" * 800
    with FakeOpenAIServer(FakeConfig()).running() as fake:
        async with fake_client(fake) as c:
            assert (await c.chat(request(zh))).content
    assert fake.stats.requests == 1
