"""Benchmark 4: store and export at dataset scale.

6,000 synthetic accepted samples of 5,000 words each are written straight into a Store
(SQLite in a temp dir), then `tasks.export.export_store` writes the parquet + jsonl shards and
the manifest in a child process. Reported: export throughput (MB of output per second) and
the child's peak RSS (ru_maxrss), next to its RSS before the export started and sampled while
it ran (flat RSS over the run is what streaming looks like). Goal: peak RSS under 1 GB.

    .venv/bin/python -m tests.benchmarks.bench_export [--samples N] [--words N]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

from tests.benchmarks.common import BenchResult, bench_env, load_average, run_sampled, scratch_dir

MB = 1024 * 1024


def synthetic_text(rng: random.Random, vocab: list[str], words: int) -> str:
    """`words` words in sentences of 12 and paragraphs of ~500 (varied, like real prose in
    size and compressibility rather than one repeated string)."""
    toks = rng.choices(vocab, k=words)
    sentences = [" ".join(toks[i : i + 12]).capitalize() + "." for i in range(0, words, 12)]
    paras = [" ".join(sentences[i : i + 42]) for i in range(0, len(sentences), 42)]
    return "\n\n".join(paras)


def fill_store(db_url: str, samples: int, words: int, batch: int = 250) -> dict[str, Any]:
    """Write `samples` accepted samples (instruction, plan call, plan, sample) in batches."""
    from sqlalchemy import insert

    from storage.models import Instruction, LLMCall, Plan, Sample
    from storage.store import Store
    from tests.fake_openai import VOCAB

    rng = random.Random(7)
    store = Store(db_url)
    t0 = time.perf_counter()
    text_bytes = 0
    try:
        with store.engine.begin() as conn:
            for start in range(0, samples, batch):
                ids = range(start + 1, min(samples, start + batch) + 1)
                insts, calls, plans, rows = [], [], [], []
                for i in ids:
                    prompt = f"Write a long report, number {i}, on the history of canal {i}."
                    steps = [
                        {"main_point": f"Part {k} of report {i}", "word_count": 500}
                        for k in range(10)
                    ]
                    text = synthetic_text(rng, VOCAB, words)
                    text_bytes += len(text.encode("utf-8"))
                    insts.append(
                        Instruction(
                            id=i,
                            uid=f"exp-{i}",
                            prompt=prompt,
                            norm_hash=f"h{i}",
                            length=words,
                            source="bench",
                            status="accepted",
                        ).model_dump()
                    )
                    calls.append(
                        LLMCall(
                            key=f"plan-{i}",
                            stage="plan",
                            model="bench-model",
                            prompt_version="plan@bench",
                            content=json.dumps({"paragraphs": steps}),
                        ).model_dump()
                    )
                    plans.append(
                        Plan(
                            instruction_id=i,
                            call_key=f"plan-{i}",
                            steps_json=json.dumps(steps),
                            n_steps=len(steps),
                            total_words=words,
                            prompt_version="plan@bench",
                        ).model_dump()
                    )
                    rows.append(
                        Sample(
                            instruction_id=i,
                            text=text,
                            words=words,
                            n_paragraphs=len(steps),
                            model="bench-model",
                            prompt_version="write@bench",
                        ).model_dump()
                    )
                conn.execute(insert(Instruction), insts)
                conn.execute(insert(LLMCall), calls)
                conn.execute(insert(Plan), plans)
                conn.execute(insert(Sample), rows)
    finally:
        store.close()
    return {"fill_s": round(time.perf_counter() - t0, 1), "text_mb": round(text_bytes / MB, 1)}


def child(db_url: str, out_dir: str) -> None:
    """The measured process: open the store, export, report its own peak RSS."""
    from storage.store import Store
    from tasks.export import export_store

    store = Store(db_url)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    manifest = export_store(store, Path(out_dir), {"command": "bench"}, shard_size=1000)
    seconds = time.perf_counter() - t0
    store.close()
    out_bytes = sum(f["bytes"] for f in manifest["files"])
    out_bytes += (Path(out_dir) / "manifest.json").stat().st_size
    print(
        json.dumps(
            {
                "samples": manifest["counts"]["samples"],
                "shards": manifest["counts"]["shards"],
                "export_s": seconds,
                "out_bytes": out_bytes,
                "parquet_bytes": sum(
                    f["bytes"] for f in manifest["files"] if f["path"].endswith(".parquet")
                ),
                "jsonl_bytes": sum(
                    f["bytes"] for f in manifest["files"] if f["path"].endswith(".jsonl")
                ),
                "maxrss_before": rss_before,
                "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        )
    )


def run(samples: int = 6000, words: int = 5000) -> BenchResult:
    res = BenchResult("export", f"Store and export ({samples:,} samples x {words:,} words)")
    work = scratch_dir("export")
    db_url = f"sqlite:///{work / 'store.db'}"
    fill = fill_store(db_url, samples, words)
    db_mb = (work / "store.db").stat().st_size / MB
    run_ = run_sampled(
        [
            sys.executable,
            "-m",
            "tests.benchmarks.bench_export",
            "--child",
            db_url,
            str(work / "out"),
        ],
        bench_env(work / "prefect-unused"),
        timeout_s=1200,
    )
    if run_.returncode != 0:
        raise RuntimeError(f"export failed:\n{run_.output[-3000:]}")
    r = json.loads(run_.output.strip().splitlines()[-1])
    # RSS over the export, in quarters of its duration: flat means streaming.
    s = run_.sampler.samples
    quarters = []
    if s:
        t_end = s[-1].t
        t_start = t_end - r["export_s"]
        for q in (0.25, 0.5, 0.75, 1.0):
            t = t_start + q * (t_end - t_start)
            quarters.append(round(max((x.rss_bytes for x in s if x.t <= t), default=0) / MB))
    mbps = r["out_bytes"] / MB / r["export_s"]
    res.details = {
        **fill,
        "db_mb": round(db_mb, 1),
        "out_mb": round(r["out_bytes"] / MB, 1),
        "parquet_mb": round(r["parquet_bytes"] / MB, 1),
        "jsonl_mb": round(r["jsonl_bytes"] / MB, 1),
        "export_s": round(r["export_s"], 2),
        "child_wall_s": round(run_.wall_s, 2),
        "rss_before_export_mb": round(r["maxrss_before"] / MB),
        "peak_rss_mb": round(r["maxrss"] / MB),
        "peak_rss_sampled_mb": round(run_.sampler.peak_rss() / MB),
        "rss_by_quarter_mb": quarters,
        "samples": r["samples"],
        "shards": r["shards"],
        "load": [run_.load_before, run_.load_after],
    }
    res.add(
        "store fill (text, db file)",
        f"{fill['text_mb']} MB text, {db_mb:.0f} MB db, {fill['fill_s']} s",
    )
    res.add(
        "export output (parquet + jsonl)", f"{r['out_bytes'] / MB:.0f} MB in {r['export_s']:.1f} s"
    )
    res.add("export throughput", round(mbps, 1), "MB/s")
    res.add("export peak RSS", round(r["maxrss"] / MB), "MB", "< 1024")
    res.add("RSS before export (imports + store)", round(r["maxrss_before"] / MB), "MB")
    res.add("RSS at 25/50/75/100% of export", "/".join(str(q) for q in quarters) + " MB")
    res.notes.append(f"load average {run_.load_before} -> {load_average()}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=6000)
    ap.add_argument("--words", type=int, default=5000)
    ap.add_argument("--child", nargs=2, metavar=("DB_URL", "OUT_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    res = run(args.samples, args.words)
    for f in res.figures:
        print(f"{f.name:40s} {f.shown():>40s} {f.goal}")
    for n in res.notes:
        print(n)
    print(json.dumps(res.details))


if __name__ == "__main__":
    main()
