"""Benchmark 6: the quality checks (tasks/quality.py) against the labelled corpus.

Every record of tests/data/quality_corpus.jsonl goes through `review_sample` or `review_plan`.
Per defect class: records, detected (its own class among the reasons or cleanings; plans:
rejected with that reason), recall (goal >= 0.95). Per kind of clean record: false
rejections and false cleanings (goal for rejections <= 0.02). Also the time per review. Writes
the full outcome of every record to tests/benchmarks/quality_results.json. Then the same rows
for the held-out corpus (tests/data/quality_holdout.jsonl, written blind to the checks; it adds
a refusal class), prefixed "held-out": the honest figures, since the checks were tuned on the
first corpus. Last, the CPU the write stage spends per paragraph in the pure checks (issue 12):
review_paragraph, repetition_share and repeated_sentence over chains of generated paragraphs,
each checked against those before it as write_step does (process time, so other processes on
the machine count little).

    .venv/bin/python -m tests.benchmarks.bench_quality [--no-write] [--chains N]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
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
# The per-paragraph measure: chains of this many paragraphs of this many words (an English and
# a Chinese run), checked against a plan of as many main points.
CHAIN_PARAGRAPHS = 6
PARAGRAPH_WORDS = 300
CHAINS = 300
_INSTRUCTIONS = {
    "en": "Write a long, detailed essay of about 2000 words about the history of tea in China "
    "and Japan.",
    "zh": "写一篇关于长城历史的文章，约2000字。",
}


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


def paragraph_cpu(lang: str, chains: int = CHAINS) -> dict[str, float]:
    """CPU ms per paragraph of the write stage's pure checks (review_paragraph with the
    paragraph's context, repetition_share at the filter's n, repeated_sentence against the
    paragraphs before it), over `chains` fresh chains of generated paragraphs: each text is new
    to the caches, as each draft of a build is."""
    from tasks.quality import ParagraphContext, review_paragraph
    from tasks.wordcount import repeated_sentence, repetition_share
    from tests.fake_openai import prose

    instruction = _INSTRUCTIONS[lang]
    points = tuple(
        f"Point {j}: one part of the subject, number {j}" for j in range(CHAIN_PARAGRAPHS)
    )
    texts = [
        [
            prose(f"cpu-{lang}-{i}-{k}", PARAGRAPH_WORDS, chinese=lang == "zh")
            for k in range(CHAIN_PARAGRAPHS)
        ]
        for i in range(chains)
    ]
    spent = {"review_paragraph": 0.0, "repetition_share": 0.0, "repeated_sentence": 0.0}
    for chain in texts:
        written: list[str] = []
        for k, text in enumerate(chain, start=1):
            ctx = ParagraphContext(instruction, lang, points, tuple(written), k)
            t0 = time.process_time()
            review = review_paragraph(text, ctx)
            t1 = time.process_time()
            repetition_share(review.text, 13)
            t2 = time.process_time()
            repeated_sentence(review.text, written)
            t3 = time.process_time()
            spent["review_paragraph"] += t1 - t0
            spent["repetition_share"] += t2 - t1
            spent["repeated_sentence"] += t3 - t2
            written.append(review.text)
    count = chains * CHAIN_PARAGRAPHS
    out = {name: 1e3 * s / count for name, s in spent.items()}
    out["total"] = sum(out.values())
    return out


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


def run(write: bool = True, chains: int = CHAINS) -> BenchResult:
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
    for lang in ("en", "zh"):
        cpu = paragraph_cpu(lang, chains)
        res.add(f"paragraph check CPU per paragraph ({lang})", round(cpu["total"], 3), "ms")
        res.details[f"paragraph_cpu_{lang}"] = {k: round(v, 4) for k, v in cpu.items()}
    if write:
        RESULTS.write_text(json.dumps(s.as_dict(), indent=2, ensure_ascii=False) + "\n")
        res.details["results_file"] = str(RESULTS.relative_to(REPO))
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true", help="do not write quality_results.json")
    ap.add_argument("--chains", type=int, default=CHAINS, help="chains for the per-paragraph CPU")
    args = ap.parse_args(argv)
    s = measure()
    if s is None:
        print("skipped: tasks/quality.py does not exist yet")
        return 0
    print(format_report(s))
    h = measure_holdout()
    if h is not None:
        print(f"\nheld-out corpus ({HOLDOUT.relative_to(REPO)}):\n" + format_report(h))
    print(
        f"\nCPU per paragraph of the write stage's checks ({args.chains} chains x "
        f"{CHAIN_PARAGRAPHS} paragraphs of {PARAGRAPH_WORDS} words, ms):"
    )
    for lang in ("en", "zh"):
        cpu = paragraph_cpu(lang, args.chains)
        print(f"  {lang}: " + ", ".join(f"{k} {v:.3f}" for k, v in cpu.items()))
    if not args.no_write:
        RESULTS.write_text(json.dumps(s.as_dict(), indent=2, ensure_ascii=False) + "\n")
        print(f"\nwrote {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
