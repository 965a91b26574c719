"""Benchmark 6: start-up of the commands that run no flow (issue 12).

`longwriter --help` and `longwriter stats --db STORE` are run as the user runs them (the
console script in the venv, a fresh interpreter each time), `repeats` times each; the median
and the fastest wall time are reported, with what each run imported of Prefect and torch
(`-X importtime`'s module list would change the timing, so a second, untimed run with
`python -c` reads `sys.modules` after the same command). The store holds `samples` accepted
samples as a build leaves them: per sample an instruction, a plan call and plan, six write
calls and their paragraphs, the assembled sample (~430 MB at 6,000 x 5,000 words).

Goals (issue 12): `--help` <= 0.4 s, `stats` on a 6,000-sample store <= 1 s.

    .venv/bin/python -m tests.benchmarks.bench_startup [--samples N] [--words N] [--repeats N]
        [--db PATH]   (a store kept from an earlier run: LW_BENCH_KEEP=1)
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.benchmarks.bench_export import synthetic_text
from tests.benchmarks.common import REPO, BenchResult, bench_env, load_average, scratch_dir

MB = 1024 * 1024
PARAGRAPHS = 6

# Run after the command in the same interpreter: which heavy packages it pulled in.
_PROBE = (
    "import sys\n"
    "from flows.cli import main\n"
    "try:\n"
    "    main(sys.argv[1:])\n"
    "except SystemExit:\n"
    "    pass\n"
    "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'torch'})\n"
    "print('HEAVY=' + ','.join(heavy), file=sys.stderr)\n"
)


def fill_store(db_url: str, samples: int, words: int, batch: int = 200) -> dict[str, Any]:
    """`samples` accepted samples with every row a build writes for them, in batches."""
    from sqlalchemy import insert

    from storage.models import Instruction, LLMCall, Paragraph, Plan, Sample
    from storage.store import Store
    from tests.fake_openai import VOCAB

    rng = random.Random(11)
    store = Store(db_url)
    t0 = time.perf_counter()
    per_para = max(1, words // PARAGRAPHS)
    try:
        with store.engine.begin() as conn:
            for start in range(0, samples, batch):
                rows: dict[type, list[dict[str, Any]]] = {
                    Instruction: [],
                    LLMCall: [],
                    Plan: [],
                    Paragraph: [],
                    Sample: [],
                }
                for i in range(start + 1, min(samples, start + batch) + 1):
                    steps = [
                        {"main_point": f"Part {k} of report {i}", "word_count": per_para}
                        for k in range(1, PARAGRAPHS + 1)
                    ]
                    rows[Instruction].append(
                        Instruction(
                            id=i,
                            uid=f"startup-{i}",
                            prompt=f"Write a long report, number {i}, on canal {i}.",
                            norm_hash=f"h{i}",
                            length=words,
                            source="bench",
                            status="accepted",
                        ).model_dump()
                    )
                    rows[LLMCall].append(
                        LLMCall(
                            key=f"plan-{i}",
                            stage="plan",
                            model="bench-model",
                            prompt_version="plan@bench",
                            content=json.dumps({"paragraphs": steps}),
                            prompt_tokens=300,
                            completion_tokens=200,
                        ).model_dump()
                    )
                    rows[Plan].append(
                        Plan(
                            instruction_id=i,
                            call_key=f"plan-{i}",
                            steps_json=json.dumps(steps),
                            n_steps=PARAGRAPHS,
                            total_words=words,
                            prompt_version="plan@bench",
                        ).model_dump()
                    )
                    texts = []
                    for k in range(1, PARAGRAPHS + 1):
                        text = synthetic_text(rng, VOCAB, per_para)
                        texts.append(text)
                        rows[LLMCall].append(
                            LLMCall(
                                key=f"write-{i}-{k}",
                                stage="write",
                                model="bench-model",
                                prompt_version="write@bench",
                                content=text,
                                prompt_tokens=1500 * k,
                                completion_tokens=per_para * 4 // 3,
                            ).model_dump()
                        )
                        rows[Paragraph].append(
                            Paragraph(
                                instruction_id=i,
                                step=k,
                                call_key=f"write-{i}-{k}",
                                text=text,
                                words=per_para,
                                prompt_version="write@bench",
                            ).model_dump()
                        )
                    rows[Sample].append(
                        Sample(
                            instruction_id=i,
                            text="\n\n".join(texts),
                            words=per_para * PARAGRAPHS,
                            n_paragraphs=PARAGRAPHS,
                            model="bench-model",
                            prompt_version="plan@bench,write@bench",
                        ).model_dump()
                    )
                for table, values in rows.items():
                    conn.execute(insert(table), values)
    finally:
        store.close()
    return {"fill_s": round(time.perf_counter() - t0, 1)}


def time_command(argv: list[str], repeats: int, env: dict[str, str]) -> dict[str, Any]:
    """Wall time of `longwriter ARGV` over `repeats` fresh processes, and what it imported."""
    script = Path(sys.executable).parent / "longwriter"
    cmd = [str(script), *argv] if script.exists() else [sys.executable, "-m", "flows.cli", *argv]
    times, cpu = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], env=env, cwd=REPO, capture_output=True, text=True
    )
    heavy = [ln[6:] for ln in probe.stderr.splitlines() if ln.startswith("HEAVY=")]
    return {
        "median_s": round(statistics.median(times), 3),
        "min_s": round(min(times), 3),
        "runs_s": [round(t, 3) for t in times],
        # CPU seconds move much less than wall time when other work shares the machine.
        "cpu_median_s": round(statistics.median(cpu), 3),
        "imports": (heavy[0] if heavy else "?") or "neither prefect nor torch",
    }


def run(
    samples: int = 6000, words: int = 5000, repeats: int = 5, db: str | None = None
) -> BenchResult:
    """`db`: a store filled by an earlier run (LW_BENCH_KEEP=1 keeps it), to time again
    without the minute of filling."""
    res = BenchResult("startup", f"Start-up of --help and stats ({samples:,}-sample store)")
    work = scratch_dir("startup")
    path = Path(db) if db else work / "store.db"
    db_url = f"sqlite:///{path}"
    fill = {"fill_s": None} if db else fill_store(db_url, samples, words)
    env = bench_env(work / "prefect-unused")
    load_before = load_average()
    helped = time_command(["--help"], repeats, env)
    stats = time_command(["stats", "--db", db_url], repeats, env)
    res.details = {
        **fill,
        "db_mb": round(path.stat().st_size / MB, 1),
        "help": helped,
        "stats": stats,
        "load": [load_before, load_average()],
    }
    res.add("longwriter --help (median)", helped["median_s"], "s", "<= 0.4")
    res.add("longwriter --help (fastest)", helped["min_s"], "s")
    res.add("longwriter --help CPU (median)", helped["cpu_median_s"], "s")
    res.add("--help imports", helped["imports"])
    res.add(f"longwriter stats, {samples:,} samples (median)", stats["median_s"], "s", "<= 1")
    res.add(f"longwriter stats, {samples:,} samples (fastest)", stats["min_s"], "s")
    res.add("longwriter stats CPU (median)", stats["cpu_median_s"], "s")
    res.add("stats imports", stats["imports"])
    res.notes.append(
        f"{repeats} runs each; store {res.details['db_mb']} MB; load average "
        f"{load_before} -> {load_average()}"
    )
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=6000)
    ap.add_argument("--words", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--db", default=None, help="time against this filled store instead")
    args = ap.parse_args()
    res = run(args.samples, args.words, args.repeats, args.db)
    for f in res.figures:
        print(f"{f.name:45s} {f.shown():>30s} {f.goal}")
    for n in res.notes:
        print(n)
    print(json.dumps(res.details))


if __name__ == "__main__":
    main()
