"""Filters over assembled samples. Each returns a `Verdict` (keep, reason, detail); the first
failing filter's reason is stored as the rejection, so tuning a filter is a SQL query over the
rejection table.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from tasks.wordcount import count_words

_TOKEN_RE = re.compile(r"[a-zA-Z]+|[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")

# Opening phrases of refusals and assistant boilerplate, English and Chinese.
_REFUSAL_RE = re.compile(
    r"^\W*(?:i(?:'m| am) (?:sorry|unable|not able)"
    r"|i can(?:no|')t (?:help|write|assist|fulfil|comply|provide)"
    r"|as an ai(?: language model)?|i apologi[sz]e, but|sorry, (?:but )?i can"
    r"|抱歉|对不起|很抱歉|作为一个?(?:ai|人工智能)|我无法|我不能)",
    re.IGNORECASE,
)
# Text that only ever comes from a failed call or a crashed script, never from writing.
_ERROR_TEXT_RE = re.compile(
    r"max tries\.? failed|traceback \(most recent call last\)|internal server error"
    r"|rate limit (?:exceeded|reached)|\"error\"\s*:\s*\{|<html[\s>]|502 bad gateway"
    r"|503 service unavailable|request timed out|connection (?:reset|refused)"
    r"|openai\.(?:\w+)?error|api ?error|context_length_exceeded",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Verdict:
    keep: bool
    reason: str | None = None
    detail: str = ""


KEEP = Verdict(True)


@dataclass(frozen=True)
class SampleCandidate:
    """An assembled sample before filtering."""

    text: str
    paragraphs: list[str]
    planned_steps: int
    truncated_steps: list[int]


@dataclass(frozen=True)
class FilterConfig:
    min_words: int = 2000
    max_repetition: float = 0.3  # share of 13-gram occurrences that repeat an earlier one
    ngram: int = 13


def check_empty(c: SampleCandidate, _cfg: FilterConfig) -> Verdict:
    empty = [i for i, p in enumerate(c.paragraphs, start=1) if not p.strip()]
    if not c.text.strip() or empty:
        return Verdict(False, "empty", f"empty paragraphs: {empty}" if empty else "empty text")
    return KEEP


def check_error_text(c: SampleCandidate, _cfg: FilterConfig) -> Verdict:
    m = _ERROR_TEXT_RE.search(c.text)
    if m:
        return Verdict(False, "error_text", f"contains {m.group(0)!r}")
    return KEEP


def check_refusal(c: SampleCandidate, _cfg: FilterConfig) -> Verdict:
    for i, p in enumerate(c.paragraphs, start=1):
        if _REFUSAL_RE.match(p.strip()[:200]):
            return Verdict(False, "refusal", f"paragraph {i} opens with {p.strip()[:60]!r}")
    return KEEP


def check_truncated(c: SampleCandidate, _cfg: FilterConfig) -> Verdict:
    if c.truncated_steps:
        return Verdict(
            False, "truncated", f"paragraphs {c.truncated_steps} stopped at the token limit"
        )
    return KEEP


def check_paragraph_count(c: SampleCandidate, _cfg: FilterConfig) -> Verdict:
    if len(c.paragraphs) != c.planned_steps:
        return Verdict(
            False,
            "paragraph_count",
            f"{len(c.paragraphs)} paragraphs written for {c.planned_steps} planned",
        )
    return KEEP


def check_min_words(c: SampleCandidate, cfg: FilterConfig) -> Verdict:
    words = count_words(c.text)
    if words < cfg.min_words:
        return Verdict(False, "too_short", f"{words} words; minimum {cfg.min_words}")
    return KEEP


def repetition_share(text: str, n: int = 13) -> float:
    """Share of n-gram occurrences (over words and CJK characters) that repeat an n-gram seen
    earlier in the text: 0 for fresh prose, near 1 for a model stuck in a loop."""
    tokens = [t.lower() for t in _TOKEN_RE.findall(text)]
    if len(tokens) < n + 1:
        return 0.0
    counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(counts.values())
    repeated = sum(c - 1 for c in counts.values() if c > 1)
    return repeated / total


def check_repetition(c: SampleCandidate, cfg: FilterConfig) -> Verdict:
    share = repetition_share(c.text, cfg.ngram)
    if share > cfg.max_repetition:
        return Verdict(
            False,
            "repetition",
            f"{share:.0%} of {cfg.ngram}-grams repeat (max {cfg.max_repetition:.0%})",
        )
    return KEEP


FILTERS: tuple[Callable[[SampleCandidate, FilterConfig], Verdict], ...] = (
    check_empty,
    check_error_text,
    check_refusal,
    check_truncated,
    check_paragraph_count,
    check_min_words,
    check_repetition,
)


def run_filters(c: SampleCandidate, cfg: FilterConfig) -> Verdict:
    """First failing filter's verdict, or KEEP."""
    for f in FILTERS:
        v = f(c, cfg)
        if not v.keep:
            return v
    return KEEP


# -- stage over the store (thin) ------------------------------------------------------------
from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from prompts import prompt_version  # noqa: E402
from storage.models import Sample  # noqa: E402
from storage.store import InstructionState  # noqa: E402
from tasks.runtime import BuildRuntime, get_runtime  # noqa: E402


def build_candidate(state: InstructionState) -> SampleCandidate:
    from tasks.write import join_paragraphs

    assert state.plan is not None
    paragraphs = [p.text for p in state.paragraphs]
    return SampleCandidate(
        text=join_paragraphs(paragraphs),
        paragraphs=paragraphs,
        planned_steps=state.plan.n_steps,
        truncated_steps=[p.step for p in state.paragraphs if p.truncated],
    )


def filter_instruction(rt: BuildRuntime, state: InstructionState) -> bool:
    """Accept the assembled sample or store the first failing filter's reason."""
    inst = state.instruction
    assert inst.id is not None
    candidate = build_candidate(state)
    verdict = run_filters(candidate, rt.config.filters)
    rt.progress.instructions_done += 1
    if not verdict.keep:
        rt.store.reject(inst.id, "filter", verdict.reason or "rejected", verdict.detail)
        rt.progress.rejected += 1
        return False
    rt.store.save(
        Sample(
            instruction_id=inst.id,
            text=candidate.text,
            words=count_words(candidate.text),
            n_paragraphs=len(candidate.paragraphs),
            model=rt.client.model,
            prompt_version=f"{prompt_version('plan')},{prompt_version('write')}",
        ),
        status=(inst.id, "accepted"),
    )
    rt.progress.accepted += 1
    return True


@task(name="filter", cache_policy=NO_CACHE, persist_result=False)
async def filter_batch(runtime_id: str, instruction_ids: list[int]) -> int:
    """Filter the written instructions of a batch. Returns how many were accepted."""
    rt = get_runtime(runtime_id)
    states = rt.store.load_states(instruction_ids)
    return sum(filter_instruction(rt, s) for s in states if s.instruction.status == "written")
