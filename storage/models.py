"""The factory's records. The store is the source of truth: every LLM output lands here
before anything uses it, so a rerun resumes from these rows and never pays twice.

Tables:
  run          one row per `longwriter build/eval` invocation (settings without secrets)
  instruction  accepted input records, one per de-duplicated instruction
  rejection    every record or sample that stopped, with stage, reason code and detail
  llm_call     every LLM response: raw text, model, prompt version, usage, latency, finish reason
  plan         parsed AgentWrite plans (steps as JSON)
  paragraph    written paragraphs, one per (instruction, step)
  sample       accepted, assembled samples ready for export
  draft_check  the quality checks' verdict on every plan and paragraph draft
  sample_signature  each sample's MinHash signature, for the export's near-duplicate pass
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy import Column, Index, LargeBinary, Text, UniqueConstraint
from sqlalchemy.orm import configure_mappers
from sqlalchemy.orm.instrumentation import ClassManager, manager_of_class
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


Row = TypeVar("Row", bound=SQLModel)


# A default that is one of these is given as it is (pydantic copies only mutable defaults).
_IMMUTABLE = (str, int, float, bool, type(None), datetime)


@functools.cache
def _row_spec(
    cls: type[SQLModel],
) -> tuple[ClassManager[Any], frozenset[str], tuple[tuple[str, Callable[[], Any]], ...]]:
    """The class manager, the field names and a maker of each default: a factory as it is
    (pydantic's get_default inspects the factory's signature on every call, which was most
    of a row's cost), a constant as itself or a deep copy of a mutable one."""
    defaults: list[tuple[str, Callable[[], Any]]] = []
    for name, info in cls.model_fields.items():
        if info.is_required():
            continue
        factory = info.default_factory
        if factory is not None:
            if info.default_factory_takes_validated_data:
                raise TypeError(f"{cls.__name__}.{name}: a factory of the validated data")
            defaults.append((name, factory))  # type: ignore[arg-type]
        elif isinstance(info.default, _IMMUTABLE):
            defaults.append((name, functools.partial(_same, info.default)))
        else:
            defaults.append((name, functools.partial(copy.deepcopy, info.default)))
    # The ORM configures its mappers at the first __init__ or query; new_instance does not,
    # and a row made before either would have no mapper behind its state.
    configure_mappers()
    return manager_of_class(cls), frozenset(cls.model_fields), tuple(defaults)


def _same(value: Any) -> Any:
    return value


def new_row(cls: type[Row], **values: Any) -> Row:
    """`cls(**values)` for a table model, built the way SQLAlchemy builds a row it loads:
    the instance from its class manager, the values straight into its `__dict__`.

    A table model's own `__init__` validates nothing either, but sets every field through
    SQLAlchemy's attribute events and pydantic's `__setattr__`, and pydantic inspects each
    default factory's signature (51 us an `llm_call` row against 4.5 here): on the build's
    hot path, three rows per paragraph call (the call, the paragraph, the draft's check) made
    it the store's largest CPU cost (issue 12). The row is the same:
    the same field values and defaults (factories called), the same fields-set, a transient
    SQLAlchemy state (the store writes rows' values through Core; a Session takes it too:
    tests/storage/test_models.py). Stricter than `__init__`: an unknown field name is a
    TypeError, not silently dropped."""
    manager, names, defaults = _row_spec(cls)
    if not names.issuperset(values):
        raise TypeError(f"{cls.__name__} has no field {sorted(set(values) - names)}")
    row = manager.new_instance()
    d = row.__dict__
    for name, make in defaults:
        if name not in values:
            d[name] = make()
    d.update(values)
    object.__setattr__(row, "__pydantic_fields_set__", set(values))
    return row


class InstructionStatus(StrEnum):
    """Where an instruction is: pending -> planned -> written -> accepted | rejected.

    The values are the strings stores have always held (the column stays a plain string, so
    a store written before this enum reads the same); a member is a `str` and compares equal
    to its value."""

    PENDING = "pending"
    PLANNED = "planned"
    WRITTEN = "written"
    ACCEPTED = "accepted"
    REJECTED = "rejected"


# Statuses a build still has work for (a rerun resumes them), in pipeline order.
UNFINISHED = (InstructionStatus.PENDING, InstructionStatus.PLANNED, InstructionStatus.WRITTEN)


class RunStatus(StrEnum):
    """A `run` row's status; the values are those stores hold, as for InstructionStatus."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class Run(SQLModel, table=True):
    __tablename__ = "run"
    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(index=True)  # build | eval | export
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
    status: str = RunStatus.RUNNING
    settings_json: str = Field(default="{}", sa_column=Column(Text))
    summary_json: str = Field(default="{}", sa_column=Column(Text))
    error: str | None = Field(default=None, sa_column=Column(Text))


class Instruction(SQLModel, table=True):
    __tablename__ = "instruction"
    __table_args__ = (UniqueConstraint("norm_hash", name="uq_instruction_norm_hash"),)
    id: int | None = Field(default=None, primary_key=True)
    uid: str = Field(index=True, unique=True)  # the input's own id, or a content hash
    prompt: str = Field(sa_column=Column(Text, nullable=False))
    norm_hash: str
    length: int | None = None  # required words, when the input says
    lang: str = "en"
    source: str = ""  # the record's own `source` field, else the input file
    input_file: str = Field(default="", index=True)  # for per-file line accounting
    line_no: int | None = None
    status: str = Field(default=InstructionStatus.PENDING, index=True)  # InstructionStatus
    created_at: datetime = Field(default_factory=utcnow)


class Rejection(SQLModel, table=True):
    __tablename__ = "rejection"
    __table_args__ = (Index("ix_rejection_stage_reason", "stage", "reason"),)
    id: int | None = Field(default=None, primary_key=True)
    stage: str  # ingest | plan | write | filter | generate | judge
    reason: str  # short machine-readable code, e.g. invalid_json, too_short
    detail: str = Field(default="", sa_column=Column(Text))
    instruction_id: int | None = Field(default=None, index=True, foreign_key="instruction.id")
    source: str = ""
    line_no: int | None = None
    raw: str | None = Field(default=None, sa_column=Column(Text))  # excerpt of the bad input/output
    created_at: datetime = Field(default_factory=utcnow)


class LLMCall(SQLModel, table=True):
    __tablename__ = "llm_call"
    # `longwriter stats` sums usage per stage: from this covering index alone it reads a few
    # hundred KB instead of every call's row (0.11 s -> 0.01 s on 42,000 calls).
    __table_args__ = (
        Index(
            "ix_llm_call_usage",
            "stage",
            "prompt_tokens",
            "completion_tokens",
            "attempts",
            "cached_tokens",
            "reasoning_tokens",
        ),
    )
    key: str = Field(primary_key=True)  # idempotency key, also sent as X-Longwriter-Request-Id
    stage: str = Field(index=True)
    model: str
    prompt_version: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: int = 0
    attempts: int = 1
    endpoint: str = ""
    created_at: datetime = Field(default_factory=utcnow)
    cached_tokens: int = 0  # prompt tokens the endpoint served from its prefix cache
    reasoning_tokens: int = 0  # completion tokens spent on reasoning (in completion_tokens)
    # Reasoning split off the answer at the client (think blocks, reasoning fields): kept for
    # audit and cost, never exported, parsed or judged; `content` is the answer alone.
    reasoning: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    # The long texts last: SQLite keeps a long text in overflow pages and walks them to reach
    # any column declared after it, so `stats`' sums over the small columns read every
    # answer's text when it came first (0.19 s -> 0.09 s on 42,000 calls; stores made before
    # keep their order, and every read and write names its columns).
    content: str = Field(sa_column=Column(Text, nullable=False))


class Plan(SQLModel, table=True):
    __tablename__ = "plan"
    instruction_id: int = Field(primary_key=True, foreign_key="instruction.id")
    call_key: str = Field(foreign_key="llm_call.key")
    steps_json: str = Field(sa_column=Column(Text, nullable=False))
    n_steps: int
    total_words: int
    prompt_version: str
    created_at: datetime = Field(default_factory=utcnow)


class Paragraph(SQLModel, table=True):
    __tablename__ = "paragraph"
    # Stats count the cleanings of accepted samples' paragraphs from this index, not from the
    # rows with their text (0.14 s -> 0.005 s on 36,000 paragraphs).
    __table_args__ = (Index("ix_paragraph_cleanings", "instruction_id", "cleanings_json"),)
    instruction_id: int = Field(primary_key=True, foreign_key="instruction.id")
    step: int = Field(primary_key=True)  # 1-based, as in the plan
    call_key: str = Field(foreign_key="llm_call.key")
    # Keys of continuation calls when the first answer stopped at max_tokens.
    continuation_keys: str = ""
    words: int
    truncated: bool = False  # still cut by max_tokens after continuing: never passed as complete
    trimmed: bool = False  # cut by max_tokens with its planned words: ended at its last sentence
    prompt_version: str
    # What the quality checks cut from the accepted draft (tasks.quality.Cleaning as JSON).
    # A plain column with a default (also on the server side, for rows written by an older
    # release), so an older store gains it with that default.
    cleanings_json: str = Field(default="[]", sa_column_kwargs={"server_default": "[]"})
    created_at: datetime = Field(default_factory=utcnow)
    text: str = Field(sa_column=Column(Text, nullable=False))  # last: see LLMCall.content


class DraftCheck(SQLModel, table=True):
    """The quality checks' verdict on one draft of a plan (step 0) or a paragraph: every
    draft, kept or failed, with its reason and cleanings, so why a sample was redrafted or
    rejected is a query. The draft's text is its stored call (`call_key`)."""

    __tablename__ = "draft_check"
    instruction_id: int = Field(primary_key=True, foreign_key="instruction.id")
    stage: str = Field(primary_key=True)  # plan | write
    step: int = Field(primary_key=True)  # 0 for the plan
    attempt: int = Field(primary_key=True)  # 0 = first draft, then one per resample
    call_key: str = ""
    keep: bool = False
    reason: str | None = None
    detail: str = Field(default="", sa_column=Column(Text, nullable=False))
    cleanings_json: str = Field(default="[]", sa_column=Column(Text, nullable=False))
    # Think-block text cut out of the draft: stored apart, never content.
    reasoning: str | None = Field(default=None, sa_column=Column(Text))
    created_at: datetime = Field(default_factory=utcnow)


class Sample(SQLModel, table=True):
    __tablename__ = "sample"
    instruction_id: int = Field(primary_key=True, foreign_key="instruction.id")
    words: int
    n_paragraphs: int
    model: str
    prompt_version: str
    # S_l against the instruction's required length (LongBench-Write's formula); None when
    # the instruction gives none.
    length_score: float | None = None
    # Share of paragraphs whose written words are within the band of their planned words.
    plan_fidelity: float | None = None
    # Judge scores on the six LongBench-Write dimensions when the build had a judge gate.
    quality_json: str | None = Field(default=None, sa_column=Column(Text))
    created_at: datetime = Field(default_factory=utcnow)
    text: str = Field(sa_column=Column(Text, nullable=False))  # last: see LLMCall.content


class SampleSignature(SQLModel, table=True):
    """A sample's MinHash signature (tasks.near_duplicates.signature), computed beside the build
    once its sample is stored, so the export's near-duplicate pass reads it instead of hashing
    every shingle at the end of the run. A cache: valid only while `text_sha1` is the digest
    of its sample's text; the export recomputes (and stores) any other."""

    __tablename__ = "sample_signature"
    instruction_id: int = Field(primary_key=True, foreign_key="instruction.id")
    text_sha1: str
    # NUM_PERM uint32 minima, little-endian (numpy "<u4"): 512 bytes.
    hashvalues: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class SourceFile(SQLModel, table=True):
    """An input file already ingested: the same bytes are never ingested twice on a rerun."""

    __tablename__ = "source_file"
    path: str = Field(primary_key=True)
    sha256: str
    records: int = 0
    accepted: int = 0
    rejected: int = 0
    ingested_at: datetime = Field(default_factory=utcnow)
