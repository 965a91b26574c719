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
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Modules that add their own subcommands through `add_cli(subparsers)`. Missing ones (an
# optional extra not installed) just do not appear.
CLI_MODULES = (
    "flows.serve",
    "flows.eval",
    "flows.train",
    "flows.pairs",
    "flows.publish",
    "flows.audit",
)


def _db_default() -> str:
    return os.environ.get("LONGWRITER_DB_URL", "sqlite:///longwriter.db")


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
    p = sub.add_parser("build", help="ingest, plan, write, filter and export a dataset")
    p.add_argument("--instructions", help="instruction file (jsonl, json, parquet, csv)")
    p.add_argument("--db", default=None, help="store URL or SQLite path (env LONGWRITER_DB_URL)")
    p.add_argument("--out", default="out", help="output directory for shards + manifest")
    p.add_argument(
        "--base-url",
        action="append",
        default=None,
        help="OpenAI-compatible /v1 URL; repeat or comma-separate for several "
        "(env LONGWRITER_BASE_URL; none: the embedded llama.cpp server)",
    )
    p.add_argument("--model", default=None, help="model name (env LONGWRITER_MODEL)")
    p.add_argument(
        "--api-key-env",
        default="LONGWRITER_API_KEY",
        help="name of the environment variable holding the API key",
    )
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--min-words", type=int, default=2000)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--context-window", type=int, default=None)
    p.add_argument(
        "--embedded-replicas",
        type=int,
        default=None,
        help="embedded llama.cpp servers when no --base-url (default: one per core, up to 4)",
    )
    p.add_argument("--max-paragraph-tokens", type=int, default=2048)
    p.add_argument("--frequency-penalty", type=float, default=None)
    p.add_argument("--presence-penalty", type=float, default=None)
    p.add_argument("--max-repetition", type=float, default=0.3)
    p.add_argument(
        "--max-resamples", type=int, default=2, help="redrafts of a paragraph that loops"
    )
    p.add_argument(
        "--min-paragraph-share",
        type=float,
        default=0.5,
        help="continue a paragraph that ends under this share of its planned words (0-1)",
    )
    p.add_argument(
        "--max-continuations",
        type=int,
        default=2,
        help="continuation calls per paragraph (cut at max_tokens or short)",
    )
    p.add_argument(
        "--max-paragraphs",
        type=int,
        default=50,
        help="most paragraphs per plan, 1-50: bounds the calls and words of each sample",
    )
    p.add_argument(
        "--max-plan-resamples",
        type=int,
        default=2,
        help="new plans (new seed) asked for when a plan fails validation",
    )
    p.add_argument("--no-json-plan", action="store_true", help="ask for line-format plans")
    p.add_argument(
        "--no-quality-checks",
        action="store_true",
        help="skip the plan and paragraph quality checks (echo, chatter, markup, language, "
        "restated paragraphs); the sample filters still run",
    )
    p.add_argument(
        "--min-quality",
        type=float,
        default=None,
        help="judge gate: score every accepted sample on LongBench-Write's six dimensions and "
        "reject those with S_q (0-100) under this (judge: --judge-base-url, else the writer)",
    )
    p.add_argument(
        "--judge-base-url",
        action="append",
        default=None,
        help="judge /v1 URL for the judge gate; repeat or comma-separate for several",
    )
    p.add_argument("--judge-model", default=None, help="judge model (default: the writer's)")
    p.add_argument(
        "--judge-api-key-env",
        default="LONGWRITER_JUDGE_API_KEY",
        help="name of the environment variable holding the judge's API key",
    )
    p.add_argument(
        "--judge-format",
        default="auto",
        help="judge structured output: auto, json_schema, json_object or none",
    )
    p.add_argument(
        "--min-length-score",
        type=float,
        default=0.0,
        help="reject samples whose length score S_l (0-100, LongBench-Write's formula) against "
        "the instruction's required length is below this",
    )
    p.add_argument("--no-decontaminate", action="store_true")
    p.add_argument("--no-export", action="store_true")
    _add_license_argument(p)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument(
        "--reasoning-effort",
        default=None,
        help="reasoning_effort sent with every call (OpenAI reasoning models: low/medium/high)",
    )
    p.add_argument(
        "--extra-body",
        type=_json_object,
        default=None,
        metavar="JSON",
        help='extra request fields sent with every call, e.g. \'{"chat_template_kwargs": '
        '{"enable_thinking": false}}\' (vLLM/SGLang Qwen3)',
    )
    p.add_argument(
        "--api-dialect",
        choices=("auto", "chat", "openai-reasoning"),
        default="auto",
        help="parameter names: auto learns max_completion_tokens / no temperature from the "
        "endpoint's 400s; chat never switches; openai-reasoning starts switched",
    )
    p.add_argument("--rpm", type=float, default=None, help="requests per minute to stay under")
    p.add_argument(
        "--tpm", type=float, default=None, help="tokens per minute (prompt + max_tokens)"
    )
    p.add_argument(
        "--max-throttle-wait",
        type=float,
        default=10.0,
        metavar="MIN",
        help="minutes one call may wait out 429s before the build stops (rerun resumes)",
    )
    p.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="stream answers (SSE); proxies that cut silent long calls (524/504) pass them",
    )
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--partition",
        type=int,
        default=None,
        help="build only instructions with id %% PARTITIONS == PARTITION (one machine's share "
        "of a build over a shared PostgreSQL store; ingest and export run separately)",
    )
    p.add_argument("--partitions", type=int, default=1)
    p.add_argument(
        "--run-name",
        default=None,
        help="Prefect flow-run name (default: the input file's name and the UTC date and time)",
    )
    p.add_argument(
        "--tag",
        action="append",
        default=None,
        help="Prefect tag on the flow run and its task runs; repeat for several",
    )
    from tasks.forecast import add_dry_run_arguments

    add_dry_run_arguments(p)
    p.add_argument("--json", action="store_true", help="with --dry-run: print JSON")
    p.set_defaults(handler=cmd_build)


