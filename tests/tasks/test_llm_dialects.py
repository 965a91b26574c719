"""Real endpoints at their limits (issue 16): reasoning output, API dialects, errors read from
the body, rate limits, streaming, silent truncation. Each behaviour is emulated by the fake
OpenAI server on loopback (tests/fake_openai.py) the way the real server does it (sources in
/work/shared/docs/ENDPOINTS.md); each test here fails on the client before issue 16."""

from __future__ import annotations

import json

import httpx
import pytest
import respx

from tasks.llm_client import (
    BadOutputError,
    ChatRequest,
    ContentPolicyError,
    ContextLengthError,
    Endpoint,
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

FAST = RetryPolicy(max_attempts=4, initial_backoff_s=0.001, max_backoff_s=0.01)


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
        plain = LLMClient([Endpoint("http://x.test/v1")], "m", FAST)
        tuned = LLMClient(
            [Endpoint("http://x.test/v1")], "m", FAST, reasoning_effort="low", extra_body=extra
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
        async with LLMClient([Endpoint("http://x.test/v1")], "m", FAST) as c:
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
