"""The store under concurrent writers: several processes (partitioned builds, a rerun started
while a killed build's last transaction is still being rolled back, `longwriter stats` while a
build runs) on one SQLite file or one PostgreSQL database. No "database is locked", no lost
write, and an LLM output saved twice (two writers raced on the same call) stays one row."""

import multiprocessing as mp
import threading

import pytest
from sqlmodel import func, select

from storage.models import Instruction, LLMCall, Paragraph, Plan, Rejection
from storage.store import Store

WRITERS = 4
PER_WRITER = 60


def _writer(url: str, wid: int, shared_keys: int, barrier) -> None:
    """One process: its own instructions, plans, paragraphs and calls, plus calls every
    writer saves (same key, same content: two workers that raced on one LLM call)."""
    store = Store(url)
    barrier.wait(60)  # start together, so the writes really interleave
    try:
        for i in range(PER_WRITER):
            uid = f"w{wid}-{i}"
            store.add_all([Instruction(uid=uid, prompt=f"prompt {uid}", norm_hash=f"h-{uid}")])
            with store.session() as s:
                iid = s.exec(select(Instruction.id).where(Instruction.uid == uid)).one()
            call = LLMCall(key=f"k-{uid}", stage="plan", model="m", prompt_version="v", content=uid)
            store.save(call)
            store.save(
                Plan(
                    instruction_id=iid,
                    call_key=call.key,
                    steps_json="[]",
                    n_steps=1,
                    total_words=300,
                    prompt_version="v",
                ),
                status=(iid, "planned"),
            )
            store.save(
                Paragraph(
                    instruction_id=iid,
                    step=1,
                    call_key=call.key,
                    text=uid,
                    words=1,
                    prompt_version="v",
                ),
                status=(iid, "written"),
            )
            if i % 5 == 0:
                store.reject(iid, "filter", "too_short", f"{uid} is short")
            shared = LLMCall(
                key=f"shared-{i % shared_keys}",
                stage="write",
                model="m",
                prompt_version="v",
                content=f"same answer {i % shared_keys}",
            )
            store.save(shared)
    finally:
        store.close()


def _reader(url: str, stop: threading.Event, errors: list[BaseException]) -> None:
    store = Store(url)
    try:
        while not stop.is_set():
            store.stats()
            store.instruction_ids(["planned", "written"])
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)
    finally:
        store.close()


def hammer(url: str) -> None:
    Store(url).close()  # create the tables once, before the writers race to
    ctx = mp.get_context("spawn")  # fresh interpreters: no engine or connection inherited
    barrier = ctx.Barrier(WRITERS)
    procs = [ctx.Process(target=_writer, args=(url, w, 7, barrier)) for w in range(WRITERS)]
    stop, errors = threading.Event(), []
    reader = threading.Thread(target=_reader, args=(url, stop, errors))
    for p in procs:
        p.start()
    reader.start()
    for p in procs:
        p.join(120)
    stop.set()
    reader.join(30)
    assert [p.exitcode for p in procs] == [0] * WRITERS, "a writer failed (see its traceback)"
    assert errors == []

    store = Store(url)
    try:
        with store.session() as s:
            n = WRITERS * PER_WRITER
            assert s.exec(select(func.count()).select_from(Instruction)).one() == n
            assert s.exec(select(func.count()).select_from(Plan)).one() == n
            assert s.exec(select(func.count()).select_from(Paragraph)).one() == n
            assert s.exec(select(func.count()).select_from(LLMCall)).one() == n + 7
            assert s.exec(select(func.count()).select_from(Rejection)).one() == n // 5
            statuses = dict(
                s.exec(select(Instruction.status, func.count()).group_by(Instruction.status)).all()
            )
            assert statuses == {"written": n - n // 5, "rejected": n // 5}
    finally:
        store.close()


def test_concurrent_writers_sqlite(tmp_path):
    hammer(f"sqlite:///{tmp_path / 'store.db'}")


@pytest.mark.postgres
def test_concurrent_writers_postgres(pg_url):
    hammer(pg_url)


def _open(url: str, barrier) -> None:
    barrier.wait(60)
    store = Store(url)
    store.stats()
    store.close()


def open_together(url: str, n: int = 6) -> None:
    """Processes opening a fresh database at once (partitioned builds starting together, or
    `longwriter stats` as a build starts) all get a working store."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(n)
    procs = [ctx.Process(target=_open, args=(url, barrier)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * n, "a process failed to open the store"


def test_first_open_by_many_processes_sqlite(tmp_path):
    open_together(f"sqlite:///{tmp_path / 'fresh.db'}")


@pytest.mark.postgres
def test_first_open_by_many_processes_postgres(pg_url):
    open_together(pg_url)


def test_same_call_saved_twice_is_one_row(db_url):
    store = Store(db_url)
    try:
        call = LLMCall(key="k", stage="plan", model="m", prompt_version="v", content="a")
        store.save(call)
        store.save(LLMCall(key="k", stage="plan", model="m", prompt_version="v", content="a"))
        with store.session() as s:
            assert s.exec(select(func.count()).select_from(LLMCall)).one() == 1
    finally:
        store.close()
