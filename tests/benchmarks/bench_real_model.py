"""Benchmark 3: generated tokens per second through the factory vs the server called directly.

One embedded llama.cpp server (tasks.llama_server.LlamaServer, the SmolLM2 GGUF) serves both
sides. The factory builds a few instructions (plan + paragraphs) at temperature 0 and
concurrency 1, with every request it sends recorded on the wire (drive_build --record). Then
the same request bodies are replayed directly, one after another, with sync httpx, in the
order the factory sent them (llama.cpp reuses the previous prompt's prefix, so order
matters). Greedy decoding makes both sides generate the same tokens; the benchmark checks it.

  factory tok/s = stored usage.completion_tokens / LLM phase (first request to last answer)
  (also per call: completion_tokens / llm_call.latency, summed)
  direct  tok/s = completion_tokens / wall time of the direct requests

    .venv/bin/python -m tests.benchmarks.bench_real_model [--instructions N]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.benchmarks.common import (
    BenchResult,
    bench_env,
    call_window,
    load_average,
    run_sampled,
)

N_CTX = 8192
# SmolLM2-135M at temperature 0 plans these in 2-3 paragraphs; other prompts can send it into
# 2,048 tokens of unparseable plan (deterministic, so the benchmark picks prompts that work).
PROMPTS = (
    "Write a short story of about 600 words about a lighthouse keeper.",
    "Write a 600-word article explaining how bees make honey.",
    "Write a travel guide to Lisbon of about 600 words.",
)


def replay(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Send the recorded bodies again, sequentially; tokens, time and answers that match."""
    tokens = 0
    seconds = 0.0
    same = 0
    compared = 0
    with httpx.Client(timeout=900, trust_env=False) as client:
        for rec in records:
            t0 = time.perf_counter()
            response = client.post(rec["url"], json=rec["body"])
            seconds += time.perf_counter() - t0
            if response.status_code != 200:
                continue
            data = response.json()
            tokens += int((data.get("usage") or {}).get("completion_tokens") or 0)
            if rec.get("answer") and rec["status"] == 200:
                compared += 1
                mine = data["choices"][0]["message"]["content"]
                theirs = rec["answer"]["choices"][0]["message"]["content"]
                same += int(mine == theirs)
    return {"tokens": tokens, "seconds": seconds, "same_answers": same, "compared": compared}


def estimate_vs_tokenizer(records: list[dict[str, Any]]) -> dict[str, float]:
    """The factory's token estimate (what the dry-run forecast uses) over the model's own
    count, for prompts and answers of the recorded successful calls."""
    from tasks.write import estimate_tokens

    est_in = est_out = real_in = real_out = 0
    for rec in records:
        if rec["status"] != 200 or not rec.get("answer"):
            continue
        usage = rec["answer"].get("usage") or {}
        est_in += sum(estimate_tokens(m["content"]) for m in rec["body"]["messages"])
        est_out += estimate_tokens(rec["answer"]["choices"][0]["message"]["content"] or "")
        real_in += int(usage.get("prompt_tokens") or 0)
        real_out += int(usage.get("completion_tokens") or 0)
    return {
        "prompt": round(est_in / max(real_in, 1), 3),
        "completion": round(est_out / max(real_out, 1), 3),
    }


