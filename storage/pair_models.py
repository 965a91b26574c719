"""Records of `longwriter pairs` (DPO preference pairs), kept apart from the build's tables.

Registered on import of the storage package (storage/__init__.py), like every table, so
`Store(url)` creates them whichever module was imported first.

  pair_variant_paragraph  one paragraph of one extra AgentWrite sample: the instruction's
                          stored plan written again with other sampling (variant >= 1),
                          keyed by (instruction, variant, step); a rerun resumes a variant at
                          its first missing step.
  pair_variant_sample     one whole candidate response per (instruction, variant): variant 0
                          is a copy of the accepted build sample, variants 1..K the extra ones;
                          a variant that could not be written is a row too (status `failed`,
                          with the reason), so it is counted, not forgotten.
  pair_judgement          the judge's verdict on one variant, keyed by (instruction, variant,
                          judge model, judge prompt version): six ratings or `unparsed`/`error`
                          with the raw answer after the bounded attempts.
  pair_decision           per instruction, the outcome of the last selection: `paired` with the
                          chosen and rejected variant and their scores, or `skipped` with the
                          reason (too few scored variants, margin below --min-margin, ...).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, Text
from sqlmodel import Field, SQLModel

from storage.models import utcnow


class VariantParagraph(SQLModel, table=True):
    __tablename__ = "pair_variant_paragraph"
    instruction_id: int = Field(primary_key=True, foreign_key="instruction.id")
    variant: int = Field(primary_key=True)  # >= 1; variant 0 is the build's own sample
    step: int = Field(primary_key=True)  # 1-based, as in the plan
    call_key: str = Field(foreign_key="llm_call.key")
    continuation_keys: str = ""  # comma-separated llm_call keys of continuation calls
    text: str = Field(sa_column=Column(Text, nullable=False))
    words: int
    truncated: bool = False  # still cut by max_tokens after continuing
    prompt_version: str
    created_at: datetime = Field(default_factory=utcnow)


class VariantSample(SQLModel, table=True):
    __tablename__ = "pair_variant_sample"
    instruction_id: int = Field(primary_key=True, foreign_key="instruction.id")
    variant: int = Field(primary_key=True)
    status: str = "written"  # written | failed
    origin: str = "variant"  # build (variant 0, the accepted sample) | variant
    text: str = Field(default="", sa_column=Column(Text, nullable=False))
    words: int = 0
    n_paragraphs: int = 0
    # First failing quality filter (tasks.filters, minus the length floor), None when clean: a
    # variant that fails one may still be a *rejected* answer, never a chosen one.
    filter_reason: str | None = None
    error: str | None = Field(default=None, sa_column=Column(Text))
    model: str = ""
    temperature: float | None = None
    seed: int | None = None
    created_at: datetime = Field(default_factory=utcnow)


class PairJudgement(SQLModel, table=True):
    __tablename__ = "pair_judgement"
    instruction_id: int = Field(primary_key=True, foreign_key="instruction.id")
    variant: int = Field(primary_key=True)
    judge_model: str = Field(primary_key=True)
    prompt_version: str = Field(primary_key=True)  # judge template version
    status: str  # scored | unparsed | error
    scores_json: str | None = Field(default=None, sa_column=Column(Text))  # {dimension: 1-5}
    attempts: int = 0
    call_keys: str = ""
    truncated: bool = False  # the response was cut in the middle to fit the judge's context
    error: str | None = Field(default=None, sa_column=Column(Text))
    raw: str | None = Field(default=None, sa_column=Column(Text))  # last unparseable answer
    created_at: datetime = Field(default_factory=utcnow)


class PairDecision(SQLModel, table=True):
    __tablename__ = "pair_decision"
    instruction_id: int = Field(primary_key=True, foreign_key="instruction.id")
    status: str  # paired | skipped
    reason: str = ""  # skipped: too_few_scored | no_clean_best | low_margin
    detail: str = Field(default="", sa_column=Column(Text))
    chosen_variant: int | None = None
    rejected_variant: int | None = None
    chosen_score: float | None = None
    rejected_score: float | None = None
    margin: float | None = None
    scored: int = 0  # variants with a judge score
    candidates: int = 0  # variants written (incl. variant 0)
    judge_model: str = ""
    created_at: datetime = Field(default_factory=utcnow)
