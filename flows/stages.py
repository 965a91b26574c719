"""The stages as Prefect tasks: one thin wrapper per stage, nothing else.

Each stage's work is plain code in tasks/ (a `tasks.runtime.Stage`, run batch by batch by its
one driver, or a function over a store URL); here it becomes the task the flows call, with the
task's name (what the UI lists) and its retry rule. Only the flows import this module, so the
stage modules, and every command that runs no flow (`--help`, `stats`, `export`, `audit`,
`build --dry-run`), load without Prefect.

The wrappers take every setting from their caller (no defaults here: those live in
tasks/settings.py). Retries: a task that calls the LLM is retried once, and never for an LLM
error (the client already retried those; `retry_unless_llm_error`), so attempts do not
multiply. The other tasks are not retried.
"""

from __future__ import annotations

from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE

from storage.store import Store
from tasks.eval.stages import ANSWER_STAGE, JUDGE_STAGE
from tasks.export import export_store
from tasks.filters import FILTER_STAGE
from tasks.ingest import ingest_file
from tasks.pairs import variants as pairs
from tasks.pairs.variants import JUDGE_VARIANTS_STAGE, WRITE_VARIANTS_STAGE, PairsConfig
from tasks.plan import PLAN_STAGE
from tasks.quality_gate import JUDGE_GATE_STAGE
from tasks.runtime import Stage, retry_unless_llm_error
from tasks.write import WRITE_STAGE

# Task results live in the store, never in Prefect (invariant 1); arguments are ids and URLs.
_PLAIN: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}
_CALLS_LLM: dict[str, Any] = {
    **_PLAIN,
    "retries": 1,
    "retry_delay_seconds": 2,
    "retry_condition_fn": retry_unless_llm_error,
}


def stage_task(stage: Stage[Any, Any, Any]) -> Task[[str, list[Any]], Coroutine[Any, Any, int]]:
    """The Prefect task that runs one batch of a stage (tasks.runtime.Stage.run_batch)."""

    async def run_batch(runtime_id: str, ids: list[Any]) -> int:
        return await stage.run_batch(runtime_id, ids)

    # Its own qualified name per stage: Prefect derives the task key from it.
    run_batch.__name__ = run_batch.__qualname__ = f"{stage.name.replace('-', '_')}_batch"
    return task(name=stage.name, **(_CALLS_LLM if stage.task_retry else _PLAIN))(run_batch)


# The build (flows/build.py), batch by batch.
plan_batch = stage_task(PLAN_STAGE)
write_batch = stage_task(WRITE_STAGE)
filter_batch = stage_task(FILTER_STAGE)
judge_batch = stage_task(JUDGE_GATE_STAGE)

# LongBench-Write (flows/eval.py): answer each prompt, judge each answer.
eval_generate_batch = stage_task(ANSWER_STAGE)
eval_judge_batch = stage_task(JUDGE_STAGE)

# DPO pairs (flows/pairs.py).
write_variants_batch = stage_task(WRITE_VARIANTS_STAGE)
judge_variants_batch = stage_task(JUDGE_VARIANTS_STAGE)


@task(name="ingest", **_PLAIN)
def ingest_task(db_url: str, path: str, decontaminate: bool) -> dict[str, int]:
    store = Store(db_url)
    try:
        return ingest_file(store, Path(path), decontaminate=decontaminate)
    finally:
        store.close()


@task(name="export", **_PLAIN)
def export_task(
    db_url: str, out_dir: str, settings: dict[str, Any] | None, shard_size: int
) -> dict[str, Any]:
    store = Store(db_url)
    try:
        return export_store(store, Path(out_dir), settings, shard_size)
    finally:
        store.close()


@task(name="pairs-select-export", **_PLAIN)
def select_and_export_task(
    db_url: str,
    ids: list[int],
    judge_model: str,
    cfg: PairsConfig,
    out_dir: str,
    manifest_extra: dict[str, Any],
) -> dict[str, Any]:
    return pairs.select_and_export(db_url, ids, judge_model, cfg, out_dir, manifest_extra)
