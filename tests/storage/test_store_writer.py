"""The store's batched writer (Store.asave / Store.areject): the writes of one event-loop turn
share one transaction, every caller resumes only after its rows are committed, a bad write
fails only its own caller, and a cancelled caller's write still lands (its call was paid)."""

import asyncio

import pytest
from sqlalchemy.exc import IntegrityError
from sqlmodel import func, select

from storage.models import Instruction, LLMCall, Paragraph, Rejection
from storage.store import Store


def _call(key: str, content: str = "c") -> LLMCall:
    return LLMCall(key=key, stage="write", model="m", prompt_version="v", content=content)


def _instructions(store: Store, n: int) -> list[int]:
    store.add_all(
        [
            Instruction(uid=f"u{i}", prompt=f"p{i}", norm_hash=f"h{i}", source="in", line_no=i + 1)
            for i in range(n)
        ]
    )
    return store.instruction_ids(["pending"])


def check_batched(store: Store) -> None:
    ids = _instructions(store, 40)

    async def chain(iid: int) -> bool:
        await store.asave(_call(f"k{iid}"))
        # Committed before we go on: another connection already sees it.
        seen = store.get_call(f"k{iid}") is not None
        para = Paragraph(
            instruction_id=iid, step=1, call_key=f"k{iid}", text="t", words=1, prompt_version="v"
        )
        await store.asave(para, status=(iid, "written"))
        return seen

    async def main() -> list[bool]:
        return await asyncio.gather(*(chain(i) for i in ids))

    assert all(asyncio.run(main()))
    stats = store.write_stats
    assert stats.writes == 80
    assert stats.transactions <= 4  # 40 chains, two writes each, in a couple of loop turns
    assert stats.largest == 40
    with store.session() as s:
        assert s.exec(select(func.count()).select_from(Paragraph)).one() == 40
    assert store.stats()["instructions"]["by_status"] == {"written": 40}


def test_batched_writes_share_transactions_sqlite(db_url):
    check_batched(Store(db_url))


@pytest.mark.postgres
def test_batched_writes_share_transactions_postgres(pg_url):
    store = Store(pg_url)
    try:
        check_batched(store)
    finally:
        store.close()


def test_a_bad_write_fails_only_its_caller(db_url):
    store = Store(db_url)
    (iid,) = _instructions(store, 1)
    orphan = Paragraph(
        instruction_id=iid, step=1, call_key="no-such-call", text="t", words=1, prompt_version="v"
    )

    async def main() -> list[object]:
        return await asyncio.gather(
            store.asave(_call("a")),
            store.asave(orphan),  # foreign key: no such llm_call
            store.asave(_call("b")),
            return_exceptions=True,
        )

    ok_a, bad, ok_b = asyncio.run(main())
    assert ok_a is None and ok_b is None
    assert isinstance(bad, IntegrityError)
    assert store.get_call("a") is not None and store.get_call("b") is not None


def test_upsert_keeps_the_last_write_and_rejections_read_their_input(db_url):
    store = Store(db_url)
    (iid,) = _instructions(store, 1)

    async def main() -> None:
        await asyncio.gather(store.asave(_call("k", "first")), store.asave(_call("k", "second")))
        await store.areject(iid, "write", "too_short", "one line", raw="x" * 5000)

    asyncio.run(main())
    assert store.get_call("k").content == "second"
    with store.session() as s:
        (rej,) = s.exec(select(Rejection)).all()
        inst = s.get(Instruction, iid)
    assert (rej.source, rej.line_no, rej.reason, len(rej.raw)) == ("in", 1, "too_short", 4000)
    assert inst.status == "rejected"


def test_a_cancelled_callers_write_still_lands(db_url):
    store = Store(db_url)

    async def main() -> None:
        task = asyncio.ensure_future(store.asave(_call("paid")))
        await asyncio.sleep(0)  # queued, not yet committed
        task.cancel()
        await asyncio.sleep(0.01)

    asyncio.run(main())
    assert store.get_call("paid") is not None


def _upsert_compiles(store: Store, rows: list) -> int:
    """How many times SQLAlchemy compiled a statement while `rows` were saved one by one."""
    from sqlalchemy import event

    compiled: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        # Anything but a cache hit was compiled for this execution (a miss, or no cache key).
        if context.compiled is not None and context.cache_hit != context.dialect.CACHE_HIT:
            compiled.append(statement)

    event.listen(store.engine, "before_cursor_execute", count)
    try:
        for row in rows:
            store.save(row)
    finally:
        event.remove(store.engine, "before_cursor_execute", count)
    return len(compiled)


