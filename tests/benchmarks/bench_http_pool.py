"""Benchmark 6: the LLM client's HTTP pool settings, measured.

N chat requests at concurrency C against the fake server in its own process (100 ms per
call), through `LLMClient` itself, for each transport and pool layout: aiohttp's one pool (the
client's default, via httpx-aiohttp), then httpcore's P pools of K connections each (httpcore
scans every connection of a pool on each request, so one pool of 64 costs several times what
many small ones do) and with keep-alive off (a new connection per request). Reported
per layout: the client's CPU per request (process time, which moves much less than wall time
on a shared machine) and wall / lower bound.

    .venv/bin/python -m tests.benchmarks.bench_http_pool [--requests N] [--concurrency C]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from tests.benchmarks.common import BenchResult, fake_server, load_average

LATENCY_S = 0.1
# httpcore layouts: (connections per pool, keep-alive connections per pool); pools =
# concurrency / connections. aiohttp (the client's default transport) has one pool.
LAYOUTS: tuple[tuple[int, int], ...] = ((1, 1), (2, 2), (4, 4), (8, 8), (64, 64), (4, 0))
AIOHTTP = (0, 0)  # the layout key of the aiohttp transport


async def _drive(
    base_url: str, n: int, concurrency: int, per_pool: int, keepalive: int
) -> tuple[float, float, int]:
    import tasks.llm.client as llm

    saved = llm.POOL_CONNECTIONS, llm.POOL_KEEPALIVE
    llm.POOL_CONNECTIONS, llm.POOL_KEEPALIVE = per_pool, keepalive
    transport = "aiohttp" if (per_pool, keepalive) == AIOHTTP else "httpcore"
    try:
        client = llm.LLMClient(
            [llm.Endpoint(base_url, max_concurrency=concurrency)],
            "fake-model",
            llm.RetryPolicy(http_transport=transport),
        )
    finally:
        llm.POOL_CONNECTIONS, llm.POOL_KEEPALIVE = saved
    text = "Write the next paragraph of the piece about the lighthouse keeper. " * 40

    def request(i: int) -> llm.ChatRequest:
        messages = [{"role": "user", "content": f"{text} (request {i})"}]
        return llm.ChatRequest.of("write", messages, "write@bench", max_tokens=600)

    async with client:
        await asyncio.gather(*(client.chat(request(-i - 1)) for i in range(concurrency)))  # warm
        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(client.chat(request(i)) for i in range(n)))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
        pools = len(client._pools)
    return cpu, wall, pools


def run(requests: int = 3000, concurrency: int = 64) -> BenchResult:
    res = BenchResult(
        "http_pool", f"LLM client pool layouts ({concurrency} in flight, 100 ms/call)"
    )
    bound = requests * LATENCY_S / concurrency
    rows = {}
    with fake_server(LATENCY_S, 6, 300) as fake:
        for per_pool, keepalive in (AIOHTTP, *LAYOUTS):
            load = load_average()
            cpu, wall, pools = asyncio.run(
                _drive(fake.base_url, requests, concurrency, per_pool, keepalive)
            )
            name = (
                "aiohttp, 1 pool"
                if (per_pool, keepalive) == AIOHTTP
                else f"httpcore, {pools} pools x {per_pool} conn"
                + ("" if keepalive else ", no keep-alive")
            )
            rows[name] = {
                "cpu_ms_per_request": round(1000 * cpu / requests, 3),
                "wall_over_bound": round(wall / bound, 3),
                "load": load,
            }
            res.add(f"{name}: CPU per request", rows[name]["cpu_ms_per_request"], "ms")
            res.add(f"{name}: wall / bound", rows[name]["wall_over_bound"])
    res.details = {"layouts": rows, "requests": requests, "concurrency": concurrency}
    res.notes.append(
        f"{requests} requests through LLMClient.chat, concurrency {concurrency}; load average "
        f"per layout in details; the client ships with aiohttp, and on httpcore with the cheapest "
        "layout measured here"
    )
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args()
    res = run(args.requests, args.concurrency)
    for f in res.figures:
        print(f"{f.name:50s} {f.shown():>12s}")
    for n in res.notes:
        print(n)


if __name__ == "__main__":
    main()
