"""Shared fixtures. Each test gets its own database (tmp_path); the Prefect API is one
temporary server per test session (entering the harness costs ~8 s, so it is started lazily:
only sessions that run a flow pay for it)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

# Fast, quiet Prefect for tests (names from Prefect's own tests/conftest.py).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
for _svc in (
    "SCHEDULER",
    "LATE_RUNS",
    "FOREMAN",
    "CANCELLATION_CLEANUP",
    "PAUSE_EXPIRATIONS",
    "REPOSSESSOR",
    "TRIGGERS",
    "EVENT_PERSISTER",
):
    os.environ.setdefault(f"PREFECT_SERVER_SERVICES_{_svc}_ENABLED", "false")

from tests.fake_openai import FakeConfig, FakeOpenAIServer  # noqa: E402


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One temporary Prefect API for the session; flow tests request it."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    # Sync flow runs otherwise wait up to 1 s at exit joining the heartbeat thread.
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture
def fake_server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(FakeConfig()).running() as server:
        yield server


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text(
        "".join(
            (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records
        ),
        encoding="utf-8",
    )
    return path


PG_ADMIN_DSN = os.environ.get("LONGWRITER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def in_ci() -> bool:
    """A CI run: CI=true, as GitHub Actions, GitLab and most CI systems set it."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def service_missing(reason: str) -> NoReturn:
    """Skip a test whose service (PostgreSQL) does not answer; with CI=true fail it instead: a
    CI job without the service would otherwise pass every test that needs it, by skipping."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a test that needs it fails, not skips)", pytrace=False)
    pytest.skip(reason)


def pg_server_url(driver: str = "psycopg") -> str:
    """LONGWRITER_TEST_PG's server as a SQLAlchemy URL without the database name."""
    return PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", f"postgresql+{driver}://")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards; skipped when no server
    answers at LONGWRITER_TEST_PG (failed under CI=true)."""
    import uuid

    try:
        import psycopg
    except ImportError:
        service_missing("psycopg is not installed")
    try:
        admin = psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        service_missing(f"PostgreSQL not reachable at LONGWRITER_TEST_PG: {exc}")
    name = f"lw_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{pg_server_url()}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
