"""`longwriter audit`: the build's rule checks over an existing LongWriter-format dataset.

Any jsonl or parquet file (or a folder of them) whose records hold `messages` (the first user
turn is the instruction, the first assistant turn after it the response), or `instruction` /
`prompt` with `response`. Every record gets the same paragraph review the build runs on each
draft (`tasks.quality.review_sample`: chatter, prompt echo, markup, reasoning blocks, language,
restated paragraphs) plus the sample filters that make sense without a plan or a store (empty,
error text, refusal, repetition; too short when `min_words` is set). Cleanings are applied to
what is kept, as the build applies them before a paragraph is stored.

Streaming: records are read one line / one parquet row batch at a time, reviewed (in worker
processes when there are several cores: the review is pure CPU), and the kept ones go to a
spool file that the export's own shard writer then streams into `kept/`; the per-record rows
are spooled too. Memory stays flat whatever the dataset size, and the input is only ever read.

Nothing here calls an LLM; the optional judge lives in flows/audit.py.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.pool import AsyncResult
from pathlib import Path
from typing import Any

from tasks.files import atomic_write_text
from tasks.filters import (
    FilterConfig,
    SampleCandidate,
    check_empty,
    check_error_text,
    check_refusal,
    check_repetition,
)
from tasks.quality import Cleaning, SampleReview, Verdict, review_sample
from tasks.settings import BUILD, AuditSettings
from tasks.shards import SCHEMA, export_shards
from tasks.wordcount import count_words

BAD_RECORD = "bad_record"
EXCERPT_CHARS = 240
_PARQUET_BATCH_ROWS = 64  # rows of ~30 KB each: ~2 MB per batch, whatever the file size


# -- records ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditRecord:
    """One parsed input record: the pair to review plus the fields the export format keeps."""

    id: str
    instruction: str
    response: str
    lang: str | None = None
    plan: list[dict[str, Any]] = field(default_factory=list)
    model: str = ""
    prompt_version: str = ""
    source: str = ""


@dataclass(frozen=True)
class BadRecord:
    """A line or row that is not a reviewable record: reported, never a crash."""

    id: str
    detail: str


def _content_text(content: Any) -> str | None:
    """A message's content as text: a string, or OpenAI-style parts [{"type": "text", ...}]."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict)]
        if texts and all(isinstance(t, str) for t in texts):
            return "".join(texts)
    return None


def _from_messages(messages: Any) -> tuple[str, str] | str:
    """(instruction, response) from a chat, or the reason it has none."""
    if not isinstance(messages, list):
        return "messages is not a list"
    user: str | None = None
    for m in messages:
        if not isinstance(m, dict):
            return "a message is not an object"
        role = m.get("role")
        text = _content_text(m.get("content"))
        if user is None and role == "user":
            if text is None:
                return "the user turn has no text content"
            user = text
        elif user is not None and role == "assistant":
            if text is None:
                return "the assistant turn has no text content"
            return user, text
    return "no user turn" if user is None else "no assistant turn after the user turn"


def _plan_steps(value: Any) -> list[dict[str, Any]]:
    """The record's plan in the export's shape; anything unrecognised is dropped, not fatal."""
    if not isinstance(value, list):
        return []
    steps: list[dict[str, Any]] = []
    for s in value:
        if isinstance(s, dict) and isinstance(s.get("main_point"), str):
            wc = s.get("word_count")
            steps.append(
                {"main_point": s["main_point"], "word_count": wc if isinstance(wc, int) else 0}
            )
        elif isinstance(s, str):
            steps.append({"main_point": s, "word_count": 0})
    return steps


