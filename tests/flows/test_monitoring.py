"""What a person watching builds in the Prefect UI sees (issue 17), on a real `prefect server
start` (services on): a build through the CLI against it (PREFECT_API_URL) and one through a
deployment on a worker, both against a fake endpoint injecting 20 % faults, read back through
the API: per-batch log lines, endpoint and model, retries as they happen with the threshold
warnings, every rejection with the input's id or file and line (ingest included), no
"Finished in state Completed()" per task run, task runs named after their batch, the flow run
named and tagged, progress that moves, the live table and the summary's run facts; then the
same checks on a CLI build with no server (Prefect's temporary API), read back by a server
started afterwards on its PREFECT_HOME. A headless chromium opens the flow run page and finds
a batch line and the summary artifact. The zombie automation from deploy/deployments.py, for
real: a worker SIGKILLed mid-run, the automation marks the run Crashed when its heartbeats
stop, and the retry resumes from the store.

The crash scenario starts first (a module fixture) so its wait for the automation overlaps
the two builds. LONGWRITER_SCREENSHOTS=deploy writes the browser's screenshots into deploy/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from flows.monitoring import (
    MAX_LOGGED_REJECTIONS,
    RetryWatch,
    default_run_name,
    ingest_rejection_lines,
    last_rejection_id,
    percent_done,
    redact_url,
)
from storage.models import LLMCall, Rejection
from storage.store import Store
from tasks.llm.client import ClientStats
from tasks.runtime import Progress
from tests.conftest import write_jsonl
from tests.fake_openai import FakeConfig, FakeOpenAIServer
from tests.flows.prefect_stack import PREFECT, REPO, PrefectStack, Proc, tail

POOL = "lw-monitor"
FAKE = dict(plan_steps=3, step_words=100, latency_s=0.05)  # 4 calls per instruction
# 20 % of requests fail; 429 twice as likely as each other kind (so the 429 warning shows).
FAULTS = dict(
    fault_rate=0.2, fault_kinds=("429", "429", "503", "drop", "bad_json"), retry_after_s=0.05
)
ZOMBIE_S = 40  # > the 30 s heartbeat (Prefect's minimum) the test processes send
# Heartbeats every 30 s, and the live artifacts refreshed every 0.5 s: the test's builds take
# seconds, the default 2 s refresh would show a real build's progress but not theirs.
HEARTBEAT = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30", "LONGWRITER_UI_REFRESH_S": "0.5"}
BATCH_NAME = re.compile(r"^(plan|write|filter)-#\d+(-#\d+)?$")


# -- pure pieces ---------------------------------------------------------------------------


def test_redact_url_hides_userinfo_and_query_values() -> None:
    assert redact_url("https://user:sk-secret@api.example.com:8443/v1?key=sk-2&x=1") == (
        "https://***@api.example.com:8443/v1?key=***&x=***"
    )
    assert redact_url("http://127.0.0.1:8001/v1") == "http://127.0.0.1:8001/v1"


def test_retry_watch_warns_once_per_crossing() -> None:
    stats = ClientStats()
    watch = RetryWatch(stats, every_s=0)
    stats.requests, stats.retries, stats.by_status = 30, 6, {"200": 24, "429": 4, "503": 2}
    said = watch.check(now=1)
    levels = [lvl for lvl, _ in said]
    assert levels.count(30) == 2, said  # WARNING: retry rate 20 % and 429 share 13 %
    assert "HTTP 429×4, HTTP 503×2" in said[0][1]
    stats.requests, stats.retries, stats.by_status["429"] = 60, 12, 8
    assert [lvl for lvl, _ in watch.check(now=2)] == [20]  # still above: no second warning
    assert watch.check(now=3) == []  # nothing new, nothing said


def test_percent_done_moves_with_paragraphs() -> None:
    p = Progress(instructions_total=2)
    assert percent_done(p) == 0.0
    p.plans, p.paragraphs_planned = 1, 4
    first = percent_done(p)
    p.paragraphs = 2
    assert 0 < first < percent_done(p) < 100


def test_default_run_name_from_input_and_date() -> None:
    at = datetime(2026, 12, 2, 3, 0, tzinfo=UTC)
    assert default_run_name({"instructions": "/d/prompts.jsonl"}, at) == "prompts-2026-12-02-0300"
    parted = {"instructions": "/d/prompts.jsonl", "partition": 1, "partitions": 4}
    assert default_run_name(parted, at) == "prompts-2026-12-02-0300-p1of4"
    assert default_run_name({}, at) == "resume-2026-12-02-0300"  # a rerun with no input file


def test_ingest_rejections_logged_after_this_ingest_capped_with_the_rest_counted(
    db_url: str,
) -> None:
    store = Store(db_url)
    try:
        store.save(Rejection(stage="ingest", reason="duplicate", source="/d/old.jsonl", line_no=1))
        before = last_rejection_id(store)  # what an earlier ingest refused is not said again
        store.save(
            *(
                Rejection(stage="ingest", reason="invalid_json", source="/d/in.jsonl", line_no=n)
                for n in range(1, MAX_LOGGED_REJECTIONS + 6)
            )
        )
        lines = ingest_rejection_lines(store, before)
    finally:
        store.close()
    assert len(lines) == MAX_LOGGED_REJECTIONS + 1
    assert lines[0] == "input in.jsonl:1 rejected at ingest: invalid_json"
    assert lines[-1] == "... and 5 more (longwriter stats)"


# -- the stack -------------------------------------------------------------------------------


def _pg_admin() -> str | None:
    """A PostgreSQL admin DSN when one answers: Prefect's migrations take ~7 s there against
    20-40 s on SQLite, a good part of this module's time."""
    dsn = os.environ.get("LONGWRITER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
    try:
        import psycopg

        with psycopg.connect(dsn, connect_timeout=2):
            return dsn
    except Exception:  # noqa: BLE001 - no server (or no driver): SQLite it is
        return None


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectStack]:
    import uuid

    admin = _pg_admin()
    name = f"lw_prefect_{uuid.uuid4().hex[:10]}"
    url = None
    if admin:
        import psycopg

        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = admin.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
        url += f"/{name}"
    s = PrefectStack(tmp_path_factory.mktemp("monitor"), database_url=url)
    try:
        s.start_server()  # the pool: created by deploy/deployments.py or the first worker
        yield s
    finally:
        s.close()
        if admin:
            import psycopg

            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def faulty() -> Iterator[FakeOpenAIServer]:
    """One per build: the fake draws its faults from one seeded sequence, so a fresh server
    gives every build the same faults whatever ran before (a shared one gave a later build
    3 failed requests of 49, under the retry warning's threshold)."""
    with FakeOpenAIServer(FakeConfig(**FAKE, **FAULTS)).running() as server:  # type: ignore[arg-type]
        yield server


