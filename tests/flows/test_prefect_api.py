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
