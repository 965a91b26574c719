"""Scale-out builds and a standalone export, as Prefect flows for deployments (deploy/).

`partitioned_build` is the parent of a build split across workers and machines:

    ingest once -> one run of the `longwriter-build/partition` deployment per partition
    (settings.partition = p, settings.partitions = N; each takes the instruction ids with
    id % N == p, on whichever worker of the pool picks it up) -> wait for all -> export once
    -> summary table and length histogram as artifacts.

Partitions share one store (PostgreSQL when they run on several machines) and each resumes on
its own: a rerun of a partition skips finished instructions and reuses every stored LLM call.
A partition run that fails or crashes is started again (`attempts`); a retry of the parent
(`prefect flow-run retry`, or the UI's Retry button) starts every partition again, which is
cheap for the finished ones (nothing left to do).

`export_flow` writes shards and manifest.json from the store, on demand.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.context import FlowRunContext
from prefect.deployments import arun_deployment

from flows.common import publish_markdown, recorded_run, summary_with_histogram
from flows.stages import export_task, ingest_task
from storage.store import Store
from tasks.report import build_summary
from tasks.settings import BUILD, BuildSettings

PARTITION_DEPLOYMENT = "longwriter-build/partition"
# A partition that ended in one of these states is worth running again: it resumes from the
# store. Cancelled is a person's decision and is left alone.
RETRYABLE = (StateType.FAILED, StateType.CRASHED)


class PartitionsFailed(RuntimeError):
    """Some partitions did not complete; the message names each one with its state."""


def partition_settings(settings: BuildSettings, partition: int, partitions: int) -> BuildSettings:
    """The settings of one partition run: no ingest, no export (the parent does both), no
    terminal bar (nobody watches a worker's stdout)."""
    return settings.model_copy(
        update={
            "instructions": None,
            "partition": partition,
            "partitions": partitions,
            "export": False,
            "progress": False,
        }
    )


async def publish_summary(store: Store, out_dir: Path | None, key: str, title: str) -> None:
    """The summary table, and when shards were written the length histogram."""
    md = summary_with_histogram(store, build_summary(store), out_dir, title=title)
    await publish_markdown(md, key, title)


async def _run_partition(
    deployment: str,
    settings: BuildSettings,
    attempts: int,
    poll_interval_s: float,
    timeout_s: float | None,
) -> FlowRun:
    """Run one partition on the work pool until it completes or runs out of attempts."""
    logger = get_run_logger()
    p, n = settings.partition, settings.partitions
    ctx = FlowRunContext.get()
    parent = f"{ctx.flow_run.id}:{ctx.flow_run.run_count}" if ctx and ctx.flow_run else "local"
    run: FlowRun | None = None
    for attempt in range(1, attempts + 1):
        run = await arun_deployment(
            deployment,
            parameters={"settings": settings.model_dump(mode="json")},
            flow_run_name=f"partition-{p}-of-{n}" + (f"-attempt-{attempt}" if attempt > 1 else ""),
            tags=["longwriter", f"partition-{p}"],
            # The same parent attempt never starts a partition attempt twice.
            idempotency_key=f"{parent}:partition-{p}-of-{n}:attempt-{attempt}",
            poll_interval=poll_interval_s,
            timeout=timeout_s,
        )
        state = run.state
        if state is not None and state.is_completed():
            logger.info("partition %d/%d completed (flow run %s)", p, n, run.name)
            return run
        if state is None or not state.is_final():
            # Timed out while still Scheduled/Running: starting a second run of the same
            # partition beside a live one would pay for the same calls twice, so stop here.
            logger.error(
                "partition %d/%d still %s after %ss (is a worker polling the pool?)",
                p,
                n,
                state.name if state else "unknown",
                timeout_s,
            )
            return run
        logger.warning(
            "partition %d/%d attempt %d ended %s: %s",
            p,
            n,
            attempt,
            state.name,
            state.message or "",
        )
        if state.type not in RETRYABLE:
            return run
    assert run is not None
    return run


@flow(name="longwriter-partitioned-build", log_prints=True)
async def partitioned_build(
    settings: BuildSettings,
    partitions: int = 2,
    deployment: str = PARTITION_DEPLOYMENT,
    attempts: int = 2,
    poll_interval_s: float = 5.0,
    partition_timeout_s: float | None = None,
) -> dict[str, Any]:
    """Ingest, build `partitions` partitions as separate deployment runs, export, summarise.

    `deployment` runs `build_flow` (deploy/deployments.py creates it); its workers need the
    store URL and the endpoints to be reachable from their machines. Each partition opens
    `settings.concurrency` connections per endpoint, so the endpoints see up to
    partitions x concurrency requests at once.
    """
    if partitions < 1:
        raise ValueError("partitions must be at least 1")
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    logger = get_run_logger()
    started = time.monotonic()
    # Creating the store here makes its tables once, before N processes could race to.
    public = {**settings.public(), "partitions": partitions}
    with recorded_run(settings.db_url, "partitioned-build", public) as run:
        store = run.store
        if settings.instructions:
            counts = ingest_task(settings.db_url, settings.instructions, settings.decontaminate)
            logger.info("ingest %s: %s", settings.instructions, counts)
        runs = await asyncio.gather(
            *(
                _run_partition(
                    deployment,
                    partition_settings(settings, p, partitions),
                    attempts,
                    poll_interval_s,
                    partition_timeout_s,
                )
                for p in range(partitions)
            )
        )
        bad = [
            f"partition {p}: {r.name} {r.state.name if r.state else 'no state'}"
            for p, r in enumerate(runs)
            if r.state is None or not r.state.is_completed()
        ]
        if bad:
            raise PartitionsFailed(
                "; ".join(bad) + " (retry this flow run to resume: finished work is kept)"
            )
        manifest = None
        if settings.export:
            manifest = export_task(settings.db_url, settings.out_dir, public, settings.shard_size)
        out = Path(settings.out_dir) if settings.export else None
        await publish_summary(store, out, "build-summary", "longwriter partitioned build")
        summary = build_summary(store)
        summary.update(
            wall_s=round(time.monotonic() - started, 2),
            partitions=partitions,
            partition_runs=[str(r.id) for r in runs],
            out_dir=str(out.resolve()) if out else None,
            shards=manifest["counts"]["shards"] if manifest else 0,
        )
        run.summary = summary
    return summary


@flow(name="longwriter-export", log_prints=True)
async def export_flow(
    db_url: str = BUILD.db_url,
    out_dir: str = BUILD.out_dir,
    shard_size: int = BUILD.shard_size,
) -> dict[str, Any]:
    """Write shards + manifest.json from the store (what `longwriter export` does), and
    publish the summary table and length histogram."""
    logger = get_run_logger()
    manifest = export_task(db_url, out_dir, {"command": "export"}, shard_size)
    logger.info(
        "exported %d samples in %d shard(s) to %s",
        manifest["counts"]["samples"],
        manifest["counts"]["shards"],
        Path(out_dir).resolve(),
    )
    store = Store(db_url)
    try:
        await publish_summary(store, Path(out_dir), "export-summary", "longwriter export")
    finally:
        store.close()
    return manifest["counts"]
