"""The LongBench-Write quality judge: request building and answer parsing (pure).

The judge rates six dimensions 1-5 (`tasks.eval.scoring.DIMENSIONS`) and is told to ignore length.
We ask for JSON with `response_format` where the endpoint supports it, but small or remote
judges often ignore it, so the parser takes the answer as it comes: fenced or surrounded by
prose, single-quoted, with trailing commas, keys spelled "Breadth and Depth" or
"readingExperience", scores as 4, "4", "4/5", "8/10" or {"score": 4, "reason": ...}, and as a
last resort `key: 4` lines when no JSON object survives at all. An answer missing a dimension
or rating outside 1-5 is not a score: the caller asks again with a varied request (another
seed and temperature, hence another idempotency key) a bounded number of times, then reports
the prompt as unscored.
"""

from __future__ import annotations

import ast
import asyncio
import json
import re
from typing import Any, Protocol

from prompts import prompt_version, render
from storage.store import Store
from tasks.eval.scoring import DIMENSIONS
from tasks.llm import structured
from tasks.llm.client import (
    BadOutputError,
    ChatRequest,
    ContextLengthError,
    EndpointDownError,
    FatalLLMError,
    LLMClient,
)
from tasks.llm.structured import LADDER
from tasks.runtime import Progress, generate
from tasks.settings import BUILD
from tasks.wordcount import estimate_tokens

JUDGE_TEMPLATE = "judge"
STAGE = "judge"

# The structured-output shapes the judge may be asked in (tasks.llm.structured's ladder).
FORMATS = LADDER


def judge_format_for(setting: str, embedded: bool) -> str:
    """auto: llama-cpp-python's server (the embedded one) answers json_schema with HTTP 500,
    so it gets json_object; others json_schema (and fall back when refused)."""
    if setting == "auto":
        return "json_object" if embedded else "json_schema"
    if setting not in FORMATS:
        raise ValueError(f"judge format must be auto or one of {', '.join(FORMATS)}")
    return setting


class JudgeParseError(ValueError):
    """The judge's answer holds no complete, valid set of six ratings."""


def judge_schema() -> dict[str, Any]:
    # An enum, not minimum/maximum: llama.cpp's schema-to-grammar conversion ignores numeric
    # bounds (SmolLM2 then "rates" 1, 2, 3, 4, 5, 6), but it does enforce enums.
    rating = {"type": "integer", "enum": [1, 2, 3, 4, 5]}
    return {
        "type": "object",
        "properties": {d: rating for d in DIMENSIONS},
        "required": list(DIMENSIONS),
        "additionalProperties": False,
    }


def response_format(fmt: str) -> dict[str, Any] | None:
    return structured.response_format("judge_scores", judge_schema(), fmt)


def fit_response(response: str, budget_tokens: int) -> tuple[str, bool]:
    """The response, or its opening and ending around an omission marker when it would not
    fit the judge's context. Returns (text, truncated)."""
    if estimate_tokens(response) <= budget_tokens:
        return response, False
    # estimate_tokens is ~linear in characters: keep that share of the text, half each end.
    keep = max(200, int(len(response) * budget_tokens / max(1, estimate_tokens(response))) - 60)
    head, tail = response[: keep // 2], response[len(response) - keep // 2 :]
    return f"{head}\n\n[... middle of the response omitted ...]\n\n{tail}", True


def attempt_params(attempt: int, temperature: float) -> tuple[float, int]:
    """(temperature, seed) of judge attempt `attempt` (0-based): each retry is a different
    request, so a stored unparseable answer is not simply replayed."""
    return min(1.0, temperature + 0.3 * attempt), attempt


def build_judge_request(
    prompt: str,
    response: str,
    *,
    attempt: int = 0,
    fmt: str = "json_schema",
    max_tokens: int = BUILD.judge_max_tokens,
    temperature: float = BUILD.judge_temperature,
    context_window: int | None = None,
) -> tuple[ChatRequest, bool]:
    """The judge call for one (prompt, response) and whether the response was cut to fit."""
    truncated = False
    if context_window is not None:
        overhead = estimate_tokens(
            render(JUDGE_TEMPLATE, prompt=prompt, response="", truncated=True)
        )
        budget = context_window - max_tokens - overhead - 256  # chat template, estimate error
        response, truncated = fit_response(response, max(200, budget))
    content = render(JUDGE_TEMPLATE, prompt=prompt, response=response, truncated=truncated)
    temp, seed = attempt_params(attempt, temperature)
    params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temp, "seed": seed}
    rf = response_format(fmt)
    if rf is not None:
        params["response_format"] = rf
    request = ChatRequest.of(
        STAGE, [{"role": "user", "content": content}], prompt_version(JUDGE_TEMPLATE), **params
    )
    return request, truncated


