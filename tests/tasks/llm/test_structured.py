"""tasks.llm.structured: the one structured-output ladder the plan and the judge step down."""

import pytest

from tasks.llm.client import ContextLengthError, EndpointDownError, FatalLLMError
from tasks.llm.structured import LADDER, format_refused, next_format, response_format

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


def test_shapes_of_the_ladder():
    assert response_format("plan", SCHEMA, "json_schema") == {
        "type": "json_schema",
        "json_schema": {"name": "plan", "strict": True, "schema": SCHEMA},
    }
    assert response_format("plan", SCHEMA, "json_object") == {
        "type": "json_object",
        "schema": SCHEMA,
    }
    assert response_format("plan", SCHEMA, "none") is None
    with pytest.raises(ValueError, match="one of json_schema"):
        response_format("plan", SCHEMA, "xml")


def test_the_ladder_steps_down_and_ends_in_words():
    assert LADDER == ("json_schema", "json_object", "none")
    assert [next_format(f) for f in LADDER] == ["json_object", "none", "none"]


@pytest.mark.parametrize(
    ("exc", "refused"),
    [
        # OpenAI-style refusals of the shape itself
        (FatalLLMError("Invalid parameter: 'response_format' of type 'json_schema'", 400), True),
        (FatalLLMError("Input should be 'text' or 'json_object' at response_format", 422), True),
        (FatalLLMError("grammar is not supported", 400), True),
        # llama-cpp-python's 500 after the client's retries
        (EndpointDownError("500: Unsupported response_format type json_schema"), True),
        # refusals of something else: never a reason to change the shape
        (FatalLLMError("Invalid 'messages': empty", 400), False),
        (FatalLLMError("response_format invalid key", 401), False),
        (EndpointDownError("connection refused after 4 attempts"), False),
        (ContextLengthError("json_schema: prompt too long"), False),
    ],
)
def test_format_refused(exc, refused):
    assert format_refused(exc) is refused