@pytest.fixture(scope="module")
def clean() -> Iterator[FakeOpenAIServer]:
    """The crash scenario's endpoint: slow enough to be killed mid-run, no faults."""
    with FakeOpenAIServer(FakeConfig(plan_steps=3, step_words=100, latency_s=0.4)).running() as s:
        yield s


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def doomed(stack: PrefectStack) -> Proc:
    """The crash scenario's worker (limit 1), booting while the deployments are created."""
    return stack.start_worker(POOL, "w-doomed", limit=1, wait=False, **HEARTBEAT)


@pytest.fixture(scope="module")
def deployed(stack: PrefectStack, clean: FakeOpenAIServer, data: Path, doomed: Proc) -> None:
    write_jsonl(data / "nightly.jsonl", [{"prompt": "Write a long essay about tides"}])
    out = stack.run(
        sys.executable, "deploy/deployments.py",
        "--pool", POOL, "--no-schedule",
        "--instructions", str(data / "nightly.jsonl"),
        "--db", str(data / "nightly.db"), "--out", str(data / "nightly-out"),
        "--base-url", clean.base_url, "--model", "fake-model",  # runs below set their own
        "--set", "min_words=200", "--set", "batch_size=4",
        "--tag", "nightly", "--tag", "team-data",
        "--zombie-automation", str(ZOMBIE_S),
    )  # fmt: skip
    assert "deployed longwriter-build/nightly" in out.stdout, out.stdout


