"""The fake server's `answer=` hook: an assertion a test makes inside it (about the request
the factory sent) reaches the test as that assertion's failure, with its message, instead of
as a dropped connection that the client retries and reports as an endpoint error."""

from __future__ import annotations

from typing import Any

import pytest

from tasks.llm.client import ChatRequest, Endpoint, FatalLLMError, LLMClient, RetryPolicy
from tests.fake_openai import FakeConfig, FakeOpenAIServer, default_answer


def strict_answer(stage: str, body: dict[str, Any], cfg: FakeConfig) -> str:
    assert body["temperature"] == 0.25, f"the {stage} call was sent at {body['temperature']}"
    return default_answer(stage, body, cfg)


def _request(temperature: float) -> ChatRequest:
    return ChatRequest.of(
        "write",
        [{"role": "user", "content": "Write one line."}],
        "write@t",
        temperature=temperature,
    )


async def test_an_assertion_in_the_answer_hook_fails_the_test_with_its_message() -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.0, max_backoff_s=0.0)
    with pytest.raises(AssertionError, match="the write call was sent at 0.7") as failed:
        with FakeOpenAIServer(answer=strict_answer).running() as server:
            async with LLMClient([Endpoint(server.base_url)], "m", policy) as client:
                await client.chat(_request(0.25))  # what the hook expects: answered
                await client.chat(_request(0.7))
    # The client got a clear refusal, not a dropped connection, and did not retry it.
    assert isinstance(failed.value.__context__, FatalLLMError)
    assert "answer hook raised AssertionError" in str(failed.value.__context__)
    assert server.stats.by_status[422] == 1
    assert len(server.hook_errors) == 1


async def test_a_hook_that_holds_lets_the_server_answer() -> None:
    policy = RetryPolicy(max_attempts=1)
    with FakeOpenAIServer(answer=strict_answer).running() as server:
        async with LLMClient([Endpoint(server.base_url)], "m", policy) as client:
            result = await client.chat(_request(0.25))
    assert result.content and server.hook_errors == []
