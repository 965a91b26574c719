"""`tasks.audit`: record parsing, the review of each record, the counts, and the files written
(audit.json, audit.md, kept/ in the export format) over jsonl and parquet inputs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.audit import (
    BAD_RECORD,
    AuditRecord,
    AuditSettings,
    BadRecord,
    audit_record,
    iter_records,
    parse_line,
    parse_record,
    run_audit,
)
from tasks.export import SCHEMA, verify_manifest
from tests.conftest import write_jsonl

TOWN = (
    "The town grew up where the river slowed and widened, and for two hundred years its "
    "mills ground the grain that farmers carried down from the hills. Each spring the "
    "water rose over the lower meadows, and each autumn the market filled with sacks of "
    "barley, wool and salted fish brought along the coast road."
)
BRIDGE = (
    "When the stone bridge was finished in 1791 the ferrymen lost their trade, but the inns "
    "on the northern bank doubled in number. Carters now stopped overnight before the long "
    "climb to the moors, and the parish records show new families arriving from three "
    "counties to work the quarries above the valley."
)
TEA = (
    "茶在中国已有数千年的历史。早在唐代，陆羽就写下了《茶经》，系统记述了茶的种植、采摘、"
    "制作和饮用方法。宋代人喜欢点茶，把茶末放在碗中用沸水冲点，再用茶筅击拂出细密的泡沫。"
    "到了明代，散茶冲泡逐渐流行，人们更加注重茶叶本身的香气和滋味。"
)


def chat(instruction: str, response: str, **extra: Any) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": instruction},
            {"role": "assistant", "content": response},
        ],
        **extra,
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- parsing ----------------------------------------------------------------------------------

PARSE_CASES: list[tuple[str, Any, str | None, tuple[str, str] | None]] = [
    # (case, record, bad_record detail fragment or None, (instruction, response) when good)
    ("messages", chat("Write.", "Text."), None, ("Write.", "Text.")),
    (
        "system first, first assistant after the user turn",
        {
            "messages": [
                {"role": "system", "content": "Be helpful."},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Write."},
                {"role": "assistant", "content": "Text."},
                {"role": "user", "content": "More."},
                {"role": "assistant", "content": "Ignored."},
            ]
        },
        None,
        ("Write.", "Text."),
    ),
    (
        "content parts",
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Write."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Text."}]},
            ]
        },
        None,
        ("Write.", "Text."),
    ),
    ("instruction/response", {"instruction": "Write.", "response": "Text."}, None, None),
    ("prompt/response", {"prompt": "Write.", "response": "Text."}, None, None),
    ("not an object", [1, 2], "not an object", None),
    ("a string", "text", "not an object", None),
    ("no fields", {"text": "x"}, "no messages, instruction or prompt", None),
    ("no response", {"prompt": "Write."}, "no response", None),
    ("no assistant turn", {"messages": [{"role": "user", "content": "x"}]}, "no assistant", None),
    ("no user turn", {"messages": [{"role": "assistant", "content": "x"}]}, "no user turn", None),
    ("messages not a list", {"messages": "hi"}, "not a list", None),
    ("blank instruction", {"instruction": "  ", "response": "Text."}, "blank", None),
    (
        "content not text",
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
        "no text content",
        None,
    ),
]


@pytest.mark.parametrize(
    ("case", "obj", "bad", "pair"), PARSE_CASES, ids=[c[0] for c in PARSE_CASES]
)
def test_parse_record(case: str, obj: Any, bad: str | None, pair: tuple[str, str] | None) -> None:
    rec = parse_record(obj, "7", "f.jsonl")
    if bad is not None:
        assert isinstance(rec, BadRecord)
        assert bad in rec.detail
        assert rec.id == "7"
        return
    assert isinstance(rec, AuditRecord)
    assert (rec.instruction, rec.response) == (pair or ("Write.", "Text."))
    assert rec.source == "f.jsonl"


@pytest.mark.parametrize(
    ("given", "expected"),
    [("abc", "abc"), (12, "12"), (None, "7"), ("", "7"), (True, "7"), ([1], "7")],
)
def test_record_id_is_its_id_field_else_its_position(given: Any, expected: str) -> None:
    rec = parse_record({"id": given, "prompt": "Write.", "response": "Text."}, "7")
    assert rec.id == expected


def test_parse_line_bad_json_and_utf8() -> None:
    assert isinstance(parse_line(b"{not json", "0"), BadRecord)
    bad = parse_line(b'{"prompt": "\xff"}', "1")
    assert isinstance(bad, BadRecord) and "UTF-8" in bad.detail


def test_parse_keeps_export_fields() -> None:
    rec = parse_record(
        {
            "prompt": "Write.",
            "response": "Text.",
            "lang": "zh",
            "model": "m",
            "source": "s",
            "plan": [{"main_point": "a", "word_count": 300}, "b", 3],
        },
        "0",
    )
    assert isinstance(rec, AuditRecord)
    assert rec.lang == "zh" and rec.model == "m" and rec.source == "s"
    assert rec.plan == [
        {"main_point": "a", "word_count": 300},
        {"main_point": "b", "word_count": 0},
    ]


# -- review -----------------------------------------------------------------------------------

REVIEW_CASES: list[tuple[str, str, str, bool, list[str], list[str]]] = [
    # (case, instruction, response, keep, reasons, cleaned checks)
    ("clean English", "Write a history of a river town.", f"{TOWN}\n\n{BRIDGE}", True, [], []),
    ("clean Chinese", "写一篇关于中国茶文化的文章", TEA, True, [], []),
    (
        "chatter cut, kept",
        "Write a history of a river town.",
        f"Sure! Here is the essay:\n\n{TOWN}\n\n{BRIDGE}\n\nI hope this helps!",
        True,
        [],
        ["chatter"],
    ),
    (
        "think block cut, kept",
        "Write a history of a river town.",
        f"<think>The user wants a history.</think>\n{TOWN}\n\n{BRIDGE}",
        True,
        [],
        ["reasoning"],
    ),
    (
        "refusal",
        "Write a history of a river town.",
        "I'm sorry, but I can't write that for you.",
        False,
        ["refusal"],
        [],
    ),
    (
        "error text",
        "Write a history of a river town.",
        f"{TOWN}\n\nError: max tries failed",
        False,
        ["error_text"],
        [],
    ),
    (
        "English for a Chinese instruction",
        "写一篇关于茶的文章",
        f"{TOWN}\n\n{BRIDGE}",
        False,
        ["wrong_language"],
        [],
    ),
    ("empty", "Write a history of a river town.", "   ", False, ["empty"], []),
    (
        "restated paragraph",
        "Write a history of a river town.",
        f"{TOWN}\n\n{BRIDGE}\n\n{TOWN}",
        False,
        ["restated_paragraph"],
        [],
    ),
    (
        "looping text",
        "Write a history of a river town.",
        " ".join([TOWN] * 6),
        False,
        ["repetition"],
        [],
    ),
]


@pytest.mark.parametrize(
    ("case", "instruction", "response", "keep", "reasons", "cleaned"),
    REVIEW_CASES,
    ids=[c[0] for c in REVIEW_CASES],
)
def test_audit_record(
    case: str, instruction: str, response: str, keep: bool, reasons: list[str], cleaned: list[str]
) -> None:
    row = audit_record(AuditRecord("r", instruction, response), AuditSettings())
    assert row.keep is keep, row.details
    assert row.reasons == reasons
    assert len(row.details) == len(row.reasons)
    assert sorted({c.check for c in row.cleaned}) == cleaned
    if keep:
        assert row.record is not None
        assert "Sure!" not in row.record["response"] and "<think>" not in row.record["response"]
        assert row.record["messages"][1]["content"] == row.record["response"]
    else:
        assert row.record is None


def test_min_words() -> None:
    rec = AuditRecord("r", "Write a history of a river town.", TOWN)
    assert audit_record(rec, AuditSettings()).keep  # default 0: any length
    row = audit_record(rec, AuditSettings(min_words=2000))
    assert row.reasons == ["too_short"]


def test_bad_record_row() -> None:
    row = audit_record(BadRecord("3", "invalid JSON"), AuditSettings())
    assert (row.keep, row.reasons, row.details) == (False, [BAD_RECORD], ["invalid JSON"])


# -- files ------------------------------------------------------------------------------------


def mixed_records() -> list[Any]:
    return [
        chat(
            "Write a history of a river town.",
            f"Sure! Here's the essay:\n\n{TOWN}\n\n{BRIDGE}",
            id="town",
        ),
        {"instruction": "写一篇关于中国茶文化的文章", "response": TEA},
        "{this is not json",
        [1, 2, 3],
        {"prompt": "Write about a bridge.", "response": "I'm sorry, but I can't help with that."},
        {"prompt": "Write about a bridge.", "response": BRIDGE, "id": 99, "model": "m1"},
        {"text": "no fields"},
    ]


def test_run_audit_jsonl(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", mixed_records())
    with data.open("a", encoding="utf-8") as fh:
        fh.write("\n")  # a blank line: skipped, not a record; later ids stay line indexes
        fh.write(json.dumps({"prompt": "Write about a town.", "response": TOWN}) + "\n")
    before = sha256(data)
    out = tmp_path / "audit"
    summary = run_audit(data, out)
    assert sha256(data) == before  # the input is only read

    report = json.loads((out / "audit.json").read_text(encoding="utf-8"))
    assert report["records"] == summary["records"] == 8
    assert report["kept"] == 4
    assert report["rejected"] == {"bad_record": 3, "refusal": 1}
    assert report["cleaned"] == {"chatter": 2}
    rows = {r["id"]: r for r in report["rows"]}
    assert list(rows) == ["town", "1", "2", "3", "4", "99", "6", "8"]
    assert rows["town"]["keep"] and [c["check"] for c in rows["town"]["cleaned"]] == [
        "chatter",
        "chatter",
    ]
    assert rows["2"]["reasons"] == ["bad_record"] and "invalid JSON" in rows["2"]["details"][0]
    assert rows["4"]["reasons"] == ["refusal"]

    md = (out / "audit.md").read_text(encoding="utf-8")
    assert "| bad_record | 3 |" in md and "### refusal" in md and "I'm sorry" in md
    assert "| chatter | 2 | 1 |" in md

    kept = out / "kept"
    assert verify_manifest(kept) == []
    ds = datasets.load_dataset("json", data_files=str(kept / "jsonl" / "*.jsonl"), split="train")
    assert ds.num_rows == 4
    assert ds["id"] == ["town", "1", "99", "8"]
    first = ds[0]
    assert first["response"] == f"{TOWN}\n\n{BRIDGE}"  # the chatter is cut
    assert first["messages"][1]["content"] == first["response"]
    assert ds[2]["model"] == "m1" and ds[2]["source"] == "in.jsonl"
    assert set(ds.column_names) == set(SCHEMA.names)  # null quality etc., as the export has
    table = pq.read_table(next((kept / "shards").glob("*.parquet")))
    assert table.schema.names == SCHEMA.names
    assert table.num_rows == 4
    assert not list(out.glob(".*tmp"))  # spools removed


def test_run_audit_parquet_in_row_batches(tmp_path: Path) -> None:
    # A null id column (parquet has one schema for all rows): the row index is the id.
    rows = [
        chat("Write a history of a river town.", f"{TOWN}\n\n{BRIDGE}", id=None) for _ in range(150)
    ]
    rows[70] = chat("Write a history of a river town.", "I'm sorry, but I can't do that.", id=None)
    rows[140] = {"messages": None, "id": "no-messages"}
    data = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data, row_group_size=40)
    before = sha256(data)
    summary = run_audit(data, tmp_path / "out", workers=2)
    assert sha256(data) == before
    assert summary["records"] == 150
    assert summary["kept"] == 148
    assert summary["rejected"] == {"refusal": 1, "bad_record": 1}
    report = json.loads((tmp_path / "out" / "audit.json").read_text(encoding="utf-8"))
    assert [r["id"] for r in report["rows"]][68:72] == ["68", "69", "70", "71"]
    assert report["rows"][70]["reasons"] == ["refusal"]
    assert report["rows"][140]["id"] == "no-messages"
    ds = datasets.load_dataset(
        "parquet", data_files=str(tmp_path / "out" / "kept" / "shards" / "*.parquet"), split="train"
    )
    assert ds.num_rows == 148


def test_workers_give_the_same_rows(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", mixed_records() * 5)
    one = run_audit(data, tmp_path / "one", workers=1)
    two = run_audit(data, tmp_path / "two", workers=2)
    assert one == two
    rows_one = json.loads((tmp_path / "one" / "audit.json").read_text())["rows"]
    rows_two = json.loads((tmp_path / "two" / "audit.json").read_text())["rows"]
    assert rows_one == rows_two


def test_folder_input_ids_name_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"prompt": "Write.", "response": TOWN}])
    write_jsonl(folder / "b.jsonl", [{"prompt": "Write.", "response": BRIDGE}, "bad"])
    ids = [r.id for r in iter_records(folder)]
    assert ids == ["a.jsonl:0", "b.jsonl:0", "b.jsonl:1"]


def test_audit_of_its_own_output_is_refused(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Write.", "response": TOWN}])
    out = tmp_path / "out"
    run_audit(data, out)
    kept_file = next((out / "kept" / "jsonl").glob("*.jsonl"))
    before = sha256(kept_file)
    with pytest.raises(ValueError, match="kept/"):
        run_audit(kept_file, out)
    assert sha256(kept_file) == before
    # Into another folder it is fine, and the kept set passes again unchanged.
    again = run_audit(kept_file, tmp_path / "again")
    assert again["kept"] == 1


def test_missing_input(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        run_audit(tmp_path / "nope.jsonl", tmp_path / "out")


def test_empty_input(tmp_path: Path) -> None:
    data = tmp_path / "empty.jsonl"
    data.write_text("", encoding="utf-8")
    summary = run_audit(data, tmp_path / "out")
    assert (summary["records"], summary["kept"]) == (0, 0)
    assert json.loads((tmp_path / "out" / "audit.json").read_text())["rows"] == []


def test_audit_imports_neither_prefect_nor_torch() -> None:
    code = (
        "import sys, tasks.audit, flows.audit;"
        "from tasks.audit import audit_record, AuditRecord, AuditSettings;"
        "audit_record(AuditRecord('r', 'Write.', 'Text.'), AuditSettings());"
        "import tasks.export;"
        "print(sorted(m for m in ('prefect', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
