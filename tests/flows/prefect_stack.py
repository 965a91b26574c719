"""A real Prefect stack on loopback for deployment tests: `prefect server start` (with its
services: the scheduler and triggers are what a deployment needs beyond the API), process
workers, and the REST calls the tests make to read runs, artifacts and logs.

Every process starts in its own session (process group). Workers start flow runs in
sessions of their own, so `Proc.kill` collects the whole process tree before signalling: a
worker killed first would orphan its flow runs. `PrefectStack.close` kills everything left.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).parent / "prefect")
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """pid and every live descendant, from /proc (Linux; no psutil dependency)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":  # a zombie is already dead
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"(no {path})"


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def kill(self, pids: list[int] | None = None) -> list[int]:
        """SIGKILL the process, its group and every descendant's group; the pids killed.
        The tree is read first: once the worker is dead its flow runs are orphans."""
        if pids is None:
            pids = descendants(self.popen.pid) if self.popen.poll() is None else []
        groups = set()
        for pid in pids:
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                pass
        for g in groups:
            try:
                os.killpg(g, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            pass
        return pids

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM first (a worker or server shuts down cleanly), then kill what is left,
        including flow-run processes (they run in sessions of their own)."""
        pids = descendants(self.popen.pid) if self.popen.poll() is None else []
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        self.kill(pids + descendants(self.popen.pid) if self.popen.poll() is None else pids)


@dataclass
class PrefectStack:
    root: Path
    port: int = field(default_factory=free_port)
    # Prefect's own database: SQLite in PREFECT_HOME unless a postgresql+asyncpg:// URL is
    # given (migrations take ~7 s there instead of 20-40 s, and many workers never see
    # "database is locked").
    database_url: str | None = None
    procs: list[Proc] = field(default_factory=list)

    @property
    def home(self) -> Path:
        return self.root / "prefect-home"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of every process: none of the test session's PREFECT_* overrides
        (tests/conftest.py turns services and API logging off), a private PREFECT_HOME, and a
        1 s worker poll so tests do not wait for the 10 s default."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_API_URL=self.api_url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_WORKER_QUERY_SECONDS="1",
            PREFECT_WORKER_PREFETCH_SECONDS="2",
            PREFECT_LOGGING_LEVEL="INFO",
            PREFECT_CLI_WRAP_LINES="false",
            COLUMNS="200",
        )
        env.update(extra)
        return env

    def spawn(self, name: str, args: list[str], **env: str) -> Proc:
        log = self.root / f"{name}.log"
        fh = log.open("wb")
        popen = subprocess.Popen(
            args,
            cwd=REPO,
            env=self.env(**env),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        fh.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def start_server(self, timeout_s: float = 180.0) -> Proc:
        self.home.mkdir(parents=True, exist_ok=True)
        db = (
            {"PREFECT_SERVER_DATABASE_CONNECTION_URL": self.database_url}
            if self.database_url
            else {}
        )
        server = self.spawn(
            "server",
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            **db,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if server.popen.poll() is not None:
                raise RuntimeError(f"prefect server exited:\n{tail(server.log)}")
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"prefect server not healthy after {timeout_s} s:\n{tail(server.log)}")

    def start_worker(
        self, pool: str, name: str, limit: int = 4, wait: bool = True, **env: str
    ) -> Proc:
        worker = self.spawn(
            f"worker-{name}",
            [PREFECT, "worker", "start", "--pool", pool, "--type", "process"]
            + ["--name", name, "--limit", str(limit)],
            **env,
        )
        if wait:
            self.wait_online(pool, [worker])
        return worker

    def wait_online(self, pool: str, workers: list[Proc], timeout_s: float = 90.0) -> None:
        """Until every worker's first heartbeat reached the server."""
        names = {w.name.removeprefix("worker-") for w in workers}

        def online() -> bool:
            found = self.post(f"/work_pools/{pool}/workers/filter", {})
            return names <= {w["name"] for w in found if w["status"] == "ONLINE"}

        self.wait(online, timeout_s, f"workers {sorted(names)} online", *(w.log for w in workers))

    def run(
        self, *args: str, timeout_s: float = 180.0, **env: str
    ) -> subprocess.CompletedProcess[str]:
        """A command (e.g. the README's) in the repository with this stack's environment."""
        out = subprocess.run(
            list(args),
            cwd=REPO,
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if out.returncode != 0:
            raise AssertionError(f"{args} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
        return out

    # -- REST ----------------------------------------------------------------------------

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One API call, retried on 503/429 as Prefect's own client does (a busy SQLite
        backend answers 503 while locked)."""
        for attempt in range(8):
            r = httpx.request(method, self.api_url + path, json=body, timeout=30)
            if r.status_code not in (429, 503) or attempt == 7:
                break
            time.sleep(0.25 * 2**attempt)
        r.raise_for_status()
        return r.json() if r.content else None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("POST", path, body)

    def deployment(self, name: str) -> dict[str, Any]:
        return self.get(f"/deployments/name/{name}")

    def create_run(self, deployment: str, parameters: dict[str, Any]) -> dict[str, Any]:
        dep = self.deployment(deployment)
        return self.post(f"/deployments/{dep['id']}/create_flow_run", {"parameters": parameters})

    def flow_run(self, run_id: str) -> dict[str, Any]:
        return self.get(f"/flow_runs/{run_id}")

    def state(self, run_id: str) -> str:
        state = self.flow_run(run_id).get("state") or {}
        return str(state.get("type") or "NONE")

    def wait_final(self, run_id: str, timeout_s: float, logs: list[Path]) -> dict[str, Any]:
        self.wait(
            lambda: self.state(run_id) in TERMINAL, timeout_s, f"flow run {run_id} final", *logs
        )
        return self.flow_run(run_id)

    def artifacts(self, run_id: str) -> list[dict[str, Any]]:
        return self.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})

    def logs(self, run_id: str) -> list[dict[str, Any]]:
        """Every log of the run, oldest first (the API returns at most 200 per page)."""
        out: list[dict[str, Any]] = []
        while True:
            page = self.post(
                "/logs/filter",
                {
                    "logs": {"flow_run_id": {"any_": [run_id]}},
                    "sort": "TIMESTAMP_ASC",
                    "limit": 200,
                    "offset": len(out),
                },
            )
            out += page
            if len(page) < 200:
                return out

    def task_runs(self, run_id: str) -> list[dict[str, Any]]:
        return self.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})

    def flow_runs(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        return self.post("/flow_runs/filter", body)

    def wait(self, ok: Callable[[], bool], timeout_s: float, what: str, *logs: Path) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ok():
                return
            time.sleep(0.25)
        detail = "\n".join(f"--- {p.name}\n{tail(p)}" for p in logs)
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{detail}")

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(grace_s=3.0)
        self.procs.clear()
