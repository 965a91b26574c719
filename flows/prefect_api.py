"""Prefect's temporary API server, started without waiting for it and without importing it.

Prefect's own ephemeral start (`SubprocessASGIServer.start`, what `get_client()` does when
PREFECT_API_URL is unset) imports the whole server package into the client process first
(FastAPI, the server's ORM models: seconds of CPU on a 2-core box) and then blocks until the
child answers. The child imports that same package again, so the parent's copy is pure
start-up cost. Here the child is spawned with the command and environment Prefect uses, the
parent goes on with its own start-up while the child boots on the other core, and waits for
`/api/health` only when the flow is about to start. The flow then talks to it as to any API
(PREFECT_API_URL set for the run), so nothing starts a second server.

The child gets PR_SET_PDEATHSIG=SIGKILL (it cannot outlive a SIGKILLed build: the reason
flows.console.start_prefect_api exists) and is stopped at exit. A running server is reused:
PREFECT_API_URL set, or Prefect's own temporary server already started in this process.

    api = launch()          # returns at once (None: nothing of ours to start)
    ...                      # the rest of the start-up, concurrently
    with serving(api):       # waits until healthy; the flow runs inside
        asyncio.run(flow())
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

# Prefect picks a random free port in this range for its temporary server; so do we.
_PORTS = range(8000, 9000)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass
class TemporaryApi:
    """One spawned API server child."""

    port: int
    process: subprocess.Popen[bytes]
    log: IO[bytes]
    # False while spawned before Prefect's settings were read (launch); see _confirm.
    confirmed: bool = True
    started: float = field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def wait(self, timeout_s: float) -> float:
        """Block until `/api/health` answers 200; seconds waited. Raises RuntimeError when the
        child exits or `timeout_s` passes first."""
        import urllib.error
        import urllib.request

        t0 = time.monotonic()
        while True:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(
                    f"Prefect's temporary API server exited with code {code}: {self.output()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return time.monotonic() - t0
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() - t0 > timeout_s:
                self.stop()
                raise RuntimeError(
                    f"Prefect's temporary API server did not answer within {timeout_s:.0f} s "
                    f"(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS): {self.output()}"
                )
            time.sleep(0.05)  # short: every 50 ms of polling is start-up added to a build

    def output(self, limit: int = 2000) -> str:
        """The end of what the server printed."""
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")[-limit:].strip()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


_CURRENT: TemporaryApi | None = None

# Modules Prefect imports only when a flow is called and its run starts (Flow.__call__,
# serialize_parameters, the engines): ~0.4 s on the 2-core box, imported by `serving` while
# the server boots instead of after it answers.
_FLOW_RUN_IMPORTS = (
    "prefect.utilities.visualization",
    "fastapi.encoders",
    "prefect.flow_engine",
    "prefect.task_engine",
)


def _kill_with_parent() -> Callable[[], None] | None:
    """A preexec_fn giving the child PR_SET_PDEATHSIG=SIGKILL (None off Linux): what
    tasks.llm.llama_server's `_make_preexec(True)` does, without its imports (httpx and the
    settings models), which would delay the spawn by their import time."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    # Resolved before fork: between fork and exec the child must not dlopen.
    prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    parent_pid = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The parent may have died between fork() and prctl(): then no signal would ever come.
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _free_port() -> int:
    import random

    for _ in range(20):
        port = random.choice(_PORTS)
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port for Prefect's temporary API server")


def _prefect_running_in_process() -> bool:
    """Prefect's own temporary server already started here (flows.console.start_prefect_api,
    or a client that started it): its module is loaded only then, so look, never import."""
    server = sys.modules.get("prefect.server.api.server")
    instances = getattr(getattr(server, "SubprocessASGIServer", None), "_instances", {})
    return any(getattr(s, "running", False) for s in instances.values())


def _settings_name_a_server() -> bool:
    """PREFECT_API_URL set in Prefect's settings (environment, profile, prefect.toml...), or
    Prefect's own temporary server already running here: a server to reuse."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value()) or _prefect_running_in_process()


def _confirm(api: TemporaryApi | None) -> TemporaryApi | None:
    """A child spawned before Prefect was imported (see `launch`), checked against Prefect's
    settings once they are loaded: stopped (None) when they name a server to reuse."""
    global _CURRENT
    if api is None or api.confirmed:
        return api
    if _settings_name_a_server():
        api.stop()
        if _CURRENT is api:
            _CURRENT = None
        return None
    api.confirmed = True
    return api


def launch() -> TemporaryApi | None:
    """Spawn the temporary API server and return at once; None when a server is to be reused
    (PREFECT_API_URL set, ours or Prefect's own already running in this process). Call it
    from the main thread: PDEATHSIG follows the thread that forked.

    Called before anything imported Prefect (the CLI's build), it spawns without importing
    it (~1 s of the child's head start): no setting can then differ in this process from
    what the child reads itself from the same environment, profile and working directory.
    Only PREFECT_API_URL in the environment is looked at then; a URL from the profile or a
    settings file is seen by the next `launch()` or by `serving()`, which stop the child and
    reuse that server, as they would have without it."""
    global _CURRENT
    if "prefect" not in sys.modules:
        if os.environ.get("PREFECT_API_URL"):
            return None
        if _CURRENT is None or _CURRENT.process.poll() is not None:
            _CURRENT = _spawn({}, confirmed=False)
        return _CURRENT
    if _settings_name_a_server():
        if _CURRENT is not None and not _CURRENT.confirmed:
            _confirm(_CURRENT)  # spawned early for nothing: stopped
        return None
    if _CURRENT is not None and _CURRENT.process.poll() is None:
        _CURRENT.confirmed = True
        return _CURRENT
    from prefect.settings import get_current_settings

    # What SubprocessASGIServer passes its child: the settings as this process has them
    # (temporary_settings included).
    _CURRENT = _spawn(get_current_settings().to_environment_variables(exclude_unset=True))
    return _CURRENT


def _spawn(settings_env: dict[str, str], confirmed: bool = True) -> TemporaryApi:
    import importlib.util

    # Where the prefect package lives, found without importing it.
    spec = importlib.util.find_spec("prefect")
    assert spec is not None and spec.origin is not None
    port = _free_port()
    env = {
        **os.environ,
        # What SubprocessASGIServer sets for its child: no UI, the ephemeral server's mode.
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        **settings_env,
    }
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "--app-dir",
        str(Path(spec.origin).resolve().parent.parent),
        "--factory",
        "prefect.server.api.server:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "error",
        "--lifespan",
        "on",
    ]
    # Its output goes to a file, shown when it fails to start: its shutdown noise (the task
    # run recorder cancelled mid-flush when it is terminated) is not the build's.
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(  # noqa: PLW1509 - PDEATHSIG must be set between fork and exec
        argv, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_kill_with_parent()
    )
    api = TemporaryApi(port, process, log, confirmed=confirmed)
    atexit.register(api.stop)
    return api


@contextlib.contextmanager
def serving(api: TemporaryApi | None) -> Iterator[str | None]:
    """Wait for `api` (from `launch`) and point Prefect at it for the block; with None, leave
    Prefect's settings as they are (a server to reuse)."""
    api = _confirm(api)
    if api is None:
        yield None
        return
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    timeout_s = float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    # While the server boots this process is idle: what the flow run would do first anyway
    # (the settings copy, Prefect's lazy imports) is done before waiting, not after.
    with temporary_settings(updates={PREFECT_API_URL: api.url}):
        for module in _FLOW_RUN_IMPORTS:
            importlib.import_module(module)
        api.wait(timeout_s)
        yield api.url
