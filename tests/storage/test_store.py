import pytest

from storage.models import Instruction, LLMCall, Paragraph, Plan
from storage.store import Store, normalize_db_url, redact_db_url


def test_url_helpers():
    assert normalize_db_url("runs/x.db").startswith("sqlite:///")
    assert normalize_db_url("postgres://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert "secret" not in redact_db_url("postgresql+psycopg://u:secret@h/db")


def exercise(store: Store) -> None:
    store.add_all([Instruction(uid=f"u{i}", prompt=f"p{i}", norm_hash=f"h{i}") for i in range(3)])
    ids = store.instruction_ids(["pending"])
    assert len(ids) == 3
    call = LLMCall(
        key="k1", stage="plan", model="m", prompt_version="v", content="raw", prompt_tokens=5
    )
    store.save(call)
    store.save(call)  # idempotent upsert by key
    assert store.get_call("k1").content == "raw"
    store.save(
        Plan(
            instruction_id=ids[0],
            call_key="k1",
            steps_json="[]",
            n_steps=2,
            total_words=600,
            prompt_version="v",
        ),
        status=(ids[0], "planned"),
    )
    store.save(
        Paragraph(
            instruction_id=ids[0], step=1, call_key="k1", text="t", words=1, prompt_version="v"
        )
    )
    store.reject(ids[1], "plan", "unparseable", "no lines", raw="garbage")
    (state,) = store.load_states([ids[0]])
    assert state.instruction.status == "planned" and state.plan.n_steps == 2
    assert [p.step for p in state.paragraphs] == [1]
    stats = store.stats()
    assert stats["instructions"]["by_status"] == {"pending": 1, "planned": 1, "rejected": 1}
    assert stats["rejections"] == {"plan": {"unparseable": 1}}
    assert stats["llm_calls"]["plan"]["prompt_tokens"] == 5


def test_sqlite_store(db_url):
    store = Store(db_url)
    exercise(store)
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


@pytest.mark.postgres
def test_postgres_store(pg_url):
    store = Store(pg_url)
    try:
        exercise(store)
    finally:
        store.close()


def _old_store_without_trimmed(url: str) -> None:
    """A store made by a release whose paragraph table had no `trimmed` column."""
    store = Store(url)
    with store.engine.begin() as conn:
        conn.exec_driver_sql('ALTER TABLE paragraph DROP COLUMN "trimmed"')
    store.add_all([Instruction(id=1, uid="u", prompt="p", norm_hash="h")])
    store.save(LLMCall(key="k", stage="write", model="m", prompt_version="v", content="c"))
    with store.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO paragraph (instruction_id, step, call_key, continuation_keys, text, "
            "words, truncated, prompt_version, created_at) "
            "VALUES (1, 1, 'k', '', 'old text', 2, false, 'v', CURRENT_TIMESTAMP)"
        )
    store.close()


def check_upgraded(url: str) -> None:
    store = Store(url)  # opening adds the missing column with its default
    (state,) = store.load_states([1])
    assert state.paragraphs[0].text == "old text" and state.paragraphs[0].trimmed is False
    store.save(
        Paragraph(
            instruction_id=1,
            step=2,
            call_key="k",
            text="t",
            words=1,
            trimmed=True,
            prompt_version="v",
        )
    )
    assert [p.trimmed for p in store.load_states([1])[0].paragraphs] == [False, True]
    store.close()


def test_sqlite_store_gains_new_columns(db_url):
    _old_store_without_trimmed(db_url)
    check_upgraded(db_url)


@pytest.mark.postgres
def test_postgres_store_gains_new_columns(pg_url):
    _old_store_without_trimmed(pg_url)
    check_upgraded(pg_url)
