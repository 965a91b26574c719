"""Shared pieces of the benchmarks: the machine, processes and their CPU time, the fake
server in its own process, `longwriter build` as a subprocess, and what the store says about
when the LLM calls ran.

Every benchmark returns a `BenchResult`: figures (each a ratio or a measure, with its goal when
the issue sets one) and details. `run_all` prints them as one table and writes results.json and
results.md. Nothing here is a timed test: a benchmark reports, it never fails a build.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# -- scratch space ----------------------------------------------------------------------------

_SCRATCH: list[Path] = []


def scratch_dir(label: str) -> Path:
    """A temporary directory removed when the process exits (the export benchmark alone
    writes ~850 MB), unless LW_BENCH_KEEP=1 asks to keep them for inspection."""
    path = Path(tempfile.mkdtemp(prefix=f"lw-bench-{label}-"))
    _SCRATCH.append(path)
    return path


@atexit.register
def _remove_scratch() -> None:
    if os.environ.get("LW_BENCH_KEEP") == "1":
        return
    for path in _SCRATCH:
        shutil.rmtree(path, ignore_errors=True)


# -- results ----------------------------------------------------------------------------------


@dataclass
class Figure:
    """One number a benchmark reports. `goal` is text such as '<= 1.15'; `met` is None when
    the issue sets no goal for it."""

    name: str
    value: float | int | str | None
    unit: str = ""
    goal: str = ""
    met: bool | None = None

    def shown(self) -> str:
        v = self.value
        if isinstance(v, float):
            v = f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return f"{v}{(' ' + self.unit) if self.unit else ''}"


@dataclass
class BenchResult:
    name: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None  # why it did not run
    wall_s: float = 0.0

    def add(
        self,
        name: str,
        value: float | int | str | None,
        unit: str = "",
        goal: str = "",
    ) -> Figure:
        fig = Figure(name, value, unit, goal, _meets(value, goal))
        self.figures.append(fig)
        return fig

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _meets(value: float | int | str | None, goal: str) -> bool | None:
    m = re.fullmatch(r"\s*(<=|>=|<|>)\s*([\d.]+)\s*", goal or "")
    if not m or not isinstance(value, int | float):
        return None
    op, bound = m.group(1), float(m.group(2))
    return {
        "<=": value <= bound,
        ">=": value >= bound,
        "<": value < bound,
        ">": value > bound,
    }[op]


# -- the machine -------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # non-Linux
        cores = os.cpu_count() or 0
    mem_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        mem_gb = round(kb / 1024 / 1024, 1)
    versions: dict[str, str] = {}
    for pkg in ("prefect", "httpx", "sqlalchemy", "pyarrow", "llama_cpp_python"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[pkg] = version(pkg.replace("_python", "-python").replace("_", "-"))
    return {
        "cpu_model": cpu,
        "cores": cores,
        "memory_gb": mem_gb,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def load_average() -> float:
    """1-minute load average: other processes on the machine steal CPU from the measured ones,
    so every timed figure is reported next to it."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return -1.0


# -- processes ---------------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of one live process (None once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_bytes(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return None


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (the Prefect API server, llama.cpp server...)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _is_model_server(pid: int) -> bool:
    try:
        return b"llama_cpp.server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _is_factory_worker(pid: int) -> bool:
    """A process the factory spawned for its own work (tasks.signature_worker's pool): its
    CPU is the factory's, not the Prefect API server's."""
    try:
        return b"multiprocessing" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@dataclass
class CpuSample:
    t: float  # time.time()
    main_cpu_s: float  # the measured process itself
    children_cpu_s: float  # its descendants (the Prefect API server...), model servers apart
    rss_bytes: int
    model_cpu_s: float = 0.0  # descendants serving a model (the embedded llama.cpp server)
    worker_cpu_s: float = 0.0  # the factory's own worker processes (counted in children too)