def _str_field(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    return value if isinstance(value, str) else ""


def parse_record(obj: Any, index_id: str, source: str = "") -> AuditRecord | BadRecord:
    """A decoded JSON value (or parquet row) as a record. `index_id` (the 0-based line or row
    index) is its id unless it carries an `id` of its own."""
    if not isinstance(obj, dict):
        return BadRecord(index_id, f"not an object ({type(obj).__name__})")
    rid = obj.get("id")
    # An id that is null, blank, a list...: fall back to the position, which is always unique.
    valid = isinstance(rid, int) and not isinstance(rid, bool) or isinstance(rid, str) and rid
    rec_id = str(rid) if valid else index_id
    if obj.get("messages") is not None:
        pair = _from_messages(obj["messages"])
        if isinstance(pair, str):
            return BadRecord(rec_id, pair)
        instruction, response = pair
    else:
        inst = obj.get("instruction", obj.get("prompt"))
        response = obj.get("response")
        if not isinstance(inst, str):
            return BadRecord(rec_id, "no messages, instruction or prompt")
        if not isinstance(response, str):
            return BadRecord(rec_id, "no response")
        instruction = inst
    if not instruction.strip():
        return BadRecord(rec_id, "blank instruction")
    lang = obj.get("lang")
    return AuditRecord(
        id=rec_id,
        instruction=instruction,
        response=response,
        lang=lang if lang in ("en", "zh") else None,
        plan=_plan_steps(obj.get("plan")),
        model=_str_field(obj, "model"),
        prompt_version=_str_field(obj, "prompt_version"),
        source=_str_field(obj, "source") or source,
    )


def parse_line(line: bytes, index_id: str, source: str = "") -> AuditRecord | BadRecord:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return BadRecord(index_id, f"invalid UTF-8 at byte {exc.start}")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return BadRecord(index_id, f"invalid JSON: {exc.msg} at column {exc.colno}")
    return parse_record(obj, index_id, source)


# -- reading ----------------------------------------------------------------------------------


def input_files(data: Path) -> list[Path]:
    """The files to audit: `data` itself, or a folder's parquet files (else its jsonl files),
    searched recursively and sorted, so an export's OUT/ folder audits as its parquet shards."""
    if data.is_file():
        return [data]
    if data.is_dir():
        for pattern in ("*.parquet", "*.jsonl"):
            found = sorted(p for p in data.rglob(pattern) if not p.name.startswith("."))
            if found:
                return found
        raise FileNotFoundError(f"no .parquet or .jsonl files under {data}")
    raise FileNotFoundError(f"{data} does not exist")


def _is_parquet(path: Path) -> bool:
    if path.suffix.lower() in (".parquet", ".pq"):
        return True
    with path.open("rb") as fh:
        return fh.read(4) == b"PAR1"


def iter_file(path: Path, id_prefix: str = "") -> Iterator[AuditRecord | BadRecord]:
    """Records of one file, streamed: jsonl line by line (blank lines skipped, ids are
    physical line indexes), parquet in row batches."""
    source = path.name
    if _is_parquet(path):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        index = 0
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            for row in batch.to_pylist():
                yield parse_record(row, f"{id_prefix}{index}", source)
                index += 1
        return
    with path.open("rb") as fh:
        for index, line in enumerate(fh):
            if not line.strip():
                continue
            yield parse_line(line, f"{id_prefix}{index}", source)


def iter_records(data: Path) -> Iterator[AuditRecord | BadRecord]:
    """Every record under `data`. With several files a position id is `file:index` (the
    file's path relative to `data`), so ids stay unique across files."""
    files = input_files(data)
    for path in files:
        prefix = f"{path.relative_to(data)}:" if len(files) > 1 else ""
        yield from iter_file(path, prefix)


# -- review -----------------------------------------------------------------------------------


@dataclass
class AuditRow:
    """The verdict on one record; `record` is its kept export record (None when rejected)."""

    id: str
    keep: bool
    reasons: list[str]
    details: list[str]  # one per reason, aligned with `reasons`
    cleaned: list[Cleaning]
    excerpt: str = ""
    words: int = 0
    record: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "keep": self.keep,
            "reasons": self.reasons,
            "details": self.details,
            "cleaned": [c.as_dict() for c in self.cleaned],
            "words": self.words,
        }