def cmd_build(args: argparse.Namespace) -> int:
    from flows.build import BuildSettings, run_build
    from tasks.endpoints import ConfigError
    from tasks.ingest import InputError
    from tasks.llm_client import LLMError

    if args.instructions and not Path(args.instructions).is_file():
        return _fail(f"instructions file not found: {args.instructions}")
    if args.dry_run:
        from tasks.forecast import run_dry_run

        return run_dry_run(args, args.db or _db_default())
    if args.partition is not None and not 0 <= args.partition < args.partitions:
        return _fail(f"--partition must be in 0..{args.partitions - 1}")
    settings = BuildSettings(
        instructions=args.instructions,
        db_url=args.db or _db_default(),
        out_dir=args.out,
        base_urls=args.base_url or [],
        model=args.model,
        api_key_env=args.api_key_env,
        concurrency=args.concurrency,
        min_words=args.min_words,
        limit=args.limit,
        batch_size=args.batch_size,
        context_window=args.context_window,
        max_paragraph_tokens=args.max_paragraph_tokens,
        frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty,
        max_repetition=args.max_repetition,
        max_resamples=args.max_resamples,
        max_plan_resamples=args.max_plan_resamples,
        max_paragraphs=args.max_paragraphs,
        min_paragraph_share=args.min_paragraph_share,
        max_continuations=args.max_continuations,
        embedded_replicas=args.embedded_replicas,
        json_plan=not args.no_json_plan,
        quality_checks=not args.no_quality_checks,
        min_quality=args.min_quality,
        judge_base_urls=args.judge_base_url or [],
        judge_model=args.judge_model,
        judge_api_key_env=args.judge_api_key_env,
        judge_format=args.judge_format,
        min_length_score=args.min_length_score,
        decontaminate=not args.no_decontaminate,
        export=not args.no_export,
        license=args.license,
        request_timeout_s=args.request_timeout,
        reasoning_effort=args.reasoning_effort,
        extra_body=args.extra_body or {},
        api_dialect=args.api_dialect,
        rpm=args.rpm,
        tpm=args.tpm,
        max_throttle_wait_min=args.max_throttle_wait,
        stream=args.stream,
        progress=sys.stderr.isatty() if args.progress is None else args.progress,
        partition=args.partition,
        partitions=args.partitions,
    )
    expected = (ConfigError, InputError, LLMError)
    _console_logs_without_tracebacks_for(expected)
    try:
        start_prefect_api()
        summary = run_build(settings, run_name=args.run_name, tags=args.tag or ())
    except expected as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted; rerun the same command to resume", code=130)
    print(_summary_table(summary))
    return 0


def _json_object(text: str) -> dict[str, Any]:
    """argparse type of --extra-body: a JSON object, or a one-line usage error."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


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
    p = sub.add_parser("export", help="write shards + manifest from the store")
    p.add_argument("--db", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--shard-size", type=int, default=1000)
    _add_license_argument(p)
    p.set_defaults(handler=cmd_export)


def _add_license_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--license",
        default="unknown",
        help="licence for the dataset card, a Hub licence id (apache-2.0, cc-by-4.0, ...); "
        "default unknown: check the generator model's terms and the instructions' source",
    )


def cmd_export(args: argparse.Namespace) -> int:
    from storage.store import Store
    from tasks.export import export_store

    store = Store(args.db or _db_default())
    try:
        settings = {"command": "export", "license": args.license}
        manifest = export_store(store, Path(args.out), settings, args.shard_size)
    finally:
        store.close()
    print(
        f"exported {manifest['counts']['samples']} samples in {manifest['counts']['shards']} "
        f"shard(s) to {Path(args.out).resolve()}"
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
    from storage.store import Store

    if args.lineage:
        from tasks.lineage import lineage_chain

        if not Path(args.lineage).exists():
            return _fail(f"no such model or eval folder: {args.lineage}")
        print("\n".join(lineage_chain(Path(args.lineage))))
        return 0
    url = args.db or _db_default()
    store = Store(url)
    try:
        stats = store.stats()
    finally:
        store.close()
    if args.json:
        print(json.dumps(stats, indent=2, ensure_ascii=False))
        return 0
    print(f"store: {store.redacted_url}")
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


def _fail(message: str, code: int = 2) -> int:
    print(f"longwriter: error: {message}", file=sys.stderr)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longwriter", description="AgentWrite long-output SFT data factory"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_build_parser(sub)
    add_export_parser(sub)
    add_stats_parser(sub)
    for name in CLI_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        add = getattr(module, "add_cli", None)
        if add is not None:
            add(sub)
    return parser


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


def _console_logs_without_tracebacks_for(expected: tuple[type[BaseException], ...]) -> None:
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

    from tasks.llama_server import _make_preexec

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


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_prefect_defaults()  # before anything imports Prefect
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
