"""Filters over assembled samples. Each returns a `Verdict` (keep, reason, detail); the first
failing filter's reason is stored as the rejection, so tuning a filter is a SQL query over the
rejection table.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from storage.models import InstructionStatus, Sample, new_row
from storage.store import InstructionState
from tasks.eval.scoring import length_score
from tasks.plan import steps_from_json
from tasks.quality import KEEP, REFUSAL_RE, ParagraphContext, Verdict
from tasks.quality import check_language as check_text_language
from tasks.runtime import BuildRuntime, Stage
from tasks.stage_config import FilterConfig
from tasks.wordcount import count_words, join_paragraphs, repetition_share

# Text that only ever comes from a failed call or a crashed script, never from writing.
_ERROR_TEXT_RE = re.compile(
    r"max tries\.? failed|traceback \(most recent call last\)|internal server error"
    r"|rate limit (?:exceeded|reached)|\"error\"\s*:\s*\{|<html[\s>]|502 bad gateway"
    r"|503 service unavailable|request timed out|connection (?:reset|refused)"
    r"|openai\.(?:\w+)?error|api ?error|context_length_exceeded",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class SampleCandidate:
    """An assembled sample before filtering."""

    text: str
    paragraphs: list[str]
    planned_steps: int
    truncated_steps: list[int]
    planned_words: list[int] = field(default_factory=list)  # per step, from the plan
    required_words: int | None = None  # the instruction's required length, when given
    instruction: str = ""
    lang: str | None = None


def check_empty(c: SampleCandidate, _cfg: FilterConfig) -> Verdict:
    empty = [i for i, p in enumerate(c.paragraphs, start=1) if not p.strip()]
    if not c.text.strip() or empty:
        return Verdict(False, "empty", f"empty paragraphs: {empty}" if empty else "empty text")
    return KEEP


# Each alternative of _ERROR_TEXT_RE holds one of these (lower-cased): plain substring tests
# skip the case-insensitive regex for the texts that hold none, nearly all of them (the audit
# of 6,000 long samples spent a tenth of its time in that regex).
_ERROR_TEXT_HINTS = (
    "max tries", "traceback", "internal server", "rate limit", '"error"', "<html", "502 bad",
    "503 service", "timed out", "connection", "openai.", "api error", "apierror",
    "context_length",
)  # fmt: skip


def check_error_text(c: SampleCandidate, _cfg: FilterConfig) -> Verdict:
    low = c.text.lower()
    if not any(h in low for h in _ERROR_TEXT_HINTS):
        return KEEP
    m = _ERROR_TEXT_RE.search(c.text)
    if m:
        return Verdict(False, "error_text", f"contains {m.group(0)!r}")
    return KEEP


def check_refusal(c: SampleCandidate, _cfg: FilterConfig) -> Verdict:
    for i, p in enumerate(c.paragraphs, start=1):
        if REFUSAL_RE.match(p.strip()[:200]):
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


def check_repetition(c: SampleCandidate, cfg: FilterConfig) -> Verdict:
    share = repetition_share(c.text, cfg.ngram)
    if share > cfg.max_repetition:
        return Verdict(
            False,
            "repetition",
            f"{share:.0%} of {cfg.ngram}-grams repeat (max {cfg.max_repetition:.0%})",
        )
    return KEEP


def sample_length_score(c: SampleCandidate) -> float | None:
    """S_l of the sample against the instruction's required length (None when none)."""
    if not c.required_words:
        return None
    return length_score(c.required_words, count_words(c.text))


def check_length_score(c: SampleCandidate, cfg: FilterConfig) -> Verdict:
    score = sample_length_score(c)
    if score is not None and cfg.min_length_score and score < cfg.min_length_score:
        return Verdict(
            False,
            "length_score",
            f"S_l {score:.1f} for {count_words(c.text)} words against a required "
            f"{c.required_words} (minimum {cfg.min_length_score:g})",
        )
    return KEEP


# Written words over planned words of one paragraph inside this band count as following the
# plan; the share of such paragraphs is reported per sample (plan_fidelity), not filtered on.
PLAN_FIDELITY_BAND = (0.5, 2.0)


def plan_fidelity(c: SampleCandidate) -> float | None:
    if not c.planned_words or len(c.planned_words) != len(c.paragraphs):
        return None
    lo, hi = PLAN_FIDELITY_BAND
    inside = sum(
        lo <= count_words(p) / max(1, planned) <= hi
        for p, planned in zip(c.paragraphs, c.planned_words, strict=True)
    )
    return inside / len(c.paragraphs)


