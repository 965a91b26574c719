"""The paper's way of driving AgentWrite, reduced to its bones, for benchmark 2.

LongWriter's agentwrite scripts (plan.py, then write.py) split the instructions statically
over a fixed number of worker processes (`data[rank::world_size]`, world_size = 8), and each
worker walks its share one blocking HTTP call at a time, appending every answer to a jsonl
file. This module does the same with the factory's prompts (tasks.plan / tasks.write build
the exact request bodies the factory sends) so the two drivers differ only in how they drive:
a fixed pool of processes with sync httpx versus the factory's async flow. No store, retries,
filters or export: a lower bound for the paper's way, not a port of it.

    python -m tests.benchmarks.paper_reference --base-url URL --instructions FILE --out DIR
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tasks.llm.client import ChatRequest
from tasks.llm.endpoints import REMOTE_CONTEXT_WINDOW
from tasks.plan import build_plan_request, parse_plan
from tasks.write import ContextBudget, build_write_request


def body_of(request: ChatRequest, model: str) -> dict[str, Any]:
    """The JSON body the factory's client sends for `request`."""
    return {
        "model": model,
        "messages": [{"role": r, "content": c} for r, c in request.messages],
        **request.sampling_params(),
    }


def _post(client: httpx.Client, url: str, request: ChatRequest, model: str) -> str:
    response = client.post(
        url,
        json=body_of(request, model),
        headers={
            "X-Longwriter-Stage": request.stage,
            "X-Longwriter-Request-Id": request.key(model),
        },
    )
    response.raise_for_status()
    return str(response.json()["choices"][0]["message"]["content"])


def plan_worker(rank: int, items: list[dict[str, Any]], args: dict[str, Any]) -> None:
    url = args["base_url"].rstrip("/") + "/chat/completions"
    out = Path(args["out"]) / f"plan-{rank}.jsonl"
    first = last = 0.0
    with httpx.Client(timeout=600, trust_env=False) as client, out.open("a") as fh:
        for item in items:
            request = build_plan_request(
                item["prompt"], item.get("length"), args["min_words"], json_mode=True
            )
            first = first or time.time()
            plan = _post(client, url, request, args["model"])
            last = time.time()
            fh.write(json.dumps({**item, "plan": plan}) + "\n")
            fh.flush()
    (Path(args["out"]) / f"plan-{rank}.time").write_text(json.dumps([first, last]))


def write_worker(rank: int, items: list[dict[str, Any]], args: dict[str, Any]) -> None:
    url = args["base_url"].rstrip("/") + "/chat/completions"
    out = Path(args["out"]) / f"write-{rank}.jsonl"
    budget = ContextBudget(REMOTE_CONTEXT_WINDOW)
    first = last = 0.0
    with httpx.Client(timeout=600, trust_env=False) as client, out.open("a") as fh:
        for item in items:
            steps = parse_plan(item["plan"])
            written: list[str] = []
            for step in range(1, len(steps) + 1):
                request = build_write_request(
                    item["prompt"], steps, written, step, lang="en", budget=budget
                )
                first = first or time.time()
                written.append(_post(client, url, request, args["model"]).strip())
                last = time.time()
            fh.write(json.dumps({**item, "write": written}) + "\n")
            fh.flush()
    (Path(args["out"]) / f"write-{rank}.time").write_text(json.dumps([first, last]))


def _run_phase(target: Any, data: list[dict[str, Any]], workers: int, args: dict[str, Any]) -> None:
    ctx = mp.get_context("fork")
    procs = [
        ctx.Process(target=target, args=(rank, data[rank::workers], args))
        for rank in range(workers)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"{target.__name__} worker exited with {p.exitcode}")


def _read_jsonl(paths: list[Path]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for p in paths:
        rows += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", default="fake-model")
    ap.add_argument("--instructions", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--min-words", type=int, default=1000)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    args = {"base_url": a.base_url, "model": a.model, "out": str(out), "min_words": a.min_words}
    data = _read_jsonl([Path(a.instructions)])
    t0 = time.perf_counter()
    _run_phase(plan_worker, data, a.workers, args)
    t1 = time.perf_counter()
    planned = _read_jsonl(sorted(out.glob("plan-*.jsonl")))
    _run_phase(write_worker, planned, a.workers, args)
    t2 = time.perf_counter()
    written = _read_jsonl(sorted(out.glob("write-*.jsonl")))
    times = [json.loads(p.read_text()) for p in out.glob("*.time")]
    starts = [t[0] for t in times if t[0]]
    ends = [t[1] for t in times if t[1]]
    summary = {
        "instructions": len(data),
        "samples": len(written),
        "calls": len(planned) + sum(len(w["write"]) for w in written),
        "plan_phase_s": round(t1 - t0, 3),
        "write_phase_s": round(t2 - t1, 3),
        "first_request": min(starts) if starts else 0.0,
        "last_answer": max(ends) if ends else 0.0,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
