"""The configs of single stages that the build's runtime (tasks.runtime.BuildRuntime) carries:
the sample filters', the write call's context budget and the judge gate's.

They live apart from their stages because the runtime holds them and every stage imports the
runtime: defined in tasks/filters.py, tasks/write.py and tasks/quality_gate.py they made the
runtime import those stages back (the import cycle of issue 14). This module imports only
tasks.settings, where the defaults live (it imports no stage); each stage module re-exports
its own config under its old name
(`from tasks.filters import FilterConfig` still works).
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.settings import BUILD, EMBEDDED_CONTEXT_WINDOW


@dataclass(frozen=True)
class FilterConfig:
    """The sample filters' thresholds (tasks.filters)."""

    min_words: int = BUILD.min_words
    # Share of n-gram occurrences that repeat an earlier one.
    max_repetition: float = BUILD.max_repetition
    ngram: int = BUILD.ngram
    # Reject samples whose length score S_l (LongBench-Write's formula, against the
    # instruction's required length) is below this; 0 keeps every length.
    min_length_score: float = BUILD.min_length_score


@dataclass(frozen=True)
class ContextBudget:
    """Token budget of one write call (tasks.write)."""

    context_window: int = EMBEDDED_CONTEXT_WINDOW
    reserve_tokens: int = 256  # chat template tokens, estimate error

    def prompt_budget(self, max_tokens: int) -> int:
        return self.context_window - max_tokens - self.reserve_tokens


@dataclass
class JudgeGate:
    """The build's judge gate (tasks.quality_gate): its settings and the judge endpoint's
    structured-output format (a fallback found by one call serves the rest of the run)."""

    min_quality: float = 0.0
    judge_format: str = "json_schema"
    attempts: int = BUILD.judge_attempts
    max_tokens: int = BUILD.judge_max_tokens
    temperature: float = BUILD.judge_temperature
    context_window: int = EMBEDDED_CONTEXT_WINDOW
