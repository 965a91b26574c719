"""tasks/sqlite_stats.py: `longwriter stats` read with sqlite3 gives what Store.stats() gives
(values and key order), and leaves every store it cannot read as the Store would to the
Store."""

from __future__ import annotations

import argparse
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert

import tasks.sqlite_stats as lean
from flows import cli
from storage.models import (
    DraftCheck,
    Instruction,
    InstructionStatus,
    LLMCall,
    Paragraph,
    Rejection,
    Sample,
    SourceFile,
)
from storage.store import Store, redact_db_url


def _fill(store: Store) -> None:
    """Every kind of row stats counts, including the ones it must not count."""
    statuses = ["accepted", "accepted", "accepted", "rejected", "pending", "planned"]
    rows: dict[type, list[dict[str, Any]]] = {
        t: [] for t in (SourceFile, Instruction, LLMCall, Paragraph, DraftCheck, Sample, Rejection)
    }
    for path, records in (("/data/b.jsonl", 5), ("/data/a.jsonl", 3)):
        rows[SourceFile].append(SourceFile(path=path, sha256="x", records=records).model_dump())
    for i, status in enumerate(statuses, start=1):
        rows[Instruction].append(
            Instruction(
                id=i,
                uid=f"u{i}",
                prompt=f"Write {i}",
                norm_hash=f"h{i}",
                input_file="/data/a.jsonl" if i % 2 else "/data/b.jsonl",
                status=status,
            ).model_dump()
        )
        for stage, k in (("plan", 0), ("write", 1), ("write", 2)):
            rows[LLMCall].append(
                LLMCall(
                    key=f"{stage}-{i}-{k}",
                    stage=stage,
                    model="m",
                    prompt_version="v",
                    content="c",
                    prompt_tokens=10 * i + k,
                    completion_tokens=3 * i,
                    attempts=1 + (i == 2),
                    cached_tokens=64 if stage == "write" and i == 1 else 0,
                    reasoning_tokens=5 if stage == "plan" and i == 3 else 0,
                ).model_dump()
            )
            if stage == "write":
                cleanings = (
                    [{"check": "repeated_sentence"}, {"check": "markdown_heading"}]
                    if k == 1
                    else ([{"check": "repeated_sentence"}] if i % 2 else [])
                )
                rows[Paragraph].append(
                    Paragraph(
                        instruction_id=i,
                        step=k,
                        call_key=f"write-{i}-{k}",
                        text="t",
                        words=100,
                        prompt_version="v",
                        cleanings_json=json.dumps(cleanings),
                    ).model_dump()
                )
        for attempt, (keep, reason) in enumerate(
            ((False, "too_short"), (False, None), (True, None))
        ):
            rows[DraftCheck].append(
                DraftCheck(
                    instruction_id=i,
                    stage="write",
                    step=1,
                    attempt=attempt,
                    keep=keep,
                    reason=reason,
                ).model_dump()
            )
        if status in ("accepted", "rejected"):
            rows[Sample].append(
                Sample(
                    instruction_id=i,
                    text="t",
                    words=1000 * i,
                    n_paragraphs=2,
                    model="m",
                    prompt_version="v",
                    length_score=80.0 + i / 3,
                    plan_fidelity=0.9 - i / 70,
                ).model_dump()
            )
    for stage, reason, source in (
        ("ingest", "empty_prompt", "/data/a.jsonl"),
        ("ingest", "empty_prompt", "/data/a.jsonl"),
        ("ingest", "duplicate", "/data/b.jsonl"),
        ("plan", "unsupported_language", ""),
        ("filter", "too_short", ""),
    ):
        rows[Rejection].append(Rejection(stage=stage, reason=reason, source=source).model_dump())
    with store.engine.begin() as conn:
        for table, values in rows.items():
            conn.execute(insert(table), values)


@pytest.fixture
def filled(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(url)
    try:
        _fill(store)
    finally:
        store.close()
    return url


def _store_stats(url: str) -> dict[str, Any]:
    store = Store(url)
    try:
        return store.stats()
    finally:
        store.close()


def test_the_same_dict_in_the_same_order(filled: str) -> None:
    got = lean.sqlite_stats(filled)
    assert got is not None
    url, stats = got
    want = _store_stats(filled)
    assert stats == want
    assert json.dumps(stats, indent=2) == json.dumps(want, indent=2)  # key and row order too
    assert url == redact_db_url(filled)
    # The fill reaches every branch: a positive control for the comparison above.
    assert want["rejections"]["ingest"] == {"duplicate": 1, "empty_prompt": 2}
    assert want["quality"]["failed_drafts"]["write"]["rejected"] == 6
    assert want["quality"]["cleanings"] and want["quality"]["length_score_mean"] is not None
    assert want["llm_calls"]["write"]["cached_tokens"] == 128  # two write calls of #1
    assert [s["path"] for s in want["sources"]] == ["/data/b.jsonl", "/data/a.jsonl"]


def test_an_empty_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    Store(url).close()
    got = lean.sqlite_stats(url)
    assert got is not None and got[1] == _store_stats(url)


def test_the_cli_prints_the_same_bytes_either_way(
    filled: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def run(json_out: bool) -> str:
        args = argparse.Namespace(db=filled, json=json_out, lineage=None)
        assert cli.cmd_stats(args) == 0
        return capsys.readouterr().out

    quick = [run(False), run(True)]
    monkeypatch.setattr(lean, "sqlite_stats", lambda url: None)  # the Store's path
    assert [run(False), run(True)] == quick
    assert "quality checks:" in quick[0] and "rejections:" in quick[0]


def test_bare_paths_and_redaction(filled: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = Path(filled.removeprefix("sqlite:///"))
    got = lean.sqlite_stats(str(path))
    assert got is not None and got[0] == redact_db_url(str(path))
    monkeypatch.chdir(path.parent)
    rel = "sqlite:///store.db"
    got = lean.sqlite_stats(rel)
    assert got is not None and got[0] == redact_db_url(rel) == rel


def test_what_it_leaves_to_the_store(tmp_path: Path) -> None:
    missing = tmp_path / "new.db"
    assert lean.sqlite_stats(f"sqlite:///{missing}") is None
    assert not missing.exists()  # the Store creates it, not this
    assert lean.sqlite_stats("postgresql://u:secret@db/x") is None
    assert lean.sqlite_stats("sqlite:///:memory:") is None
    plain = tmp_path / "plain.db"
    Store(str(plain)).close()
    assert lean.sqlite_stats(f"sqlite:///{plain}?mode=ro") is None
    # An older store (llm_call as it was before issue 16, no other table): the Store brings
    # it up to date first.
    old = tmp_path / "old.db"
    con = sqlite3.connect(old)
    con.execute(
        "CREATE TABLE llm_call (key VARCHAR PRIMARY KEY, stage VARCHAR NOT NULL, model VARCHAR "
        "NOT NULL, prompt_version VARCHAR NOT NULL, content TEXT NOT NULL, finish_reason "
        "VARCHAR, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, "
        "latency_ms INTEGER NOT NULL, attempts INTEGER NOT NULL, endpoint VARCHAR NOT NULL, "
        "created_at DATETIME NOT NULL)"
    )
    con.commit()
    con.close()
    assert lean.sqlite_stats(str(old)) is None
    assert _store_stats(str(old))["llm_calls"] == {}
    assert lean.sqlite_stats(str(old)) is not None  # now up to date


def test_the_status_it_counts_is_the_models() -> None:
    assert lean._ACCEPTED == InstructionStatus.ACCEPTED
