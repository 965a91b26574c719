"""What every flow does around its work, written once: the recorded run, the writer and
judge clients, the end-of-run artifacts and the periodic progress refresh.

    with recorded_run(url, "pairs", settings.public()) as run:   # Run row: started ...
        async with contextlib.AsyncExitStack() as stack:
            writer = await open_writer(stack, settings, retry_policy(settings))
            judge = await open_judge(stack, settings, writer, retry_policy(settings))
            async with ticking(15.0, refresh):
                ...                                               # the flow's own work
        run.summary = {...}                                       # ... completed, or failed
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    aupdate_progress_artifact,
)

from storage.models import RunStatus
from storage.store import Store
from tasks.llm.client import LLMClient, RetryPolicy
from tasks.llm.endpoints import ConfigError, ResolvedEndpoints, open_endpoints
from tasks.report import length_histogram_png, summary_markdown
from tasks.settings import ClientPolicy, JudgeEndpoint, WriterEndpoint

# -- the recorded run ----------------------------------------------------------------------


@dataclass
class RecordedRun:
    """One command's Run row in the store; `summary` is what it is finished with."""

    store: Store
    id: int
    summary: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def recorded_run(store_url: str, command: str, settings: dict[str, Any]) -> Iterator[RecordedRun]:
    """Open the store and record a run of `command`: started now; finished `completed` with
    `run.summary` when the block ends, or `failed` with the error when it raises (Ctrl-C
    and cancellation too, so no run stays `running` for ever); the store closed either way."""
    store = Store(store_url)
    run = RecordedRun(store, store.start_run(command, settings))
    try:
        yield run
        store.finish_run(run.id, RunStatus.COMPLETED, run.summary)
    except BaseException as exc:
        store.finish_run(run.id, RunStatus.FAILED, {}, error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        store.close()


# -- writer and judge clients -------------------------------------------------------------


def retry_policy(settings: ClientPolicy, **more: Any) -> RetryPolicy:
    """The client's retry policy from a command's settings (`more`: fields only some
    commands set, e.g. the build's throttle wait)."""
    return RetryPolicy(
        max_attempts=settings.max_attempts,
        read_timeout_s=settings.request_timeout_s,
        initial_backoff_s=settings.initial_backoff_s,
        max_backoff_s=settings.max_backoff_s,
        http_transport=settings.http_transport,
        **more,
    )


@dataclass(frozen=True)
class Opened:
    """Endpoints and the client that talks to them."""

    endpoints: ResolvedEndpoints
    client: LLMClient


async def open_writer(
    stack: contextlib.AsyncExitStack,
    settings: WriterEndpoint,
    concurrency: int,
    policy: RetryPolicy,
    embedded_replicas: int | None = None,
    **client_options: Any,
) -> Opened:
    """The writer's endpoints (the embedded server when none is given) and client, closed
    with `stack`."""
    resolved = await stack.enter_async_context(
        open_endpoints(
            settings.base_urls,
            settings.model,
            settings.api_key_env,
            concurrency,
            settings.context_window,
            embedded_replicas,
        )
    )
    client = await stack.enter_async_context(
        LLMClient(resolved.endpoints, resolved.model, policy, **client_options)
    )
    return Opened(resolved, client)


def require_judge_model(settings: JudgeEndpoint) -> None:
    """A judge endpoint needs a model name: checked before any server starts."""
    if settings.judge_base_urls and not settings.judge_model:
        raise ConfigError("--judge-model is required with --judge-base-url")


async def open_judge(
    stack: contextlib.AsyncExitStack,
    settings: JudgeEndpoint,
    writer: Opened,
    policy: RetryPolicy,
    concurrency: int,
) -> Opened:
    """The judge: its own endpoints when --judge-base-url is given; else the writer's
    endpoints, with their own client when --judge-model names another model; else the
    writer's client itself (the writer judges)."""
    if settings.judge_base_urls:
        resolved = await stack.enter_async_context(
            open_endpoints(
                settings.judge_base_urls,
                settings.judge_model,
                settings.judge_api_key_env,
                concurrency,
                settings.judge_context_window,
            )
        )
        client = await stack.enter_async_context(
            LLMClient(resolved.endpoints, resolved.model, policy)
        )
        return Opened(resolved, client)
    if settings.judge_model not in (None, writer.client.model):
        client = await stack.enter_async_context(
            LLMClient(writer.endpoints.endpoints, str(settings.judge_model), policy)
        )
        return Opened(writer.endpoints, client)
    return writer


def http_requests(*clients: LLMClient | None) -> int:
    """HTTP requests of the run's clients, each counted once (the judge may be the writer)."""
    seen: list[LLMClient] = []
    for c in clients:
        if c is not None and all(c is not s for s in seen):
            seen.append(c)
    return sum(c.stats.requests for c in seen)


# -- artifacts ------------------------------------------------------------------------------


def image_markdown(alt: str, png: Path) -> str:
    """A PNG inside markdown as a data URI: Prefect's image artifact takes a URL only, and a
    data URI shows on any server without a file host (the UI renders `data:image/*`)."""
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return f"\n![{alt}](data:image/png;base64,{data})\n"


def summary_with_histogram(
    store: Store, summary: dict[str, Any], out_dir: Path | None, title: str | None = None
) -> str:
    """The build summary table and, when shards were written to `out_dir`, the length
    histogram (also saved there as length_histogram.png)."""
    md = summary_markdown(summary) if title is None else summary_markdown(summary, title=title)
    if out_dir is not None:
        png = length_histogram_png(store, out_dir / "length_histogram.png")
        if png is not None:
            md += image_markdown("length histogram", png)
    return md


async def publish_markdown(md: str, key: str, description: str) -> None:
    await acreate_markdown_artifact(markdown=md, key=key, description=description)


class ProgressArtifact:
    """A Prefect progress artifact. Updates never fail the run (the UI is a view) and the
    shown share never moves back (an estimate of the work to come can shrink)."""

    def __init__(self, artifact_id: Any) -> None:
        self.id = artifact_id
        self.shown = 0.0

    @classmethod
    async def create(cls, key: str, description: str) -> ProgressArtifact:
        return cls(await acreate_progress_artifact(progress=0.0, key=key, description=description))

    async def update(self, percent: float, description: str | None = None, **kw: Any) -> None:
        self.shown = max(self.shown, percent)
        with contextlib.suppress(Exception):
            await aupdate_progress_artifact(self.id, self.shown, description=description, **kw)


# -- periodic refresh -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def ticking(
    interval_s: float,
    tick: Callable[[], Awaitable[None]],
    final: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[None]:
    """Run `tick` every `interval_s` seconds while the block runs, then `final` once when it
    ends (also on errors: the last figures are the ones left shown)."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval_s)
            await tick()

    ticker = asyncio.create_task(loop())
    try:
        yield
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        if final is not None:
            await final()