def check_language(c: SampleCandidate, _cfg: FilterConfig) -> Verdict:
    """The whole text's language against the instruction's (each paragraph was checked as it
    was drafted; this catches a sample assembled from a store built without the checks)."""
    if not c.instruction:
        return KEEP
    return check_text_language(c.text, ParagraphContext(c.instruction, lang=c.lang))


FILTERS: tuple[Callable[[SampleCandidate, FilterConfig], Verdict], ...] = (
    check_empty,
    check_error_text,
    check_refusal,
    check_truncated,
    check_paragraph_count,
    check_min_words,
    check_repetition,
    check_language,
    check_length_score,
)


def run_filters(c: SampleCandidate, cfg: FilterConfig) -> Verdict:
    """First failing filter's verdict, or KEEP."""
    for f in FILTERS:
        v = f(c, cfg)
        if not v.keep:
            return v
    return KEEP


# -- stage over the store (its Prefect task is flows.stages.filter_batch) --------------------


def build_candidate(state: InstructionState) -> SampleCandidate:
    assert state.plan is not None
    paragraphs = [p.text for p in state.paragraphs]
    steps = steps_from_json(state.plan.steps_json)
    return SampleCandidate(
        text=join_paragraphs(paragraphs),
        paragraphs=paragraphs,
        planned_steps=state.plan.n_steps,
        truncated_steps=[p.step for p in state.paragraphs if p.truncated],
        planned_words=[s.word_count for s in steps],
        required_words=state.instruction.length,
        instruction=state.instruction.prompt,
        lang=state.instruction.lang,
    )


def sample_prompt_versions(state: InstructionState) -> str:
    """The templates the sample was written with, as stored on its plan and paragraphs (the
    write template differs by --write-prompt): "plan@...,write_turns@..."."""
    versions = [state.plan.prompt_version] if state.plan is not None else []
    for p in state.paragraphs:
        if p.prompt_version not in versions:
            versions.append(p.prompt_version)
    return ",".join(versions)


def _outcome(rt: BuildRuntime, state: InstructionState) -> tuple[Verdict, Sample | None]:
    """The filters' verdict on the assembled sample, and the sample to store when kept."""
    inst = state.instruction
    assert inst.id is not None
    candidate = build_candidate(state)
    verdict = run_filters(candidate, rt.config.filters)
    if not verdict.keep:
        return verdict, None
    return verdict, new_row(
        Sample,
        instruction_id=inst.id,
        text=candidate.text,
        words=count_words(candidate.text),
        n_paragraphs=len(candidate.paragraphs),
        model=rt.client.model,
        length_score=sample_length_score(candidate),
        plan_fidelity=plan_fidelity(candidate),
        prompt_version=sample_prompt_versions(state),
    )


async def filter_instruction(rt: BuildRuntime, state: InstructionState) -> bool:
    """Accept the assembled sample or store the first failing filter's reason, through the
    store's batched writer: the stage's samples of one loop turn are written in one
    transaction (one statement per table for all of them) instead of one each, as the write
    stage's are; the same rows, each sample's still all or none (0.55-0.75 -> 0.15-0.3 ms of
    CPU a sample on 1,000)."""
    verdict, sample = _outcome(rt, state)
    inst_id = state.instruction.id
    assert inst_id is not None
    rt.progress.instructions_done += 1
    if sample is None:
        await rt.store.areject(inst_id, "filter", verdict.reason or "rejected", verdict.detail)
        rt.progress.rejected += 1
        return False
    await rt.store.asave(sample, status=(inst_id, InstructionStatus.ACCEPTED))
    rt.progress.accepted += 1
    if rt.signatures is not None:
        rt.signatures.submit(inst_id, sample.text)
    return True


def written_instructions(rt: BuildRuntime, instruction_ids: list[int]) -> list[InstructionState]:
    return [
        s
        for s in rt.store.load_states(instruction_ids)
        if s.instruction.status == InstructionStatus.WRITTEN
    ]


# Filter the written instructions of a batch (no call: checks over the stored text); counts
# the accepted ones.
FILTER_STAGE = Stage(
    "filter", BuildRuntime, written_instructions, filter_instruction, task_retry=False
)
