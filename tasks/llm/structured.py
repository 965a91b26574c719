"""Structured output across endpoint dialects: one ladder of `response_format` shapes.

OpenAI, vLLM and llama.cpp's own llama-server take `json_schema`; llama-cpp-python's server
(the embedded one) answers that shape with an error and takes `json_object` with a `schema`
instead (compiled to a grammar); "none" asks in words only and parses the text. A stage starts
at the shape its endpoint is known to take and steps down the ladder when the endpoint refuses
one (`format_refused`); the step it reached is kept for the run's later calls.
"""

from __future__ import annotations

from typing import Any

from tasks.llm.client import EndpointDownError, FatalLLMError, LLMError

LADDER = ("json_schema", "json_object", "none")


def response_format(name: str, schema: dict[str, Any], fmt: str) -> dict[str, Any] | None:
    """The request's `response_format` for a shape of the ladder (None: ask in words)."""
    if fmt == "json_schema":
        return {
            "type": "json_schema",
            "json_schema": {"name": name, "strict": True, "schema": schema},
        }
    if fmt == "json_object":
        return {"type": "json_object", "schema": schema}
    if fmt == "none":
        return None
    raise ValueError(f"unknown response format {fmt!r}; one of {', '.join(LADDER)}")


def next_format(fmt: str) -> str:
    """The next shape down the ladder ("none" is the last and stays)."""
    return LADDER[min(LADDER.index(fmt) + 1, len(LADDER) - 1)]


# Words an endpoint's refusal of the structured-output request names (not of the prompt).
_FORMAT_WORDS = ("response_format", "json_schema", "json_object", "schema", "grammar")


def format_unsupported(status: int | None, message: str) -> bool:
    """A 4xx that rejects the response_format (not the prompt): try the next shape."""
    msg = message.lower()
    return status in (400, 404, 422) and any(word in msg for word in _FORMAT_WORDS)


def format_refused(exc: LLMError) -> bool:
    """The endpoint rejected the structured-output request itself. OpenAI-style servers say
    so with 400/404/422 naming the field; llama-cpp-python answers the OpenAI shape with a 500
    that names the accepted types, which arrives as EndpointDownError after the client's
    retries (read as a 400)."""
    if isinstance(exc, FatalLLMError):
        return format_unsupported(exc.status, str(exc))
    return isinstance(exc, EndpointDownError) and format_unsupported(400, str(exc))