# -- parsing --------------------------------------------------------------------------------

_FENCE_RE = re.compile(r"```[a-zA-Z]*\s*\n?(.*?)```", re.DOTALL)
_TRAILING_COMMA_RE = re.compile(r",\s*([}\]])")
_CAMEL_RE = re.compile(r"(?<=[a-z])(?=[A-Z])")
_NUMBER_RE = re.compile(r"(-?\d+(?:\.\d+)?)\s*(?:(?:/|out\s+of|of)\s*(\d+(?:\.\d+)?))?", re.I)

# Compact key (lowercase letters only) -> dimension.
_ALIASES: dict[str, str] = {
    "relevance": "relevance",
    "relevancy": "relevance",
    "accuracy": "accuracy",
    "coherence": "coherence",
    "clarity": "clarity",
    "breadthanddepth": "breadth_and_depth",
    "breadthdepth": "breadth_and_depth",
    "depthandbreadth": "breadth_and_depth",
    "depthbreadth": "breadth_and_depth",
    "breadth": "breadth_and_depth",
    "readingexperience": "reading_experience",
    "readability": "reading_experience",
    "experience": "reading_experience",
}


def canonical_key(key: str) -> str | None:
    """The dimension a key names, whatever its spelling ("Breadth & Depth", "reading-exp...")."""
    compact = re.sub(r"[^a-z]", "", _CAMEL_RE.sub("_", key).lower())
    return _ALIASES.get(compact)


