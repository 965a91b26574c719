"""storage/: every table is registered whatever was imported first, and statuses are one
StrEnum per status column whose values are the strings stores have always held."""

from __future__ import annotations

import ast
import json
import re
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect
from sqlmodel import select

from storage.models import UNFINISHED, Instruction, InstructionStatus, Run, RunStatus
from storage.store import Store

REPO = Path(__file__).resolve().parents[2]
PRODUCT = ("flows", "tasks", "storage", "prompts", "deploy")
EVERY_TABLE = {
    "run",
    "instruction",
    "rejection",
    "llm_call",
    "plan",
    "paragraph",
    "sample",
    "draft_check",
    "source_file",
    "eval_generation",
    "eval_judgement",
    "pair_variant_paragraph",
    "pair_variant_sample",
    "pair_judgement",
    "pair_decision",
}


@pytest.mark.parametrize(
    "first_import",
    ["storage.store", "storage.models", "storage.eval_models", "storage.pair_models", "tasks.plan"],
)
def test_a_store_creates_every_table_whichever_module_came_first(
    tmp_path: Path, first_import: str
) -> None:
    # A fresh interpreter: in this one every module is imported already.
    db = tmp_path / "store.db"
    code = (
        f"import {first_import}\n"
        "import sys\n"
        "from storage.store import Store\n"
        f"Store({str(db)!r}).close()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)
    tables = {r[0] for r in sqlite3.connect(db).execute("select name from sqlite_master")}
    assert EVERY_TABLE <= tables


def test_statuses_keep_the_values_stores_hold() -> None:
    assert [s.value for s in InstructionStatus] == [
        "pending",
        "planned",
        "written",
        "accepted",
        "rejected",
    ]
    assert [s.value for s in RunStatus] == ["running", "completed", "failed"]
    assert UNFINISHED == ("pending", "planned", "written")
    assert Instruction(uid="u", prompt="p", norm_hash="h").status == "pending"
    assert Run(kind="build").status == "running"
    assert json.dumps([InstructionStatus.ACCEPTED]) == '["accepted"]'


def test_a_store_written_with_plain_strings_reads_the_same(tmp_path: Path) -> None:
    """A store from before the enum (statuses as plain text) is read by the enum's code, and
    what the enum's code writes is the same plain text."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    store = Store(url)
    try:
        with store.engine.begin() as conn:
            conn.exec_driver_sql(
                "insert into instruction (id, uid, prompt, norm_hash, lang, source, input_file,"
                " status, created_at) values (1, 'a', 'Write.', 'h1', 'en', '', '', 'planned',"
                " '2025-01-01 00:00:00'), (2, 'b', 'Write.', 'h2', 'en', '', '', 'accepted',"
                " '2025-01-01 00:00:00')"
            )
        assert store.instruction_ids([InstructionStatus.PLANNED]) == [1]
        assert store.stats()["instructions"]["by_status"] == {"planned": 1, "accepted": 1}
        store.save(status=(1, InstructionStatus.WRITTEN))
        store.reject(2, "filter", "too_short")
        run_id = store.start_run("build", {})
        store.finish_run(run_id, RunStatus.COMPLETED, {})
    finally:
        store.close()
    db = sqlite3.connect(tmp_path / "old.db")
    rows = db.execute("select id, status, typeof(status) from instruction order by id").fetchall()
    assert rows == [(1, "written", "text"), (2, "rejected", "text")]
    assert db.execute("select status from run").fetchall() == [("completed",)]


@pytest.mark.postgres
def test_statuses_are_stored_as_their_values_on_postgres(pg_url: str) -> None:
    # psycopg dumps a plain Enum by its *name*; a StrEnum must reach it as its value.
    store = Store(pg_url)
    try:
        inst = Instruction(uid="a", prompt="Write.", norm_hash="h")
        store.add_all([inst])
        [iid] = store.instruction_ids([InstructionStatus.PENDING])
        store.save(status=(iid, InstructionStatus.PLANNED))
        with store.engine.connect() as conn:
            raw = conn.exec_driver_sql("select status from instruction").scalar_one()
    finally:
        store.close()
    assert raw == "planned"


# -- no bare status strings in product code ------------------------------------------------

_VALUES = {s.value for s in InstructionStatus} | {s.value for s in RunStatus}


# An instruction's or a run's status (a pairs variant's written/failed is its own field).
_STATUS_OF = re.compile(r"\b(?:inst|instruction|Instruction|run|Run)\)?\.status\b")


def _bare_statuses(tree: ast.AST) -> list[int]:
    """Lines comparing an instruction's or run's `.status` with a status literal, or handing
    one to the store (`status=`, `finish_run`, `instruction_ids`)."""
    found: list[int] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            on_status = any(
                _STATUS_OF.search(ast.unparse(s)) and not isinstance(s, ast.Constant) for s in sides
            )
            literal = any(isinstance(s, ast.Constant) and s.value in _VALUES for s in sides)
            if on_status and literal:
                found.append(node.lineno)
        elif isinstance(node, ast.keyword) and node.arg == "status":
            if any(isinstance(c, ast.Constant) and c.value in _VALUES for c in ast.walk(node)):
                found.append(node.value.lineno)
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name.endswith(("finish_run", "instruction_ids")):
                args = [c for a in node.args for c in ast.walk(a)]
                if any(isinstance(c, ast.Constant) and c.value in _VALUES for c in args):
                    found.append(node.lineno)
    return found


def test_no_bare_status_strings_in_product_code() -> None:
    found = [
        f"{path.relative_to(REPO)}:{line}"
        for package in PRODUCT
        for path in sorted((REPO / package).rglob("*.py"))
        if path.name != "models.py" or path.parent.name != "storage"
        for line in _bare_statuses(ast.parse(path.read_text(encoding="utf-8")))
    ]
    assert not found, "use storage.models.InstructionStatus / RunStatus: " + ", ".join(found)


def test_the_bare_status_check_sees_them() -> None:
    code = (
        "if inst.status == 'written': pass\n"
        "store.save(row, status=(1, 'accepted'))\n"
        "store.finish_run(run_id, 'failed', {})\n"
        "ids = store.instruction_ids(['pending'])\n"
        "ok = inst.status == InstructionStatus.WRITTEN\n"
        "label = 'written'\n"
        "done = variant.status == 'written'\n"  # a pairs variant's own status
        "if col(Instruction.status) == 'accepted': pass\n"
    )
    assert sorted(_bare_statuses(ast.parse(code))) == [1, 2, 3, 4, 8]


def test_status_columns_stay_plain_strings(tmp_path: Path) -> None:
    """The column is a string (no database enum type): old stores need no migration."""
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    try:
        cols = {c["name"]: c for c in inspect(store.engine).get_columns("instruction")}
    finally:
        store.close()
    assert "VARCHAR" in str(cols["status"]["type"]).upper()


# The three tables as stores made before the long texts moved last hold them.
_OLD_LAYOUT = {
    "llm_call": '"key" VARCHAR NOT NULL PRIMARY KEY, stage VARCHAR NOT NULL, model VARCHAR NOT'
    " NULL, prompt_version VARCHAR NOT NULL, content TEXT NOT NULL, finish_reason VARCHAR,"
    " prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, latency_ms INTEGER"
    " NOT NULL, attempts INTEGER NOT NULL, endpoint VARCHAR NOT NULL, created_at DATETIME NOT"
    " NULL, reasoning TEXT, cached_tokens INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL",
    "paragraph": "instruction_id INTEGER NOT NULL, step INTEGER NOT NULL, call_key VARCHAR NOT"
    " NULL, continuation_keys VARCHAR NOT NULL, text TEXT NOT NULL, words INTEGER NOT NULL,"
    " truncated BOOLEAN NOT NULL, trimmed BOOLEAN NOT NULL, prompt_version VARCHAR NOT NULL,"
    " cleanings_json VARCHAR DEFAULT '[]' NOT NULL, created_at DATETIME NOT NULL,"
    " PRIMARY KEY (instruction_id, step)",
    "sample": "instruction_id INTEGER NOT NULL PRIMARY KEY, text TEXT NOT NULL, words INTEGER"
    " NOT NULL, n_paragraphs INTEGER NOT NULL, model VARCHAR NOT NULL, prompt_version VARCHAR"
    " NOT NULL, length_score FLOAT, plan_fidelity FLOAT, quality_json TEXT, created_at"
    " DATETIME NOT NULL",
}


async def test_a_store_with_the_old_column_order_reads_and_writes(tmp_path: Path) -> None:
    """storage/models.py declares the long texts last (new stores: stats reads no overflow
    pages); a store created before, with `content`/`text` early, is read and written alike,
    because every statement names its columns."""
    from storage.models import LLMCall, Paragraph, Plan, Sample

    db = tmp_path / "old-layout.db"
    with sqlite3.connect(db) as conn:
        for table, columns in _OLD_LAYOUT.items():
            conn.execute(f"CREATE TABLE {table} ({columns})")
    store = Store(f"sqlite:///{db}")
    try:
        inst = Instruction(uid="a", prompt="Write.", norm_hash="h")
        store.add_all([inst])
        [iid] = store.instruction_ids([InstructionStatus.PENDING])
        call = LLMCall(key="k1", stage="write", model="m", prompt_version="w@1", content="Text.")
        await store.asave(call)
        store.save(
            Plan(
                instruction_id=iid,
                call_key="k1",
                steps_json='[{"main_point": "p", "word_count": 1}]',
                n_steps=1,
                total_words=1,
                prompt_version="p@1",
            ),
            Paragraph(
                instruction_id=iid, step=1, call_key="k1", text="Text.", words=1, prompt_version="w"
            ),
            Sample(
                instruction_id=iid,
                text="Text.",
                words=1,
                n_paragraphs=1,
                model="m",
                prompt_version="p,w",
            ),  # fmt: skip
            status=(iid, InstructionStatus.ACCEPTED),
        )
        got = store.get_call("k1")
        samples = list(store.iter_samples())
        stats = store.stats()
    finally:
        store.close()
    assert got is not None and got.content == "Text." and got.prompt_version == "w@1"
    assert [(s.text, s.words) for s, _i, _p in samples] == [("Text.", 1)]
    assert stats["samples"] == {"accepted": 1, "words": 1}
    assert stats["llm_calls"]["write"]["calls"] == 1
    with sqlite3.connect(db) as conn:
        assert conn.execute("select content from llm_call").fetchall() == [("Text.",)]


def _table_models() -> list[type]:
    from sqlmodel import SQLModel

    import storage.eval_models  # noqa: F401 - registers its tables
    import storage.pair_models  # noqa: F401

    return sorted((m.class_ for m in SQLModel._sa_registry.mappers), key=lambda c: c.__name__)


def _some_values(cls: type) -> dict:
    """A value for every field of `cls`, of the field's type."""
    import typing

    # bool before int: a bool is an int too.
    by_type = {
        bool: True,
        str: "s",
        bytes: b"\x00\x01",
        int: 7,
        float: 0.5,
        datetime: datetime(2025, 1, 2, tzinfo=UTC),
    }

    def of(annotation: Any) -> Any:
        options = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
        kind = options[0]
        return by_type[next(t for t in by_type if isinstance(kind, type) and issubclass(kind, t))]

    return {n: of(f.annotation) for n, f in cls.model_fields.items()}


@pytest.mark.parametrize("cls", _table_models(), ids=lambda c: c.__name__)
def test_new_row_is_the_row_init_makes(cls: type, tmp_path: Path) -> None:
    """storage.models.new_row builds rows the way SQLAlchemy loads them (the hot path's three
    rows per call cost 55-85 us each through __init__): the same values, defaults (factories
    called), fields-set and pydantic state as `cls(**values)`, for every table, whether given
    every column or only the required ones; and the row writes through the store and a
    Session like any other."""
    from sqlmodel import Session

    from storage.models import new_row

    # Every column is a field of the same name: new_row fills __dict__ by field name.
    assert {c.name for c in cls.__table__.columns} == set(cls.model_fields)
    full = _some_values(cls)
    required = {n: full[n] for n, f in cls.model_fields.items() if f.is_required()}
    for values in (full, required):
        made, built = cls(**values), new_row(cls, **values)
        assert type(built) is cls
        mine = {k: v for k, v in built.__dict__.items() if k != "_sa_instance_state"}
        theirs = {k: v for k, v in made.__dict__.items() if k != "_sa_instance_state"}
        assert mine.keys() == theirs.keys() == set(cls.model_fields)
        for name in cls.model_fields:
            if name in values or not isinstance(theirs[name], datetime):
                assert mine[name] == theirs[name], name
            else:  # a timestamp factory: called for each row
                assert abs((mine[name] - theirs[name]).total_seconds()) < 5
        assert built.__pydantic_fields_set__ == made.__pydantic_fields_set__ == set(values)
        assert built.__pydantic_extra__ is made.__pydantic_extra__ is None
        assert built.__pydantic_private__ is made.__pydantic_private__ is None
        assert inspect(built).transient
    with pytest.raises(TypeError, match="no field"):
        new_row(cls, **full, not_a_field=1)
    # It persists like the row __init__ makes (its own table alone: no foreign keys to meet).
    from sqlalchemy import create_engine

    engine = create_engine(f"sqlite:///{tmp_path}/one.db")
    cls.__table__.create(engine)
    row = new_row(cls, **full)
    with Session(engine) as s:
        s.add(row)
        s.commit()
    with Session(engine) as s:
        [back] = s.exec(select(cls)).all()
        for name, value in full.items():
            got = getattr(back, name)
            if isinstance(value, datetime):
                got = got.replace(tzinfo=value.tzinfo)
            assert got == value, name


def test_new_row_works_before_any_orm_use() -> None:
    """A fresh process whose first row is a new_row (the build's first LLM call, before any
    __init__ or query has configured the mappers) gets a working row."""
    code = (
        "from storage.models import LLMCall, new_row\n"
        "from sqlalchemy import inspect\n"
        "c = new_row(LLMCall, key='k', stage='write', model='m', prompt_version='v', content='x')\n"
        "assert inspect(c).transient and c.content == 'x' and c.attempts == 1\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
