import json

import pytest

from tasks.eval.judge import (
    JudgeParseError,
    build_judge_request,
    canonical_key,
    fit_response,
    judge_schema,
    parse_judge,
    response_format,
)
from tasks.eval.scoring import DIMENSIONS
from tasks.llm.structured import format_unsupported

KEYS = list(DIMENSIONS)


def scores(*values):
    return dict(zip(KEYS, map(float, values), strict=True))


GOOD = [
    (
        "plain JSON",
        '{"relevance": 5, "accuracy": 4, "coherence": 4, "clarity": 5, '
        '"breadth_and_depth": 3, "reading_experience": 4}',
        scores(5, 4, 4, 5, 3, 4),
    ),
    (
        "fenced, prose around, keys with spaces and capitals",
        "Here is my evaluation of the response:\n```json\n"
        '{"Relevance": 4, "Accuracy": 4, "Coherence": 3, "Clarity": 4, '
        '"Breadth and Depth": 2, "Reading Experience": 3}\n```\nOverall it is decent.',
        scores(4, 4, 3, 4, 2, 3),
    ),
    (
        "single quotes, strings like 4/5, trailing comma, camelCase and dashes",
        "{'relevance': '4/5', 'accuracy': '5/5', 'coherence': '4', 'clarity': 3, "
        "'breadth-and-depth': '3 out of 5', 'readingExperience': 4,}",
        scores(4, 5, 4, 3, 3, 4),
    ),
    (
        "trailing commas in nested prose-surrounded object",
        'Sure! {"relevance": 3, "accuracy": 3, "coherence": 3, "clarity": 3, '
        '"breadth_and_depth": 3, "reading_experience": 2,} Let me know.',
        scores(3, 3, 3, 3, 3, 2),
    ),
    (
        "nested scores with reasons",
        json.dumps(
            {
                "scores": {
                    "Relevance": {"score": 2, "reason": "off topic in places"},
                    "Accuracy": {"score": 3, "reason": "one wrong date"},
                    "Coherence": {"score": "4", "reason": "flows"},
                    "Clarity": {"Score": 4},
                    "Breadth & Depth": {"rating": 2},
                    "Reading_Experience": {"score": 3, "reason": "it's fine"},
                }
            }
        ),
        scores(2, 3, 4, 4, 2, 3),
    ),
    (
        "UPPER and snake/space variants, floats",
        '{"RELEVANCE": 4.5, "ACCURACY": 4, "COHERENCE": 4, "CLARITY": 4, '
        '"BREADTH_AND_DEPTH": 3.5, "READING EXPERIENCE": 4}',
        scores(4.5, 4, 4, 4, 3.5, 4),
    ),
    (
        "a ten-point scale is rescaled",
        '{"relevance": "8/10", "accuracy": "10/10", "coherence": "6/10", "clarity": "4/10", '
        '"breadth_and_depth": "2/10", "reading_experience": "8/10"}',
        scores(4, 5, 3, 2, 1, 4),
    ),
    (
        "list of dimension objects",
        json.dumps(
            [
                {"dimension": "Relevance", "score": 5},
                {"dimension": "Accuracy", "score": 5},
                {"dimension": "Coherence", "score": 4},
                {"dimension": "Clarity", "score": 4},
                {"dimension": "Breadth and depth", "score": 4},
                {"dimension": "Reading experience", "score": 5},
            ]
        ),
        scores(5, 5, 4, 4, 4, 5),
    ),
    (
        "no JSON at all, markdown lines",
        "**Relevance**: 5\n**Accuracy**: 5/5\n- Coherence: 4\n- Clarity - 4\n"
        "Breadth & Depth: 4 out of 5\nReading experience = 5\nGreat work overall.",
        scores(5, 5, 4, 4, 4, 5),
    ),
    (
        "unquoted fraction inside JSON (invalid JSON, rescued line by line)",
        '{"relevance": 4/5, "accuracy": 3/5, "coherence": 4/5, "clarity": 4/5, '
        '"breadth_and_depth": 2/5, "reading_experience": 3/5}',
        scores(4, 3, 4, 4, 2, 3),
    ),
    (
        "an apostrophe in prose before the object",
        "Here's what I think, it's solid:\n"
        '{"relevance": 4, "accuracy": 4, "coherence": 4, "clarity": 4, '
        '"breadth_and_depth": 4, "reading_experience": 4}',
        scores(4, 4, 4, 4, 4, 4),
    ),
    (
        "an incomplete object first, a complete one later",
        '{"relevance": 2}\nSorry, the full scores: {"relevance": 3, "accuracy": 3, '
        '"coherence": 3, "clarity": 3, "breadth_and_depth": 3, "reading_experience": 3}',
        scores(3, 3, 3, 3, 3, 3),
    ),
    (
        "booleans and nulls beside the scores",
        '{"relevance": 4, "accuracy": 4, "coherence": 4, "clarity": 4, '
        '"breadth_and_depth": 4, "reading_experience": 4, "ignored_length": true, "note": null}',
        scores(4, 4, 4, 4, 4, 4),
    ),
]