class ProcessSampler:
    """Samples a process's CPU time (and its descendants') and RSS every `interval_s` from a
    thread, so the CPU spent inside any wall-clock window can be read afterwards."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[CpuSample] = []
        self._child_last: dict[int, float] = {}
        self._model_pids: set[int] = set()
        self._worker_pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcessSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        scan_every = 10  # descendants change rarely; listing /proc costs a few ms
        kids: list[int] = []
        i = 0
        while not self._stop.is_set():
            main = proc_cpu_s(self.pid)
            if main is None:
                return
            if i % scan_every == 0:
                kids = descendants(self.pid)
                for k in kids:
                    if k not in self._child_last and _is_model_server(k):
                        self._model_pids.add(k)
                    if k not in self._child_last and _is_factory_worker(k):
                        self._worker_pids.add(k)
            for k in kids:
                c = proc_cpu_s(k)
                if c is not None:
                    self._child_last[k] = c  # a child's last reading counts after it exits
            rss = proc_rss_bytes(self.pid) or 0
            model = sum(v for k, v in self._child_last.items() if k in self._model_pids)
            others = sum(self._child_last.values()) - model
            worker = sum(v for k, v in self._child_last.items() if k in self._worker_pids)
            self.samples.append(CpuSample(time.time(), main, others, rss, model, worker))
            i += 1
            self._stop.wait(self.interval_s)

    def model_cpu_between(self, t0: float, t1: float) -> float:
        return self._at(t1, "model_cpu_s") - self._at(t0, "model_cpu_s")

    def worker_cpu_between(self, t0: float, t1: float) -> float:
        return self._at(t1, "worker_cpu_s") - self._at(t0, "worker_cpu_s")

    def cpu_between(self, t0: float, t1: float) -> tuple[float, float]:
        """(main, children) CPU seconds spent between wall times t0 and t1 (interpolated)."""
        return (
            self._at(t1, "main_cpu_s") - self._at(t0, "main_cpu_s"),
            self._at(t1, "children_cpu_s") - self._at(t0, "children_cpu_s"),
        )

    def _at(self, t: float, attr: str) -> float:
        s = self.samples
        if not s:
            return 0.0
        if t <= s[0].t:
            return float(getattr(s[0], attr))
        for a, b in zip(s, s[1:], strict=False):
            if a.t <= t <= b.t:
                va, vb = float(getattr(a, attr)), float(getattr(b, attr))
                return va + (vb - va) * (t - a.t) / max(b.t - a.t, 1e-9)
        return float(getattr(s[-1], attr))

    def peak_rss(self) -> int:
        return max((s.rss_bytes for s in self.samples), default=0)


# -- the fake server in its own process --------------------------------------------------------


@dataclass
class FakeServerProcess:
    proc: subprocess.Popen[str]
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def cpu_s(self) -> float:
        return proc_cpu_s(self.proc.pid) or 0.0

    def stats(self) -> dict[str, Any]:
        import httpx

        with httpx.Client(trust_env=False, timeout=30) as c:
            return dict(c.get(f"http://127.0.0.1:{self.port}/_stats").json())


@contextlib.contextmanager
def fake_server(
    latency_s: float,
    plan_steps: int | None = 6,
    step_words: int = 300,
    module: str = "tests.fake_openai",
) -> Iterator[FakeServerProcess]:
    """`python -m tests.fake_openai` in a separate process (its CPU is not the factory's).
    `plan_steps=None` with module tests.benchmarks.fake_sized: plans sized by the prompt."""
    argv = [sys.executable, "-m", module, "--port", "0", "--latency", str(latency_s)]
    argv += ["--step-words", str(step_words)]
    if plan_steps is not None:
        argv += ["--plan-steps", str(plan_steps)]
    proc = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.isdigit():
            raise RuntimeError(f"fake server did not print its port (got {line!r})")
        yield FakeServerProcess(proc, int(line))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# -- instructions and environment --------------------------------------------------------------


def write_instructions(
    path: Path,
    n: int,
    *,
    length: int | None = None,
    prefix: str = "bench",
    lengths: Sequence[int] = (),
) -> Path:
    """`n` distinct English instructions (no benchmark text, so decontamination keeps them),
    each with `length`, or with lengths[i % len(lengths)] when `lengths` is given."""
    topics = ("a lighthouse keeper", "a river town", "a glass factory", "an orchard", "a ferry")
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            rec: dict[str, Any] = {
                "id": f"{prefix}-{i}",
                "prompt": f"Write a long story, number {i}, about {topics[i % len(topics)]} "
                f"and the people around it (variant {prefix}-{i}).",
            }
            if lengths:
                rec["length"] = lengths[i % len(lengths)]
            elif length is not None:
                rec["length"] = length
            fh.write(json.dumps(rec) + "\n")
    return path


def bench_env(prefect_home: Path, api_url: str | None = None) -> dict[str, str]:
    """Environment of a benchmarked build: a warm Prefect home of our own, quiet logging;
    `api_url`: the Prefect API server to use (as a profile's PREFECT_API_URL names one), else
    the build starts its temporary one."""
    env = dict(os.environ)
    env.update(
        {
            "PREFECT_HOME": str(prefect_home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
            "PYTHONPATH": str(REPO),
        }
    )
    env.pop("PREFECT_API_URL", None)
    env.pop("LONGWRITER_BASE_URL", None)
    env.pop("LONGWRITER_DB_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


@contextlib.contextmanager
def running_prefect_api(prefect_home: Path) -> Iterator[str]:
    """A Prefect API server left running for several builds (what a machine that schedules
    builds and watches them in the UI has), on the warm home: its URL. Started as the CLI
    starts its temporary one (flows.prefect_api), so it is the same server."""
    from flows import prefect_api

    api = prefect_api._spawn({"PREFECT_HOME": str(prefect_home)})
    try:
        api.wait(120)
        yield api.url
    finally:
        api.stop()


_PREFECT_HOME: Path | None = None


def warm_prefect_home(base_url: str) -> Path:
    """A Prefect home whose database is already migrated (one tiny build), shared by every
    benchmark in this process: a user's machine has one, and the first build's ~10 s of
    migrations would otherwise land in whichever benchmark runs first."""
    global _PREFECT_HOME
    if _PREFECT_HOME is not None:
        return _PREFECT_HOME
    home = scratch_dir("prefect")
    work = scratch_dir("warm")
    inst = write_instructions(work / "warm.jsonl", 2, prefix="warm")
    run = run_cli_build(
        home,
        ["--instructions", str(inst), "--db", str(work / "warm.db"), "--out", str(work / "out")],
        base_url,
        concurrency=2,
        min_words=100,
    )
    if run.returncode != 0:
        raise RuntimeError(f"warm-up build failed ({run.returncode}):\n{run.output[-3000:]}")
    _PREFECT_HOME = home
    return home


# -- `longwriter build` as a subprocess --------------------------------------------------------


@dataclass
class BuildRun:
    returncode: int
    wall_s: float
    started: float  # time.time() at launch
    ended: float
    cpu_main_s: float  # the build process, whole command
    cpu_children_s: float  # its descendants (Prefect's API server), whole command
    sampler: ProcessSampler
    output: str
    load_before: float
    load_after: float


def run_cli_build(
    prefect_home: Path,
    args: Sequence[str],
    base_url: str,
    *,
    concurrency: int,
    min_words: int,
    model: str = "fake-model",
    extra: Sequence[str] = (),
    timeout_s: float = 1800,
    prefix: Sequence[str] = (),
    api_url: str | None = None,
) -> BuildRun:
    """Run `longwriter build` exactly as a user would (`python -m flows.cli build ...`) and
    sample its CPU time and its children's while it runs. `prefix` wraps the command (a
    profiler); the CPU figures are then the wrapper's."""
    argv = [
        *prefix,
        sys.executable,
        "-m",
        "flows.cli",
        "build",
        *args,
        "--base-url",
        base_url,
        "--model",
        model,
        "--concurrency",
        str(concurrency),
        "--min-words",
        str(min_words),
        "--no-progress",
        *extra,
    ]
    return run_sampled(argv, bench_env(prefect_home, api_url), timeout_s)


def run_sampled(argv: Sequence[str], env: dict[str, str], timeout_s: float) -> BuildRun:
    load_before = load_average()
    out = tempfile.TemporaryFile(mode="w+")
    started = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        list(argv), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True
    )
    with ProcessSampler(proc.pid) as sampler:
        # Read the process's own CPU from /proc just before reaping it: wait4's rusage would
        # also fold in the children it reaped (the Prefect server), which we count apart.
        last_main = 0.0
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None:
            c = proc_cpu_s(proc.pid)
            if c is not None:
                last_main = c
            if time.monotonic() > deadline:
                proc.kill()
                break
            time.sleep(0.05)
        proc.wait()
    wall = time.perf_counter() - t0
    ended = time.time()
    last_main = max(last_main, sampler.samples[-1].main_cpu_s if sampler.samples else 0.0)
    children = sampler.samples[-1].children_cpu_s if sampler.samples else 0.0
    out.seek(0)
    text = out.read()
    out.close()
    return BuildRun(
        returncode=proc.returncode,
        wall_s=wall,
        started=started,
        ended=ended,
        cpu_main_s=last_main,
        cpu_children_s=children,
        sampler=sampler,
        output=text,
        load_before=load_before,
        load_after=load_average(),
    )