def _excerpt(text: str) -> str:
    flat = re.sub(r"\s+", " ", text).strip()
    return flat if len(flat) <= EXCERPT_CHARS else flat[: EXCERPT_CHARS - 1] + "…"


def export_record(rec: AuditRecord, text: str, words: int) -> dict[str, Any]:
    """The kept sample in the export's shard format (tasks.shards.SCHEMA), cleaned text as both
    the assistant message and `response`."""
    return {
        "messages": [
            {"role": "user", "content": rec.instruction},
            {"role": "assistant", "content": text},
        ],
        "id": rec.id,
        "instruction": rec.instruction,
        "response": text,
        "words": words,
        "plan": rec.plan,
        "model": rec.model,
        "prompt_version": rec.prompt_version,
        "source": rec.source,
    }


def _sample_filters() -> tuple[Callable[..., Verdict], ...]:
    # The build's sample filters that need neither a plan nor the writing history: the
    # paragraph count and truncation checks have nothing to read in a finished file, and
    # language and length are already in review_sample.
    return (check_empty, check_error_text, check_refusal, check_repetition)


def audit_record(item: AuditRecord | BadRecord, settings: AuditSettings) -> AuditRow:
    """Review one record: the quality review, then the sample filters over its cleaned text.
    Every failing check is listed (not only the first), so the counts show every defect."""
    if isinstance(item, BadRecord):
        return AuditRow(item.id, False, [BAD_RECORD], [item.detail], [])
    review = review_sample(
        item.instruction,
        item.response,
        lang=item.lang,
        plan=[s["main_point"] for s in item.plan] or None,
        min_words=settings.min_words,
    )
    reasons = list(review.reasons)
    details = _detail_per_reason(review)
    text = review.text
    candidate = SampleCandidate(
        text=text,
        paragraphs=review.paragraphs,
        planned_steps=len(review.paragraphs),
        truncated_steps=[],
        instruction=item.instruction,
        lang=item.lang,
    )
    cfg = FilterConfig(
        min_words=settings.min_words, max_repetition=settings.max_repetition, ngram=settings.ngram
    )
    for check in _sample_filters():
        verdict = check(candidate, cfg)
        if not verdict.keep and verdict.reason and verdict.reason not in reasons:
            reasons.append(verdict.reason)
            details.append(verdict.detail)
    keep = not reasons
    words = count_words(text)
    return AuditRow(
        id=item.id,
        keep=keep,
        reasons=reasons,
        details=details,
        cleaned=list(review.cleanings),
        excerpt="" if keep else _excerpt(item.response),
        words=words,
        record=export_record(item, text, words) if keep else None,
    )


def _detail_per_reason(review: SampleReview) -> list[str]:
    """The first detail of each of the review's reasons, aligned with `review.reasons`.
    review_sample lists a detail per failing paragraph (several may share a reason) and then
    one per whole-text reason (empty, wrong_language, too_short), in that order."""
    found: dict[str, str] = {}
    for i, verdict in enumerate(review.paragraph_verdicts, start=1):
        detail = f"paragraph {i}: {verdict.detail}"
        if verdict.reason in review.reasons and detail in review.details:
            found.setdefault(verdict.reason, detail)
    unmapped = [r for r in review.reasons if r not in found]
    tail = review.details[len(review.details) - len(unmapped) :] if unmapped else []
    found.update(zip(unmapped, tail, strict=False))
    return [found.get(r, "") for r in review.reasons]


# Worker processes get the settings once, at start, instead of with every record.
_WORKER_SETTINGS = AuditSettings()


def _init_worker(settings: AuditSettings) -> None:
    global _WORKER_SETTINGS
    _WORKER_SETTINGS = settings


def _audit_chunk_in_worker(chunk: list[AuditRecord | BadRecord]) -> list[AuditRow]:
    return [audit_record(item, _WORKER_SETTINGS) for item in chunk]


