"""Records of `longwriter eval` (LongBench-Write), kept apart from the build's tables.

Registered on import of the storage package (storage/__init__.py), like every table, so
`Store(url)` creates them whichever module was imported first.

  eval_generation  one answer of the evaluated model to one prompt, keyed by the generation
                   request's idempotency key (model + prompt + sampling parameters): a rerun of
                   the same evaluation finds it and never asks again. An answer that never came
                   (bad output after retries, prompt over the context window) is a row too,
                   with an empty response and the reason, so it is scored, not forgotten.
  eval_judgement   the judge's verdict on one generation, keyed by (generation, judge model,
                   judge prompt version): the six ratings, or `unparsed` with the raw answers
                   after the bounded attempts.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, Text
from sqlmodel import Field, SQLModel

from storage.models import utcnow


class EvalGeneration(SQLModel, table=True):
    __tablename__ = "eval_generation"
    key: str = Field(primary_key=True)  # the generate request's key (ChatRequest.key(model))
    model: str = Field(index=True)
    prompt: str = Field(sa_column=Column(Text, nullable=False))
    length: int  # required length
    type: str = ""
    lang: str = "en"
    response: str = Field(default="", sa_column=Column(Text, nullable=False))
    response_length: int = 0  # tasks.wordcount.count_words(response)
    status: str = "ok"  # ok | bad_output | context_overflow
    error: str | None = Field(default=None, sa_column=Column(Text))
    finish_reason: str | None = None
    call_key: str | None = None  # llm_call.key of the stored answer, when there is one
    max_tokens: int | None = None
    temperature: float  # the request's (flows.eval: EvalSettings.temperature)
    created_at: datetime = Field(default_factory=utcnow)


class EvalJudgement(SQLModel, table=True):
    __tablename__ = "eval_judgement"
    generation_key: str = Field(primary_key=True, foreign_key="eval_generation.key")
    judge_model: str = Field(primary_key=True)
    prompt_version: str = Field(primary_key=True)  # judge template version
    status: str  # scored | unparsed | error
    scores_json: str | None = Field(default=None, sa_column=Column(Text))  # {dimension: 1-5}
    attempts: int = 0
    call_keys: str = ""  # comma-separated llm_call keys of every attempt
    truncated: bool = False  # the response was cut in the middle to fit the judge's context
    error: str | None = Field(default=None, sa_column=Column(Text))
    raw: str | None = Field(default=None, sa_column=Column(Text))  # last unparseable answer
    created_at: datetime = Field(default_factory=utcnow)