def _rating(value: Any) -> float | None:
    """A 1-5 rating from 4, 4.5, "4", "4/5", "8/10", "4 out of 5", {"score": 4}."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        x = float(value)
    elif isinstance(value, str):
        m = _NUMBER_RE.search(value)
        if m is None:
            return None
        x = float(m.group(1))
        if m.group(2):
            scale = float(m.group(2))
            if scale <= 0:
                return None
            x = x * 5.0 / scale  # "8/10" is a 4 on the 1-5 scale
    elif isinstance(value, dict):
        for k in ("score", "rating", "value", "points"):
            for kk, v in value.items():
                if isinstance(kk, str) and kk.lower() == k:
                    return _rating(v)
        return None
    elif isinstance(value, list) and value:
        return _rating(value[0])
    else:
        return None
    return x if 1.0 <= x <= 5.0 else None


def _loads(text: str) -> Any:
    """JSON, else the same after mending trailing commas, else a Python literal (single
    quotes, True/None), else None."""
    for candidate in (text, _TRAILING_COMMA_RE.sub(r"\1", text)):
        try:
            return json.loads(candidate)
        except ValueError:
            pass
        try:
            pyish = re.sub(r"\btrue\b", "True", re.sub(r"\bfalse\b", "False", candidate))
            pyish = re.sub(r"\bnull\b", "None", pyish)
            return ast.literal_eval(pyish)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            pass
    return None


def _objects(text: str) -> list[str]:
    """Candidate JSON object texts: fenced blocks first, then every balanced {...} (outermost
    first), so prose around or between them does not matter."""
    found = [m.group(1).strip() for m in _FENCE_RE.finditer(text)]
    found.append(text.strip())
    depth = 0
    start = -1
    quote: str | None = None
    escaped = False
    for i, ch in enumerate(text):
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
            continue
        if ch in "\"'" and depth > 0:
            # An apostrophe inside prose ("it's") must not open a string: only treat a quote
            # as a string delimiter when it follows JSON punctuation.
            prev = text[:i].rstrip()[-1:] if text[:i].rstrip() else ""
            if prev in "{[,:":
                quote = ch
            continue
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                found.append(text[start : i + 1])
    return found


def _collect(obj: Any, out: dict[str, float]) -> None:
    """Ratings found anywhere in a parsed value (top level wins over nested)."""
    if isinstance(obj, dict):
        nested: list[Any] = []
        for k, v in obj.items():
            dim = canonical_key(str(k))
            if dim is not None and dim not in out:
                r = _rating(v)
                if r is not None:
                    out[dim] = r
                    continue
            if isinstance(v, dict | list):
                nested.append(v)
        for v in nested:
            _collect(v, out)
    elif isinstance(obj, list):
        for v in obj:
            # [{"dimension": "clarity", "score": 4}, ...]
            if isinstance(v, dict):
                name = next(
                    (v[k] for k in v if str(k).lower() in ("dimension", "name", "criterion")),
                    None,
                )
                if isinstance(name, str):
                    dim = canonical_key(name)
                    r = _rating(v)
                    if dim is not None and r is not None and dim not in out:
                        out[dim] = r
                        continue
            _collect(v, out)


# Spellings of each dimension in free text, for answers with no parseable object.
_NAME_RES: dict[str, str] = {
    "relevance": r"relevan(?:ce|cy)",
    "accuracy": r"accuracy",
    "coherence": r"coherence",
    "clarity": r"clarity",
    "breadth_and_depth": r"(?:breadth[\W_]*(?:and[\W_]*)?depth|depth[\W_]*(?:and[\W_]*)?breadth)",
    "reading_experience": r"reading[\W_]*experience",
}
_VALUE = r"[\"'\s*_]*[:=\-\u2013]\s*[*_]*\s*[\"']?(\d+(?:\.\d+)?(?:\s*(?:/|out\s+of)\s*\d+)?)"
_LINE_RES: dict[str, re.Pattern[str]] = {
    d: re.compile(r"\b" + name + _VALUE, re.I) for d, name in _NAME_RES.items()
}


def _scan_lines(text: str) -> dict[str, float]:
    """Last resort for answers with no parseable object: `Relevance: 4/5`, `"clarity": 4/5`
    or `**Reading experience** - 3` anywhere in the text (first valid rating of each)."""
    out: dict[str, float] = {}
    for dim, pattern in _LINE_RES.items():
        for m in pattern.finditer(text):
            r = _rating(m.group(1))
            if r is not None:
                out[dim] = r
                break
    return out


def parse_judge(text: str) -> dict[str, float]:
    """The six ratings (1-5) in a judge answer, or JudgeParseError."""
    if not text or not text.strip():
        raise JudgeParseError("empty judge answer")
    best: dict[str, float] = {}
    for candidate in _objects(text):
        obj = _loads(candidate)
        if obj is None:
            continue
        found: dict[str, float] = {}
        _collect(obj, found)
        if len(found) == len(DIMENSIONS):
            return {d: found[d] for d in DIMENSIONS}
        if len(found) > len(best):
            best = found
    found = _scan_lines(text)
    if len(found) == len(DIMENSIONS):
        return {d: found[d] for d in DIMENSIONS}
    if len(found) > len(best):
        best = found
    missing = [d for d in DIMENSIONS if d not in best]
    raise JudgeParseError(
        f"judge answer lacks valid 1-5 ratings for {', '.join(missing)}"
        if best
        else "no ratings found in judge answer"
    )


# -- judging one answer (shared by eval and pairs) -------------------------------------------


class JudgeVerdictRow(Protocol):
    """The fields eval's and pairs' verdict rows share; `judge_answer` fills them."""

    status: str
    scores_json: str | None
    raw: str | None
    error: str | None
    truncated: bool
    attempts: int
    call_keys: str


class JudgeFormatHolder(Protocol):
    """Where the structured-output format that works with this judge endpoint is kept (one
    per run: a fallback found by one call serves the next)."""

    judge_format: str


async def judge_answer(
    row: JudgeVerdictRow,
    prompt: str,
    response: str,
    *,
    store: Store,
    client: LLMClient,
    progress: Progress | None,
    slots: asyncio.Semaphore,
    formats: JudgeFormatHolder,
    attempts: int,
    max_tokens: int,
    temperature: float,
    context_window: int,
) -> None:
    """Up to `attempts` judge calls (each a varied request, so a new idempotency key) until
    one parses; fills `row` with the scores, or with why none came (never dropped). Hard LLM
    failures propagate; a structured-output format the endpoint rejects moves to the next."""
    call_keys: list[str] = []
    errors: list[str] = []
    attempt = 0
    while attempt < attempts:
        fmt = formats.judge_format
        request, truncated = build_judge_request(
            prompt,
            response,
            attempt=attempt,
            fmt=fmt,
            max_tokens=max_tokens,
            temperature=temperature,
            context_window=context_window,
        )
        row.truncated = truncated
        try:
            async with slots:
                call = await generate(store, client, request, progress)
        except (FatalLLMError, EndpointDownError) as exc:
            if fmt != "none" and structured.format_refused(exc):
                # The endpoint has no structured output of this shape: ask the next way.
                if formats.judge_format == fmt:
                    formats.judge_format = structured.next_format(fmt)
                continue
            raise
        except BadOutputError as exc:
            errors.append(f"attempt {attempt + 1}: {exc}")
            attempt += 1
            continue
        except ContextLengthError as exc:
            row.status, row.error = "error", f"judge context overflow: {exc}"
            break
        call_keys.append(call.key)
        attempt += 1
        try:
            scores = parse_judge(call.content)
        except JudgeParseError as exc:
            errors.append(f"attempt {attempt}: {exc}")
            row.raw = call.content[:4000]
            continue
        row.status = "scored"
        row.scores_json = json.dumps(scores, sort_keys=True)
        row.raw = None
        break
    row.attempts = attempt
    row.call_keys = ",".join(call_keys)
    if row.status != "scored" and row.error is None:
        row.error = "; ".join(errors)[:4000] or None
