"""Benchmark 2: the factory against the paper's way of driving the same build.

The paper's way (tests/benchmarks/paper_reference.py): 8 worker processes, static split,
blocking calls one at a time, plan phase then write phase, same prompts. The factory:
`longwriter build` at --concurrency 16 (its default) and 64, 300 instructions as in the issue. Both
against the fake server in its own process, 100 ms per call. Reported: paper wall / factory
wall (above 1: the factory is faster), for the whole command and for the steady state (first
request to last answer).

    .venv/bin/python -m tests.benchmarks.bench_paper_baseline [--instructions N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from tests.benchmarks.bench_orchestration import LATENCY_S, STEP_WORDS, STEPS, measure_build
from tests.benchmarks.common import (
    REPO,
    BenchResult,
    fake_server,
    load_average,
    scratch_dir,
    write_instructions,
)

PAPER_WORKERS = 8


def run_paper(n: int) -> dict[str, float | int]:
    work = scratch_dir("paper")
    inst = write_instructions(work / "instructions.jsonl", n, prefix="paper")
    with fake_server(LATENCY_S, STEPS, STEP_WORDS) as fake:
        load = load_average()
        t0 = time.perf_counter()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.benchmarks.paper_reference",
                "--base-url",
                fake.base_url,
                "--instructions",
                str(inst),
                "--out",
                str(work / "out"),
                "--workers",
                str(PAPER_WORKERS),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"paper reference failed:\n{done.stderr[-3000:]}")
    s = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "instructions": n,
        "calls": s["calls"],
        "samples": s["samples"],
        "wall_s": round(wall, 2),
        "steady_s": round(s["last_answer"] - s["first_request"], 2),
        "plan_phase_s": s["plan_phase_s"],
        "write_phase_s": s["write_phase_s"],
        "load_before": load,
        "load_after": load_average(),
    }


# The goals: paper wall / factory wall (> 1: the factory is faster).
GOALS = {16: ">= 1.8", 64: ">= 6"}
DEFAULT_CONCURRENCY = 16  # BuildSettings.concurrency


def run(instructions: int = 300, concurrencies: tuple[int, ...] = (16, 64)) -> BenchResult:
    res = BenchResult("paper_baseline", "Against the paper's way (8 processes, blocking calls)")
    paper = run_paper(instructions)
    res.details["paper"] = paper
    bound8 = max(7 * LATENCY_S, paper["calls"] * LATENCY_S / PAPER_WORKERS)
    res.add(
        "paper way: wall whole / steady",
        f"{paper['wall_s']} s / {paper['steady_s']} s ({paper['steady_s'] / bound8:.2f}x bound)",
    )
    for c in concurrencies:
        m = measure_build(instructions, c, label=f"paper-cmp-{c}")
        res.details[f"factory_c{c}"] = m
        res.add(
            f"factory c={c}: wall whole / steady",
            f"{m['wall_s']} s / {m['steady_s']} s ({m['ratio_steady']:.2f}x bound)",
        )
        res.add(
            f"paper / factory c={c}"
            + (" (default)" if c == DEFAULT_CONCURRENCY else "")
            + ", whole command",
            round(paper["wall_s"] / m["wall_s"], 3),
            goal=GOALS.get(c, ""),
        )
        res.add(f"paper / factory c={c}, steady state", round(paper["steady_s"] / m["steady_s"], 3))
        # With the Prefect server a scheduling machine keeps running (PREFECT_API_URL).
        r = measure_build(instructions, c, label=f"paper-cmp-api-{c}", running_api=True)
        res.details[f"factory_c{c}_running_api"] = r
        res.add(
            f"paper / factory c={c}, whole command, Prefect API running",
            round(paper["wall_s"] / r["wall_s"], 3),
            goal=GOALS.get(c, ""),
        )
    res.notes.append(
        f"{instructions} instructions x 7 calls; the paper's way always runs {PAPER_WORKERS} "
        "processes (its scripts' world_size); above 1 means the factory is faster"
    )
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instructions", type=int, default=300)
    args = ap.parse_args()
    res = run(args.instructions)
    for f in res.figures:
        print(f"{f.name:45s} {f.shown():>30s} {f.goal}")
    for n in res.notes:
        print(n)


if __name__ == "__main__":
    main()