def _inputs(name: str, n: int, refuse: int = 1) -> list[Any]:
    """`n` instructions with their own ids, `refuse` the writer refuses, and three records
    ingest refuses (invalid JSON, no prompt, a duplicate id)."""
    recs: list[Any] = [
        {"id": f"{name}-{i:02d}", "prompt": f"Write a long essay about {name} harbour {i}"}
        for i in range(n)
    ]
    recs += [
        {"id": f"{name}-refused-{i}", "prompt": f"Write a story {i} the writer refuses [[refuse]]"}
        for i in range(refuse)
    ]
    recs += ['{"id": "broken", "prompt": ', {"id": "blank", "prompt": "  "}, recs[0]]
    return recs


def _settings(data: Path, name: str, fake: FakeOpenAIServer, **kw: Any) -> dict[str, Any]:
    return {
        "instructions": str(data / f"{name}.jsonl"),
        "db_url": str(data / f"{name}.db"),
        "out_dir": str(data / f"{name}-out"),
        "base_urls": [fake.base_url],
        "model": "fake-model",
        "min_words": 200,
        "batch_size": 4,
        **kw,
    }


def _stored_keys(db: str) -> set[str]:
    store = Store(db)
    try:
        with store.session() as s:
            return set(s.exec(select(LLMCall.key)).all())
    finally:
        store.close()


@dataclass
class Crash:
    run_id: str
    db: str
    asked: dict[str, int]  # stored keys at the kill -> requests the endpoint had seen for them
    killed_at: float  # wall clock (time.time()): compared with the server's state timestamp
    worker: Proc  # the worker that takes the other runs and the retry


@pytest.fixture(scope="module")
def crashed(
    stack: PrefectStack, deployed: None, doomed: Proc, clean: FakeOpenAIServer, data: Path
) -> Iterator[Crash]:
    """A deployment run whose worker (and flow-run process) is SIGKILLed mid-run; nobody
    tells the server. Started first: the automation's wait overlaps the other tests."""
    write_jsonl(
        data / "killed.jsonl", [{"prompt": f"Write an essay on pass {i}"} for i in range(6)]
    )
    settings = _settings(data, "killed", clean, concurrency=1)
    stack.wait_online(POOL, [doomed])
    run = stack.create_run("longwriter-build/nightly", {"settings": settings})
    db = settings["db_url"]
    stack.wait(
        lambda: Path(db).exists() and len(_stored_keys(db)) >= 3, 120, "3 stored calls", doomed.log
    )
    assert stack.state(run["id"]) == "RUNNING"
    killed = doomed.kill()
    killed_at = time.time()
    assert len(killed) >= 2, "the flow-run process should be a child of the worker"
    asked = {k: clean.stats.by_request_id[k] for k in _stored_keys(db)}
    worker = stack.start_worker(POOL, "w-builds", wait=False, **HEARTBEAT)
    try:
        yield Crash(run["id"], db, asked, killed_at, worker)
    finally:
        worker.stop()


# -- what the UI shows, checked the same way for both kinds of run -----------------------------


def _progress_watcher(
    stack: PrefectStack, find_run: Any, done: threading.Event
) -> tuple[threading.Thread, list[float]]:
    """Samples the run's `build-progress` artifact while it runs (a list of distinct values)."""
    seen: list[float] = []

    def watch() -> None:
        run_id = None
        while not done.is_set():
            with suppress(Exception):
                run_id = run_id or find_run()
                if run_id:
                    for a in stack.artifacts(run_id):
                        if a["key"] == "build-progress":
                            v = float(a["data"])
                            if not seen or seen[-1] != v:
                                seen.append(v)
            time.sleep(0.3)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t, seen


