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
import base64
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field, model_validator

from flows import monitoring
from storage.store import Store, redact_db_url
from tasks.endpoints import open_endpoints, sampling_extras
from tasks.export import export_task
from tasks.filters import FilterConfig, filter_batch
from tasks.ingest import ingest_task
from tasks.judge import judge_format_for
from tasks.llm_client import ClientStats, LLMClient, RetryPolicy
from tasks.plan import plan_batch
from tasks.quality_gate import JudgeGate, judge_batch
from tasks.report import build_summary, length_histogram_png, summary_markdown
from tasks.runtime import (
    BuildRuntime,
    Progress,
    StageConfig,
    gather_all,
    register,
    unregister,
)
from tasks.write import ContextBudget, write_batch

UNFINISHED = ("pending", "planned", "written")


class BuildSettings(BaseModel):
    """Everything a build needs. A Prefect deployment takes it as its parameter (the UI shows a
    form); it holds the *name* of the API key variable, never the key."""

    # A misspelt setting (in a deployment's parameters, say) must fail, not be ignored.
    model_config = ConfigDict(extra="forbid")

    instructions: str | None = Field(None, description="instruction file (jsonl/json/parquet/csv)")
    db_url: str = Field("sqlite:///longwriter.db", description="store URL or SQLite path")
    out_dir: str = Field("out", description="where shards and manifest.json go")
    base_urls: list[str] = Field(default_factory=list, description="OpenAI-compatible /v1 URLs")
    model: str | None = None
    api_key_env: str = "LONGWRITER_API_KEY"
    concurrency: int = Field(16, ge=1, le=4096)
    min_words: int = Field(2000, ge=0)
    limit: int | None = Field(None, ge=1, description="build only the first N instructions")
    batch_size: int = Field(50, ge=1, description="instructions per plan/write/filter task")
    context_window: int | None = Field(None, description="model context; default 8192 embedded")
    embedded_replicas: int | None = Field(
        None, ge=1, le=16, description="embedded llama.cpp servers (default: one per core, <= 4)"
    )
    max_paragraph_tokens: int = 2048
    plan_temperature: float = 0.5
    write_temperature: float = 0.7
    # None: the endpoint's default, or for the embedded model tasks.endpoints.EMBEDDED_SAMPLING
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    json_plan: bool = True
    max_repetition: float = 0.3
    decontaminate: bool = True
    export: bool = True
    shard_size: int = 1000
    # Written into the dataset card (OUT/README.md). No default can be right: it depends on the
    # generator's terms and the instructions' source; "unknown" says so on the Hub.
    license: str = Field("unknown", description="dataset card licence (a Hub id: apache-2.0...)")
    request_timeout_s: float = 600.0
    max_attempts: int = 6
    # Client backoff between attempts (capped full jitter; Retry-After wins when given).
    initial_backoff_s: float = Field(0.5, ge=0)
    max_backoff_s: float = Field(30.0, ge=0)
    max_continuations: int = Field(
        2, ge=0, description="continuations of a paragraph cut at max_tokens or too short"
    )
    max_paragraphs: int = Field(
        50, ge=1, le=50, description="most paragraphs per plan (bounds calls and words per sample)"
    )
    max_plan_resamples: int = Field(
        2, ge=0, description="new plans (new seed) asked for when a plan fails validation"
    )
    max_resamples: int = Field(
        2, ge=0, description="rewrites (new seed) of a paragraph that loops; best one kept"
    )
    min_paragraph_share: float = Field(
        0.5, ge=0, le=1, description="continue a paragraph under this share of its planned words"
    )
    quality_checks: bool = Field(
        True, description="plan and paragraph quality checks on every draft (tasks.quality)"
    )
    # The judge gate: every accepted sample scored on LongBench-Write's six dimensions.
    judge_base_urls: list[str] = Field(
        default_factory=list, description="judge /v1 URLs (none: the writer's endpoint)"
    )
    judge_model: str | None = Field(None, description="judge model (default: the writer's)")
    judge_api_key_env: str = Field(
        "LONGWRITER_JUDGE_API_KEY", description="env variable holding the judge's API key"
    )
    judge_format: str = Field("auto", description="auto | json_schema | json_object | none")
    judge_context_window: int | None = Field(None, description="judge model context")
    min_quality: float | None = Field(
        None,
        ge=0,
        le=100,
        description="judge every accepted sample; reject those with S_q (0-100) under this",
    )
    min_length_score: float = Field(
        0.0,
        ge=0,
        le=100,
        description="reject samples whose length score S_l against the required length is lower",
    )
    progress: bool = False  # terminal progress bar (the CLI turns it on for a tty)
    # Real endpoints (tasks/llm_client.py): fields sent with every request, part of each key.
    reasoning_effort: str | None = Field(
        None, description="reasoning_effort sent with every call (OpenAI reasoning models)"
    )
    extra_body: dict[str, Any] = Field(
        default_factory=dict, description="extra request fields, e.g. chat_template_kwargs"
    )
    api_dialect: str = Field(
        "auto", description="auto (learned from the 400s), chat or openai-reasoning"
    )
    rpm: float | None = Field(None, gt=0, description="requests per minute the account allows")
    tpm: float | None = Field(None, gt=0, description="tokens per minute (prompt + max_tokens)")
    max_throttle_wait_min: float = Field(
        10.0, ge=0, description="minutes one call may wait out 429s before the build stops"
    )
    stream: bool = Field(False, description="stream answers (SSE): no proxy cuts long calls")
    # Scale-out: several flow runs (workers, machines) share one store and each builds the
    # instruction ids with id % partitions == partition. Ingest and export happen once, in the
    # parent flow (flows/partition.py), so a partition run does neither.
    partition: int | None = Field(
        None, ge=0, description="build only ids with id % partitions == partition"
    )
    partitions: int = Field(1, ge=1, description="number of partitions (used with partition)")

    @model_validator(mode="after")
    def _partition_in_range(self) -> BuildSettings:
        if self.partition is not None and self.partition >= self.partitions:
            raise ValueError(
                f"partition {self.partition} must be below partitions {self.partitions}"
            )
        return self

    def in_partition(self, instruction_id: int) -> bool:
        return self.partition is None or instruction_id % self.partitions == self.partition

    @property
    def exports(self) -> bool:
        """Whether this run writes shards (a partition run leaves that to its parent)."""
        return self.export and self.partition is None

    def public(self) -> dict[str, Any]:
        """Settings safe to store and publish: the DB password hidden, no key values."""
        d = self.model_dump()
        d["db_url"] = redact_db_url(self.db_url)
        return d


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
    from prefect import get_client
    from prefect.artifacts import (
        TableArtifact,
        acreate_progress_artifact,
        acreate_table_artifact,
        aupdate_progress_artifact,
    )
    from prefect.client.schemas.actions import ArtifactUpdate

    interval_s = monitoring.REFRESH_S if interval_s is None else interval_s
    logger = get_run_logger()
    watch = monitoring.RetryWatch(stats) if stats is not None else None
    artifact_id = await acreate_progress_artifact(
        progress=0.0, key="build-progress", description=monitoring.progress_line(progress)
    )
    table_id = await acreate_table_artifact(
        monitoring.progress_table(progress, stats, progress.started),
        key="build-live",
        description="build progress, refreshed every few seconds",
    )
    shown = 0.0  # the bar never moves back (an estimate of paragraphs to come can shrink)
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
        nonlocal shown
        shown = max(shown, pct)
        with contextlib.suppress(Exception):  # the UI is a view; never fail the build on it
            await aupdate_progress_artifact(
                artifact_id, shown, description=monitoring.progress_line(progress), client=client
            )
            table = TableArtifact(
                table=monitoring.progress_table(progress, stats, progress.started)
            )
            await client.update_artifact(table_id, ArtifactUpdate(data=await table.aformat()))

    async def loop(client: Any) -> None:
        while True:
            await asyncio.sleep(interval_s)
            refresh()
            log_retries()
            await publish(client, min(99.9, monitoring.percent_done(progress)))

    async with get_client() as client:
        ticker = asyncio.create_task(loop(client))
        try:
            yield
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            refresh()
            if bar is not None:
                bar.stop()
            log_retries(final=True)
            await publish(client, 100.0)


