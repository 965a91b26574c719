"""Benchmark: `longwriter audit` over 6,000 samples of ~5,000 words.

A deterministic generator writes LongWriter-6k-style jsonl (`messages`, one user and one
assistant turn): varied prose from a word list, sentences of 8-22 words, paragraphs of
120-280 words with a markdown heading every four, so the repetition and restatement checks see
fresh text (a repeated sentence would be rejected and measure nothing). A few samples carry the
defects audit cuts or rejects (chatter, a think block, a refusal) so every path runs. Then
`longwriter audit` runs in a child process (the real CLI, default workers): wall time, peak RSS
of the largest process (ru_maxrss over RUSAGE_CHILDREN) and of the whole process tree (sampled
from /proc, the pool's workers included). Goals: under 2 minutes, under 1 GB.

    .venv/bin/python -m tests.benchmarks.bench_audit [--samples N] [--words N] [--workers N]
    .venv/bin/python -m tests.benchmarks.bench_audit --profile 20    (cProfile of the review)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import random
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.benchmarks.common import (
    REPO,
    BenchResult,
    descendants,
    load_average,
    proc_rss_bytes,
    scratch_dir,
)

MB = 1024 * 1024
GOAL_S = 120
GOAL_RSS_MB = 1024

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there been one all we their has would when if so "
    "no will more can out who up what about into than them some could him time only new other "
    "also then two like people its these may first any over after most made even many way such "
    "years well back because where down much those through great should while our still "
    "between little own life year long being before very same under last never state world "
    "another know both work might water part place city river house light history country "
    "family power land garden night village music school market road winter summer morning "
    "evening harbour bridge station field forest mountain valley island coast tower library "
    "museum kitchen window ship train engine wall stone wood iron glass paper bread salt wine "
    "tea silk cotton wool trade craft guild council mayor farmer miller weaver baker sailor "
    "doctor teacher student painter builder merchant traveller neighbour child mother father "
    "brother sister friend stranger old young early late quiet busy narrow wide bright dark "
    "warm cold heavy slow quick careful patient proud simple strange familiar ancient modern "
    "northern southern eastern western walked carried opened closed built found kept lost "
    "watched turned followed remembered described returned gathered crossed planted repaired "
    "painted wrote read sang listened waited"
).split()
TOPICS = ("river town", "harbour", "mountain village", "market city", "island", "railway")


def paragraph(rng: random.Random, words: int) -> str:
    sentences, left = [], words
    while left > 0:
        k = min(left, rng.randint(8, 22))
        left -= k
        sentence = " ".join(rng.choices(WORDS, k=k)).capitalize()
        sentences.append(sentence + rng.choice(".....?;"))
    return " ".join(sentences)


def sample_text(rng: random.Random, words: int) -> str:
    parts: list[str] = []
    total = 0
    i = 0
    while total < words:
        if i % 4 == 0:
            parts.append(
                f"## Part {i // 4 + 1}: the {rng.choice(WORDS)} and the {rng.choice(WORDS)}"
            )
        n = rng.randint(120, 280)
        parts.append(paragraph(rng, n))
        total += n
        i += 1
    return "\n\n".join(parts)


def write_dataset(path: Path, samples: int, words: int, seed: int = 5) -> dict[str, float]:
    """Write the jsonl; every 50th sample opens with chatter, every 97th holds a think block,
    every 200th is a refusal."""
    rng = random.Random(seed)
    t0 = time.perf_counter()
    with path.open("w", encoding="utf-8") as fh:
        for i in range(samples):
            topic = TOPICS[i % len(TOPICS)]
            instruction = f"Write a {words}-word history of a {topic}, number {i}."
            text = sample_text(rng, words)
            if i % 50 == 0:
                text = "Sure! Here is the history you asked for:\n\n" + text
            if i % 97 == 0:
                text = "<think>Plan the history first.</think>\n" + text
            if i % 200 == 199:
                text = "I'm sorry, but I can't write that history."
            record = {
                "id": f"bench-{i}",
                "messages": [
                    {"role": "user", "content": instruction},
                    {"role": "assistant", "content": text},
                ],
            }
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return {"gen_s": time.perf_counter() - t0, "data_mb": path.stat().st_size / MB}


def _tree_rss_sampler(pid: int, stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        pids = [pid, *descendants(pid)]
        total = sum(proc_rss_bytes(p) or 0 for p in pids)
        peak[0] = max(peak[0], total)
        stop.wait(0.2)


def run_audit_child(
    data: Path, out: Path, workers: int | None, timeout_s: float
) -> tuple[float, int, int, str, int]:
    """(wall s, peak RSS of the largest process, peak summed tree RSS, output, returncode)."""
    argv = [
        sys.executable,
        "-c",
        "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))",
        "audit",
        "--data",
        str(data),
        "--out",
        str(out),
        "--json",
    ]
    if workers:
        argv += ["--workers", str(workers)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=_tree_rss_sampler, args=(proc.pid, stop, peak), daemon=True)
    sampler.start()
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join(2)
    # ru_maxrss over RUSAGE_CHILDREN: the largest single process among the waited-for
    # descendants (Linux reports KiB).
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return wall, maxrss, peak[0], output.decode("utf-8", "replace"), proc.returncode


def run(samples: int = 6000, words: int = 5000, workers: int | None = None) -> BenchResult:
    res = BenchResult("audit", f"longwriter audit ({samples:,} samples x ~{words:,} words)")
    work = scratch_dir("audit")
    data = work / "data.jsonl"
    gen = write_dataset(data, samples, words)
    load_before = load_average()
    wall, maxrss, tree_peak, output, rc = run_audit_child(data, work / "out", workers, 1800)
    if rc != 0:
        raise RuntimeError(f"audit failed (rc {rc}):\n{output[-3000:]}")
    summary = json.loads(output.strip().splitlines()[-1])
    res.add("input", f"{gen['data_mb']:.0f} MB jsonl, generated in {gen['gen_s']:.0f} s")
    res.add("audit wall time", round(wall, 1), "s", f"< {GOAL_S}")
    res.add("samples per second", round(summary["records"] / wall, 1), "/s")
    res.add("peak RSS, largest process", round(maxrss / MB), "MB", f"< {GOAL_RSS_MB}")
    res.add("peak RSS, whole process tree (sampled)", round(tree_peak / MB), "MB")
    res.add("kept / records", f"{summary['kept']} / {summary['records']}")
    res.details = {
        "records": summary["records"],
        "kept": summary["kept"],
        "rejected": summary["rejected"],
        "cleaned": summary["cleaned"],
        "wall_s": round(wall, 2),
        "maxrss_mb": round(maxrss / MB),
        "tree_peak_rss_mb": round(tree_peak / MB),
        "workers": workers or "default",
        "load": [load_before, load_average()],
    }
    res.notes.append(f"load average {load_before} -> {load_average()}")
    return res


def profile(samples: int, words: int, top: int = 25) -> str:
    """cProfile of the review alone (one process) over `samples` generated samples."""
    from tasks.audit import AuditSettings, audit_record, parse_record

    rng = random.Random(5)
    recs = [
        parse_record({"prompt": f"Write a history of a {TOPICS[i % 6]}.", "response": t}, str(i))
        for i, t in enumerate(sample_text(rng, words) for _ in range(samples))
    ]
    settings = AuditSettings()
    audit_record(recs[0], settings)  # warm the imports and the template cache
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for r in recs:
        audit_record(r, settings)  # type: ignore[arg-type]
    prof.disable()
    per = (time.perf_counter() - t0) / samples * 1000
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(top)
    return f"{per:.1f} ms per sample under cProfile ({samples} samples)\n{buf.getvalue()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=6000)
    ap.add_argument("--words", type=int, default=5000)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="profile N samples")
    args = ap.parse_args()
    if args.profile:
        print(profile(args.profile, args.words))
        return
    res = run(args.samples, args.words, args.workers)
    for f in res.figures:
        print(f"{f.name:40s} {f.shown():>40s} {f.goal}")
    for n in res.notes:
        print(n)
    print(json.dumps(res.details))


if __name__ == "__main__":
    main()