def _check_run(
    stack: PrefectStack,
    run_id: str,
    name: str,
    fake: FakeOpenAIServer,
    tags: set[str],
    run_name: str | re.Pattern[str],
) -> dict[str, Any]:
    """Every item of issue 17 for one finished flow run; returns what was read."""
    run = stack.flow_run(run_id)
    assert run["state"]["type"] == "COMPLETED"
    if isinstance(run_name, str):
        assert run["name"] == run_name
    else:
        assert run_name.match(run["name"]), run["name"]
    assert tags <= set(run["tags"]), run["tags"]

    # Logs ship in batches: the last lines may land after the run is marked completed.
    def logs() -> list[dict[str, Any]]:
        return stack.logs(run_id)

    def text() -> str:
        return "\n".join(entry["message"] for entry in logs())

    stack.wait(lambda: "LLM: " in text() and "rejected at ingest" in text(), 30, "final logs")
    entries = logs()
    messages = [e["message"] for e in entries]
    joined = "\n".join(messages)
    batch_lines = [m for m in messages if m.startswith("batch #")]
    assert batch_lines and all("planned" in m and "accepted" in m for m in batch_lines)
    assert any(f"ids {name}-00.." in m for m in batch_lines), batch_lines
    assert f"endpoints: ['{fake.base_url}'] (model fake-model)" in joined
    assert "LLM retries: " in joined  # as they happen, with the kinds
    assert re.search(r"LLM retry rate \d+% over the last \d+ requests", joined), joined[-3000:]
    assert re.search(r"HTTP 429 on \d+% of the last \d+ requests", joined)
    # Rejections: the input's own id and file:line, stage, reason; ingest ones by file:line.
    assert re.search(
        rf"instruction {name}-refused-0 \({name}\.jsonl:\d+\) rejected at \w+: refusal", joined
    ), joined
    assert re.search(rf"input {name}\.jsonl:\d+ rejected at ingest: invalid_json", joined)
    assert re.search(rf"input {name}\.jsonl:\d+ rejected at ingest: duplicate", joined)
    # Prefect's per-task "Finished in state Completed()" is gone; the flow run's state stays.
    task_done = [
        e for e in entries if e["task_run_id"] and e["message"].startswith("Finished in state")
    ]
    assert task_done == []
    assert any(
        e["message"].startswith("Finished in state Completed") and not e["task_run_id"]
        for e in entries
    )
    levels = {e["level"] for e in entries}
    assert 20 in levels and 30 in levels  # INFO lines reached the API, not only warnings

    names = [t["name"] for t in stack.task_runs(run_id)]
    batch_tasks = [n for n in names if n.split("-", 1)[0] in ("plan", "write", "filter")]
    assert batch_tasks and all(BATCH_NAME.match(n) for n in batch_tasks), names
    assert "plan-#1-#4" in names

    arts = {a["key"]: a for a in stack.artifacts(run_id)}
    progress = arts["build-progress"]
    assert float(progress["data"]) == 100.0
    # The refused instruction's plan is never written: written <= planned at the end.
    m = re.search(r"paragraphs (\d+)/(\d+) planned", progress["description"] or "")
    assert m and 0 < int(m[1]) <= int(m[2]), progress
    live = {row["metric"]: row["value"] for row in json.loads(arts["build-live"]["data"])}
    written, planned = (int(x) for x in live["paragraphs written / planned"].split(" / "))
    assert 0 < written <= planned and (written, planned) == (int(m[1]), int(m[2]))
    assert int(live["retries"]) > 0 and "429×" in live["HTTP errors"]
    summary = arts["build-summary"]["data"]
    assert re.search(r"\| wall time \| [\d.]+ s \|", summary)
    assert "| model(s) | `fake-model`" in summary
    assert f"| endpoint(s) | `{fake.base_url}`" in summary
    out_dir = Path(_settings(Path(), name, fake)["out_dir"]).name
    assert re.search(rf"\| output folder \| `[^`]*{out_dir}` \|", summary)
    # The export wrote the build report: its path in the table and a link under it.
    assert re.search(rf"\| build report \| `[^`]*{out_dir}/report\.html` \|", summary)
    assert re.search(rf"\]\(file://[^)]*{out_dir}/report\.html\)", summary), summary[-600:]
    return {"run": run, "messages": messages, "artifacts": arts, "task_runs": names}


CLI_RUN_NAME = "cli-check"