_CHUNK = 4  # records per task sent to a worker: amortises the pickling round trip


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def review_all(
    items: Iterable[AuditRecord | BadRecord], settings: AuditSettings, workers: int = 1
) -> Iterator[AuditRow]:
    """Rows in input order. With workers > 1 the review runs in a process pool (it is pure CPU
    and the GIL would serialise threads); imap keeps the order and only a bounded window of
    records in flight, so memory stays flat."""
    if workers <= 1:
        for item in items:
            yield audit_record(item, settings)
        return
    _sample_filters()  # import once before forking, so workers start with it loaded
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    # Not Pool.imap: its feeder thread drains the whole input iterator into the task queue
    # at once, i.e. the whole dataset in memory. A bounded window of chunks keeps it flat.
    max_in_flight = workers * 3
    with ctx.Pool(workers, initializer=_init_worker, initargs=(settings,)) as pool:
        window: deque[AsyncResult[list[AuditRow]]] = deque()
        for chunk in _chunks(items, _CHUNK):
            window.append(pool.apply_async(_audit_chunk_in_worker, (chunk,)))
            if len(window) >= max_in_flight:
                yield from window.popleft().get()
        while window:
            yield from window.popleft().get()


def _chunks(items: Iterable[AuditRecord | BadRecord], size: int) -> Iterator[list[Any]]:
    chunk: list[AuditRecord | BadRecord] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# -- aggregation ------------------------------------------------------------------------------


@dataclass
class AuditTally:
    """Counts over the rows, plus the first example of each rejection reason and cleaning."""

    records: int = 0
    kept: int = 0
    kept_words: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    rejected_records: int = 0
    cleaned: Counter[str] = field(default_factory=Counter)  # cuts per check
    cleaned_records: Counter[str] = field(default_factory=Counter)  # records with such a cut
    reject_examples: dict[str, dict[str, str]] = field(default_factory=dict)
    clean_examples: dict[str, dict[str, str]] = field(default_factory=dict)

    def add(self, row: AuditRow) -> None:
        self.records += 1
        if row.keep:
            self.kept += 1
            self.kept_words += row.words
        else:
            self.rejected_records += 1
        for reason, detail in zip(row.reasons, row.details, strict=True):
            self.rejected[reason] += 1
            self.reject_examples.setdefault(
                reason, {"id": row.id, "detail": detail, "excerpt": row.excerpt}
            )
        for check in {c.check for c in row.cleaned}:
            self.cleaned_records[check] += 1
        for c in row.cleaned:
            self.cleaned[c.check] += 1
            self.clean_examples.setdefault(c.check, {"id": row.id, "detail": c.detail})

    def summary(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "kept": self.kept,
            "rejected": dict(self.rejected.most_common()),
            "rejected_records": self.rejected_records,
            "cleaned": dict(self.cleaned.most_common()),
            "cleaned_records": dict(self.cleaned_records.most_common()),
            "kept_words": self.kept_words,
        }


def render_markdown(summary: dict[str, Any], tally: AuditTally, data: str) -> str:
    """audit.md: what a reviewer reads first."""
    lines = [
        f"# Audit of `{data}`",
        "",
        f"- records: {summary['records']}",
        f"- kept: {summary['kept']} ({summary['kept_words']:,} words)",
        f"- rejected: {summary['rejected_records']}",
        f"- min words: {summary['settings']['min_words']}",
        "",
        "## Rejections by reason",
        "",
    ]
    if not tally.rejected:
        lines.append("None.")
    else:
        lines += [
            "A record can fail several checks; each is counted.",
            "",
            "| reason | records |",
            "|---|---|",
        ]
        lines += [f"| {r} | {n} |" for r, n in tally.rejected.most_common()]
        for reason, _n in tally.rejected.most_common():
            ex = tally.reject_examples[reason]
            lines += ["", f"### {reason}", "", f"Record `{ex['id']}`: {ex['detail']}"]
            if ex["excerpt"]:
                lines += ["", f"> {ex['excerpt']}"]
    lines += ["", "## Cleanings by check", ""]
    if not tally.cleaned:
        lines.append("None.")
    else:
        lines += ["| check | cuts | records | example |", "|---|---|---|---|"]
        for check, n in tally.cleaned.most_common():
            ex = tally.clean_examples[check]
            detail = ex["detail"].replace("|", "\\|").replace("\n", " ")
            lines.append(
                f"| {check} | {n} | {tally.cleaned_records[check]} | `{ex['id']}`: {detail} |"
            )
    lines += [
        "",
        "Kept records (cleanings applied) are in `kept/` (parquet shards, jsonl and",
        "manifest.json, the build's export format); every record's verdict is in `audit.json`.",
        "",
    ]
    return "\n".join(lines)


