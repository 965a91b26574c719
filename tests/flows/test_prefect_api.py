"""flows/prefect_api.py: the build's temporary Prefect API server, spawned without waiting.
A running server is reused (no second one), and the child dies with a SIGKILLed build."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import flows.prefect_api as launcher

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.usefixtures("prefect_api")
def test_a_server_prefect_points_at_is_reused():
    assert launcher.launch() is None  # the harness's server: nothing of ours to start


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (killed, not yet reaped by init) counts as gone.
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] != "Z"


def test_the_server_dies_with_a_sigkilled_build(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PYTHONPATH=str(REPO))
    code = (
        "import time\n"
        "from flows import prefect_api\n"
        "api = prefect_api.launch()\n"
        "print(api.process.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert _alive(child)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
    deadline = time.monotonic() + 20
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the API server outlived the SIGKILLed build"


def test_an_early_spawn_yields_to_a_server_the_profile_names(tmp_path):
    """Spawned before Prefect is imported (the CLI's build), the child cannot know of a URL in
    the profile: once Prefect's settings are read it is stopped and that server reused."""
    home = tmp_path / "prefect"
    home.mkdir()
    (home / "profiles.toml").write_text(
        'active = "remote"\n[profiles.remote]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n'
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
    env.update(PREFECT_HOME=str(home), PYTHONPATH=str(REPO))
    code = (
        "import sys\n"
        "from flows import prefect_api\n"
        "early = prefect_api.launch()\n"
        "assert early is not None and not early.confirmed and 'prefect' not in sys.modules\n"
        "from prefect.settings import PREFECT_API_URL\n"
        "assert PREFECT_API_URL.value() == 'http://127.0.0.1:9/api'\n"
        "assert prefect_api.launch() is None\n"
        "assert early.process.poll() is not None  # stopped\n"
        "with prefect_api.serving(early) as url:\n"
        "    assert url is None\n"
        "print('OK')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "OK"


def test_an_early_spawn_is_kept_when_nothing_names_a_server(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PYTHONPATH=str(REPO))
    code = (
        "from flows import prefect_api\n"
        "early = prefect_api.launch()\n"
        "import prefect.settings\n"
        "assert prefect_api.launch() is early and early.confirmed\n"
        "assert early.process.poll() is None\n"
        "print('OK')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "OK"


def test_the_cli_spawns_first_only_for_a_build_that_runs(monkeypatch):
    from flows.cli import _runs_a_flow

    monkeypatch.delitem(sys.modules, "prefect", raising=False)
    assert _runs_a_flow(["build", "--instructions", "in.jsonl", "--db", "x.db"])
    assert not _runs_a_flow(["build", "--dry-run", "--instructions", "in.jsonl"])
    assert not _runs_a_flow(["build", "--help"])
    assert not _runs_a_flow(["stats", "--db", "x.db"])
    assert not _runs_a_flow(["export", "--db", "build"])
    monkeypatch.setitem(sys.modules, "prefect", object())  # a caller that imported Prefect
    assert not _runs_a_flow(["build", "--instructions", "in.jsonl"])