@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_upserts_are_compiled_once_and_keep_the_column_types(db, tmp_path, request):
    """The upsert is SQLAlchemy-cached text (the dialects' on_conflict constructs are never
    cached: every flush compiled them again): saving 20 calls compiles it at most once, a
    second save of a key updates it, and typed columns (datetime, enum status) round-trip."""
    url = request.getfixturevalue("pg_url") if db == "postgres" else f"sqlite:///{tmp_path}/s.db"
    store = Store(url)
    store.save(_call("warm"))  # the first save compiles
    assert _upsert_compiles(store, [_call(f"k{i}") for i in range(20)]) == 0
    store.save(_call("k3", content="changed"))
    got = store.get_call("k3")
    assert got is not None and got.content == "changed"
    assert got.created_at.year >= 2024
    [iid] = _instructions(store, 1)
    inst = store.load_states([iid])[0].instruction
    inst.status = "accepted"
    store.save(inst)
    assert store.instruction_ids(["accepted"]) == [iid]


def _selects(store: Store) -> list[str]:
    """SELECTs run on the store's engine from now on (a list that fills as they run)."""
    from sqlalchemy import event

    seen: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append(statement)

    event.listen(store.engine, "before_cursor_execute", count)
    return seen


def check_batched_lookups(store: Store) -> None:
    for i in range(0, 30, 2):
        store.save(_call(f"k{i}", content=f"c{i}"))
    selects = _selects(store)

    async def main() -> list[LLMCall | None]:
        # 30 keys, half stored, one asked twice: one turn's lookups.
        keys = [f"k{i}" for i in range(30)] + ["k4"]
        return await asyncio.gather(*(store.aget_call(k) for k in keys))

    got = asyncio.run(main())
    assert len(selects) == 1  # one SELECT for the 31 lookups of the turn
    for i, call in enumerate(got[:30]):
        if i % 2:
            assert call is None
        else:
            assert call is not None and (call.key, call.content) == (f"k{i}", f"c{i}")
            assert call.created_at.tzinfo is not None  # the column's type still applies
    assert got[30] is not None and got[30].content == "c4"
    # Each answer is what get_call says, field by field.
    one = store.get_call("k2")
    assert one is not None and got[2] is not None
    assert one.model_dump() == got[2].model_dump()

    async def later() -> tuple[LLMCall | None, LLMCall | None]:
        # A call stored after one lookup is seen by the next one (no stale answer kept).
        first = await store.aget_call("k1")
        await store.asave(_call("k1", content="now"))
        return first, await store.aget_call("k1")

    before, after = asyncio.run(later())
    assert before is None and after is not None and after.content == "now"


def test_lookups_of_one_turn_share_a_select_sqlite(db_url):
    check_batched_lookups(Store(db_url))


@pytest.mark.postgres
def test_lookups_of_one_turn_share_a_select_postgres(pg_url):
    check_batched_lookups(Store(pg_url))


def test_a_failed_lookup_fails_its_callers_and_the_next_turn_reads_again(db_url, monkeypatch):
    store = Store(db_url)
    store.save(_call("k"))
    real = store.get_calls

    def broken(keys):  # noqa: ANN001, ANN202
        raise RuntimeError("database went away")

    async def main() -> LLMCall | None:
        monkeypatch.setattr(store, "get_calls", broken)
        results = await asyncio.gather(
            store.aget_call("k"), store.aget_call("x"), return_exceptions=True
        )
        assert all(isinstance(r, RuntimeError) for r in results)
        monkeypatch.setattr(store, "get_calls", real)
        return await store.aget_call("k")

    got = asyncio.run(main())
    assert got is not None and got.key == "k"


def test_load_states_reads_what_the_orm_reads(db_url):
    """load_states builds its records from Core rows: the same values as the ORM loads, in
    id order, with paragraphs in step order and a missing plan as None."""
    from storage.models import Plan

    store = Store(db_url)
    ids = _instructions(store, 4)
    store.save(_call("p"))
    store.save(
        Plan(
            instruction_id=ids[0],
            call_key="p",
            steps_json="[]",
            n_steps=2,
            total_words=600,
            prompt_version="v",
        )
    )
    for step in (2, 1):
        store.save(_call(f"w{step}"))
        store.save(
            Paragraph(
                instruction_id=ids[0],
                step=step,
                call_key=f"w{step}",
                text=f"t{step}",
                words=1,
                prompt_version="v",
            )
        )
    wanted = [ids[2], ids[0], 999_999]
    states = store.load_states(wanted)
    assert [s.instruction.id for s in states] == [ids[2], ids[0]]
    assert states[0].plan is None and states[0].paragraphs == []
    assert [p.step for p in states[1].paragraphs] == [1, 2]
    with store.session() as s:
        orm_inst = s.get(Instruction, ids[0])
        orm_plan = s.exec(select(Plan).where(Plan.instruction_id == ids[0])).one()
        orm_paras = s.exec(
            select(Paragraph).where(Paragraph.instruction_id == ids[0]).order_by(Paragraph.step)
        ).all()
        assert states[1].instruction.model_dump() == orm_inst.model_dump()
        assert states[1].plan is not None
        assert states[1].plan.model_dump() == orm_plan.model_dump()
        assert [p.model_dump() for p in states[1].paragraphs] == [p.model_dump() for p in orm_paras]
