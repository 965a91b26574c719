"""Which LLM endpoints a run talks to: the ones given (flags, env), else the embedded
llama.cpp server, started for the run and stopped when it ends (also on errors)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from tasks.llm.client import Endpoint
from tasks.settings import BUILD, EMBEDDED_CONTEXT_WINDOW

REMOTE_CONTEXT_WINDOW = 32768
# The embedded 135M model loops: it repeats main points in plans and sentences in paragraphs
# (measured: 2 of 3 plans degenerate at default sampling). These penalties are its defaults;
# flags override them, and other endpoints keep their own defaults.
EMBEDDED_SAMPLING: dict[str, float] = {"frequency_penalty": 0.8, "presence_penalty": 0.5}
# What the embedded SmolLM2-135M-Instruct writes: English (its model card). Asked in Chinese it
# writes word salad in Chinese characters (measured in the demo: "美食是一种搏剧，但可能有一个
# 方面多少迳茧毛" repeated, plans of run-together characters) that passes a language check and
# would poison a dataset, so other languages are rejected before any call.
EMBEDDED_LANGUAGES: tuple[str, ...] = ("en",)


def writer_languages(resolved: ResolvedEndpoints, languages: list[str] | None) -> tuple[str, ...]:
    """Instruction languages the writer is given: the user's list, else the embedded model's,
    else every language (empty: no gate; a remote model's languages are the user's to know)."""
    if languages:
        return tuple(languages)
    return EMBEDDED_LANGUAGES if resolved.embedded else ()


class ConfigError(ValueError):
    """Settings that cannot work; reported as one line with a non-zero exit."""


@dataclass(frozen=True)
class ResolvedEndpoints:
    endpoints: list[Endpoint]
    model: str
    embedded: bool
    context_window: int

    @property
    def json_style(self) -> str:
        """Structured-output dialect for plan requests (see tasks.plan.response_format)."""
        return "llama_cpp" if self.embedded else "json_schema"


def split_urls(values: Sequence[str] | None) -> list[str]:
    """Flags may repeat and each may hold a comma-separated list."""
    urls: list[str] = []
    for v in values or []:
        urls += [u.strip() for u in v.split(",") if u.strip()]
    return urls


def api_key_from_env(api_key_env: str | None) -> str | None:
    """The key is read from the environment at run time and never stored anywhere else."""
    for var in (api_key_env, BUILD.api_key_env):
        if var and os.environ.get(var):
            return os.environ[var]
    return None


@asynccontextmanager
async def open_endpoints(
    base_urls: Sequence[str] | None,
    model: str | None,
    api_key_env: str | None,
    concurrency: int,
    context_window: int | None = None,
    embedded_replicas: int | None = None,
) -> AsyncIterator[ResolvedEndpoints]:
    """The endpoints given, or the embedded model: `embedded_replicas` llama.cpp servers
    (default: tasks.llm.llama_server.embedded_layout, one per core up to 4), stopped on exit."""
    urls = split_urls(base_urls) or split_urls([os.environ.get("LONGWRITER_BASE_URL", "")])
    model = model or os.environ.get("LONGWRITER_MODEL") or None
    if urls:
        if not model:
            raise ConfigError("--model (or LONGWRITER_MODEL) is required with --base-url")
        for u in urls:
            if not u.startswith(("http://", "https://")):
                raise ConfigError(f"base URL must start with http:// or https://: {u!r}")
        key = api_key_from_env(api_key_env)
        # Each endpoint gets the whole concurrency: with several replicas the flow's chain
        # limit is what bounds total load, and a slow replica just gets fewer requests.
        yield ResolvedEndpoints(
            [Endpoint(u, api_key=key, max_concurrency=concurrency) for u in urls],
            model,
            embedded=False,
            context_window=context_window or REMOTE_CONTEXT_WINDOW,
        )
        return
    from tasks.llm.llama_server import embedded_layout

    layout = embedded_layout()
    replicas = layout.replicas if embedded_replicas is None else max(1, embedded_replicas)
    servers = [layout.server(context_window or EMBEDDED_CONTEXT_WINDOW) for _ in range(replicas)]
    try:
        # Starting and waiting block for seconds: keep the event loop free meanwhile.
        for server in servers:
            await asyncio.to_thread(server.start)
        await asyncio.gather(*(asyncio.to_thread(s.wait_ready, 180.0) for s in servers))
        # Each replica answers one request at a time; a request queued at a busy replica
        # would wait there while another sits idle, so each takes its share of the slots.
        per_replica = max(1, -(-concurrency // replicas))
        yield ResolvedEndpoints(
            [Endpoint(s.base_url, max_concurrency=per_replica) for s in servers],
            servers[0].model,
            embedded=True,
            context_window=context_window or EMBEDDED_CONTEXT_WINDOW,
        )
    finally:
        for server in servers:
            server.stop()


def sampling_extras(
    resolved: ResolvedEndpoints,
    frequency_penalty: float | None,
    presence_penalty: float | None,
) -> dict[str, float]:
    """Extra sampling parameters for plan and write calls: the user's, else the embedded
    model's defaults, else none (the endpoint decides)."""
    extras = dict(EMBEDDED_SAMPLING) if resolved.embedded else {}
    if frequency_penalty is not None:
        extras["frequency_penalty"] = frequency_penalty
    if presence_penalty is not None:
        extras["presence_penalty"] = presence_penalty
    return extras