def run(instructions: int = 2, paragraph_tokens: int = 160) -> BenchResult:
    res = BenchResult("real_model", "Real model: factory vs direct llama.cpp calls")
    if importlib.util.find_spec("llama_cpp") is None:
        res.skipped = "llama_cpp (llama-cpp-python) is not installed: pip install '.[embedded]'"
        return res
    from tasks.llama_server import LlamaServer, LlamaServerError

    work = Path(tempfile.mkdtemp(prefix="lw-bench-real-"))
    # Pieces of ~600 words: the plan asks for at least 2 paragraphs; paragraphs are capped at
    # `paragraph_tokens` so the benchmark takes minutes on a laptop CPU, not hours.
    inst = work / "instructions.jsonl"
    inst.write_text(
        "".join(
            json.dumps({"id": f"real-{i}", "prompt": PROMPTS[i % len(PROMPTS)], "length": 600})
            + "\n"
            for i in range(instructions)
        )
    )
    db = work / "store.db"
    record = work / "requests.jsonl"
    try:
        server = LlamaServer(n_ctx=N_CTX)
    except LlamaServerError as exc:
        res.skipped = f"embedded model unavailable: {exc}"
        return res
    with server:
        settings = {
            "instructions": str(inst),
            "db_url": str(db),
            "out_dir": str(work / "out"),
            "base_urls": [server.base_url],
            "model": server.model,
            "concurrency": 1,
            "min_words": 100,
            "context_window": N_CTX,
            "max_paragraph_tokens": paragraph_tokens,
            "max_continuations": 0,
            "plan_temperature": 0.0,
            "write_temperature": 0.0,
            "export": False,
        }
        home = Path(tempfile.mkdtemp(prefix="lw-bench-prefect-real-"))
        run_ = run_sampled(
            [
                sys.executable,
                "-m",
                "tests.benchmarks.drive_build",
                json.dumps(settings),
                "--record",
                str(record),
            ],
            bench_env(home),
            timeout_s=1500,
        )
        if run_.returncode != 0:
            raise RuntimeError(f"factory build failed:\n{run_.output[-3000:]}")
        records = [json.loads(line) for line in record.read_text().splitlines() if line.strip()]
        records.sort(key=lambda r: r["started"])
        load = load_average()
        direct = replay(records)
    win = call_window(db)
    factory_tps = win.completion_tokens / max(win.seconds, 1e-9)
    per_call_tps = win.completion_tokens / max(win.latency_s_sum, 1e-9)
    direct_tps = direct["tokens"] / max(direct["seconds"], 1e-9)
    res.details = {
        "instructions": instructions,
        "server": {"model": server.model, "n_ctx": N_CTX, "threads": server.n_threads},
        "requests_sent": len(records),
        "requests_ok": sum(1 for r in records if r["status"] == 200),
        "stored_calls": win.calls,
        "by_stage": win.by_stage,
        "factory": {
            "completion_tokens": win.completion_tokens,
            "llm_phase_s": round(win.seconds, 2),
            "latency_sum_s": round(win.latency_s_sum, 2),
            "build_wall_s": round(run_.wall_s, 2),
        },
        "direct": {k: round(v, 2) if isinstance(v, float) else v for k, v in direct.items()},
        "load": [run_.load_before, run_.load_after, load],
    }
    res.add("calls (stored) / HTTP requests replayed", f"{win.calls} / {len(records)}")
    res.add("completion tokens factory / direct", f"{win.completion_tokens} / {direct['tokens']}")
    res.add("identical answers on replay", f"{direct['same_answers']}/{direct['compared']}")
    res.add("factory tok/s (LLM phase)", round(factory_tps, 2), "tok/s")
    res.add("factory tok/s (per-call latency)", round(per_call_tps, 2), "tok/s")
    res.add("direct tok/s", round(direct_tps, 2), "tok/s")
    res.add(
        "factory / direct, LLM phase", round(factory_tps / max(direct_tps, 1e-9), 3), goal=">= 0.95"
    )
    res.add("factory / direct, per-call", round(per_call_tps / max(direct_tps, 1e-9), 3))
    calib = estimate_vs_tokenizer(records)
    res.details["estimate_over_tokenizer"] = calib
    res.add(
        "forecast token estimate / tokenizer, in / out",
        f"{calib['prompt']:.2f} / {calib['completion']:.2f}",
    )
    res.notes.append(
        f"SmolLM2-135M Q4_1 on {server.n_threads} threads, temperature 0, factory concurrency 1, "
        f"paragraphs capped at {paragraph_tokens} tokens; load average "
        f"{run_.load_before} -> {load}"
    )
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instructions", type=int, default=2)
    ap.add_argument("--paragraph-tokens", type=int, default=160)
    args = ap.parse_args()
    res = run(args.instructions, args.paragraph_tokens)
    if res.skipped:
        print(f"skipped: {res.skipped}")
        return
    for f in res.figures:
        print(f"{f.name:45s} {f.shown():>22s} {f.goal}")
    for n in res.notes:
        print(n)
    print(json.dumps(res.details, indent=1))


if __name__ == "__main__":
    main()
