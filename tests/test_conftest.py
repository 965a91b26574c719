"""The fixtures' own promises: a test that needs PostgreSQL skips when no server answers at
LONGWRITER_TEST_PG, and fails instead under CI=true (a CI job without the service must not go
green by skipping); the partition tests read LONGWRITER_TEST_PG too, not a fixed address."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Nothing listens on port 1: the server "does not answer".
DEAD_PG = "postgresql://postgres@127.0.0.1:1/test"
NEEDS_PG = [
    "tests/storage/test_store.py::test_postgres_store",
    "tests/flows/test_partitions.py::test_partitioned_build_on_three_workers_with_postgres",
]


def _pytest(ci: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["LONGWRITER_TEST_PG"] = DEAD_PG
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rfs", "-p", "no:cacheprovider", *NEEDS_PG],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_postgres_tests_skip_without_a_server() -> None:
    done = _pytest(ci=None)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "2 skipped" in done.stdout
    assert "LONGWRITER_TEST_PG" in done.stdout


def test_postgres_tests_fail_under_ci_without_a_server() -> None:
    done = _pytest(ci="true")
    assert done.returncode == 1, done.stdout[-3000:]
    assert "2 errors" in done.stdout or "2 failed" in done.stdout, done.stdout[-3000:]
    assert done.stdout.count("CI=true: a test that needs it fails, not skips") >= 2
