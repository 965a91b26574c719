"""`longwriter audit` through the real CLI entry point (flows.cli.main)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from flows.cli import main
from tests.conftest import write_jsonl

ESSAY = (
    "The harbour was dredged for the first time in 1820, and within a decade the fishing fleet "
    "had doubled. Warehouses rose along the quay, and the old rope walk was let to a sail "
    "maker who employed forty hands through the busy summer months."
)


def records() -> list[object]:
    return [
        {
            "id": "h1",
            "messages": [
                {"role": "user", "content": "Write a history of a harbour."},
                {"role": "assistant", "content": f"Certainly! Here is the essay:\n\n{ESSAY}"},
            ],
        },
        {"instruction": "Write a history of a harbour.", "response": "I'm sorry, but I can't."},
        "not json at all",
    ]


def test_audit_cli_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", records())
    before = hashlib.sha256(data.read_bytes()).hexdigest()
    out = tmp_path / "audit"
    assert main(["audit", "--data", str(data), "--out", str(out), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "records: 3  kept: 1  rejected: 2" in printed
    assert "refusal 1" in printed and "bad_record 1" in printed
    assert hashlib.sha256(data.read_bytes()).hexdigest() == before
    report = json.loads((out / "audit.json").read_text(encoding="utf-8"))
    assert [r["id"] for r in report["rows"]] == ["h1", "1", "2"]
    assert (out / "audit.md").exists()
    kept = next((out / "kept" / "jsonl").glob("*.jsonl")).read_text(encoding="utf-8")
    assert json.loads(kept)["response"] == ESSAY


def test_audit_cli_json_and_min_words(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", records())
    argv = ["audit", "--data", str(data), "--out", str(tmp_path / "o"), "--json"]
    assert main([*argv, "--min-words", "2000"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["records"] == 3 and summary["kept"] == 0
    assert summary["rejected"] == {"too_short": 2, "refusal": 1, "bad_record": 1}


def test_audit_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    data = write_jsonl(tmp_path / "data.jsonl", records())
    judged = ["audit", "--data", str(data), "--out", str(tmp_path / "o"), "--min-quality", "3"]
    assert main(judged) == 2  # refused, never silently unjudged
    assert "judge" in capsys.readouterr().err
