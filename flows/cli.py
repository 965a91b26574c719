"""`longwriter`: the command line. Every subcommand is a thin shell over a Prefect flow or a
store query; scripts and schedules call these names, so they are a contract.

  longwriter build  --instructions PATH --db URL --out DIR [--base-url URL ...] [--model NAME]
                    [--api-key-env VAR] [--concurrency N] [--min-words N] [--limit N]
  longwriter export --db URL --out DIR
  longwriter stats  --db URL [--json]
  longwriter serve / eval / train / pairs   (see --help of each)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Imports no Prefect (which must not be imported before `_quiet_prefect_defaults`), nor
# pydantic: the settings models are imported by the command that reads them, so `--help`
# costs little more than the interpreter's start.
from flows.console import (
    COMMANDS,
    add_command,
    console_logs_without_tracebacks_for,
    fail,
)

# Modules that add their own subcommands through `add_cli(subparsers)`.
CLI_MODULES = tuple(dict.fromkeys(m for m, _ in COMMANDS.values() if m != "flows.cli"))


def _db_default() -> str:
    from tasks.settings import db_url_from_env

    return db_url_from_env()


def _quiet_prefect_defaults() -> None:
    """Prefect settings for a CLI run, unless the user set them: no telemetry noise, a
    startup timeout that suits a 2-core machine, and a terminal that shows warnings and
    errors only. The terminal is quietened at Prefect's console handler, not with
    PREFECT_LOGGING_LEVEL: that level also gates what the API handler ships, so the UI got
    none of a CLI run's INFO lines (batches, endpoints, retries) while a worker's run had them.
    Prefect reads its settings once, when it is first imported, so this runs first thing in
    `main()`."""
    from flows.monitoring import quiet_console

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    quiet_console(os.environ)


def add_build_parser(sub: Any) -> None:
    from tasks.settings import BUILD_FLAGS, DRY_RUN_FLAGS, RUN_LABEL_FLAGS

    # Every flag is made from a settings field (tasks/settings.py): its default and help.
    add_command(
        sub,
        "build",
        cmd_build,
        BUILD_FLAGS,
        RUN_LABEL_FLAGS,
        DRY_RUN_FLAGS,  # tasks.forecast.add_dry_run_arguments' flags
        doc="Ingest instructions, plan and write each sample with AgentWrite, filter and "
        "export shards. Rerunning the same command resumes from the store.",
    )


def cmd_build(args: argparse.Namespace) -> int:
    from tasks.flags import SettingsError
    from tasks.ingest import InputError
    from tasks.llm.client import LLMError
    from tasks.llm.endpoints import ConfigError
    from tasks.settings import BUILD, BUILD_FLAGS, DRY_RUN_FLAGS, RUN_LABEL_FLAGS

    values = BUILD_FLAGS.values(args)
    instructions = values.get("instructions")
    if instructions and not Path(instructions).is_file():
        return fail(f"instructions file not found: {instructions}")
    partition = values.get("partition")
    partitions = values.get("partitions", BUILD.partitions)
    if partition is not None and not 0 <= partition < partitions:
        return fail(f"--partition must be in 0..{partitions - 1}")
    try:
        settings = BUILD_FLAGS.settings(args)
        labels = RUN_LABEL_FLAGS.settings(args)
        if DRY_RUN_FLAGS.settings(args).dry_run:
            from tasks.forecast import run_dry_run  # imports the stages: only for a dry run

            return run_dry_run(args, settings.db_url)
    except SettingsError as exc:
        return fail(str(exc))
    from flows import prefect_api

    # Prefect's temporary API server boots in its own process (on the other core) while this
    # one imports the flow; run_build waits for it only as the flow starts. None when a
    # server is to be reused (PREFECT_API_URL set): nothing is started, as before. Already
    # started by main() in a fresh process: this returns that one.
    prefect_api.launch()
    from flows.build import run_build  # Prefect: only once the build really runs

    expected = (ConfigError, InputError, LLMError)
    console_logs_without_tracebacks_for(expected)
    try:
        summary = run_build(settings, run_name=labels.run_name, tags=labels.tag)
    except expected as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        return fail("interrupted; rerun the same command to resume", code=130)
    print(_summary_table(summary))
    return 0


def _summary_table(summary: dict[str, Any]) -> str:
    w = summary["words"]
    rows = [
        ("accepted samples", summary["accepted"]),
        ("rejected", summary["rejected"]),
        ("words p10/p50/p90", f"{w['p10']}/{w['p50']}/{w['p90']}"),
        ("tokens in/out", f"{summary['tokens']['prompt']}/{summary['tokens']['completion']}"),
        ("wall time", f"{summary.get('wall_s', 0)} s"),
        ("shards", summary.get("out_dir") or "(export off)"),
    ]
    for stage, reasons in sorted(summary["rejections"].items()):
        for reason, n in sorted(reasons.items()):
            rows.append((f"  rejected at {stage}: {reason}", n))
    from tasks.report import quality_rows

    rows += [(f"  {label}", value) for label, value in quality_rows(summary.get("quality") or {})]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def add_export_parser(sub: Any) -> None:
    from tasks.settings import EXPORT_FLAGS

    add_command(sub, "export", cmd_export, EXPORT_FLAGS)


def cmd_export(args: argparse.Namespace) -> int:
    from storage.store import Store
    from tasks.export import export_store
    from tasks.flags import SettingsError
    from tasks.settings import EXPORT_FLAGS

    try:
        settings = EXPORT_FLAGS.settings(args)
    except SettingsError as exc:
        return fail(str(exc))
    store = Store(settings.db_url)
    try:
        meta = {"command": "export", "license": settings.license}
        manifest = export_store(store, Path(settings.out_dir), meta, settings.shard_size)
    finally:
        store.close()
    print(
        f"exported {manifest['counts']['samples']} samples in {manifest['counts']['shards']} "
        f"shard(s) to {Path(settings.out_dir).resolve()}"
    )
    return 0


def add_stats_parser(sub: Any) -> None:
    p = sub.add_parser("stats", help="where every instruction ended, words and tokens")
    p.add_argument("--db", default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--lineage",
        metavar="PATH",
        default=None,
        help="print shards -> model -> scores for a model folder (or an eval folder), "
        "re-checking every sha256; no store needed",
    )
    p.set_defaults(handler=cmd_stats)


def cmd_stats(args: argparse.Namespace) -> int:
    if args.lineage:
        from tasks.lineage import lineage_chain

        if not Path(args.lineage).exists():
            return _fail(f"no such model or eval folder: {args.lineage}")
        print("\n".join(lineage_chain(Path(args.lineage))))
        return 0
    url = args.db or _db_default()
    from tasks.sqlite_stats import sqlite_stats

    # A SQLite store is read with sqlite3 (the same queries, no SQLAlchemy import: ~0.7 s);
    # anything else, or a store that needs its schema brought up to date, opens the Store.
    lean = sqlite_stats(url)
    if lean is not None:
        redacted_url, stats = lean
    else:
        from storage.store import Store

        store = Store(url)
        try:
            stats = store.stats()
        finally:
            store.close()
        redacted_url = store.redacted_url
    if args.json:
        print(json.dumps(stats, indent=2, ensure_ascii=False))
        return 0
    print(f"store: {redacted_url}")
    print(f"instructions: {stats['instructions']['total']}")
    for status, n in sorted(stats["instructions"]["by_status"].items()):
        print(f"  {status}: {n}")
    print("rejections:")
    for stage, reasons in sorted(stats["rejections"].items()):
        for reason, n in sorted(reasons.items()):
            print(f"  {stage}/{reason}: {n}")
    from tasks.report import quality_rows

    quality = quality_rows(stats.get("quality") or {})
    if quality:
        print("quality checks:")
        for label, value in quality:
            print(f"  {label}: {value}")
    for src in stats["sources"]:
        print(
            f"input {src['path']}: {src['records']} records = {src['instructions']} instructions"
            f" + {src['ingest_rejections']} rejected at ingest"
        )
    print(f"samples: {stats['samples']['accepted']} ({stats['samples']['words']} words)")
    for stage, c in sorted(stats["llm_calls"].items()):
        print(
            f"llm {stage}: {c['calls']} calls, {c['prompt_tokens']} tokens in, "
            f"{c['completion_tokens']} out, {c['http_attempts']} HTTP attempts"
            + (f", {c['cached_tokens']} cached in" if c.get("cached_tokens") else "")
            + (f", {c['reasoning_tokens']} reasoning" if c.get("reasoning_tokens") else "")
        )
    return 0


_fail = fail  # the name cmd_stats calls


_OWN_PARSERS = {"build": add_build_parser, "export": add_export_parser, "stats": add_stats_parser}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The CLI's parser. With `argv`, only the command it names is set up in full (its module
    imported, its flags added); the others are listed by name and help line, so a command
    costs the imports of its own module only. Without `argv`, every command is set up."""
    parser = argparse.ArgumentParser(
        prog="longwriter", description="AgentWrite long-output SFT data factory"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    # The command is the first word: the top-level parser has no option that takes a value.
    chosen = next((a for a in argv or () if not a.startswith("-")), None)
    added: set[str] = set()
    for name, (module_name, help_line) in COMMANDS.items():
        if name in added:
            continue
        if argv is not None and name != chosen:
            sub.add_parser(name, help=help_line)
            continue
        if module_name == "flows.cli":
            _OWN_PARSERS[name](sub)
        else:
            try:
                module = importlib.import_module(module_name)
            except ImportError:  # an optional extra not installed: as before, no such command
                continue
            module.add_cli(sub)
        added.update(sub.choices)
    return parser


def _runs_a_flow(argv: Sequence[str]) -> bool:
    """`build` that will start its flow (not its --help or --dry-run), in a process where
    nothing imported Prefect yet (a fresh `longwriter`; not a caller holding its own
    settings)."""
    chosen = next((a for a in argv if not a.startswith("-")), None)
    asks_no_flow = {"-h", "--help", "--dry-run"} & set(argv)
    return chosen == "build" and not asks_no_flow and "prefect" not in sys.modules


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_prefect_defaults()  # before anything imports Prefect
    argv = list(sys.argv[1:] if argv is None else argv)
    if _runs_a_flow(argv):
        from flows import prefect_api

        # First thing: the temporary API server (~4 s to boot here) starts on the other core
        # while this process reads its flags and imports the flow. The child reads Prefect's
        # settings itself; a server the settings name is reused instead (prefect_api.launch).
        # A build that stops on its flags stops the child at exit.
        prefect_api.launch()
    args = build_parser(argv).parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
