"""The stages as Prefect tasks: one thin wrapper per stage, nothing else.

Each stage's work is a plain function in tasks/ (a batch function that looks the run's runtime
up by id, or a function over a store URL); here it becomes the task the flows call, with the
task's name (what the UI lists) and its retry rule. Only the flows import this module, so the
stage modules, and every command that runs no flow (`--help`, `stats`, `export`, `audit`,
`build --dry-run`), load without Prefect.

The wrappers take every setting from their caller (no defaults here: those live in
tasks/settings.py). Retries: a task that calls the LLM is retried once, and never for an LLM
error (the client already retried those; `retry_unless_llm_error`), so attempts do not
multiply. The other tasks are not retried.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from storage.store import Store
from tasks import filters, pairs, plan, quality_gate, write
from tasks.export import export_store
from tasks.ingest import ingest_file
from tasks.pairs import PairsConfig
from tasks.runtime import retry_unless_llm_error

# Task results live in the store, never in Prefect (invariant 1); arguments are ids and URLs.
_PLAIN: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}
_CALLS_LLM: dict[str, Any] = {
    **_PLAIN,
    "retries": 1,
    "retry_delay_seconds": 2,
    "retry_condition_fn": retry_unless_llm_error,
}

# The build (flows/build.py), batch by batch.
plan_batch = task(name="plan", **_CALLS_LLM)(plan.plan_batch)
write_batch = task(name="write", **_CALLS_LLM)(write.write_batch)
filter_batch = task(name="filter", **_PLAIN)(filters.filter_batch)
judge_batch = task(name="judge", **_CALLS_LLM)(quality_gate.judge_batch)

# DPO pairs (flows/pairs.py).
write_variants_batch = task(name="pairs-write", **_CALLS_LLM)(pairs.write_variants_batch)
judge_variants_batch = task(name="judge", **_CALLS_LLM)(pairs.judge_variants_batch)


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
