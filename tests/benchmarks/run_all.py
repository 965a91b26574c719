"""Run every benchmark (tests/benchmarks/bench_*.py), print one table, and write
tests/benchmarks/results.json and results.md (with the machine it ran on).

    .venv/bin/python -m tests.benchmarks.run_all            (what `make bench` runs)
    .venv/bin/python -m tests.benchmarks.run_all --only export,tokens
    .venv/bin/python -m tests.benchmarks.run_all --quick    (small sizes; writes nothing)
    .venv/bin/python -m tests.benchmarks.run_all --profile  (+ py-spy profile of benchmark 1)

Benchmarks report; they never fail the command on a missed goal (exit 1 only if one crashed).
A partial run (--only) replaces just its own entries in the results files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.benchmarks import (
    bench_audit,
    bench_export,
    bench_http_pool,
    bench_orchestration,
    bench_paper_baseline,
    bench_quality,
    bench_rate_limit,
    bench_real_model,
    bench_startup,
    bench_tokens,
)
from tests.benchmarks.common import REPO, BenchResult, load_average, machine_info

HERE = Path(__file__).resolve().parent
BUDGET_S = 15 * 60

# name -> (run function, full-size arguments, --quick arguments)
BENCHES: dict[str, tuple[Callable[..., BenchResult], dict[str, Any], dict[str, Any]]] = {
    "orchestration": (
        bench_orchestration.run,
        {"instructions": 1000, "concurrency": 64},
        {"instructions": 200, "concurrency": 64},
    ),
    "paper_baseline": (bench_paper_baseline.run, {"instructions": 300}, {"instructions": 40}),
    "scale": (
        bench_orchestration.run_scale,
        {"instructions": 6000, "concurrency": 128},
        {"instructions": 600, "concurrency": 128},
    ),
    "http_pool": (bench_http_pool.run, {"requests": 3000}, {"requests": 500}),
    "real_model": (bench_real_model.run, {"instructions": 3}, {"instructions": 1}),
    "export": (bench_export.run, {"samples": 6000, "words": 5000}, {"samples": 600, "words": 5000}),
    "tokens": (bench_tokens.run, {"instructions": 20}, {"instructions": 5}),
    "startup": (bench_startup.run, {"samples": 6000}, {"samples": 600, "repeats": 3}),
    # --quick leaves quality_results.json as the last full run wrote it.
    "quality": (bench_quality.run, {}, {"write": False}),
    "audit": (bench_audit.run, {"samples": 6000, "words": 5000}, {"samples": 600, "words": 5000}),
    "rate_limit": (bench_rate_limit.run, {"instructions": 500}, {"instructions": 100}),
}


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def run_one(name: str, quick: bool, profile: bool) -> BenchResult:
    fn, full, small = BENCHES[name]
    args = small if quick else full
    t0 = time.perf_counter()
    try:
        res = fn(**args)
    except Exception as exc:  # noqa: BLE001 - one crashed benchmark must not hide the others
        res = BenchResult(name, name)
        res.skipped = f"crashed: {type(exc).__name__}: {exc}"
        res.details["traceback"] = traceback.format_exc()[-4000:]
    if name == "orchestration" and profile and not res.skipped:
        t1 = time.perf_counter()
        shares = bench_orchestration.profile_build(300, args["concurrency"])
        res.details["profile_s"] = round(time.perf_counter() - t1, 1)
        if shares:
            res.details["profile_300_instructions"] = shares
            for cat, share in list(shares.items())[:8]:
                res.add(f"profile: {cat}", f"{share:.1%}")
        else:
            res.notes.append("profile skipped: py-spy not installed (pip install py-spy)")
    res.wall_s = round(time.perf_counter() - t0, 1)
    res.details["arguments"] = args
    return res


def table(results: list[BenchResult]) -> str:
    rows = [("benchmark", "figure", "value", "goal", "")]
    for r in results:
        if r.skipped:
            rows.append((r.name, "SKIPPED", r.skipped[:90], "", ""))
            continue
        for f in r.figures:
            mark = {True: "met", False: "MISSED", None: ""}[f.met]
            rows.append((r.name, f.name, f.shown(), f.goal, mark))
    widths = [max(len(str(row[i])) for row in rows) for i in range(5)]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    out = [
        "# Benchmark results",
        "",
        "Written by `make bench` (`python -m tests.benchmarks.run_all`); see README.md here for "
        "what each benchmark measures. Timed figures depend on the machine and on what else "
        "ran on it: the load average is recorded next to them.",
        "",
        f"- machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_gb']} GB RAM, "
        f"{m['platform']}",
        f"- python {m['python']}, "
        + ", ".join(f"{k} {v}" for k, v in sorted(m["versions"].items())),
        f"- commit {doc['commit']}",
        "",
    ]
    for name, r in doc["benchmarks"].items():
        out += [f"## {r['title']} (`{name}`)", ""]
        out.append(
            f"Ran {r['ran_at']} in {r['wall_s']} s, load average {r['load_before']} -> "
            f"{r['load_after']}; arguments {json.dumps(r['details'].get('arguments', {}))}."
        )
        out.append("")
        if r["skipped"]:
            out += [f"**Skipped:** {r['skipped']}", ""]
            continue
        out += ["| figure | value | goal | |", "|---|---|---|---|"]
        for f in r["figures"]:
            fig = _figure(f)
            mark = {True: "met", False: "**missed**", None: ""}[f["met"]]
            out.append(f"| {f['name']} | {fig} | {f['goal']} | {mark} |")
        out.append("")
        for n in r["notes"]:
            out += [f"- {n}"]
        out.append("")
    return "\n".join(out)


def _figure(f: dict[str, Any]) -> str:
    v = f["value"]
    if isinstance(v, float):
        v = f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return f"{v}{(' ' + f['unit']) if f['unit'] else ''}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(BENCHES)}")
    ap.add_argument("--quick", action="store_true", help="small sizes, results not written")
    ap.add_argument("--profile", action="store_true", help="py-spy profile of benchmark 1")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(unknown)}")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    started = time.perf_counter()
    results: list[BenchResult] = []
    entries: dict[str, Any] = {}
    for name in names:
        load_before = load_average()
        print(f"[bench] {name} ...", flush=True)
        res = run_one(name, args.quick, args.profile)
        results.append(res)
        entry = res.as_dict()
        entry.update(
            ran_at=datetime.now(UTC).isoformat(timespec="seconds"),
            load_before=load_before,
            load_after=load_average(),
            quick=args.quick,
        )
        entries[name] = entry
        print(f"[bench] {name}: {res.wall_s} s" + (f" ({res.skipped})" if res.skipped else ""))
    # The optional profile is not part of `make bench`'s budget.
    total = time.perf_counter() - started - sum(r.details.get("profile_s", 0) for r in results)
    print()
    print(table(results))
    print(f"\ntotal {total:.0f} s" + (" (over the 15-minute budget)" if total > BUDGET_S else ""))
    if not args.quick:
        path = HERE / "results.json"
        doc: dict[str, Any] = {"benchmarks": {}}
        if path.exists():
            try:
                doc = json.loads(path.read_text())
            except ValueError:
                pass
        doc["benchmarks"] = {**doc.get("benchmarks", {}), **entries}
        doc["benchmarks"] = {k: doc["benchmarks"][k] for k in BENCHES if k in doc["benchmarks"]}
        doc.update(machine=machine_info(), commit=git_commit())
        if set(names) == set(BENCHES):
            doc["total_s"] = round(total, 1)
        path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        (HERE / "results.md").write_text(markdown(doc) + "\n")
        print(f"wrote {path.relative_to(REPO)} and results.md")
    crashed = [r.name for r in results if r.skipped and r.skipped.startswith("crashed")]
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
