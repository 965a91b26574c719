"""`longwriter audit`: the build's rule checks over any LongWriter-format file, no LLM.

    longwriter audit --data PATH --out DIR [--min-words N] [--json] [--workers N]

Not a Prefect flow: an audit is one pass over a file, with nothing to schedule, retry or
resume (tasks.audit holds the work). It imports neither Prefect nor torch, nor does anything
it reuses (the sample filters, the shard writer): tests/tasks/test_audit.py checks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tasks.audit import AuditInputError, default_workers, run_audit
from tasks.flags import Flags, SettingsError
from tasks.settings import AuditSettings

# ngram is no flag: the audit's repetition check is the build's (tasks/settings.py).
AUDIT_FLAGS = Flags(AuditSettings, exclude=("ngram",))


def _summary_lines(summary: dict[str, Any], out: Path) -> list[str]:
    rejected = summary["rejected"]
    lines = [
        f"records: {summary['records']}  kept: {summary['kept']}  "
        f"rejected: {summary['rejected_records']}",
    ]
    if rejected:
        lines.append("rejected by reason: " + ", ".join(f"{r} {n}" for r, n in rejected.items()))
    if summary["cleaned"]:
        lines.append(
            "cleaned (cuts): " + ", ".join(f"{c} {n}" for c, n in summary["cleaned"].items())
        )
    lines.append(f"wrote {out / 'audit.json'}, {out / 'audit.md'}, {out / 'kept'}/")
    return lines


def run_audit_cli(args: argparse.Namespace) -> int:
    if args.judge_base_url or args.judge_model or args.min_quality is not None:
        # Deliberately refused rather than ignored: a user who asked for a quality gate must
        # not get an unjudged "kept" set believing it was judged.
        print(
            "error: the judge gate (--judge-base-url/--judge-model/--min-quality) is not wired "
            "into audit yet; run without it for the rule checks",
            file=sys.stderr,
        )
        return 2
    try:
        settings = AUDIT_FLAGS.settings(args)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = run_audit(
            Path(args.data), Path(args.out), settings, workers=args.workers or default_workers()
        )
    except (FileNotFoundError, AuditInputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**summary, "out": str(args.out)}, ensure_ascii=False))
    else:
        print("\n".join(_summary_lines(summary, Path(args.out))))
    return 0


def add_cli(subparsers: Any) -> None:
    """Register `longwriter audit` on the top-level CLI's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "audit",
        help="run the build's rule checks over an existing LongWriter-format dataset",
        description="Review every record of a jsonl or parquet file (or a folder of them) with "
        "`messages` (or instruction/prompt + response) with the factory's rule checks; write "
        "DIR/audit.json, DIR/audit.md and the kept records, cleaned, to DIR/kept/. Calls no "
        "LLM and never changes the input.",
    )
    p.add_argument("--data", required=True, help="jsonl or parquet file, or a folder of them")
    p.add_argument("--out", required=True, help="output folder (audit.json, audit.md, kept/)")
    AUDIT_FLAGS.add_to(p)  # the review's settings (AuditSettings in tasks/settings.py)
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="review processes (default: one per core, up to 8; 1: no pool)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--judge-base-url", default=None, help=argparse.SUPPRESS)
    p.add_argument("--judge-model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--min-quality", type=float, default=None, help=argparse.SUPPRESS)
    p.set_defaults(handler=run_audit_cli)
