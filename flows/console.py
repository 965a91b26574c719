"""What every command does around its flow: errors as one line on stderr, and Prefect's
temporary API server started as a child that cannot outlive the command.

Imports no Prefect at module level: `flows.cli` imports this before it sets Prefect's
environment defaults.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # a type only: `longwriter --help` must not pay for pydantic's import
    from tasks.flags import Flags


# Every subcommand: the module that registers it (flows.cli, or a module's
# `add_cli(subparsers)`) and its one-line help, which `add_command` registers. `longwriter
# --help` lists the commands from here, and a command's module is imported only when that
# command runs: most of them import Prefect or torch, which `--help`, `stats`, `export`,
# `audit` and `build --dry-run` never need (tests/flows/test_cli.py checks each help line
# against what its module registers).
COMMANDS: dict[str, tuple[str, str]] = {
    "build": ("flows.cli", "ingest, plan, write, filter and export a dataset"),
    "export": ("flows.cli", "write shards + manifest from the store"),
    "stats": ("flows.cli", "where every instruction ended, words and tokens"),
    "serve": (
        "flows.serve",
        "run the embedded llama.cpp OpenAI-compatible server in the foreground",
    ),
    "eval": (
        "flows.eval",
        "LongBench-Write: length score S_l, judged quality S_q, S per length bucket",
    ),
    "train": (
        "flows.train",
        "SFT (or --dpo) a base model on shards with TRL; saves HF model + GGUF",
    ),
    "pairs": (
        "flows.pairs",
        "DPO preference pairs: K AgentWrite variants per plan, judged, best vs lower",
    ),
    "publish": (
        "flows.publish",
        "upload OUT (card, manifest, report, shards) to the Hugging Face Hub",
    ),
    "audit": (
        "flows.audit",
        "run the build's rule checks over an existing LongWriter-format dataset",
    ),
}


def add_command(
    sub: Any,
    name: str,
    handler: Callable[[argparse.Namespace], int],
    *flags: Flags,
    doc: str | None = None,
) -> argparse.ArgumentParser:
    """A subcommand whose flags are made from settings models (tasks.flags): its help line
    from COMMANDS, its description the first paragraph of `doc` (the module's docstring)."""
    description = (doc or "").split("\n\n")[0] or None
    p = sub.add_parser(name, help=COMMANDS[name][1], description=description)
    for f in flags:
        f.add_to(p)
    p.set_defaults(handler=handler)
    return p


def fail(message: str, code: int = 2) -> int:
    """Report a command's error in one line; returns its exit code."""
    print(f"longwriter: error: {message}", file=sys.stderr)
    return code


class _PopenWithPreexec:
    """The `subprocess` module as Prefect's server module sees it, with a `preexec_fn` added
    to every Popen (see `start_prefect_api`)."""

    def __init__(self, module: Any, preexec: Any) -> None:
        self._module = module
        self._preexec = preexec

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def Popen(self, *args: Any, **kwargs: Any) -> Any:  # noqa: N802 - mirrors subprocess
        kwargs.setdefault("preexec_fn", self._preexec)
        return self._module.Popen(*args, **kwargs)


class _OneLineFor(logging.Formatter):
    """Console formatter that drops the traceback of errors the CLI reports in one line
    anyway (a refused key, an endpoint that stayed down, unusable input): Prefect logs the
    failed task and flow runs with full tracebacks, which buried that line. Other exceptions
    keep theirs; Prefect's API handler formats records itself, so the UI keeps every one."""

    def __init__(self, inner: logging.Formatter, expected: tuple[type[BaseException], ...]) -> None:
        super().__init__()
        self._inner = inner
        self._expected = expected

    def format(self, record: logging.LogRecord) -> str:
        if not (record.exc_info and isinstance(record.exc_info[1], self._expected)):
            return self._inner.format(record)
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            return self._inner.format(record)
        finally:
            record.exc_info, record.exc_text = saved


def console_logs_without_tracebacks_for(expected: tuple[type[BaseException], ...]) -> None:
    for handler in logging.getLogger().handlers:  # Prefect's console handler lives on root
        fmt = handler.formatter
        if isinstance(handler, logging.StreamHandler) and not isinstance(fmt, _OneLineFor):
            handler.setFormatter(_OneLineFor(fmt or logging.Formatter(), expected))


def start_prefect_api() -> None:
    """Start Prefect's temporary API server (used when PREFECT_API_URL is unset) now, from the
    main thread, as a child that cannot outlive this process.

    Prefect starts it lazily as a plain subprocess and stops it from `atexit`, which never
    runs when the CLI is SIGKILLed (OOM killer, `kill -9`, a CI timeout): the uvicorn server
    was left running, holding its port and database. Here the child gets
    PR_SET_PDEATHSIG=SIGKILL between fork and exec, the guarantee the embedded llama.cpp
    server has. PDEATHSIG follows the thread that forked, hence the main thread and before
    the flow starts. Prefect keeps one server instance per port and reuses this one.
    """
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return  # a real server (or a test harness): nothing of ours to start
    import prefect.server.api.server as prefect_server

    from tasks.llm.llama_server import _make_preexec

    base = prefect_server.SubprocessASGIServer
    preexec = _make_preexec(True)
    if preexec is None or None in base._instances:
        return  # not Linux, or already started in this process

    class _TiedServer(base):  # type: ignore[misc, valid-type]
        def _run_uvicorn_command(self) -> Any:
            real = prefect_server.subprocess
            prefect_server.subprocess = _PopenWithPreexec(real, preexec)  # type: ignore[assignment]
            try:
                return super()._run_uvicorn_command()
            finally:
                prefect_server.subprocess = real

    _TiedServer().start()
