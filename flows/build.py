"""`longwriter build`: ingest -> plan -> write -> filter -> export, as one Prefect flow.

Run it:   longwriter build --instructions data.jsonl --db runs/lw.db --out runs/out
          (no --base-url: the embedded SmolLM2 llama.cpp server is started for the run)

The flow only orders and fans out. Instructions are cut into batches; each batch is three
Prefect tasks (plan, write, filter), and every batch runs concurrently on the flow's event loop.
Inside a task the LLM calls are plain asyncio behind the client's concurrency limit, so a
build of 90,000 calls is a few hundred task runs, not 90,000 (a task run costs milliseconds
and a row in Prefect's database; an LLM call inside one costs nothing extra).
Rerunning the same command resumes from the store: finished steps are skipped, stored calls
are never paid twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_client, get_run_logger
from prefect.artifacts import TableArtifact, acreate_table_artifact
from prefect.client.schemas.actions import ArtifactUpdate

from flows import monitoring
from flows.common import (
    Opened,
    ProgressArtifact,
    open_judge,
    open_writer,
    publish_markdown,
    recorded_run,
    retry_policy,
    summary_with_histogram,
    ticking,
)
from flows.stages import (
    export_task,
    filter_batch,
    ingest_task,
    judge_batch,
    plan_batch,
    write_batch,
)
from storage.models import UNFINISHED, InstructionStatus
from storage.store import Store
from tasks.eval.judge import judge_format_for
from tasks.filters import FilterConfig
from tasks.flags import derive
from tasks.llm.client import ClientStats, RetryPolicy
from tasks.llm.endpoints import ResolvedEndpoints, sampling_extras, writer_languages
from tasks.quality_gate import JudgeGate
from tasks.report import build_summary
from tasks.runtime import (
    BuildRuntime,
    Progress,
    StageConfig,
    gather_all,
    register,
    unregister,
)
from tasks.settings import BuildSettings
from tasks.signature_worker import SignatureWorker
from tasks.write import ContextBudget

__all__ = ["BuildSettings", "build_flow", "run_build", "stage_config"]


def stage_config(settings: BuildSettings, resolved: ResolvedEndpoints) -> StageConfig:
    """The plan/write/filter stages' config: the settings' fields of the same names, and
    what the endpoints decided (the plan's JSON dialect, the context window, the sampling
    extras of the embedded model)."""
    return derive(
        StageConfig,
        settings,
        json_style=resolved.json_style,
        context_window=resolved.context_window,
        max_plan_steps=settings.max_paragraphs,
        languages=writer_languages(resolved, settings.languages),
        write_prompt=(
            ("turns" if resolved.embedded else "paper")
            if settings.write_prompt == "auto"
            else settings.write_prompt
        ),
        extra_params=sampling_extras(
            resolved, settings.frequency_penalty, settings.presence_penalty
        ),
        filters=derive(FilterConfig, settings),
    )


def judge_gate(settings: BuildSettings, judge_format: str, context_window: int) -> JudgeGate:
    """The judge gate's config (tasks.quality_gate) from the settings' judge fields."""
    return derive(
        JudgeGate,
        settings,
        min_quality=settings.min_quality or 0.0,
        judge_format=judge_format,
        context_window=context_window,
        attempts=settings.judge_attempts,
        max_tokens=settings.judge_max_tokens,
        temperature=settings.judge_temperature,
    )


def _chunks(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i : i + size] for i in range(0, len(ids), size)]


@contextlib.asynccontextmanager
async def _progress_reporters(
    progress: Progress,
    show_bar: bool,
    interval_s: float | None = None,
    stats: ClientStats | None = None,
) -> AsyncIterator[None]:
    """Terminal bar (rich), a Prefect progress artifact (share of the work: plans and
    paragraphs, so it moves with every paragraph) and a live table artifact
    (`build-live`: paragraphs of planned, words, accepted, retries), refreshed every few
    seconds; and the client's retries logged as they happen (flows.monitoring.RetryWatch)."""
    interval_s = monitoring.REFRESH_S if interval_s is None else interval_s
    logger = get_run_logger()
    watch = monitoring.RetryWatch(stats) if stats is not None else None
    artifact = await ProgressArtifact.create("build-progress", monitoring.progress_line(progress))
    table_id = await acreate_table_artifact(
        monitoring.progress_table(progress, stats, progress.started),
        key="build-live",
        description="build progress, refreshed every few seconds",
    )
    bar: Any = None
    task_id: Any = None
    if show_bar:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
        from rich.progress import Progress as RichProgress

        bar = RichProgress(
            TextColumn("[bold]build"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            transient=False,
        )
        bar.start()
        task_id = bar.add_task("build", total=progress.instructions_total or 1, detail="")

    def refresh() -> None:
        if bar is not None:
            bar.update(
                task_id,
                completed=progress.instructions_done,
                total=progress.instructions_total or 1,
                detail=(
                    f"paragraphs {progress.paragraphs} · words {progress.words} · "
                    f"accepted {progress.accepted} · {progress.tokens_per_s():.1f} tok/s"
                ),
            )

    def log_retries(final: bool = False) -> None:
        for level, message in watch.check(final=final) if watch is not None else []:
            logger.log(level, message)

    async def publish(client: Any, pct: float) -> None:
        """One refresh of both artifacts; the table is updated in place (one artifact, not a
        new version every few seconds)."""
        await artifact.update(pct, monitoring.progress_line(progress), client=client)
        with contextlib.suppress(Exception):  # the UI is a view; never fail the build on it
            table = TableArtifact(
                table=monitoring.progress_table(progress, stats, progress.started)
            )
            await client.update_artifact(table_id, ArtifactUpdate(data=await table.aformat()))

    async with get_client() as client:

        async def tick() -> None:
            refresh()
            log_retries()
            await publish(client, min(99.9, monitoring.percent_done(progress)))

        async def final() -> None:
            refresh()
            if bar is not None:
                bar.stop()
            log_retries(final=True)
            await publish(client, 100.0)

        async with ticking(interval_s, tick, final):
            yield


@contextlib.asynccontextmanager
async def _judge_gate(
    settings: BuildSettings, rt: BuildRuntime, endpoints: ResolvedEndpoints, policy: RetryPolicy
) -> AsyncIterator[None]:
    """Open the judge gate's client when the build has one (--min-quality or a judge URL):
    its own endpoint, or the writer's when no --judge-base-url is given."""
    if not settings.judges:
        yield
        return
    async with contextlib.AsyncExitStack() as stack:
        writer = Opened(endpoints, rt.client)
        judge = await open_judge(stack, settings, writer, policy, settings.concurrency)
        # The writer's own client judges when no other is asked for (rt.judge_client None).
        rt.judge_client = judge.client if judge.client is not rt.client else None
        rt.judge_gate = judge_gate(
            settings,
            judge_format_for(settings.judge_format, judge.endpoints.embedded),
            judge.endpoints.context_window,
        )
        rt.judge_slots = asyncio.Semaphore(settings.concurrency)
        get_run_logger().info(
            "judge gate: %s, samples under S_q %s rejected",
            judge.client.model,
            settings.min_quality or 0,
        )
        yield


async def run_agentwrite(rt: BuildRuntime, ids: list[int], batch_size: int) -> None:
    """Fan out: every batch runs plan -> write -> filter; batches run concurrently."""
    runtime_id = register(rt)

    async def batch(chunk: list[int]) -> None:
        # Task runs named after their batch (`write-#1-#50`), as the batch's log line is.
        label = monitoring.batch_label(chunk)
        planned = await plan_batch.with_options(task_run_name=f"plan-{label}")(runtime_id, chunk)
        written = await write_batch.with_options(task_run_name=f"write-{label}")(runtime_id, chunk)
        accepted = await filter_batch.with_options(task_run_name=f"filter-{label}")(
            runtime_id, chunk
        )
        if rt.judge_gate is not None:
            accepted = await judge_batch.with_options(task_run_name=f"judge-{label}")(
                runtime_id, chunk
            )
        _log_batch(rt.store, chunk, planned, written, accepted)

    try:
        # The first failing batch cancels the others and its error is raised as itself.
        await gather_all(batch(chunk) for chunk in _chunks(ids, batch_size))
    finally:
        unregister(runtime_id)


MAX_LOGGED_REJECTIONS = monitoring.MAX_LOGGED_REJECTIONS  # per batch: the store has them all


def _log_batch(store: Store, chunk: list[int], planned: int, written: int, accepted: int) -> None:
    """One log line per batch (with the input ids it holds) and one per rejected instruction
    with the input's own id or file and line, its stage and reason, so a run's log in the UI
    says what each stage did and why an item stopped."""
    logger = get_run_logger()
    inputs, n_rejected, lines = monitoring.batch_rejections(store, chunk)
    logger.info(
        "batch %s (%d instructions, %s): planned %d, written %d, accepted %d, rejected %d",
        monitoring.batch_label(chunk),
        len(chunk),
        inputs,
        planned,
        written,
        accepted,
        n_rejected,
    )
    for line in lines:
        logger.warning(line)


# flow_run_name: runs are named after the build (input file and date) unless the CLI's
# --run-name, a parent flow or the UI named them (flows.monitoring.build_run_name).
@flow(name="longwriter-build", log_prints=True, flow_run_name=monitoring.build_run_name)
async def build_flow(settings: BuildSettings) -> dict[str, Any]:
    monitoring.install_log_filters()  # this process may be a worker's: filters set up here
    # Everything imported so far (Prefect, the stages, SQLAlchemy: a million objects) lives as
    # long as the process: frozen out of the collector, the full collections a build's own
    # garbage triggers no longer walk it (~0.7 s per export, and as much again over a build).
    gc.freeze()
    logger = get_run_logger()
    started = time.monotonic()
    with recorded_run(settings.db_url, "build", settings.public()) as run:
        store = run.store
        if settings.instructions and settings.partition is None:
            seen = monitoring.last_rejection_id(store)
            counts = ingest_task(settings.db_url, settings.instructions, settings.decontaminate)
            logger.info("ingest %s: %s", settings.instructions, counts)
            for line in monitoring.ingest_rejection_lines(store, seen):
                logger.warning(line)
        first = store.instruction_ids(list(InstructionStatus), settings.limit)
        ids = store.instruction_ids(UNFINISHED)
        scope = set(first)
        ids = [i for i in ids if i in scope and settings.in_partition(i)]
        if settings.partition is not None:
            logger.info("partition %d of %d", settings.partition, settings.partitions)
        logger.info("%d instructions to build (%d in scope)", len(ids), len(first))
        progress = Progress(instructions_total=len(ids))
        monitoring.seed_progress(store, ids, progress)  # a resumed build starts where it was
        if ids:
            await _write_samples(settings, store, ids, progress)
        manifest = None
        if settings.exports:
            manifest = export_task(
                settings.db_url, settings.out_dir, settings.public(), settings.shard_size
            )
        summary = build_summary(store)
        summary["wall_s"] = round(time.monotonic() - started, 2)
        summary["out_dir"] = str(Path(settings.out_dir).resolve()) if settings.exports else None
        summary["shards"] = manifest["counts"]["shards"] if manifest else 0
        await _publish(store, settings, summary)
        run.summary = summary
    return summary


async def _write_samples(
    settings: BuildSettings, store: Store, ids: list[int], progress: Progress
) -> None:
    """Plan, write, filter (and judge) `ids` on the writer's endpoints."""
    logger = get_run_logger()
    policy = retry_policy(settings, max_throttle_wait_s=settings.max_throttle_wait_min * 60.0)
    async with contextlib.AsyncExitStack() as stack:
        writer = await open_writer(
            stack,
            settings,
            settings.concurrency,
            policy,
            settings.embedded_replicas,
            reasoning_effort=settings.reasoning_effort,
            extra_body=settings.extra_body,
            api_dialect=settings.api_dialect,
            rpm=settings.rpm,
            tpm=settings.tpm,
            stream=settings.stream,
        )
        resolved, client = writer.endpoints, writer.client
        logger.info(
            "endpoints: %s (model %s%s)",
            [monitoring.redact_url(e.base_url) for e in resolved.endpoints],
            resolved.model,
            ", embedded" if resolved.embedded else "",
        )
        rt = BuildRuntime(
            store=store,
            client=client,
            config=stage_config(settings, resolved),
            progress=progress,
            chain_slots=asyncio.Semaphore(settings.concurrency),
            budget=ContextBudget(resolved.context_window),
            signatures=(
                await stack.enter_async_context(SignatureWorker(store))
                if settings.exports
                else None
            ),
        )
        async with (
            _judge_gate(settings, rt, resolved, policy),
            _progress_reporters(progress, settings.progress, stats=client.stats),
        ):
            await run_agentwrite(rt, ids, settings.batch_size)
        logger.info(
            "LLM: %d calls made, %d reused from the store, %d HTTP requests, %d retries",
            progress.calls,
            progress.cached_calls,
            client.stats.requests,
            client.stats.retries,
        )


async def _publish(store: Store, settings: BuildSettings, summary: dict[str, Any]) -> None:
    """End-of-run artifacts: the summary table and a length histogram. The summary gains the
    run's facts first (models, endpoints redacted, the build report's path), so the returned
    and stored summary says what the artifact says."""
    summary.update(monitoring.run_facts(store, settings.out_dir if settings.exports else None))
    out = Path(settings.out_dir)
    md = summary_with_histogram(store, summary, out if settings.exports else None)
    report = out / "report.html"
    if settings.exports and report.is_file():
        # Every sample, rejection examples and charts: too big for an artifact, so a link.
        md += f"\n[Build report: every sample, plan beside text]({report.resolve().as_uri()})\n"
    await publish_markdown(md, "build-summary", "build summary")


def run_build(
    settings: BuildSettings,
    on_summary: Callable[[dict[str, Any]], None] | None = None,
    run_name: str | None = None,
    tags: Sequence[str] = (),
) -> dict[str, Any]:
    """Run the flow to completion in this process (the CLI's entry). `run_name` names the
    flow run (default: flows.monitoring.build_run_name); `tags` tag it and its task runs."""
    from prefect import tags as prefect_tags

    from flows import prefect_api

    # Prefect's temporary API server (none when one is to be reused: PREFECT_API_URL, or the
    # CLI's already started) boots in its own process while this one goes on; the flow waits
    # for it only as it starts (flows/prefect_api.py).
    api = prefect_api.launch()
    flow_ = build_flow.with_options(flow_run_name=run_name) if run_name else build_flow
    with prefect_api.serving(api), prefect_tags(*tags):
        summary = asyncio.run(flow_(settings=settings))
    if on_summary:
        on_summary(summary)
    return summary


if __name__ == "__main__":  # pragma: no cover
    print("use: longwriter build --help", file=sys.stderr)