# -- the whole audit --------------------------------------------------------------------------


class AuditInputError(ValueError):
    """The input cannot be audited at all (missing, or it would be overwritten)."""


def _spool_lines(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("r", encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line)


def run_audit(
    data: Path,
    out: Path,
    settings: AuditSettings | None = None,
    *,
    workers: int = 1,
    shard_size: int = BUILD.shard_size,
    on_row: Callable[[AuditRow], None] | None = None,
) -> dict[str, Any]:
    """Audit `data` into `out` (audit.json, audit.md, kept/); return the summary.
    `on_row` sees each row before it is tallied (the judge gate hooks in there)."""
    settings = settings or AuditSettings()
    files = [p.resolve() for p in input_files(data)]  # raises FileNotFoundError early
    out = out.resolve()
    kept_dir = out / "kept"
    for f in files:
        # The export rewrites kept/ and deletes shards it did not list: never let that be
        # the input.
        if f.is_relative_to(kept_dir):
            raise AuditInputError(f"input {f} is inside the output's kept/ folder")
    out.mkdir(parents=True, exist_ok=True)
    kept_dir.mkdir(exist_ok=True)
    rows_spool = out / ".audit-rows.jsonl.tmp"
    kept_spool = out / ".audit-kept.jsonl.tmp"
    tally = AuditTally()
    # Every field of the shard schema, null where audit has nothing to say (quality,
    # length_score...), so the jsonl twin has the same keys as the factory's own export.
    fields = SCHEMA.names
    try:
        with (
            rows_spool.open("w", encoding="utf-8") as rows_fh,
            kept_spool.open("w", encoding="utf-8") as kept_fh,
        ):
            for row in review_all(iter_records(data), settings, workers):
                if on_row is not None:
                    on_row(row)
                tally.add(row)
                rows_fh.write(json.dumps(row.as_json(), ensure_ascii=False) + "\n")
                if row.keep and row.record is not None:
                    record = {name: row.record.get(name) for name in fields}
                    kept_fh.write(json.dumps(record, ensure_ascii=False) + "\n")

        export_shards(
            _spool_lines(kept_spool),
            tally.kept,
            kept_dir,
            shard_size=shard_size,
            settings={"command": "audit", "data": str(data), **settings.model_dump()},
        )
        summary = {
            **tally.summary(),
            "data": str(data),
            "settings": {**settings.model_dump()},
        }
        _write_audit_json(out / "audit.json", summary, rows_spool)
        atomic_write_text(out / "audit.md", render_markdown(summary, tally, str(data)))
    finally:
        rows_spool.unlink(missing_ok=True)
        kept_spool.unlink(missing_ok=True)
    return summary


def _write_audit_json(path: Path, summary: dict[str, Any], rows_spool: Path) -> None:
    """audit.json with the counts first and `rows` last, streamed from the spool so the rows
    never sit in memory together; written under a temporary name and renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    head = json.dumps(summary, indent=2, ensure_ascii=False)
    with tmp.open("w", encoding="utf-8") as fh, rows_spool.open("r", encoding="utf-8") as rows:
        fh.write(head[:-2] + ',\n  "rows": [')
        first = True
        for line in rows:
            fh.write(("\n    " if first else ",\n    ") + line.rstrip("\n"))
            first = False
        fh.write("\n  ]\n}\n")
    os.replace(tmp, path)
