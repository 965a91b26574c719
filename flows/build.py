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
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field, model_validator

from storage.store import Store, redact_db_url
from tasks.endpoints import open_endpoints, sampling_extras
from tasks.export import export_task
from tasks.filters import FilterConfig, filter_batch
from tasks.ingest import ingest_task
from tasks.llm_client import LLMClient, RetryPolicy
from tasks.plan import plan_batch
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
    progress: bool = False  # terminal progress bar (the CLI turns it on for a tty)
    # Real endpoints (tasks/llm_client.py): fields sent with every request, part of each key.
    reasoning_effort: str | None = Field(
        None, description="reasoning_effort sent with every call (OpenAI reasoning models)"
    )
    extra_body: dict[str, Any] = Field(
        default_factory=dict, description="extra request fields, e.g. chat_template_kwargs"
    )
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
    progress: Progress, show_bar: bool, interval_s: float = 2.0
) -> AsyncIterator[None]:
    """Terminal bar (rich) and a Prefect progress artifact, refreshed every few seconds."""
    from prefect.artifacts import acreate_progress_artifact, aupdate_progress_artifact

    artifact_id = await acreate_progress_artifact(
        progress=0.0, key="build-progress", description="instructions finished"
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

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval_s)
            refresh()
            pct = 100.0 * progress.instructions_done / max(1, progress.instructions_total)
            with contextlib.suppress(Exception):  # the UI is a view; never fail the build on it
                await aupdate_progress_artifact(artifact_id, pct)

    ticker = asyncio.create_task(loop())
    try:
        yield
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        refresh()
        if bar is not None:
            bar.stop()
        with contextlib.suppress(Exception):
            await aupdate_progress_artifact(artifact_id, 100.0)


async def run_agentwrite(rt: BuildRuntime, ids: list[int], batch_size: int) -> None:
    """Fan out: every batch runs plan -> write -> filter; batches run concurrently."""
    runtime_id = register(rt)

    async def batch(chunk: list[int]) -> None:
        planned = await plan_batch(runtime_id, chunk)
        written = await write_batch(runtime_id, chunk)
        accepted = await filter_batch(runtime_id, chunk)
        _log_batch(rt.store, chunk, planned, written, accepted)

    try:
        # The first failing batch cancels the others and its error is raised as itself.
        await gather_all(batch(chunk) for chunk in _chunks(ids, batch_size))
    finally:
        unregister(runtime_id)


MAX_LOGGED_REJECTIONS = 20  # per batch: the store and `longwriter stats` have them all


def _log_batch(store: Store, chunk: list[int], planned: int, written: int, accepted: int) -> None:
    """One log line per batch and one per rejected instruction with its stage and reason, so a
    run's log in the UI says what each stage did and why an item stopped."""
    from sqlmodel import col, select

    from storage.models import Rejection

    logger = get_run_logger()
    with store.session() as s:
        rejected = s.exec(
            select(Rejection)
            .where(col(Rejection.instruction_id).in_(chunk))
            .order_by(col(Rejection.instruction_id))
        ).all()
    logger.info(
        "batch #%d-#%d (%d instructions): planned %d, written %d, accepted %d, rejected %d",
        chunk[0],
        chunk[-1],
        len(chunk),
        planned,
        written,
        accepted,
        len(rejected),
    )
    for r in rejected[:MAX_LOGGED_REJECTIONS]:
        detail = f": {r.detail[:200]}" if r.detail else ""
        logger.warning(
            "instruction %s rejected at %s: %s%s", r.instruction_id, r.stage, r.reason, detail
        )
    if len(rejected) > MAX_LOGGED_REJECTIONS:
        logger.warning("... and %d more (longwriter stats)", len(rejected) - MAX_LOGGED_REJECTIONS)


@flow(name="longwriter-build", log_prints=True)
async def build_flow(settings: BuildSettings) -> dict[str, Any]:
    logger = get_run_logger()
    started = time.monotonic()
    store = Store(settings.db_url)
    run_id = store.start_run("build", settings.public())
    try:
        if settings.instructions and settings.partition is None:
            counts = ingest_task(settings.db_url, settings.instructions, settings.decontaminate)
            logger.info("ingest %s: %s", settings.instructions, counts)
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
                    [e.base_url for e in resolved.endpoints],
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
                )
                async with LLMClient(
                    resolved.endpoints,
                    resolved.model,
                    policy,
                    reasoning_effort=settings.reasoning_effort,
                    extra_body=settings.extra_body,
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
                            extra_params=extra,
                            filters=FilterConfig(
                                min_words=settings.min_words,
                                max_repetition=settings.max_repetition,
                            ),
                        ),
                        progress=progress,
                        chain_slots=asyncio.Semaphore(settings.concurrency),
                        budget=ContextBudget(resolved.context_window),
                    )
                    async with _progress_reporters(progress, settings.progress):
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
    """End-of-run artifacts: the summary table and a length histogram."""
    from prefect.artifacts import acreate_markdown_artifact

    md = summary_markdown(summary)
    out = Path(settings.out_dir)
    if settings.exports:
        png = length_histogram_png(store, out / "length_histogram.png")
        if png is not None:
            # Prefect's image artifact takes a URL only; a data URI keeps the picture inside the
            # artifact so it shows on any server without a file host.
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            md += f"\n![length histogram](data:image/png;base64,{data})\n"
    await acreate_markdown_artifact(markdown=md, key="build-summary", description="build summary")


def run_build(
    settings: BuildSettings, on_summary: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Run the flow to completion in this process (the CLI's entry)."""
    summary = asyncio.run(build_flow(settings=settings))
    if on_summary:
        on_summary(summary)
    return summary


if __name__ == "__main__":  # pragma: no cover
    print("use: longwriter build --help", file=sys.stderr)
