"""The few functions that read and write the factory's records.

One writer: every write is a short transaction made from the flow's event loop thread, so
SQLite never sees two writers at once (LLM concurrency comes from async HTTP, not threads).
The build's hot path writes through `asave`/`areject`: the writes of one loop turn share one
transaction (group commit), each caller resumed only once its rows are committed.
SQLite runs in WAL mode with a long busy timeout so readers (`longwriter stats` while a build
runs) never block the writer. The same code runs on PostgreSQL by URL.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Table, bindparam, event, func, inspect, text
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session, SQLModel, col, create_engine, select

from storage.models import (
    DraftCheck,
    Instruction,
    InstructionStatus,
    LLMCall,
    Paragraph,
    Plan,
    Rejection,
    Run,
    RunStatus,
    Sample,
    SampleSignature,
    SourceFile,
    new_row,
    utcnow,
)


def normalize_db_url(url: str) -> str:
    """Accept a bare path as a SQLite file; map postgres:// to the psycopg 3 driver."""
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser()}"
    if url.startswith(("postgres://", "postgresql://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def redact_db_url(url: str) -> str:
    """The URL with any password hidden, safe for logs, artifacts and manifests."""
    try:
        return make_url(normalize_db_url(url)).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a malformed URL is reported elsewhere; never echo it raw
        return "<unparseable db url>"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; WAL keeps it consistent
    cur.execute("PRAGMA busy_timeout=60000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _shipped(*columns: Any) -> Any:
    """A select of `columns` over the samples that ship: those whose instruction is still
    accepted (one rejected later, as a near-duplicate or by the judge gate, stays in its
    table). `stats` counts them and `accepted_sample_words` lists their words from it."""
    return (
        select(*columns)
        .join(Instruction, col(Instruction.id) == col(Sample.instruction_id))
        .where(col(Instruction.status) == InstructionStatus.ACCEPTED)
    )


@dataclass(frozen=True)
class InstructionState:
    """What a rerun needs to resume one instruction."""

    instruction: Instruction
    plan: Plan | None
    paragraphs: list[Paragraph]


class Store:
    # No default URL here: the commands' default store is their settings' (tasks/settings.py).
    def __init__(self, url: str) -> None:
        self.url = normalize_db_url(url)
        if self.url.startswith("sqlite"):
            path = make_url(self.url).database
            if path and path != ":memory:":
                Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(
                self.url, connect_args={"check_same_thread": False, "timeout": 60}
            )
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_engine(self.url, pool_pre_ping=True, pool_size=5, max_overflow=10)
        self._create_tables()
        self._prepare_statements()

    def _create_tables(self) -> None:
        """Create missing tables. `create_all` checks, then creates: two processes opening a
        fresh database together (partitions, `stats` while a build starts) both try to create
        the same table and the loser fails (PostgreSQL: duplicate pg_type; SQLite: table
        exists). The loser tries again and finds the tables there."""
        for attempt in range(1, 4):
            try:
                SQLModel.metadata.create_all(self.engine)
                self._add_missing_columns()
                return
            except DBAPIError:
                if attempt == 3:
                    raise
                time.sleep(0.2 * attempt)

    def _add_missing_columns(self) -> None:
        """Additive schema upgrades: a column a newer release added to a model is added to an
        existing store's table (with its default), so last month's store keeps resuming.
        Renames and type changes are not handled here; they would need a real migration."""
        inspector = inspect(self.engine)
        existing_tables = set(inspector.get_table_names())
        with self.engine.begin() as conn:
            for table in SQLModel.metadata.sorted_tables:
                if table.name not in existing_tables:
                    continue
                have = {c["name"] for c in inspector.get_columns(table.name)}
                for column in table.columns:
                    if column.name in have:
                        continue
                    ddl_type = column.type.compile(dialect=self.engine.dialect)
                    default = column.default.arg if column.default is not None else None
                    clause = ""
                    if isinstance(default, bool):
                        literal = str(default).upper() if self._is_postgres else str(int(default))
                        clause = f" NOT NULL DEFAULT {literal}"
                    elif isinstance(default, int | float):
                        clause = f" NOT NULL DEFAULT {default}"
                    elif isinstance(default, str):
                        clause = " NOT NULL DEFAULT '" + default.replace("'", "''") + "'"
                    conn.exec_driver_sql(
                        f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {ddl_type}{clause}'
                    )

    @property
    def _is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def close(self) -> None:
        self.engine.dispose()

    @property
    def redacted_url(self) -> str:
        return redact_db_url(self.url)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    # -- writes ---------------------------------------------------------------------------
    #
    # Every write is a list of operations (an upsert of a row, an instruction's new status, a
    # rejection) run by `_apply` in one transaction with SQLAlchemy Core: no ORM unit of
    # work, and no read before writing (an upsert by primary key replaces `merge`'s
    # SELECT-then-INSERT, which was half the store's CPU per LLM call). The async forms
    # (`asave`, `areject`) queue their operations for `_BatchWriter`, which commits every
    # write queued during one turn of the event loop in one transaction and only then lets
    # the writers go on: each output is durable before its caller uses it, and 64 chains
    # share one commit instead of paying one each.

    def save(self, *rows: SQLModel, status: tuple[int, InstructionStatus] | None = None) -> None:
        """Write rows (insert or update by primary key) and optionally move one instruction to a
        new status, all in one transaction, so a crash never leaves half a step behind.
        Another process writing the same key (a second build, a partition) is no error: the
        upsert updates the row it finds."""
        self._apply(self._ops(rows, status))

    def insert(self, *rows: SQLModel) -> None:
        """Insert new rows (the name the hot path used when `save` read before writing; both
        are the same upsert now)."""
        self._apply(self._ops(rows, None))

    async def asave(
        self, *rows: SQLModel, status: tuple[int, InstructionStatus] | None = None
    ) -> None:
        """`save` through the event loop's batched writer: returns once the rows are
        committed, in one transaction with whatever else was written in the same turn."""
        await self._writer().submit(self._ops(rows, status))

    def add_all(self, rows: Iterable[SQLModel]) -> None:
        with self.session() as s:
            s.add_all(list(rows))
            s.commit()

    def reject(
        self,
        instruction_id: int,
        stage: str,
        reason: str,
        detail: str = "",
        raw: str | None = None,
        extra_rows: Iterable[SQLModel] = (),
    ) -> None:
        """Record why an instruction stopped and mark it rejected (one transaction)."""
        self._apply(self._reject_ops(instruction_id, stage, reason, detail, raw, extra_rows))

    async def areject(
        self,
        instruction_id: int,
        stage: str,
        reason: str,
        detail: str = "",
        raw: str | None = None,
        extra_rows: Iterable[SQLModel] = (),
    ) -> None:
        """`reject` through the batched writer (see `asave`)."""
        ops = self._reject_ops(instruction_id, stage, reason, detail, raw, extra_rows)
        await self._writer().submit(ops)

    def _ops(
        self, rows: Iterable[SQLModel], status: tuple[int, InstructionStatus] | None
    ) -> list[_Op]:
        ops: list[_Op] = []
        for row in rows:
            table = row.__table__  # type: ignore[attr-defined]
            names, pk_names = _column_names(table)
            # A row's values are in its __dict__ (made by __init__, new_row or a load); one
            # that is not (an attribute expired by a commit) is read through the attribute.
            state = row.__dict__
            values = {n: state[n] if n in state else getattr(row, n) for n in names}
            pk = tuple(values[n] for n in pk_names)
            if None in pk:  # an autoincrement id still to be given: a plain insert
                for n in pk_names:
                    values.pop(n, None)
                ops.append(_Op("insert", table, values, row=row))
            else:
                ops.append(_Op("upsert", table, values, pk, row))
        if status is not None:
            ops.append(_Op("status", None, {"b_id": status[0], "b_status": status[1]}))
        return ops

    def _reject_ops(
        self,
        instruction_id: int,
        stage: str,
        reason: str,
        detail: str,
        raw: str | None,
        extra_rows: Iterable[SQLModel],
    ) -> list[_Op]:
        ops = self._ops(extra_rows, (instruction_id, InstructionStatus.REJECTED))
        values = {
            "b_iid": instruction_id,
            "b_stage": stage,
            "b_reason": reason,
            "b_detail": detail,
            "b_raw": raw[:4000] if raw else raw,
            "b_created_at": utcnow(),
        }
        return [*ops, _Op("reject", None, values)]

    def _writer(self) -> _BatchWriter:
        loop = asyncio.get_running_loop()
        writer = self._batch_writer
        if writer is None or writer.loop is not loop:  # a new loop (tests run several)
            writer = self._batch_writer = _BatchWriter(self, loop)
        return writer

    def _apply(self, ops: Sequence[_Op]) -> None:
        """Run operations in one transaction, parents before children (the tables' foreign
        key order), each statement once for all its rows (executemany). A key written twice
        keeps its last values; status changes keep their order."""
        if not self._core_upserts:
            self._apply_orm(ops)
            return
        upserts: dict[Table, dict[tuple[Any, ...], dict[str, Any]]] = {}
        inserts: dict[Table, list[dict[str, Any]]] = {}
        statuses: dict[int, dict[str, Any]] = {}
        rejections: list[dict[str, Any]] = []
        for op in ops:
            if op.kind == "upsert":
                assert op.table is not None
                upserts.setdefault(op.table, {})[op.pk] = op.values
            elif op.kind == "insert":
                assert op.table is not None
                inserts.setdefault(op.table, []).append(op.values)
            elif op.kind == "status":
                statuses.pop(op.values["b_id"], None)  # re-inserted: its order is the last
                statuses[op.values["b_id"]] = op.values
            else:
                rejections.append(op.values)
        with self.engine.begin() as conn:
            for table in self._table_order:
                if table in upserts:
                    conn.execute(self._upsert_stmt(table), list(upserts[table].values()))
                if table in inserts:
                    conn.execute(table.insert(), inserts[table])
            if rejections:
                conn.execute(self._reject_stmt, rejections)
            if statuses:
                conn.execute(self._status_stmt, list(statuses.values()))

    def _apply_orm(self, ops: Sequence[_Op]) -> None:
        """Databases other than SQLite and PostgreSQL (no Core upsert for them here): the
        ORM's merge, which reads before it writes, in one transaction all the same."""
        with self.session() as s:
            for op in ops:
                if op.row is not None:
                    s.merge(op.row)
                elif op.kind == "status":
                    inst = s.get(Instruction, op.values["b_id"])
                    if inst is not None:
                        inst.status = op.values["b_status"]
                        s.add(inst)
                else:
                    inst = s.get(Instruction, op.values["b_iid"])
                    s.add(
                        Rejection(
                            stage=op.values["b_stage"],
                            reason=op.values["b_reason"],
                            detail=op.values["b_detail"],
                            instruction_id=op.values["b_iid"],
                            source=inst.source if inst else "",
                            line_no=inst.line_no if inst else None,
                            raw=op.values["b_raw"],
                            created_at=op.values["b_created_at"],
                        )
                    )
            s.commit()

    def _upsert_stmt(self, table: Table) -> Any:
        """INSERT ... ON CONFLICT (pk) DO UPDATE of every other column, as typed text.

        Written out, not built with the dialects' `insert().on_conflict_do_update()`: those
        constructs are never cached by SQLAlchemy (`inherit_cache = False`), so every flush
        compiled each of them again (0.2-0.6 ms a statement, on every batch of the build). A
        text() with typed bind parameters is cached like any Core statement, and its values
        still go through the columns' types (enums, datetimes, booleans). The SQL is the same
        on SQLite (3.24+) and PostgreSQL."""
        stmt = self._upserts.get(table)
        if stmt is None:
            quote = self.engine.dialect.identifier_preparer.quote
            names = [c.name for c in table.columns]
            pk = [c.name for c in table.primary_key.columns]
            rest = [n for n in names if n not in pk]
            conflict = (
                "DO UPDATE SET " + ", ".join(f"{quote(n)} = excluded.{quote(n)}" for n in rest)
                if rest
                else "DO NOTHING"
            )
            sql = (
                f"INSERT INTO {quote(table.name)} ({', '.join(quote(n) for n in names)}) "
                f"VALUES ({', '.join(f':{n}' for n in names)}) "
                f"ON CONFLICT ({', '.join(quote(n) for n in pk)}) {conflict}"
            )
            stmt = text(sql).bindparams(*(bindparam(c.name, type_=c.type) for c in table.columns))
            self._upserts[table] = stmt
        return stmt

    def _prepare_statements(self) -> None:
        """The write path's statements, built once (SQLAlchemy caches their compiled form)."""
        self._core_upserts = self.engine.dialect.name in ("sqlite", "postgresql")
        self._upserts: dict[Table, Any] = {}
        self._batch_writer: _BatchWriter | None = None
        # Parents first: a batch may hold a call and the paragraph that points at it.
        self._table_order = list(SQLModel.metadata.sorted_tables)
        inst = Instruction.__table__  # type: ignore[attr-defined]
        rej = Rejection.__table__  # type: ignore[attr-defined]
        iid = bindparam("b_iid", type_=inst.c.id.type)
        # The rejection carries its input's file and line, read inside the INSERT itself.
        self._reject_stmt = rej.insert().values(
            stage=bindparam("b_stage", type_=rej.c.stage.type),
            reason=bindparam("b_reason", type_=rej.c.reason.type),
            detail=bindparam("b_detail", type_=rej.c.detail.type),
            instruction_id=iid,
            source=func.coalesce(
                sa_select(inst.c.source).where(inst.c.id == iid).scalar_subquery(), ""
            ),
            line_no=sa_select(inst.c.line_no).where(inst.c.id == iid).scalar_subquery(),
            raw=bindparam("b_raw", type_=rej.c.raw.type),
            created_at=bindparam("b_created_at", type_=rej.c.created_at.type),
        )
        self._status_stmt = (
            inst.update()
            .where(inst.c.id == bindparam("b_id", type_=inst.c.id.type))
            .values(status=bindparam("b_status", type_=inst.c.status.type))
        )
        call = LLMCall.__table__  # type: ignore[attr-defined]
        self._get_calls_stmt = sa_select(call).where(
            call.c.key.in_(bindparam("b_keys", expanding=True))
        )
        self._call_reader: _CallReader | None = None
        self.write_stats = WriteStats()

    # -- runs -----------------------------------------------------------------------------

    def start_run(self, kind: str, settings: dict[str, Any]) -> int:
        run = Run(kind=kind, settings_json=json.dumps(settings, default=str, sort_keys=True))
        with self.session() as s:
            s.add(run)
            s.commit()
            s.refresh(run)
            assert run.id is not None
            return run.id

    def finish_run(
        self, run_id: int, status: RunStatus, summary: dict[str, Any], error: str | None = None
    ) -> None:
        with self.session() as s:
            run = s.get(Run, run_id)
            if run is None:
                return
            run.status = status
            run.finished_at = utcnow()
            run.summary_json = json.dumps(summary, default=str, sort_keys=True)
            run.error = error
            s.add(run)
            s.commit()

    # -- reads ----------------------------------------------------------------------------

    def get_call(self, key: str) -> LLMCall | None:
        """The stored call with this key (the build asks through `aget_call`)."""
        return self.get_calls([key]).get(key)

    async def aget_call(self, key: str) -> LLMCall | None:
        """`get_call` through the event loop's batched reader: the lookups made during one
        loop turn (64 chains asking before their next call) share one SELECT."""
        loop = asyncio.get_running_loop()
        reader = self._call_reader
        if reader is None or reader.loop is not loop:
            reader = self._call_reader = _CallReader(self, loop)
        return await reader.submit(key)

    def get_calls(self, keys: Sequence[str]) -> dict[str, LLMCall]:
        """The stored calls among `keys`, by key (one SELECT per 500 keys)."""
        found: dict[str, LLMCall] = {}
        with self.engine.connect() as conn:
            for i in range(0, len(keys), 500):
                rows = conn.execute(self._get_calls_stmt, {"b_keys": keys[i : i + 500]})
                for row in rows:
                    found[row.key] = new_row(LLMCall, **row._mapping)
        return found

    def source_file(self, path: str) -> SourceFile | None:
        with self.session() as s:
            return s.get(SourceFile, path)

    def known_instructions(self) -> dict[str, tuple[int, str]]:
        """norm_hash -> (id, uid) of every stored instruction, for de-duplication on reruns."""
        with self.session() as s:
            rows = s.exec(select(Instruction.norm_hash, Instruction.id, Instruction.uid)).all()
        return {h: (i, u) for h, i, u in rows if i is not None}

    def instruction_ids(
        self, statuses: Iterable[InstructionStatus], limit: int | None = None
    ) -> list[int]:
        with self.session() as s:
            q = (
                select(Instruction.id)
                .where(col(Instruction.status).in_(list(statuses)))
                .order_by(col(Instruction.id))
            )
            if limit is not None:
                q = q.limit(limit)
            return [i for i in s.exec(q).all() if i is not None]

    def load_states(self, ids: list[int]) -> list[InstructionState]:
        """Instructions with their plan and stored paragraphs, in id order (Core rows made
        into records with `new_row`: the ORM's loading was a third of this per batch)."""
        if not ids:
            return []
        inst = Instruction.__table__  # type: ignore[attr-defined]
        plan = Plan.__table__  # type: ignore[attr-defined]
        para = Paragraph.__table__  # type: ignore[attr-defined]
        with self.engine.connect() as conn:
            by_id = {
                r.id: new_row(Instruction, **r._mapping)
                for r in conn.execute(sa_select(inst).where(inst.c.id.in_(ids)))
            }
            plans = {
                r.instruction_id: new_row(Plan, **r._mapping)
                for r in conn.execute(sa_select(plan).where(plan.c.instruction_id.in_(ids)))
            }
            paras: dict[int, list[Paragraph]] = {}
            for r in conn.execute(
                sa_select(para)
                .where(para.c.instruction_id.in_(ids))
                .order_by(para.c.instruction_id, para.c.step)
            ):
                paras.setdefault(r.instruction_id, []).append(new_row(Paragraph, **r._mapping))
        return [
            InstructionState(by_id[i], plans.get(i), paras.get(i, [])) for i in ids if i in by_id
        ]

    def iter_samples(self, batch_size: int = 500) -> Iterator[tuple[Sample, Instruction, Plan]]:
        """Accepted samples in instruction order, streamed in batches (export never holds the
        whole dataset in memory)."""
        yield from self._accepted(batch_size, Sample, Instruction, Plan)

    def iter_signed_sample_texts(
        self, batch_size: int = 500
    ) -> Iterator[tuple[int, str, str, str | None, bytes | None]]:
        """(instruction id, uid, text) of the samples `iter_samples` yields, in its order, as
        plain columns (no Sample, Instruction and Plan objects built for the values the
        near-duplicate pass reads: ~0.2 ms a sample), with each sample's stored signature
        beside it (its text_sha1 and hashvalues; None, None when none was stored)."""
        yield from self._accepted(
            batch_size,
            Sample.instruction_id,
            Instruction.uid,
            Sample.text,
            SampleSignature.text_sha1,
            SampleSignature.hashvalues,
            signed=True,
        )

    def _accepted(self, batch_size: int, *columns: Any, signed: bool = False) -> Iterator[Any]:
        """Rows of `columns` for the accepted samples (with their instruction and plan, and
        when `signed` their signature if stored), by instruction id, `batch_size` at a time;
        the first column is a Sample or its instruction id (the batches' cursor)."""
        last_id = 0
        while True:
            query = (
                select(*columns)
                .join(Instruction, col(Instruction.id) == col(Sample.instruction_id))
                .join(Plan, col(Plan.instruction_id) == col(Sample.instruction_id))
            )
            if signed:
                query = query.outerjoin(
                    SampleSignature,
                    col(SampleSignature.instruction_id) == col(Sample.instruction_id),
                )
            with self.session() as s:
                rows = s.exec(
                    query.where(col(Sample.instruction_id) > last_id)
                    # a sample rejected after acceptance (a near-duplicate at export) stays
                    # in the store with its reason, but is not exported
                    .where(col(Instruction.status) == InstructionStatus.ACCEPTED)
                    .order_by(col(Sample.instruction_id))
                    .limit(batch_size)
                ).all()
            if not rows:
                return
            yield from rows
            first = rows[-1][0]
            last_id = first.instruction_id if isinstance(first, Sample) else first

    def unjudged_samples(self, ids: list[int]) -> list[tuple[Sample, str]]:
        """(sample, instruction prompt) of the accepted samples among `ids` that hold no judge
        scores yet: what the build's judge gate still has to score (a rerun resumes here)."""
        with self.session() as s:
            rows = s.exec(
                select(Sample, Instruction.prompt)
                .join(Instruction, col(Instruction.id) == col(Sample.instruction_id))
                .where(col(Sample.instruction_id).in_(ids))
                .where(col(Instruction.status) == InstructionStatus.ACCEPTED)
                .where(col(Sample.quality_json).is_(None))
                .order_by(col(Sample.instruction_id))
            ).all()
        return [(sample, prompt) for sample, prompt in rows]

    def quality_stats(self) -> dict[str, Any]:
        """What the quality checks did: drafts that failed a check (and were redrafted or
        sank their sample) by stage and reason, cleanings on accepted paragraphs by check, and
        the accepted samples' mean length score and plan fidelity."""
        with self.session() as s:
            failed = s.exec(
                select(DraftCheck.stage, DraftCheck.reason, func.count())
                .where(col(DraftCheck.keep).is_(False))
                .group_by(DraftCheck.stage, DraftCheck.reason)
            ).all()
            cleaned = s.exec(
                select(Paragraph.cleanings_json)
                .join(Instruction, col(Instruction.id) == col(Paragraph.instruction_id))
                .where(col(Paragraph.cleanings_json) != "[]")
                .where(col(Instruction.status) == InstructionStatus.ACCEPTED)
            ).all()
            means = s.exec(
                select(func.avg(Sample.length_score), func.avg(Sample.plan_fidelity))
                .join(Instruction, col(Instruction.id) == col(Sample.instruction_id))
                .where(col(Instruction.status) == InstructionStatus.ACCEPTED)
            ).one()
        # The dict is built where `longwriter stats`' lean path builds it (no SQLAlchemy there).
        from tasks.sqlite_stats import quality_dict

        return quality_dict(failed, cleaned, means)

    def accepted_sample_words(self) -> list[int]:
        """The words of every sample that ships: those whose instruction is still accepted (a
        sample rejected later, as a near-duplicate or by the judge gate, stays in its table
        with its reason, and counts in no figure of what was accepted)."""
        with self.session() as s:
            return list(s.exec(_shipped(Sample.words)).all())

    def stats(self) -> dict[str, Any]:
        """Where every input record ended: instructions by status, rejections by stage and
        reason, per-source line accounting, words and tokens."""
        with self.session() as s:
            by_status = dict(
                s.exec(select(Instruction.status, func.count()).group_by(Instruction.status)).all()
            )
            rej_rows = s.exec(
                select(Rejection.stage, Rejection.reason, func.count()).group_by(
                    Rejection.stage, Rejection.reason
                )
            ).all()
            calls = s.exec(
                select(
                    LLMCall.stage,
                    func.count(),
                    func.coalesce(func.sum(LLMCall.prompt_tokens), 0),
                    func.coalesce(func.sum(LLMCall.completion_tokens), 0),
                    func.coalesce(func.sum(LLMCall.attempts), 0),
                    func.coalesce(func.sum(LLMCall.cached_tokens), 0),
                    func.coalesce(func.sum(LLMCall.reasoning_tokens), 0),
                ).group_by(LLMCall.stage)
            ).all()
            samples = s.exec(_shipped(func.count(), func.coalesce(func.sum(Sample.words), 0))).one()
            sources = s.exec(select(SourceFile)).all()
            ingest_rej = Counter(
                dict(
                    s.exec(
                        select(Rejection.source, func.count())
                        .where(Rejection.stage == "ingest")
                        .group_by(Rejection.source)
                    ).all()
                )
            )
            inst_by_source = Counter(
                dict(
                    s.exec(
                        select(Instruction.input_file, func.count()).group_by(
                            Instruction.input_file
                        )
                    ).all()
                )
            )
        from tasks.sqlite_stats import stats_dict

        return stats_dict(
            by_status,
            rej_rows,
            calls,
            samples,
            [(sf.path, sf.records) for sf in sources],
            ingest_rej,
            inst_by_source,
            self.quality_stats(),
        )


T = TypeVar("T")


@functools.cache
def _column_names(table: Table) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A table's column names and its primary key's (a ColumnCollection is slow to walk,
    and `_ops` walks them for every row written)."""
    return tuple(c.name for c in table.columns), tuple(c.name for c in table.primary_key.columns)


@dataclass
class WriteStats:
    """What the batched writer did (the throughput benchmark reports writes per commit)."""

    transactions: int = 0
    writes: int = 0  # asave/areject calls committed
    largest: int = 0  # most writes in one transaction


@dataclass(frozen=True)
class _Op:
    """One write: an upsert or insert of `row` (as column values), an instruction's new status
    or a rejection (values bound by name, b_*)."""

    kind: str  # upsert | insert | status | reject
    table: Table | None
    values: dict[str, Any]
    pk: tuple[Any, ...] = ()
    row: SQLModel | None = field(default=None, compare=False)


class _BatchWriter:
    """Group commit for one event loop. A write queued while no commit is pending schedules
    one for the loop's next turn (`call_soon`); every write queued until then joins it. The
    commit runs on the loop thread, so SQLite keeps one writer, and each writer's future is
    resolved only after the commit: nothing uses an output before it is durable. A batch that
    fails is retried one write per transaction, so a bad write fails only its own caller."""

    def __init__(self, store: Store, loop: asyncio.AbstractEventLoop) -> None:
        self.store = store
        self.loop = loop
        self._pending: list[tuple[list[_Op], asyncio.Future[None]]] = []

    def submit(self, ops: list[_Op]) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = self.loop.create_future()
        if not self._pending:
            self.loop.call_soon(self._flush)
        self._pending.append((ops, fut))
        return fut

    def _flush(self) -> None:
        # A cancelled caller's write is still made: its LLM call was paid for.
        batch, self._pending = self._pending, []
        if not batch:
            return
        stats = self.store.write_stats
        try:
            self.store._apply([op for ops, _ in batch for op in ops])
        except Exception as exc:  # noqa: BLE001 - handed to the callers
            if len(batch) == 1:
                _settle(batch[0][1], exc)
                return
            for ops, fut in batch:
                try:
                    self.store._apply(ops)
                except Exception as one:  # noqa: BLE001 - handed to its caller
                    _settle(fut, one)
                else:
                    stats.transactions += 1
                    stats.writes += 1
                    _settle(fut, None)
            return
        stats.transactions += 1
        stats.writes += len(batch)
        stats.largest = max(stats.largest, len(batch))
        for _, fut in batch:
            _settle(fut, None)


class _CallReader:
    """Batched `aget_call` for one event loop, as `_BatchWriter` batches writes: a lookup
    made while none is pending schedules a read for the loop's next turn, and every lookup
    made until then joins it. It answers what a lookup of its own would have at that moment
    (a call stored later is seen by a later lookup, as before)."""

    def __init__(self, store: Store, loop: asyncio.AbstractEventLoop) -> None:
        self.store = store
        self.loop = loop
        self._pending: dict[str, list[asyncio.Future[LLMCall | None]]] = {}

    def submit(self, key: str) -> asyncio.Future[LLMCall | None]:
        fut: asyncio.Future[LLMCall | None] = self.loop.create_future()
        if not self._pending:
            self.loop.call_soon(self._read)
        self._pending.setdefault(key, []).append(fut)
        return fut

    def _read(self) -> None:
        batch, self._pending = self._pending, {}
        try:
            found = self.store.get_calls(list(batch))
        except Exception as exc:  # noqa: BLE001 - handed to the callers
            for futs in batch.values():
                for fut in futs:
                    _settle(fut, exc)
            return
        for key, futs in batch.items():
            for fut in futs:
                _settle(fut, None, found.get(key))


def _settle(fut: asyncio.Future[T], exc: BaseException | None, result: T = None) -> None:
    if fut.done():  # its caller was cancelled
        return
    if exc is None:
        fut.set_result(result)
    else:
        fut.set_exception(exc)
