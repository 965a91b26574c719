"""Benchmark 6: the quality checks (tasks/quality.py) against the labelled corpus.

Every record of tests/data/quality_corpus.jsonl goes through `review_sample` or `review_plan`.
Per defect class: records, detected (its own class among the reasons or cleanings; plans:
rejected with that reason), recall (goal >= 0.95). Per kind of clean record: false
rejections and false cleanings (goal for rejections <= 0.02). Also the time per review. Writes
the full outcome of every record to tests/benchmarks/quality_results.json. Then the same rows
for the held-out corpus (tests/data/quality_holdout.jsonl, written blind to the checks; it adds
a refusal class), prefixed "held-out": the honest figures, since the checks were tuned on the
first corpus.

    .venv/bin/python -m tests.benchmarks.bench_quality [--no-write]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from tests.benchmarks.common import REPO, BenchResult
from tests.tasks.quality_corpus import (
    CORPUS,
    FALSE_REJECTION_GOAL,
    HOLDOUT,
    HOLDOUT_CLASSES,
    RECALL_GOAL,
    Score,
    format_report,
    load_corpus,
    score_with_tasks_quality,
)

RESULTS = Path(__file__).resolve().parent / "quality_results.json"


def measure() -> Score | None:
    """The corpus scored by tasks.quality, or None while that module does not exist."""
    if importlib.util.find_spec("tasks.quality") is None:
        return None
    return score_with_tasks_quality(load_corpus())


def measure_holdout() -> Score | None:
    """The held-out corpus scored by tasks.quality (None as for measure)."""
    if importlib.util.find_spec("tasks.quality") is None:
        return None
    return score_with_tasks_quality(load_corpus(HOLDOUT), HOLDOUT_CLASSES)


def _add_rows(res: BenchResult, s: Score, prefix: str = "") -> None:
    for c in s.classes.values():
        res.add(
            f"{prefix}recall {c.label} ({c.detected}/{c.n})",
            round(c.recall, 3),
            "",
            f">= {RECALL_GOAL}",
        )
    for cl in s.clean.values():
        res.add(
            f"{prefix}false rejections, clean {cl.kind}s ({len(cl.false_rejections)}/{cl.n})",
            round(cl.rejection_rate, 3),
            "",
            f"<= {FALSE_REJECTION_GOAL}",
        )
    sample = s.clean["sample"]
    res.add(
        f"{prefix}false cleanings, clean samples ({len(sample.false_cleanings)}/{sample.n})",
        round(sample.cleaning_rate, 3),
    )


def run(write: bool = True) -> BenchResult:
    res = BenchResult("quality", "Quality checks against the labelled corpus")
    s = measure()
    if s is None:
        res.skipped = "tasks/quality.py does not exist yet"
        return res
    _add_rows(res, s)
    res.add("time per review", round(1e3 * s.seconds / max(len(s.outcomes), 1), 2), "ms")
    res.details["corpus"] = str(CORPUS.relative_to(REPO))
    res.details["missed"] = {c.label: c.missed for c in s.classes.values() if c.missed}
    res.details["false_rejections"] = {k: v.false_rejections for k, v in s.clean.items()}
    res.details["false_cleanings"] = {k: v.false_cleanings for k, v in s.clean.items()}
    res.notes.append(format_report(s, failures=False))
    h = measure_holdout()
    if h is not None:
        _add_rows(res, h, "held-out ")
        res.details["holdout"] = str(HOLDOUT.relative_to(REPO))
        res.details["holdout_missed"] = {c.label: c.missed for c in h.classes.values() if c.missed}
        res.notes.append("held-out corpus:\n" + format_report(h, failures=False))
    if write:
        RESULTS.write_text(json.dumps(s.as_dict(), indent=2, ensure_ascii=False) + "\n")
        res.details["results_file"] = str(RESULTS.relative_to(REPO))
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true", help="do not write quality_results.json")
    args = ap.parse_args(argv)
    s = measure()
    if s is None:
        print("skipped: tasks/quality.py does not exist yet")
        return 0
    print(format_report(s))
    h = measure_holdout()
    if h is not None:
        print(f"\nheld-out corpus ({HOLDOUT.relative_to(REPO)}):\n" + format_report(h))
    if not args.no_write:
        RESULTS.write_text(json.dumps(s.as_dict(), indent=2, ensure_ascii=False) + "\n")
        print(f"\nwrote {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
