"""The eval's stages over the store: answer each prompt, judge each answer; every answer and
verdict is stored before it is used, so a rerun resumes (their Prefect tasks: flows.stages)."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

from prompts import prompt_version

# Importing the eval tables registers them on SQLModel's metadata, so the Store(url) the flow
# opens later creates them (Store.__init__ runs create_all).
from storage.eval_models import EvalGeneration, EvalJudgement
from storage.store import Store
from tasks.eval.judge import judge_answer

# Re-exported: the eval's settings and prompt set live in tasks/settings.py.
from tasks.eval.prompts import PromptItem
from tasks.llm.client import (
    BadOutputError,
    ChatRequest,
    ContextLengthError,
    LLMClient,
)
from tasks.runtime import Progress, Stage, generate
from tasks.settings import EvalSettings
from tasks.wordcount import count_words

# -- runtime ----------------------------------------------------------------------------------


@dataclass
class EvalRuntime:
    """What the eval tasks share in one run; tasks get its id (tasks.runtime.register)."""

    store: Store
    client: LLMClient
    judge_client: LLMClient | None
    settings: EvalSettings
    context_window: int
    judge_context_window: int
    judge_format: str
    items: dict[str, list[PromptItem]]  # generation key -> prompts (duplicates share a key)
    requests: dict[str, ChatRequest]  # generation key -> its request
    gen_progress: Progress = field(default_factory=Progress)
    judge_progress: Progress = field(default_factory=Progress)
    generated: int = 0
    judged: int = 0
    slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(8))
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def judge_version(self) -> str:
        return prompt_version("judge")


# -- generation -------------------------------------------------------------------------------


async def generate_one(rt: EvalRuntime, key: str) -> EvalGeneration:
    """The stored answer to one prompt, or ask for it and store it (also when it fails)."""
    with rt.store.session() as s:
        existing = s.get(EvalGeneration, key)
    if existing is not None:
        rt.generated += 1  # answered by an earlier run: counts as done
        return existing
    item = rt.items[key][0]
    request = rt.requests[key]
    row = EvalGeneration(
        key=key,
        model=rt.client.model,
        prompt=item.prompt,
        length=item.length,
        type=item.type,
        lang=item.lang,
        max_tokens=request.max_tokens,
        temperature=request.temperature,
    )
    if request.max_tokens is not None and request.max_tokens <= 0:
        row.status, row.error = "context_overflow", "prompt leaves no room in the context window"
    else:
        try:
            async with rt.slots:
                call = await generate(rt.store, rt.client, request, rt.gen_progress)
        except BadOutputError as exc:
            row.status, row.error = "bad_output", str(exc)
        except ContextLengthError as exc:
            row.status, row.error = "context_overflow", str(exc)
        else:
            row.response = call.content
            row.response_length = count_words(call.content)
            row.finish_reason = call.finish_reason
            row.call_key = call.key
    rt.store.save(row)
    rt.generated += 1
    return row


def _keys(rt: EvalRuntime, keys: list[str]) -> list[str]:
    return keys  # each one answers itself from the store when an earlier run stored it


# Answer every prompt of a batch concurrently; counts the answers (an earlier run's included).
# Neither eval stage is retried as a task: a prompt never answered or an answer never rated is
# stored as such, and an LLM error stops the run.
ANSWER_STAGE = Stage(
    "eval-generate",
    EvalRuntime,
    _keys,
    generate_one,
    lambda row: row.call_key is not None,
    task_retry=False,
)


# -- judging ----------------------------------------------------------------------------------


async def judge_one(rt: EvalRuntime, key: str) -> EvalJudgement | None:
    """The stored verdict on one answer, or up to `judge_attempts` judge calls (each a varied
    request) until one parses; None for an empty answer (nothing to judge)."""
    assert rt.judge_client is not None
    judge_model = rt.judge_client.model
    version = rt.judge_version
    with rt.store.session() as s:
        gen = s.get(EvalGeneration, key)
        existing = s.get(EvalJudgement, (key, judge_model, version))
    if existing is not None:
        rt.judged += 1
        return existing
    if gen is None or not gen.response.strip():
        return None
    row = EvalJudgement(
        generation_key=key, judge_model=judge_model, prompt_version=version, status="unparsed"
    )
    await judge_answer(
        row,
        gen.prompt,
        gen.response,
        store=rt.store,
        client=rt.judge_client,
        progress=rt.judge_progress,
        slots=rt.slots,
        formats=rt,
        attempts=rt.settings.judge_attempts,
        max_tokens=rt.settings.judge_max_tokens,
        temperature=rt.settings.judge_temperature,
        context_window=rt.judge_context_window,
    )
    rt.store.save(row)
    rt.judged += 1
    return row


# Judge every answer of a batch; counts the scored verdicts.
JUDGE_STAGE = Stage(
    "eval-judge",
    EvalRuntime,
    _keys,
    judge_one,
    lambda row: row is not None and row.status == "scored",
    task_retry=False,
)
