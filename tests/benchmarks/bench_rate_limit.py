"""Rate limits (issue 16): `longwriter build` of N instructions against a fake endpoint that
enforces an OpenAI-style requests-per-minute or tokens-per-minute limit (429s with the
x-ratelimit-* headers and no Retry-After). Reports, per scenario, the share of requests
refused with a 429 (goal < 5%) and the admitted rate against the limit (goal >= 85%).

Scenarios: `rpm-given` (--rpm set to the limit), `rpm-learned` (no flag: the client adopts
the limit from x-ratelimit-limit-requests after its first answers), `tpm-learned` (the same
for tokens, counted as OpenAI does: prompt + max_tokens).

    .venv/bin/python -m tests.benchmarks.bench_rate_limit [--instructions 500] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from tests.benchmarks.common import (
    REPO,
    BenchResult,
    FakeServerProcess,
    call_window,
    run_cli_build,
    scratch_dir,
    warm_prefect_home,
    write_instructions,
)

SCENARIOS = {
    # name: (fake server limit flags, build flags, limit kind, limit per minute)
    "rpm-given": (["--rpm", "1200"], ["--rpm", "1200"], "requests", 1200),
    "rpm-learned": (["--rpm", "1200"], [], "requests", 1200),
    "tpm-learned": (["--tpm", "600000"], [], "tokens", 600000),
}


def _start_fake(limit_args: list[str]) -> FakeServerProcess:
    argv = [sys.executable, "-m", "tests.fake_openai", "--port", "0", "--latency", "0.2"]
    # A bucket of 2 s of the limit: short next to the build, so the build is limit-bound.
    argv += ["--plan-steps", "2", "--step-words", "120", "--rate-window", "2", *limit_args]
    proc = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.isdigit():
        proc.kill()
        raise RuntimeError(f"fake server did not print its port (got {line!r})")
    return FakeServerProcess(proc, int(line))


def run_scenario(name: str, instructions: int, concurrency: int = 64) -> dict[str, float]:
    limit_args, build_args, kind, limit = SCENARIOS[name]
    fake = _start_fake(limit_args)
    try:
        home = warm_prefect_home(fake.base_url)
        work = scratch_dir(f"rate-{name}")
        src = write_instructions(work / "in.jsonl", instructions, prefix=name)
        # The warm-up build's requests count too: read the server's figures before and after.
        before = fake.stats()
        run = run_cli_build(
            home,
            ["--instructions", str(src), "--db", str(work / "s.db"), "--out", str(work / "o")],
            fake.base_url,
            concurrency=concurrency,
            min_words=200,
            extra=[*build_args, "--max-paragraph-tokens", "512"],
        )
        after = fake.stats()
    finally:
        fake.proc.terminate()
        fake.proc.wait(10)
    if run.returncode != 0:
        raise RuntimeError(f"build failed ({run.returncode}): {run.output[-2000:]}")
    requests = after["requests"] - before["requests"]
    throttled = after["throttled"] - before["throttled"]
    admitted = after["admitted"] - before["admitted"]
    span = call_window(work / "s.db").seconds  # this build's first request to last answer
    used = admitted if kind == "requests" else after["charged_tokens"] - before["charged_tokens"]
    per_minute = 60.0 * used / span if span else 0.0
    return {
        "requests": requests,
        "throttled": throttled,
        "share_429": throttled / max(1, requests),
        "admitted": admitted,
        "per_minute": per_minute,
        "limit": limit,
        "of_limit": per_minute / limit,
        "wall_s": run.wall_s,
    }


def run(instructions: int = 500, scenarios: tuple[str, ...] = tuple(SCENARIOS)) -> BenchResult:
    res = BenchResult("rate_limit", "Builds under an RPM/TPM limit: 429 share, rate vs limit")
    for name in scenarios:
        r = run_scenario(name, instructions)
        res.details[name] = r
        res.add(f"{name}: 429 share of requests", round(r["share_429"], 4), "", "< 0.05")
        res.add(f"{name}: admitted rate / limit", round(r["of_limit"], 3), "", ">= 0.85")
    res.notes.append(
        f"{instructions} instructions x 3 calls (2-paragraph plans), fake latency 0.2 s, "
        "--concurrency 64; limits enforced as a token bucket holding 2 s of the limit"
    )
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instructions", type=int, default=500)
    ap.add_argument("--quick", action="store_true", help="100 instructions")
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    args = ap.parse_args()
    n = 100 if args.quick else args.instructions
    res = run(n, tuple(args.scenario or SCENARIOS))
    print(json.dumps(res.as_dict(), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
