"""The deploy README, for real, on loopback: `prefect server start` (services on), a process
work pool, `deploy/deployments.py`, a worker, a build deployment run to Completed against the
fake OpenAI server (running in this process), the UI's artifacts and logs read back through
the API; then a worker SIGKILLed mid-run, the run retried with `prefect flow-run retry`, and
the retry resuming from the store without asking for any stored call again.

Run with -s to see the measured `trigger -> first LLM request` latency.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sqlmodel import select

from storage.models import LLMCall
from storage.store import Store
from tasks.export import verify_manifest
from tests.conftest import write_jsonl
from tests.fake_openai import FakeConfig, FakeOpenAIServer
from tests.flows.prefect_stack import PREFECT, REPO, PrefectStack, Proc, tail

pytestmark = pytest.mark.slow

POOL = "lw-test"
# Small pieces: 3 paragraphs of 100 words, accepted at 200 words (4 calls per instruction).
FAKE = dict(plan_steps=3, step_words=100)
SMALL = {"min_words": 200, "batch_size": 4}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectStack]:
    s = PrefectStack(tmp_path_factory.mktemp("stack"))
    try:
        s.start_server()
        s.run(PREFECT, "work-pool", "create", POOL, "--type", "process")  # README step
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(FakeConfig(latency_s=0.3, **FAKE)).running() as server:
        yield server


@pytest.fixture(scope="module")
def build_worker(stack: PrefectStack) -> Proc:
    """The worker of the build test, started early so it boots while the deploy runs."""
    return stack.start_worker(POOL, "w-build", wait=False)


@pytest.fixture(scope="module")
def deployed(
    stack: PrefectStack,
    fake: FakeOpenAIServer,
    build_worker: Proc,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """`python deploy/deployments.py ...` as the README runs it; returns the data directory."""
    data = tmp_path_factory.mktemp("data")
    write_jsonl(
        data / "nightly.jsonl",
        [{"prompt": f"Write a long essay about harbour number {i}"} for i in range(3)]
        + [{"prompt": "Write a long essay the writer refuses [[refuse]]"}],
    )
    out = stack.run(
        sys.executable,
        "deploy/deployments.py",
        "--pool", POOL,
        "--instructions", str(data / "nightly.jsonl"),
        "--db", str(data / "nightly.db"),
        "--out", str(data / "nightly-out"),
        "--base-url", fake.base_url,
        "--model", "fake-model",
        "--set", "min_words=200",
        "--set", "batch_size=4",
        "--zombie-automation", "600",
    )  # fmt: skip
    assert "deployed longwriter-build/nightly" in out.stdout, out.stdout
    return data


def _settings(data: Path, name: str, fake: FakeOpenAIServer, **kw: object) -> dict[str, object]:
    return {
        "instructions": str(data / f"{name}.jsonl"),
        "db_url": str(data / f"{name}.db"),
        "out_dir": str(data / f"{name}-out"),
        "base_urls": [fake.base_url],
        "model": "fake-model",
        **SMALL,
        **kw,
    }


def test_deployments_schedule_and_zombie_automation(stack: PrefectStack, deployed: Path) -> None:
    nightly = stack.deployment("longwriter-build/nightly")
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 3 * * *"]
    assert nightly["work_pool_name"] == POOL
    assert nightly["entrypoint"] == "flows/build.py:build_flow"
    settings = nightly["parameters"]["settings"]
    assert settings["instructions"].endswith("nightly.jsonl") and settings["min_words"] == 200
    for name in (
        "longwriter-build/partition",
        "longwriter-partitioned-build/partitioned",
        "longwriter-export/export",
        "longwriter-eval/eval",
    ):
        assert stack.deployment(name)["work_pool_name"] == POOL
    # The scheduler service turns the cron schedule into upcoming runs (this is what broke
    # under SQLAlchemy 2.1: Prefect 3.8's bulk insert of scheduled runs).
    stack.wait(
        lambda: (
            len(
                stack.flow_runs(
                    {
                        "deployments": {"id": {"any_": [nightly["id"]]}},
                        "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
                    }
                )
            )
            > 0
        ),
        60,
        "scheduled runs of the nightly deployment",
        stack.root / "server.log",
    )
    autos = stack.post("/automations/filter", {})
    assert any(a["name"] == "longwriter: crash zombie flow runs" and a["enabled"] for a in autos)


def test_build_deployment_runs_on_worker(
    stack: PrefectStack,
    deployed: Path,
    fake: FakeOpenAIServer,
    build_worker: Proc,
    capsys: pytest.CaptureFixture[str],
) -> None:
    worker = build_worker
    stack.wait_online(POOL, [worker])
    try:
        data = deployed
        write_jsonl(
            data / "first.jsonl",
            [{"prompt": f"Write a long essay about lighthouse number {i}"} for i in range(5)]
            + [{"prompt": "Write a long story the writer refuses [[refuse]]"}],
        )
        before = fake.stats.requests
        created = time.monotonic()
        run = stack.create_run(
            "longwriter-build/nightly", {"settings": _settings(data, "first", fake)}
        )
        stack.wait(lambda: fake.stats.requests > before, 120, "first LLM request", worker.log)
        first_request_s = time.monotonic() - created
        final = stack.wait_final(run["id"], 180, [worker.log])
        assert final["state"]["type"] == "COMPLETED", tail(worker.log)

        manifest = json.loads((data / "first-out" / "manifest.json").read_text())
        assert manifest["counts"]["samples"] == 5
        assert verify_manifest(data / "first-out") == []
        rows = sum(
            pq.read_metadata(data / "first-out" / f["path"]).num_rows
            for f in manifest["files"]
            if f["path"].endswith(".parquet")
        )
        assert rows == 5

        # What the UI shows: progress at 100 %, summary table with the histogram inline.
        arts = {a["key"]: a for a in stack.artifacts(run["id"])}
        assert arts["build-progress"]["type"] == "progress"
        assert float(arts["build-progress"]["data"]) == 100.0
        summary = arts["build-summary"]["data"]
        assert "| accepted samples | 5 |" in summary
        assert "| write | refusal | 1 |" in summary
        assert "](data:image/png;base64," in summary

        # Per-stage logs, and the failed item names its reason. The flow process ships its
        # logs in batches, so the last ones may land after the run is marked completed.
        def messages() -> list[str]:
            return [entry["message"] for entry in stack.logs(run["id"])]

        stack.wait(
            lambda: any("rejected at write: refusal" in m for m in messages()),
            30,
            "the refusal's log line",
            worker.log,
        )
        # One line per batch, naming its inputs by file and line (these records have no id);
        # the refused instruction was planned, then rejected at write.
        stack.wait(lambda: "LLM: " in "\n".join(messages()), 30, "the run's last log lines")
        batches = [m for m in messages() if m.startswith("batch #")]
        assert any(
            m.startswith("batch #1-#4 (4 instructions, first.jsonl lines 1-4): planned 4, ")
            and m.endswith("accepted 4, rejected 0")
            for m in batches
        ), batches
        assert any(
            m.startswith("batch #5-#6 (2 instructions, first.jsonl lines 5-6): planned 2, ")
            and m.endswith("accepted 1, rejected 1")
            for m in batches
        ), batches
        # Batch task runs are named after their batch (`plan-#1-#4`), the others get
        # Prefect's suffix (`ingest-3f2`): the stage is what precedes the first dash.
        stack.wait(
            lambda: (
                {"plan", "write", "filter", "ingest", "export"}
                <= {t["name"].split("-", 1)[0] for t in stack.task_runs(run["id"])}
            ),
            30,
            "stage task runs recorded",
        )
        with capsys.disabled():
            print(
                f"\nFIGURES deployment run created -> first LLM request: {first_request_s:.1f} s "
                f"(worker polling every 1 s)"
            )
        assert first_request_s < 90
    finally:
        worker.stop()


def _stored_keys(db: str) -> set[str]:
    store = Store(db)
    try:
        with store.session() as s:
            return set(s.exec(select(LLMCall.key)).all())
    finally:
        store.close()


def test_killed_worker_run_is_retried_and_resumes(
    stack: PrefectStack, deployed: Path, fake: FakeOpenAIServer, build_worker: Proc
) -> None:
    build_worker.stop()  # only the doomed worker may take this run
    data = deployed
    write_jsonl(
        data / "killed.jsonl",
        [{"prompt": f"Write a long essay about mountain pass number {i}"} for i in range(8)],
    )
    settings = _settings(data, "killed", fake, concurrency=2)
    db = str(settings["db_url"])
    worker = stack.start_worker(POOL, "w-doomed")
    run = stack.create_run("longwriter-build/nightly", {"settings": settings})
    stack.wait(lambda: stack.state(run["id"]) == "RUNNING", 120, "run started", worker.log)
    # The rescuer boots meanwhile; the run is taken, so it stays idle until the retry.
    worker2 = stack.start_worker(POOL, "w-rescue", wait=False)
    # Mid-run: some calls stored, most still to make (8 instructions x 4 calls).
    stack.wait(
        lambda: Path(db).exists() and len(_stored_keys(db)) >= 6, 120, "6 stored calls", worker.log
    )
    killed = worker.kill()  # the worker and its flow-run process, all SIGKILL
    assert len(killed) >= 2, "the flow run process should be a child of the worker"
    stored = _stored_keys(db)
    asked = {k: fake.stats.by_request_id[k] for k in stored}
    assert len(stored) < 32
    assert stack.state(run["id"]) == "RUNNING"  # nobody told the server

    # What the zombie automation does once heartbeats stop (deploy/deployments.py creates it;
    # it waits PREFECT_FLOWS_HEARTBEAT_FREQUENCY x ~3, too long for a test): mark it Crashed.
    stack.post(
        f"/flow_runs/{run['id']}/set_state",
        {
            "state": {"type": "CRASHED", "name": "Crashed", "message": "worker killed"},
            "force": True,
        },
    )
    stack.run(PREFECT, "flow-run", "retry", run["id"])  # the README's command
    try:
        final = stack.wait_final(run["id"], 180, [worker2.log])
        assert final["state"]["type"] == "COMPLETED", tail(worker2.log)
        assert final["id"] == run["id"] and final["run_count"] >= 2
    finally:
        worker2.stop()
    # Resumed from the store: no call stored before the kill was requested again.
    again = {
        k: fake.stats.by_request_id[k] - n
        for k, n in asked.items()
        if fake.stats.by_request_id[k] != n
    }
    assert again == {}
    assert len(_stored_keys(db)) == 32
    manifest = json.loads((data / "killed-out" / "manifest.json").read_text())
    assert manifest["counts"]["samples"] == 8


def test_prefect_yaml_deploys_the_same_shape(
    stack: PrefectStack, deployed: Path, fake: FakeOpenAIServer
) -> None:
    """`prefect deploy` with deploy/prefect.yaml, as its header says (last in this module: it
    replaces the deployments the tests above used)."""
    stack.run(PREFECT, "work-pool", "create", "longwriter", "--type", "process")
    urls = f"{fake.base_url},{fake.base_url}"
    stack.run(
        PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml",
        LONGWRITER_INSTRUCTIONS=str(deployed / "nightly.jsonl"),
        LONGWRITER_DB_URL=str(deployed / "yaml.db"),
        LONGWRITER_OUT=str(deployed / "yaml-out"),
        LONGWRITER_BASE_URL=urls,
        LONGWRITER_MODEL="fake-model",
    )  # fmt: skip
    nightly = stack.deployment("longwriter-build/nightly")
    assert nightly["work_pool_name"] == "longwriter"
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 3 * * *"]
    assert nightly["parameters"]["settings"]["base_urls"] == [urls]
    assert nightly["parameters"]["settings"]["db_url"] == str(deployed / "yaml.db")
    step = nightly["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]
    assert Path(step["directory"]) == REPO
    parted = stack.deployment("longwriter-partitioned-build/partitioned")
    assert parted["entrypoint"] == "flows/partition.py:partitioned_build"
    assert parted["parameters"]["partitions"] == 2
    export = stack.deployment("longwriter-export/export")
    assert export["parameters"] == {
        "db_url": str(deployed / "yaml.db"),
        "out_dir": str(deployed / "yaml-out"),
    }
