"""Scale-out on the existing engines.

- Several endpoints are load-balanced with a concurrency limit each, and a failing one is set
  aside: two real fake servers on sockets (one answering 503 to everything).
- A partitioned build on a real `prefect server start`: the parent deployment run ingests,
  starts one `longwriter-build/partition` run per partition, each taken by a different process
  worker, all sharing a fresh PostgreSQL database; one partition's worker is SIGKILLed mid-run,
  the parent starts that partition again and it resumes from the store; then one export.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from flows.build import BuildSettings, build_flow
from flows.partition import partition_settings
from storage.models import Instruction, LLMCall, Run
from storage.store import Store
from tasks.export import verify_manifest
from tasks.llm.client import ChatRequest, Endpoint, LLMClient
from tests.conftest import PG_ADMIN_DSN, pg_server_url, service_missing, write_jsonl
from tests.fake_openai import FakeConfig, FakeOpenAIServer
from tests.flows.prefect_stack import PrefectStack, tail

FAKE = dict(plan_steps=3, step_words=100)


class CountingServer(FakeOpenAIServer):
    """The fake server, also counting chat requests in flight (peak per endpoint)."""

    def __init__(self, config: FakeConfig) -> None:
        super().__init__(config)
        self.in_flight = 0
        self.peak = 0

    async def _respond(
        self, method: str, path: str, headers: dict[str, str], raw: bytes, writer: Any
    ) -> bool:
        if not path.rstrip("/").endswith("/chat/completions"):
            return await super()._respond(method, path, headers, raw, writer)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            return await super()._respond(method, path, headers, raw, writer)
        finally:
            self.in_flight -= 1


def _request(i: int) -> ChatRequest:
    return ChatRequest.of("plan", [{"role": "user", "content": f"question {i}"}], "v1")


# -- several endpoints ----------------------------------------------------------------------


async def _calls(client: LLMClient, n: int, callers: int) -> list[Any]:
    """n calls from `callers` concurrent chains (the build's chain limit plays this role)."""
    chains = asyncio.Semaphore(callers)

    async def one(i: int) -> Any:
        async with chains:
            return await client.chat(_request(i))

    return await asyncio.gather(*(one(i) for i in range(n)))


async def test_two_endpoints_share_load_within_each_limit() -> None:
    with (
        CountingServer(FakeConfig(latency_s=0.05, **FAKE)).running() as a,
        CountingServer(FakeConfig(latency_s=0.05, **FAKE)).running() as b,
    ):
        endpoints = [
            Endpoint(a.base_url, max_concurrency=3),
            Endpoint(b.base_url, max_concurrency=3),
        ]
        async with LLMClient(endpoints, "fake-model") as client:
            results = await _calls(client, 24, callers=4)
    assert len(results) == 24
    assert a.stats.requests + b.stats.requests == 24
    assert a.peak <= 3 and b.peak <= 3
    # Each call goes to the replica with the most free slots: both carry a fair share.
    assert a.stats.requests >= 8 and b.stats.requests >= 8
    assert {r.endpoint for r in results} == {a.base_url, b.base_url}


async def test_calls_beyond_all_slots_wait_for_any_free_endpoint() -> None:
    with (
        CountingServer(FakeConfig(latency_s=0.05, **FAKE)).running() as a,
        CountingServer(FakeConfig(latency_s=0.05, **FAKE)).running() as b,
    ):
        endpoints = [
            Endpoint(a.base_url, max_concurrency=3),
            Endpoint(b.base_url, max_concurrency=3),
        ]
        async with LLMClient(endpoints, "fake-model") as client:
            await _calls(client, 24, callers=24)
    assert a.peak <= 3 and b.peak <= 3
    assert a.stats.requests >= 8 and b.stats.requests >= 8


async def test_failing_endpoint_is_set_aside_and_the_build_completes(
    prefect_api: None, tmp_path: Path
) -> None:
    with (
        CountingServer(FakeConfig(fail_status=503, retry_after_s=0.0, **FAKE)).running() as down,
        CountingServer(FakeConfig(latency_s=0.02, **FAKE)).running() as up,
    ):
        src = write_jsonl(
            tmp_path / "in.jsonl",
            [{"prompt": f"Write a long essay about canal lock number {i}"} for i in range(6)],
        )
        settings = BuildSettings(
            instructions=str(src),
            db_url=f"sqlite:///{tmp_path / 'lb.db'}",
            out_dir=str(tmp_path / "out"),
            base_urls=[down.base_url, up.base_url],
            model="fake-model",
            concurrency=2,
            min_words=200,
            max_attempts=6,
            initial_backoff_s=0.01,
            max_backoff_s=0.05,
        )
        summary = await build_flow(settings=settings)
    assert summary["accepted"] == 6
    # `down` failed a few times (at most one per chain in flight before it was set aside,
    # plus the 3 consecutive failures that set it aside); every call ended on `up`.
    assert 1 <= down.stats.requests <= 3 + 2
    assert up.peak <= 2
    assert sum(up.stats.successes_by_request_id.values()) == 6 * 4


# -- partitions on several workers, PostgreSQL store ---------------------------------------


def _pg_available() -> bool:
    """Whether LONGWRITER_TEST_PG's server answers (the conftest's, not a fixed address)."""
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_DSN, connect_timeout=3):
            return True
    except Exception:  # noqa: BLE001 - any failure means: no server to test against
        return False


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new PostgreSQL database, dropped afterwards (connections still open included)."""
    import psycopg

    name = f"lw_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url() -> Iterator[str]:
    """The factory's store in a fresh database."""
    if not _pg_available():
        service_missing("PostgreSQL not reachable at LONGWRITER_TEST_PG")
    with fresh_database() as name:
        yield f"{pg_server_url()}/{name}"