@pytest.mark.slow
def test_cli_build_against_server_shows_everything(
    stack: PrefectStack, faulty: FakeOpenAIServer, data: Path, crashed: Crash
) -> None:
    name = "clirun"
    write_jsonl(data / f"{name}.jsonl", _inputs(name, 9))
    s = _settings(data, name, faulty)
    cmd = [
        sys.executable, "-m", "flows.cli", "build",
        "--instructions", s["instructions"], "--db", s["db_url"], "--out", s["out_dir"],
        "--base-url", faulty.base_url, "--model", "fake-model",
        "--min-words", "200", "--batch-size", "4", "--concurrency", "4", "--no-progress",
        "--run-name", CLI_RUN_NAME, "--tag", "cli", "--tag", "team-data",
    ]  # fmt: skip
    env = stack.env(**HEARTBEAT)
    env.pop("PREFECT_LOGGING_LEVEL")  # as a user's shell has it: the CLI's own defaults apply

    def find_run() -> str | None:
        runs = stack.flow_runs({"flow_runs": {"name": {"any_": [CLI_RUN_NAME]}}})
        return runs[0]["id"] if runs else None

    done = threading.Event()
    watcher, seen = _progress_watcher(stack, find_run, done)
    try:
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    finally:
        done.set()
        watcher.join(5)
    assert out.returncode == 0, out.stderr[-3000:]
    # The terminal stays as quiet as before: the summary table, warnings at most, no INFO.
    assert "accepted samples" in out.stdout
    assert not re.search(r"\| INFO\s+\|", out.stderr), out.stderr[-3000:]
    run_id = find_run()
    assert run_id
    got = _check_run(stack, run_id, name, faulty, {"cli", "team-data"}, CLI_RUN_NAME)
    # Progress moved: values strictly between 0 and 100 were seen while it ran.
    assert len([v for v in seen if 0 < v < 100]) >= 1, seen
    assert seen == sorted(seen), seen  # and never went back
    _figures("cli", got, seen)
    (data / "cli-run-id").write_text(run_id)


@pytest.mark.slow
def test_deployment_build_shows_the_same(
    stack: PrefectStack, faulty: FakeOpenAIServer, data: Path, crashed: Crash
) -> None:
    name = "deprun"
    write_jsonl(data / f"{name}.jsonl", _inputs(name, 9))
    run = stack.create_run(
        "longwriter-build/nightly", {"settings": _settings(data, name, faulty, concurrency=4)}
    )
    done = threading.Event()
    watcher, seen = _progress_watcher(stack, lambda: run["id"], done)
    try:
        stack.wait_final(run["id"], 180, [crashed.worker.log])
    finally:
        done.set()
        watcher.join(5)
    got = _check_run(
        stack,
        run["id"],
        name,
        faulty,
        {"longwriter", "nightly", "team-data"},
        re.compile(rf"^{name}-\d{{4}}-\d\d-\d\d-\d{{4}}$"),
    )
    assert len([v for v in seen if 0 < v < 100]) >= 1, seen
    _figures("deployment", got, seen)


@pytest.mark.slow
def test_cli_build_on_temporary_api_logs_the_same(faulty: FakeOpenAIServer, tmp_path: Path) -> None:
    """The third way a build runs: `longwriter build` with no PREFECT_API_URL, on Prefect's
    temporary API (no UI). Its run lands in PREFECT_HOME's database, and a `prefect server
    start` on that home afterwards (how a user would look at it) shows the same items."""
    later = PrefectStack(tmp_path / "temporary")
    later.home.mkdir(parents=True)
    name = "temprun"
    write_jsonl(tmp_path / f"{name}.jsonl", _inputs(name, 9))
    s = _settings(tmp_path, name, faulty)
    cmd = [
        sys.executable, "-m", "flows.cli", "build",
        "--instructions", s["instructions"], "--db", s["db_url"], "--out", s["out_dir"],
        "--base-url", faulty.base_url, "--model", "fake-model",
        "--min-words", "200", "--batch-size", "4", "--concurrency", "4", "--no-progress",
        "--run-name", "temporary-check", "--tag", "temporary",
    ]  # fmt: skip
    env = later.env(**HEARTBEAT)
    for key in ("PREFECT_API_URL", "PREFECT_LOGGING_LEVEL"):  # a user's shell with no server
        env.pop(key)
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "accepted samples" in out.stdout
    assert not re.search(r"\| INFO\s+\|", out.stderr), out.stderr[-3000:]
    try:
        later.start_server()
        runs = later.flow_runs({"flow_runs": {"name": {"any_": ["temporary-check"]}}})
        assert len(runs) == 1, runs
        got = _check_run(later, runs[0]["id"], name, faulty, {"temporary"}, "temporary-check")
    finally:
        later.close()
    _figures("temporary API", got, [])


