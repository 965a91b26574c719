"""`longwriter stats` on a SQLite store without SQLAlchemy (issue 12: stats <= 1 s).

Importing the store (SQLAlchemy, SQLModel and every table model: ~0.7 s on the 2-core box)
cost `stats` ten times its queries. For a plain `sqlite:///PATH` store that exists, this
runs the same SQL that `storage.store.Store.stats` has SQLAlchemy emit (the statements below
are its compiled text, so SQLite plans and orders the rows the same way) with the standard
library's sqlite3, and builds the same dict. It opens no engine and changes nothing.

Anything else returns None and the caller opens the Store as before: another database, a
URL with query options, a file that does not exist yet (the Store creates it), or a store
a query fails on (an older store missing a table or column: the Store adds them first).
Both build the dict with `stats_dict` and `quality_dict` below (pure over the query rows, so
the Store imports them without this module importing the Store).
tests/tasks/test_sqlite_stats.py checks this dict equals `Store.stats()` on a store with
every kind of row, so a query added there fails until it is added here.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

_PREFIX = "sqlite:///"
_ACCEPTED = "accepted"  # storage.models.InstructionStatus.ACCEPTED (a test checks)

_BY_STATUS = (
    "SELECT instruction.status, count(*) AS count_1 \nFROM instruction GROUP BY instruction.status"
)
_REJECTIONS = (
    "SELECT rejection.stage, rejection.reason, count(*) AS count_1 \n"
    "FROM rejection GROUP BY rejection.stage, rejection.reason"
)
_CALLS = (
    "SELECT llm_call.stage, count(*) AS count_1, "
    "coalesce(sum(llm_call.prompt_tokens), ?) AS coalesce_1, "
    "coalesce(sum(llm_call.completion_tokens), ?) AS coalesce_3, "
    "coalesce(sum(llm_call.attempts), ?) AS coalesce_5, "
    "coalesce(sum(llm_call.cached_tokens), ?) AS coalesce_7, "
    "coalesce(sum(llm_call.reasoning_tokens), ?) AS coalesce_9 \n"
    "FROM llm_call GROUP BY llm_call.stage"
)
_SAMPLES = (
    "SELECT count(*) AS count_1, coalesce(sum(sample.words), ?) AS coalesce_1 \n"
    "FROM sample JOIN instruction ON instruction.id = sample.instruction_id \n"
    "WHERE instruction.status = ?"
)
_SOURCES = (
    "SELECT source_file.path, source_file.sha256, source_file.records, source_file.accepted, "
    "source_file.rejected, source_file.ingested_at \nFROM source_file"
)
_INGEST_REJECTIONS = (
    "SELECT rejection.source, count(*) AS count_1 \nFROM rejection \n"
    "WHERE rejection.stage = ? GROUP BY rejection.source"
)
_BY_SOURCE = (
    "SELECT instruction.input_file, count(*) AS count_1 \n"
    "FROM instruction GROUP BY instruction.input_file"
)
_FAILED_DRAFTS = (
    "SELECT draft_check.stage, draft_check.reason, count(*) AS count_1 \nFROM draft_check \n"
    "WHERE draft_check.keep IS 0 GROUP BY draft_check.stage, draft_check.reason"
)
_CLEANED = (
    "SELECT paragraph.cleanings_json \n"
    "FROM paragraph JOIN instruction ON instruction.id = paragraph.instruction_id \n"
    "WHERE paragraph.cleanings_json != ? AND instruction.status = ?"
)
_MEANS = (
    "SELECT avg(sample.length_score) AS avg_1, avg(sample.plan_fidelity) AS avg_2 \n"
    "FROM sample JOIN instruction ON instruction.id = sample.instruction_id \n"
    "WHERE instruction.status = ?"
)


def sqlite_store_file(url: str) -> str | None:
    """The file of a plain, existing SQLite store URL (or bare path, as
    storage.store.normalize_db_url reads one), else None. Its URL then redacts to itself:
    there is no password in it."""
    if "://" not in url:
        url = f"{_PREFIX}{Path(url).expanduser()}"
    if not url.startswith(_PREFIX):
        return None
    path = url[len(_PREFIX) :]
    # URL syntax SQLAlchemy would parse (query options, escapes): left to the Store.
    if not path or path == ":memory:" or any(c in path for c in "?%#@"):
        return None
    return path if os.path.isfile(path) else None


def sqlite_stats(url: str) -> tuple[str, dict[str, Any]] | None:
    """(the store's redacted URL, `Store.stats()`'s dict) read with sqlite3, or None when the
    Store must be opened instead (see the module's docstring)."""
    path = sqlite_store_file(url)
    if path is None:
        return None
    try:
        con = sqlite3.connect(path, timeout=60)
    except sqlite3.Error:
        return None
    try:
        con.execute("PRAGMA busy_timeout=60000")
        con.execute("BEGIN")  # one snapshot for every count
        stats = _read(con)
    except sqlite3.Error:
        return None
    finally:
        con.close()
    return f"{_PREFIX}{path}", stats


def _read(con: sqlite3.Connection) -> dict[str, Any]:
    by_status = dict(con.execute(_BY_STATUS).fetchall())
    rej_rows = con.execute(_REJECTIONS).fetchall()
    calls = con.execute(_CALLS, (0, 0, 0, 0, 0)).fetchall()
    samples = con.execute(_SAMPLES, (0, _ACCEPTED)).fetchone()
    sources = con.execute(_SOURCES).fetchall()
    ingest_rej = Counter(dict(con.execute(_INGEST_REJECTIONS, ("ingest",)).fetchall()))
    inst_by_source = Counter(dict(con.execute(_BY_SOURCE).fetchall()))
    failed = con.execute(_FAILED_DRAFTS).fetchall()
    cleaned = con.execute(_CLEANED, ("[]", _ACCEPTED)).fetchall()
    means = con.execute(_MEANS, (_ACCEPTED,)).fetchone()
    return stats_dict(
        by_status,
        rej_rows,
        calls,
        samples,
        [(src_path, records) for src_path, _sha, records, *_ in sources],
        ingest_rej,
        inst_by_source,
        quality_dict(failed, [blob for (blob,) in cleaned], means),
    )


# -- the dict, from the rows (Store.stats() builds it with these too) ------------------------

Row = Sequence[Any]


def quality_dict(
    failed: Iterable[Row], cleaned: Iterable[str | None], means: Row
) -> dict[str, Any]:
    """`stats()["quality"]`: failed drafts by stage and reason (stage, reason, n rows), the
    accepted paragraphs' cleanings by check (their cleanings_json), and the accepted samples'
    (mean length score, mean plan fidelity)."""
    failed_drafts: dict[str, dict[str, int]] = {}
    for stage, reason, n in failed:
        failed_drafts.setdefault(stage, {})[reason or "rejected"] = n
    cleanings: Counter[str] = Counter()
    for blob in cleaned:
        for c in json.loads(blob or "[]"):
            cleanings[c.get("check", "?")] += 1
    return {
        "failed_drafts": failed_drafts,
        "cleanings": dict(sorted(cleanings.items())),
        "length_score_mean": round(means[0], 1) if means[0] is not None else None,
        "plan_fidelity_mean": round(means[1], 3) if means[1] is not None else None,
    }


def stats_dict(
    by_status: dict[Any, int],
    rejection_rows: Iterable[Row],
    call_rows: Iterable[Row],
    samples: Row,
    sources: Iterable[tuple[str, int]],
    ingest_rejections: Counter[str],
    instructions_by_source: Counter[str],
    quality: dict[str, Any],
) -> dict[str, Any]:
    """`Store.stats()`'s dict from its query rows: instructions by status, rejections
    (stage, reason, n), LLM calls by stage (stage, n and the token sums), accepted samples
    (n, words), sources (path, records) with their instructions and ingest rejections."""
    rejections: dict[str, dict[str, int]] = {}
    for stage, reason, n in rejection_rows:
        rejections.setdefault(stage, {})[reason] = n
    return {
        "instructions": {"total": sum(by_status.values()), "by_status": by_status},
        "rejections": rejections,
        "sources": [
            {
                "path": path,
                "records": records,
                "instructions": instructions_by_source.get(path, 0),
                "ingest_rejections": ingest_rejections.get(path, 0),
            }
            for path, records in sources
        ],
        "samples": {"accepted": samples[0], "words": int(samples[1])},
        "quality": quality,
        "llm_calls": {
            stage: {
                "calls": n,
                "prompt_tokens": int(pt),
                "completion_tokens": int(ct),
                "http_attempts": int(att),
                # served from the endpoint's prefix cache / spent on reasoning (of the
                # completion tokens): what the cost of a build really was
                "cached_tokens": int(cached),
                "reasoning_tokens": int(reasoning),
            }
            for stage, n, pt, ct, att, cached, reasoning in call_rows
        },
    }