@pytest.fixture
def prefect_pg_url(pg_url: str) -> Iterator[str]:
    """Prefect's own database, as the README recommends for several workers."""
    with fresh_database() as name:
        yield f"{pg_server_url('asyncpg')}/{name}"


def test_partition_settings_split_the_ids() -> None:
    base = BuildSettings(instructions="x.jsonl", export=True, progress=True)
    parts = [partition_settings(base, p, 3) for p in range(3)]
    assert all(s.instructions is None and not s.exports and not s.progress for s in parts)
    owners = [[p for p, s in enumerate(parts) if s.in_partition(i)] for i in range(1, 31)]
    assert all(len(o) == 1 for o in owners)  # every id in exactly one partition
    with pytest.raises(ValueError):
        BuildSettings(partition=3, partitions=3)


@pytest.mark.slow
@pytest.mark.postgres
def test_partitioned_build_on_three_workers_with_postgres(
    pg_url: str, prefect_pg_url: str, tmp_path: Path
) -> None:
    stack = PrefectStack(tmp_path / "stack", database_url=prefect_pg_url)
    pool = "lw-parts"
    n = 12
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [{"prompt": f"Write a long essay about ferry route number {i}"} for i in range(n)],
    )
    try:
        with FakeOpenAIServer(FakeConfig(latency_s=0.25, **FAKE)).running() as fake:
            stack.start_server()
            # One run per worker at a time: the parent and the two partitions land on three.
            # They boot while the deploy runs.
            stack.post("/work_pools/", {"name": pool, "type": "process"})
            workers = [stack.start_worker(pool, f"w{i}", limit=1, wait=False) for i in range(3)]
            stack.run(
                sys.executable, "deploy/deployments.py", "--pool", pool, "--no-schedule",
                "--db", pg_url, "--out", str(tmp_path / "out"),
                "--base-url", fake.base_url, "--model", "fake-model",
            )  # fmt: skip
            stack.wait_online(pool, workers)
            settings = {
                "instructions": str(src),
                "db_url": pg_url,
                "out_dir": str(tmp_path / "out"),
                "base_urls": [fake.base_url],
                "model": "fake-model",
                "min_words": 200,
                "concurrency": 1,
                "batch_size": 3,
            }
            parent = stack.create_run(
                "longwriter-partitioned-build/partitioned",
                {"settings": settings, "partitions": 2, "poll_interval_s": 1.0},
            )
            logs = [w.log for w in workers]
            part_dep = stack.deployment("longwriter-build/partition")["id"]

            def partition_runs() -> list[dict[str, Any]]:
                return stack.flow_runs({"deployments": {"id": {"any_": [part_dep]}}})

            def running(name: str) -> dict[str, Any] | None:
                for r in partition_runs():
                    if r["name"] == name and (r.get("state") or {}).get("type") == "RUNNING":
                        return r
                return None

            stack.wait(lambda: running("partition-1-of-2") is not None, 180, "partition 1", *logs)
            victim_run = running("partition-1-of-2")
            assert victim_run is not None
            victim = next(w for w in workers if victim_run["id"] in w.log.read_text())
            store = Store(pg_url)
            try:

                def stored() -> set[str]:
                    with store.session() as s:
                        return set(s.exec(select(LLMCall.key)).all())

                def partition_1_progress() -> int:
                    with store.session() as s:
                        rows = s.exec(select(Instruction.id, Instruction.status)).all()
                    return sum(
                        1 for i, st in rows if i is not None and i % 2 == 1 and st != "pending"
                    )

                # Mid-run: partition 1 has planned something (so it stored calls), not all.
                stack.wait(
                    lambda: partition_1_progress() >= 1, 120, "partition 1 progress", victim.log
                )
                victim.kill()  # the worker and its flow-run process
                before = stored()
                assert partition_1_progress() < n // 2
                asked = {k: fake.stats.by_request_id[k] for k in before}
                # What the zombie automation would do once heartbeats stop.
                stack.post(
                    f"/flow_runs/{victim_run['id']}/set_state",
                    {"state": {"type": "CRASHED", "name": "Crashed"}, "force": True},
                )
                final = stack.wait_final(parent["id"], 300, logs)
                assert final["state"]["type"] == "COMPLETED", "\n".join(tail(p) for p in logs)

                runs = {r["name"]: r["state"]["type"] for r in partition_runs()}
                assert runs == {
                    "partition-0-of-2": "COMPLETED",
                    "partition-1-of-2": "CRASHED",
                    "partition-1-of-2-attempt-2": "COMPLETED",
                }
                # Each run went to its own worker (limit 1 each).
                ids = [parent["id"], *(r["id"] for r in partition_runs())]
                for run_id in ids:
                    takers = [
                        w.name for w in workers if f"runs/flow-run/{run_id}" in w.log.read_text()
                    ]
                    assert len(takers) == 1, (run_id, takers)
                # Resumed: nothing stored before the kill was asked for again; nothing twice.
                assert all(fake.stats.by_request_id[k] == v for k, v in asked.items())
                # Partitions never overlap: a call answered twice can only be the one the
                # killed partition had in flight (concurrency 1).
                doubles = [k for k, c in fake.stats.successes_by_request_id.items() if c > 1]
                assert len(doubles) <= 1, doubles
                with store.session() as s:
                    statuses = [i.status for i in s.exec(select(Instruction)).all()]
                    kinds = sorted(r.kind for r in s.exec(select(Run)).all())
                assert statuses == ["accepted"] * n
                assert len(stored()) == n * 4
                assert kinds.count("partitioned-build") == 1 and kinds.count("build") == 3
            finally:
                store.close()
            manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
            assert manifest["counts"]["samples"] == n
            assert verify_manifest(tmp_path / "out") == []
            arts = {a["key"]: a for a in stack.artifacts(parent["id"])}
            assert "](data:image/png;base64," in arts["build-summary"]["data"]
    finally:
        stack.close()