# -- what the store says -----------------------------------------------------------------------


@dataclass
class CallWindow:
    """The LLM phase of a build, from the stored calls: first request sent to last answer."""

    calls: int
    first_start: float  # epoch seconds
    last_end: float
    prompt_tokens: int
    completion_tokens: int
    latency_s_sum: float
    by_stage: dict[str, dict[str, int]]

    @property
    def seconds(self) -> float:
        return self.last_end - self.first_start


def _epoch(value: Any) -> float:
    if isinstance(value, datetime):
        dt = value
    else:
        dt = datetime.fromisoformat(str(value))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)  # the store writes UTC
    return dt.timestamp()


def call_window(db_path: Path) -> CallWindow:
    """Read llm_call rows straight from the SQLite file (created_at is written when the
    answer is in, so created_at - latency is when the request left)."""
    import sqlite3

    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT stage, created_at, latency_ms, prompt_tokens, completion_tokens FROM llm_call"
        ).fetchall()
    finally:
        con.close()
    if not rows:
        return CallWindow(0, 0.0, 0.0, 0, 0, 0.0, {})
    starts, ends = [], []
    by_stage: dict[str, dict[str, int]] = {}
    for stage, created, latency_ms, pt, ct in rows:
        end = _epoch(created)
        ends.append(end)
        starts.append(end - (latency_ms or 0) / 1000)
        s = by_stage.setdefault(stage, {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0})
        s["calls"] += 1
        s["prompt_tokens"] += pt or 0
        s["completion_tokens"] += ct or 0
    return CallWindow(
        calls=len(rows),
        first_start=min(starts),
        last_end=max(ends),
        prompt_tokens=sum(r[3] or 0 for r in rows),
        completion_tokens=sum(r[4] or 0 for r in rows),
        latency_s_sum=sum((r[2] or 0) for r in rows) / 1000,
        by_stage=by_stage,
    )


def count_status(db_path: Path) -> dict[str, int]:
    import sqlite3

    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return dict(con.execute("SELECT status, count(*) FROM instruction GROUP BY status"))
    finally:
        con.close()


def fmt_s(x: float) -> str:
    return f"{x:.1f} s"