@contextlib.asynccontextmanager
async def _judge_gate(
    settings: BuildSettings, rt: BuildRuntime, embedded: bool, policy: RetryPolicy
) -> AsyncIterator[None]:
    """Open the judge gate's client when the build has one (--min-quality or a judge URL):
    its own endpoint, or the writer's when no --judge-base-url is given."""
    if settings.min_quality is None and not settings.judge_base_urls:
        yield
        return
    async with contextlib.AsyncExitStack() as stack:
        window = rt.config.context_window
        judge_embedded = embedded
        if settings.judge_base_urls:
            resolved = await stack.enter_async_context(
                open_endpoints(
                    settings.judge_base_urls,
                    settings.judge_model,
                    settings.judge_api_key_env,
                    settings.concurrency,
                    settings.judge_context_window,
                )
            )
            window, judge_embedded = resolved.context_window, resolved.embedded
            rt.judge_client = await stack.enter_async_context(
                LLMClient(resolved.endpoints, resolved.model, policy)
            )
        elif settings.judge_model not in (None, rt.client.model):
            rt.judge_client = await stack.enter_async_context(
                LLMClient(rt.client.endpoints, str(settings.judge_model), policy)
            )
        rt.judge_gate = JudgeGate(
            min_quality=settings.min_quality or 0.0,
            judge_format=judge_format_for(settings.judge_format, judge_embedded),
            context_window=window,
        )
        rt.judge_slots = asyncio.Semaphore(settings.concurrency)
        get_run_logger().info(
            "judge gate: %s, samples under S_q %s rejected",
            (rt.judge_client or rt.client).model,
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
    logger = get_run_logger()
    started = time.monotonic()
    store = Store(settings.db_url)
    run_id = store.start_run("build", settings.public())
    try:
        if settings.instructions and settings.partition is None:
            seen = monitoring.last_rejection_id(store)
            counts = ingest_task(settings.db_url, settings.instructions, settings.decontaminate)
            logger.info("ingest %s: %s", settings.instructions, counts)
            for line in monitoring.ingest_rejection_lines(store, seen):
                logger.warning(line)
        first = store.instruction_ids(
            ["pending", "planned", "written", "accepted", "rejected"], settings.limit
        )
        ids = store.instruction_ids(UNFINISHED)
        scope = set(first)
        ids = [i for i in ids if i in scope and settings.in_partition(i)]
        if settings.partition is not None:
            logger.info("partition %d of %d", settings.partition, settings.partitions)
        logger.info("%d instructions to build (%d in scope)", len(ids), len(first))
        progress = Progress(instructions_total=len(ids))
        monitoring.seed_progress(store, ids, progress)  # a resumed build starts where it was
        if ids:
            async with open_endpoints(
                settings.base_urls,
                settings.model,
                settings.api_key_env,
                settings.concurrency,
                settings.context_window,
                settings.embedded_replicas,
            ) as resolved:
                logger.info(
                    "endpoints: %s (model %s%s)",
                    [monitoring.redact_url(e.base_url) for e in resolved.endpoints],
                    resolved.model,
                    ", embedded" if resolved.embedded else "",
                )
                extra = sampling_extras(
                    resolved, settings.frequency_penalty, settings.presence_penalty
                )
                policy = RetryPolicy(
                    max_attempts=settings.max_attempts,
                    read_timeout_s=settings.request_timeout_s,
                    initial_backoff_s=settings.initial_backoff_s,
                    max_backoff_s=settings.max_backoff_s,
                    max_throttle_wait_s=settings.max_throttle_wait_min * 60.0,
                )
                async with LLMClient(
                    resolved.endpoints,
                    resolved.model,
                    policy,
                    reasoning_effort=settings.reasoning_effort,
                    extra_body=settings.extra_body,
                    api_dialect=settings.api_dialect,
                    rpm=settings.rpm,
                    tpm=settings.tpm,
                    stream=settings.stream,
                ) as client:
                    rt = BuildRuntime(
                        store=store,
                        client=client,
                        config=StageConfig(
                            min_words=settings.min_words,
                            json_plan=settings.json_plan,
                            json_style=resolved.json_style,
                            plan_temperature=settings.plan_temperature,
                            write_temperature=settings.write_temperature,
                            max_paragraph_tokens=settings.max_paragraph_tokens,
                            max_continuations=settings.max_continuations,
                            min_paragraph_share=settings.min_paragraph_share,
                            max_resamples=settings.max_resamples,
                            max_plan_resamples=settings.max_plan_resamples,
                            max_plan_steps=settings.max_paragraphs,
                            context_window=resolved.context_window,
                            quality_checks=settings.quality_checks,
                            extra_params=extra,
                            filters=FilterConfig(
                                min_words=settings.min_words,
                                max_repetition=settings.max_repetition,
                                min_length_score=settings.min_length_score,
                            ),
                        ),
                        progress=progress,
                        chain_slots=asyncio.Semaphore(settings.concurrency),
                        budget=ContextBudget(resolved.context_window),
                    )
                    async with (
                        _judge_gate(settings, rt, resolved.embedded, policy),
                        _progress_reporters(progress, settings.progress, stats=client.stats),
                    ):
                        await run_agentwrite(rt, ids, settings.batch_size)
                    logger.info(
                        "LLM: %d calls made, %d reused from the store, %d HTTP requests, "
                        "%d retries",
                        progress.calls,
                        progress.cached_calls,
                        client.stats.requests,
                        client.stats.retries,
                    )
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
        store.finish_run(run_id, "completed", summary)
        return summary
    except BaseException as exc:
        store.finish_run(run_id, "failed", {}, error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        store.close()


async def _publish(store: Store, settings: BuildSettings, summary: dict[str, Any]) -> None:
    """End-of-run artifacts: the summary table and a length histogram. The summary gains the
    run's facts first (models, endpoints redacted, the build report's path), so the returned
    and stored summary says what the artifact says."""
    from prefect.artifacts import acreate_markdown_artifact

    summary.update(monitoring.run_facts(store, settings.out_dir if settings.exports else None))
    md = summary_markdown(summary)
    out = Path(settings.out_dir)
    if settings.exports:
        png = length_histogram_png(store, out / "length_histogram.png")
        if png is not None:
            # Prefect's image artifact takes a URL only; a data URI keeps the picture inside the
            # artifact so it shows on any server without a file host.
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            md += f"\n![length histogram](data:image/png;base64,{data})\n"
        report = out / "report.html"
        if report.is_file():
            # Every sample, rejection examples and charts: too big for an artifact, so a link.
            md += f"\n[Build report: every sample, plan beside text]({report.resolve().as_uri()})\n"
    await acreate_markdown_artifact(markdown=md, key="build-summary", description="build summary")


def run_build(
    settings: BuildSettings,
    on_summary: Callable[[dict[str, Any]], None] | None = None,
    run_name: str | None = None,
    tags: Sequence[str] = (),
) -> dict[str, Any]:
    """Run the flow to completion in this process (the CLI's entry). `run_name` names the
    flow run (default: flows.monitoring.build_run_name); `tags` tag it and its task runs."""
    from prefect import tags as prefect_tags

    flow_ = build_flow.with_options(flow_run_name=run_name) if run_name else build_flow
    with prefect_tags(*tags):
        summary = asyncio.run(flow_(settings=settings))
    if on_summary:
        on_summary(summary)
    return summary


if __name__ == "__main__":  # pragma: no cover
    print("use: longwriter build --help", file=sys.stderr)