def _figures(kind: str, got: dict[str, Any], seen: list[float]) -> None:
    """What the UI showed, for the issue's closing note (run with -s)."""
    msgs = got["messages"]
    interesting = [
        m
        for m in msgs
        if m.startswith(("batch #", "LLM", "HTTP 429", "endpoints", "instruction", "input"))
    ]
    print(f"\nFIGURES {kind} run {got['run']['name']!r} tags {got['run']['tags']}")
    print(f"  progress seen: {seen}")
    print("  task runs:", sorted(got["task_runs"]))
    for m in interesting[:30]:
        print("  |", m[:160])
    arts = got["artifacts"]
    print(
        "  build-progress:", arts["build-progress"]["data"], arts["build-progress"]["description"]
    )
    print("  build-live:", json.loads(arts["build-live"]["data"]))
    rows = [r for r in arts["build-summary"]["data"].splitlines() if r.startswith("| ")]
    print("  build-summary rows:", rows)


def _chromium(url: str, *args: str, size: str = "1400,1000") -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed (CI installs it: apt-get install chromium)")
        pytest.skip("chromium not installed")
    out = subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--virtual-time-budget=20000", f"--window-size={size}", *args, url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return out.stdout


@pytest.mark.slow
def test_browser_shows_batch_log_and_summary(
    stack: PrefectStack, data: Path, tmp_path: Path
) -> None:
    run_file = data / "cli-run-id"
    if not run_file.exists():
        pytest.skip("the CLI build test did not run")
    run_id = run_file.read_text()
    page = f"http://127.0.0.1:{stack.port}/runs/flow-run/{run_id}"
    shots = REPO / "deploy" if os.environ.get("LONGWRITER_SCREENSHOTS") == "deploy" else tmp_path
    logs_dom = _chromium(page, "--dump-dom")  # the run page opens on its Logs tab
    assert "batch #1-#4" in logs_dom, logs_dom[-2000:]
    assert "rejected at ingest" in logs_dom
    # The run page's Artifacts tab links each artifact to its page, where the summary renders.
    # (A `?tab=Artifacts` link falls back to Logs while the page loads the run's state.)
    summary = next(a for a in stack.artifacts(run_id) if a["key"] == "build-summary")
    art_page = f"http://127.0.0.1:{stack.port}/artifacts/artifact/{summary['id']}"
    art_dom = _chromium(art_page, "--dump-dom")
    assert "build-summary" in art_dom and "accepted samples" in art_dom and "wall time" in art_dom
    # Tall enough to show the log past the ingest lines: endpoints, retries, batch lines.
    _chromium(page, f"--screenshot={shots / 'ui-flow-run-logs.png'}", size="1400,1700")
    _chromium(art_page, f"--screenshot={shots / 'ui-build-summary.png'}")
    assert (shots / "ui-flow-run-logs.png").stat().st_size > 10_000


# -- the zombie automation, for real -------------------------------------------------------------


@pytest.mark.slow
def test_killed_worker_run_crashed_by_automation_then_resumes(
    stack: PrefectStack, clean: FakeOpenAIServer, crashed: Crash
) -> None:
    # The clock started at the kill (this test runs after the builds): the last heartbeat
    # came up to 30 s before it, the automation waits ZOMBIE_S, the triggers service and the
    # actions service add their polling on a loaded machine.
    stack.wait(
        lambda: stack.state(crashed.run_id) == "CRASHED",
        max(30.0, ZOMBIE_S + 180 - (time.time() - crashed.killed_at)),
        "the zombie automation to mark the run Crashed",
        stack.root / "server.log",
    )
    state = stack.flow_run(crashed.run_id)["state"]
    assert "no heartbeat" in (state.get("message") or ""), state  # the automation's message
    # When the server set it, not when this test looked (the builds ran meanwhile).
    after_s = datetime.fromisoformat(state["timestamp"]).timestamp() - crashed.killed_at
    assert after_s > 0, state
    print(f"\nFIGURES killed worker -> Crashed by the automation {after_s:.0f} s after the kill")
    stack.run(PREFECT, "flow-run", "retry", crashed.run_id)  # the README's command
    final = stack.wait_final(crashed.run_id, 180, [crashed.worker.log])
    assert final["state"]["type"] == "COMPLETED", tail(crashed.worker.log)
    assert final["run_count"] >= 2
    again = {
        k: clean.stats.by_request_id[k] - n
        for k, n in crashed.asked.items()
        if clean.stats.by_request_id[k] != n
    }
    assert again == {}  # nothing stored before the kill was asked for again
    assert len(_stored_keys(crashed.db)) == 24  # 6 instructions x 4 calls