@pytest.mark.parametrize(("case", "text", "expected"), GOOD, ids=[c[0] for c in GOOD])
def test_parse_judge_copes_with_malformed_answers(case, text, expected):
    assert parse_judge(text) == expected


BAD = [
    ("empty", ""),
    ("whitespace", "   \n"),
    ("prose only", "The response is quite good overall, I would give it high marks."),
    ("template echoed back", '{"relevance": <1-5>, "accuracy": <1-5>, "coherence": <1-5>}'),
    (
        "a dimension missing",
        '{"relevance": 4, "accuracy": 4, "coherence": 4, "clarity": 4, "breadth_and_depth": 4}',
    ),
    (
        "out of range",
        '{"relevance": 0, "accuracy": 7, "coherence": 4, "clarity": 4, '
        '"breadth_and_depth": 4, "reading_experience": 4}',
    ),
    (
        "non-numeric scores",
        '{"relevance": "good", "accuracy": "high", "coherence": "ok", "clarity": "fine", '
        '"breadth_and_depth": "deep", "reading_experience": "nice"}',
    ),
    ("truncated mid-object", '{"relevance": 4, "accuracy": 4, "coherence": 4, "cla'),
    ("booleans are not ratings", '{"relevance": true, "accuracy": true}'),
]


@pytest.mark.parametrize(("case", "text"), BAD, ids=[c[0] for c in BAD])
def test_parse_judge_refuses_answers_without_six_valid_ratings(case, text):
    with pytest.raises(JudgeParseError):
        parse_judge(text)


def test_parse_error_names_missing_dimensions():
    with pytest.raises(JudgeParseError, match="reading_experience"):
        parse_judge(
            '{"relevance": 4, "accuracy": 4, "coherence": 4, "clarity": 4, "breadth_and_depth": 4}'
        )


@pytest.mark.parametrize(
    ("key", "dim"),
    [
        ("Breadth and Depth", "breadth_and_depth"),
        ("breadth & depth", "breadth_and_depth"),
        ("breadthAndDepth", "breadth_and_depth"),
        ("Reading-Experience", "reading_experience"),
        ("readingExperience", "reading_experience"),
        (" Relevance ", "relevance"),
        ("overall", None),
    ],
)
def test_canonical_key(key, dim):
    assert canonical_key(key) == dim


def test_judge_request_carries_prompt_response_and_json_format():
    req, truncated = build_judge_request("Write about tea.", "Tea is a drink.")
    assert not truncated
    assert req.stage == "judge"
    assert len(req.messages) == 1 and req.messages[0][0] == "user"
    text = req.messages[0][1]
    assert "Write about tea." in text and "Tea is a drink." in text
    assert "length" in text.lower()  # the judge is told to ignore length
    for d in DIMENSIONS:
        assert d in text
    rf = req.sampling_params()["response_format"]
    assert rf["type"] == "json_schema"
    assert rf["json_schema"]["schema"] == judge_schema()
    assert set(judge_schema()["required"]) == set(DIMENSIONS)


def test_judge_request_passes_braces_in_user_text_literally():
    req, _ = build_judge_request("{{ 7*7 }} {% raw %}", "{{ response }}")
    assert "{{ 7*7 }} {% raw %}" in req.messages[0][1]
    assert "{{ response }}" in req.messages[0][1]


def test_judge_retries_are_different_requests():
    keys = set()
    for attempt in range(3):
        req, _ = build_judge_request("p", "r", attempt=attempt, temperature=0.0)
        params = req.sampling_params()
        assert params["seed"] == attempt
        keys.add(req.key("judge-model"))
    assert len(keys) == 3
    # The same attempt is the same request (cached, never paid twice).
    a, _ = build_judge_request("p", "r", attempt=1)
    b, _ = build_judge_request("p", "r", attempt=1)
    assert a.key("m") == b.key("m")


def test_response_format_shapes():
    assert response_format("json_object") == {"type": "json_object", "schema": judge_schema()}
    assert response_format("none") is None
    req, _ = build_judge_request("p", "r", fmt="none")
    assert "response_format" not in req.sampling_params()
    with pytest.raises(ValueError):
        response_format("xml")


def test_long_response_is_cut_in_the_middle_to_fit_the_context():
    words = [f"w{i}" for i in range(40000)]
    response = " ".join(words)
    req, truncated = build_judge_request("p", response, context_window=8192, max_tokens=512)
    text = req.messages[0][1]
    assert truncated
    assert "w0 w1 w2" in text and "w39999" in text and "w20000 " not in text
    assert "omitted" in text
    from tasks.write import estimate_tokens

    assert estimate_tokens(text) < 8192 - 512
    short, cut = fit_response("short text", 1000)
    assert (short, cut) == ("short text", False)


@pytest.mark.parametrize(
    ("status", "message", "expected"),
    [
        (422, "Input should be 'text' or 'json_object' at response_format.type", True),
        (400, "json_schema is not supported by this model", True),
        (400, "Invalid 'messages': empty", False),
        (401, "response_format invalid key", False),
        (None, "response_format", False),
    ],
)
def test_format_unsupported(status, message, expected):
    assert format_unsupported(status, message) is expected
