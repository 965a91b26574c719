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
    ChatRequest,
    Endpoint,
    LLMClient,
    ReasoningBudgetError,
    RetryPolicy,
    split_reasoning,
)
from tests.fake_openai import FakeConfig, FakeOpenAIServer

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


