"""Benchmark 5: tokens and cost of AgentWrite, measured and forecast.

For plans of 5, 10 and 20 paragraphs of 300 words, one `longwriter build` against the fake
server (tests/benchmarks/fake_sized.py: it plans as many paragraphs as the instruction's
length asks for, answers at once, and counts 4 characters per token) gives, from the stored
usage, input tokens per output token by plan size: the text so far is re-sent at every step,
so input grows with the square of the plan size. The same instruction file goes through the
dry-run forecast (tasks.forecast), and forecast / actual is reported for calls, input tokens,
output tokens and cost (at an example price).

    .venv/bin/python -m tests.benchmarks.bench_tokens [--instructions N]
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.benchmarks.common import (
    REPO,
    BenchResult,
    bench_env,
    fake_server,
    run_cli_build,
    scratch_dir,
    warm_prefect_home,
    write_instructions,
)

STEP_WORDS = 300
PRICE_IN, PRICE_OUT = 3.0, 15.0  # USD per million tokens: an example, only ratios matter


def usage_by_length(db: Path) -> dict[int, dict[str, int]]:
    """Stored calls and usage per instruction length (plan calls and paragraph calls)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute(
            """
            SELECT i.length, c.stage, count(*), sum(c.prompt_tokens), sum(c.completion_tokens)
            FROM llm_call c
            JOIN (SELECT instruction_id, call_key FROM plan
                  UNION ALL SELECT instruction_id, call_key FROM paragraph) k
              ON k.call_key = c.key
            JOIN instruction i ON i.id = k.instruction_id
            GROUP BY i.length, c.stage
            """
        ).fetchall()
    finally:
        con.close()
    out: dict[int, dict[str, int]] = {}
    for length, stage, n, pt, ct in rows:
        d = out.setdefault(int(length), {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0})
        d["calls"] += n
        d["prompt_tokens"] += pt
        d["completion_tokens"] += ct
        d[f"{stage}_prompt_tokens"] = pt
        d[f"{stage}_completion_tokens"] = ct
    return out


def run(instructions: int = 20, plan_sizes: tuple[int, ...] = (5, 10, 20)) -> BenchResult:
    from tasks.forecast import ForecastConfig, forecast, pending_from_file
    from tasks.llm.endpoints import REMOTE_CONTEXT_WINDOW

    res = BenchResult("tokens", "Tokens and cost: measured vs dry-run forecast")
    work = scratch_dir("tokens")
    lengths = [n * STEP_WORDS for n in plan_sizes]
    inst = write_instructions(
        work / "instructions.jsonl", instructions * len(plan_sizes), prefix="tok", lengths=lengths
    )
    db = work / "store.db"
    with fake_server(0.0, None, STEP_WORDS, module="tests.benchmarks.fake_sized") as fake:
        home = warm_prefect_home(fake.base_url)
        run_ = run_cli_build(
            home,
            ["--instructions", str(inst), "--db", str(db), "--out", str(work / "out")],
            fake.base_url,
            concurrency=16,
            min_words=1000,
            extra=["--no-export"],
        )
        dry = _cli_dry_run(home, inst, work / "dry.db", fake.base_url)
    if run_.returncode != 0:
        raise RuntimeError(f"build failed:\n{run_.output[-3000:]}")
    res.details["cli_dry_run"] = dry
    measured = usage_by_length(db)
    cfg = ForecastConfig(
        min_words=1000,
        paragraph_words=STEP_WORDS,
        context_window=REMOTE_CONTEXT_WINDOW,
        price_in=PRICE_IN,
        price_out=PRICE_OUT,
    )
    pending, _ = pending_from_file(inst)
    for n, length in zip(plan_sizes, lengths, strict=True):
        act = measured.get(length, {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0})
        fc = forecast([p for p in pending if p.length == length], cfg)
        actual_cost = (act["prompt_tokens"] * PRICE_IN + act["completion_tokens"] * PRICE_OUT) / 1e6
        d = {
            **act,
            "in_per_out": round(act["prompt_tokens"] / max(act["completion_tokens"], 1), 3),
            "write_in_per_out": round(
                act.get("write_prompt_tokens", 0) / max(act.get("write_completion_tokens", 1), 1),
                3,
            ),
            "forecast": {
                "calls": fc.calls,
                "prompt_tokens": fc.prompt_tokens,
                "completion_tokens": fc.completion_tokens,
                "in_per_out": round(fc.prompt_tokens / max(fc.completion_tokens, 1), 3),
                "cost_usd": round(fc.cost or 0.0, 4),
            },
            "actual_cost_usd": round(actual_cost, 4),
        }
        res.details[f"plan_{n}"] = d
        res.add(f"{n} paragraphs: input tokens per output token", d["in_per_out"])
        res.add(
            f"{n} paragraphs: forecast / actual calls", round(fc.calls / max(act["calls"], 1), 3)
        )
        res.add(
            f"{n} paragraphs: forecast / actual input tokens",
            round(fc.prompt_tokens / max(act["prompt_tokens"], 1), 3),
        )
        res.add(
            f"{n} paragraphs: forecast / actual output tokens",
            round(fc.completion_tokens / max(act["completion_tokens"], 1), 3),
        )
        res.add(
            f"{n} paragraphs: forecast / actual cost",
            round((fc.cost or 0.0) / max(actual_cost, 1e-12), 3),
        )
    res.notes.append(
        f"{instructions} instructions per plan size, {STEP_WORDS} words per paragraph, one build; "
        "the fake counts 4 characters per token over ~8.2 characters per word, the forecast "
        "~3 per token over ordinary English (~5.3 per word): both ~2 tokens per word; against "
        "a real BPE tokenizer see benchmark 3's estimate / actual"
    )
    return res


def _cli_dry_run(home: Path, inst: Path, db: Path, base_url: str) -> str:
    """`longwriter build --dry-run` when the CLI has it (output kept in the details)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "build",
            "--dry-run",
            "--instructions",
            str(inst),
            "--db",
            str(db),
            "--base-url",
            base_url,
            "--model",
            "fake-model",
            "--min-words",
            "1000",
            "--price-in",
            str(PRICE_IN),
            "--price-out",
            str(PRICE_OUT),
        ],
        cwd=REPO,
        env=bench_env(home),
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    if done.returncode != 0:
        return f"(not available: exit {done.returncode}: {done.stderr.strip()[-300:]})"
    if db.exists():
        return "(dry run created the store: it must not write anything)"
    return done.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instructions", type=int, default=20)
    args = ap.parse_args()
    res = run(args.instructions)
    for f in res.figures:
        print(f"{f.name:50s} {f.shown():>12s} {f.goal}")
    for n in res.notes:
        print(n)
    print(res.details["cli_dry_run"])


if __name__ == "__main__":
    main()
