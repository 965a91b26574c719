"""Ingest: instruction files in, typed records out; every bad record kept with a reason.

Reads jsonl (line by line, so one broken line costs one record, not the file), json (an array
or json-lines), and anything else `datasets` loads locally (parquet, csv). A record is a
`{"prompt": ...}` object or a LongWriter-6k record (`messages`, first user turn). Optional
fields: id, length, lang, source.

Instructions are de-duplicated on normalised text and decontaminated against the evaluation
prompts shipped in tasks/data (LongBench-Write and LongWrite-Ruler): n-gram overlap, so a
lightly edited copy of a benchmark prompt never becomes training data.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlmodel import select

from storage.models import Instruction, Rejection, SourceFile
from storage.store import Store
from tasks.files import sha256_file
from tasks.wordcount import detect_lang

DATA_DIR = Path(__file__).resolve().parent / "data"
EVAL_PROMPT_FILES = (DATA_DIR / "longbench_write.jsonl", DATA_DIR / "longwrite_ruler.jsonl")
# A required length beyond this is a typo, not a piece anyone can plan; bigger integers also
# overflowed the store's INTEGER column and crashed the ingest commit.
MAX_LENGTH_WORDS = 1_000_000
DEFAULT_MAX_RECORD_BYTES = 100_000  # ~25k tokens: more than any prompt our models can plan from


@dataclass(frozen=True)
class RawRecord:
    """One record as read: either a decoded object or the reason it could not be read."""

    line_no: int
    data: Any = None
    error: str | None = None  # reason code when unreadable
    detail: str = ""
    raw: str = ""  # excerpt for the rejection row


@dataclass(frozen=True)
class InstructionRecord:
    uid: str
    prompt: str
    norm_hash: str
    length: int | None
    lang: str
    source: str
    line_no: int


@dataclass(frozen=True)
class IngestRejection:
    line_no: int
    reason: str
    detail: str
    raw: str
    source: str


# -- reading -------------------------------------------------------------------------------


def _excerpt(raw: bytes | str, limit: int = 500) -> str:
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    return raw[:limit]


def read_jsonl(path: Path, max_record_bytes: int) -> Iterator[RawRecord]:
    with path.open("rb") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue  # blank lines are layout, not records
            if len(line) > max_record_bytes:
                yield RawRecord(
                    line_no,
                    error="too_large",
                    detail=f"record is {len(line)} bytes; the cap is {max_record_bytes}",
                    raw=_excerpt(line),
                )
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield RawRecord(line_no, error="invalid_utf8", detail=str(exc), raw=_excerpt(line))
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                yield RawRecord(line_no, error="invalid_json", detail=exc.msg, raw=text[:500])
                continue
            except RecursionError:  # `[[[[...` a few thousand deep crashed the whole ingest
                detail = "nested too deeply to read"
                yield RawRecord(line_no, error="invalid_json", detail=detail, raw=text[:500])
                continue
            yield RawRecord(line_no, data=data, raw=text[:500])


def read_records(
    path: Path, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
) -> Iterator[RawRecord]:
    """Records of one local file, in file order, with 1-based line (or row) numbers."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from read_jsonl(path, max_record_bytes)
        return
    if suffix == ".json":
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            data = None  # not one JSON document: read it as json-lines
        if isinstance(data, list):
            for i, item in enumerate(data, start=1):
                yield RawRecord(i, data=item, raw=json.dumps(item, ensure_ascii=False)[:500])
            return
        if isinstance(data, dict):
            yield RawRecord(1, data=data, raw=json.dumps(data, ensure_ascii=False)[:500])
            return
        yield from read_jsonl(path, max_record_bytes)
        return
    yield from _read_with_datasets(path)


def _read_with_datasets(path: Path) -> Iterator[RawRecord]:
    import datasets  # heavy import: only for formats that need it

    builder = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".arrow": "arrow"}.get(
        path.suffix.lower()
    )
    if builder is None:
        raise ValueError(f"unsupported instruction file type: {path.suffix or path.name}")
    kwargs: dict[str, Any] = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    # csv: row 1 is the header, so data row i sits on line i + 1
    offset = 1 if builder == "csv" else 0
    for i, row in enumerate(ds, start=1):
        yield RawRecord(
            i + offset, data=row, raw=json.dumps(row, ensure_ascii=False, default=str)[:500]
        )


# -- normalising, de-duplication, decontamination ------------------------------------------

_PUNCT_RE = re.compile(r"[\W_]+", re.UNICODE)
_TOKEN_RE = re.compile(r"[a-z0-9]+|[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def normalize(text: str) -> str:
    """Case, width, punctuation and whitespace folded: two prompts that differ only there are
    the same instruction."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_PUNCT_RE.sub(" ", text).split())


def norm_hash(text: str) -> str:
    return hashlib.sha256(normalize(text).encode("utf-8")).hexdigest()


def _tokens(text: str) -> list[str]:
    return _TOKEN_RE.findall(unicodedata.normalize("NFKC", text).lower())


def _ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


class Decontaminator:
    """Flags instructions that overlap an evaluation prompt: at least `threshold` of the
    instruction's n-grams are benchmark n-grams, or most of one benchmark prompt's n-grams
    occur in the instruction (a benchmark prompt wrapped in extra text). Prompts shorter than
    n tokens are compared on normalised text."""

    def __init__(self, prompts: Iterable[str], n: int = 8, threshold: float = 0.5) -> None:
        self.n = n
        self.threshold = threshold
        self._index: dict[tuple[str, ...], set[int]] = {}
        self._sizes: list[int] = []
        self._short: set[tuple[str, ...]] = set()
        for pid, prompt in enumerate(prompts):
            toks = _tokens(prompt)
            grams = _ngrams(toks, n)
            self._sizes.append(len(grams))
            if not grams and toks:
                self._short.add(tuple(toks))
            for g in grams:
                self._index.setdefault(g, set()).add(pid)

    @classmethod
    def from_files(cls, files: Iterable[Path] = EVAL_PROMPT_FILES) -> Decontaminator:
        prompts: list[str] = []
        for f in files:
            for line in f.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    prompts.append(json.loads(line)["prompt"])
        return cls(prompts)

    def check(self, text: str) -> str | None:
        """A one-line reason when `text` overlaps an evaluation prompt, else None."""
        toks = _tokens(text)
        # Short benchmark prompts have no n-grams: look for them as a whole inside an
        # instruction at most twice their length (longer ones merely share a phrase).
        for size in {len(s) for s in self._short if len(s) <= len(toks) <= 2 * len(s)}:
            if any(tuple(toks[i : i + size]) in self._short for i in range(len(toks) - size + 1)):
                return "contains a short evaluation prompt"
        grams = _ngrams(toks, self.n)
        if not grams:
            return None
        hits_per_prompt: dict[int, int] = {}
        hit = 0
        for g in grams:
            pids = self._index.get(g)
            if pids:
                hit += 1
                for pid in pids:
                    hits_per_prompt[pid] = hits_per_prompt.get(pid, 0) + 1
        if hit / len(grams) >= self.threshold:
            return f"{hit}/{len(grams)} of its {self.n}-grams are in evaluation prompts"
        for pid, n_hits in hits_per_prompt.items():
            if n_hits / self._sizes[pid] >= 0.8:
                share = f"{n_hits}/{self._sizes[pid]} {self.n}-grams"
                return f"contains evaluation prompt #{pid} ({share})"
        return None


# -- records to instructions ---------------------------------------------------------------


def _prompt_of(data: dict[str, Any]) -> Any:
    if "prompt" in data:
        return data["prompt"]
    messages = data.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict) and m.get("role") == "user":
                return m.get("content")
    for alt in ("instruction", "query"):
        if alt in data:
            return data[alt]
    return None


def _parse_length(value: Any) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError("length must be a number of words")
    if isinstance(value, int | float):
        n = int(value)
    else:
        n = int(str(value).strip().replace(",", ""))
    if n <= 0:
        raise ValueError("length must be positive")
    if n > MAX_LENGTH_WORDS:  # also keeps it inside a 64-bit INTEGER column
        raise ValueError(f"length above {MAX_LENGTH_WORDS} words")
    return n


def _encodable(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    except (TypeError, ValueError):
        return True  # not JSON-serialisable (a parquet row): its strings are the readers' own
    return True


def to_instruction(
    rec: RawRecord, source: str, max_record_bytes: int
) -> InstructionRecord | IngestRejection:
    """One raw record to an instruction, or to the reason it is not one."""

    def reject(reason: str, detail: str) -> IngestRejection:
        raw = rec.raw.encode("utf-8", "backslashreplace").decode("utf-8")  # storable
        return IngestRejection(rec.line_no, reason, detail, raw, source)

    if rec.error:
        return reject(rec.error, rec.detail)
    if not _encodable(rec.data):
        # Valid JSON, but a `\ud800`-style escape decodes to a lone surrogate that no UTF-8
        # store or file can hold (it crashed the ingest before).
        return reject("invalid_utf8", "a string holds a lone surrogate escape (e.g. \\ud800)")
    if not isinstance(rec.data, dict):
        return reject("not_an_object", f"expected a JSON object, got {type(rec.data).__name__}")
    data = rec.data
    prompt = _prompt_of(data)
    if prompt is None:
        return reject("missing_prompt", "no `prompt` field and no user turn in `messages`")
    if not isinstance(prompt, str):
        return reject("invalid_prompt", f"prompt is a {type(prompt).__name__}, not text")
    prompt = prompt.strip()
    if not prompt:
        return reject("blank_prompt", "prompt is empty or whitespace")
    if "\x00" in prompt:
        return reject("invalid_prompt", "prompt contains NUL bytes")
    if len(prompt.encode("utf-8")) > max_record_bytes:
        return reject(
            "too_large", f"prompt is {len(prompt.encode('utf-8'))} bytes; cap {max_record_bytes}"
        )
    try:
        length = _parse_length(data.get("length"))
    except (TypeError, ValueError, OverflowError) as exc:  # Overflow: 1e400 is infinity
        return reject("invalid_length", f"length {data.get('length')!r}: {exc}")
    h = norm_hash(prompt)
    raw_id = data.get("id")
    uid = str(raw_id).strip() if raw_id not in (None, "") else f"sha-{h[:16]}"
    lang = data.get("lang") if isinstance(data.get("lang"), str) and data.get("lang") else None
    return InstructionRecord(
        uid=uid,
        prompt=prompt,
        norm_hash=h,
        length=length,
        lang=lang or detect_lang(prompt),
        source=str(data.get("source") or source),
        line_no=rec.line_no,
    )


@dataclass
class IngestResult:
    instructions: list[InstructionRecord]
    rejections: list[IngestRejection]
    already_stored: int  # identical records a previous run already ingested
    records: int


def ingest_records(
    records: Iterable[RawRecord],
    source: str,
    known: dict[str, tuple[int, str]],
    decontaminator: Decontaminator | None,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> IngestResult:
    """Pure core of ingest. `known` maps norm_hash -> (id, uid) of stored instructions, so a
    rerun over the same file adds nothing and rejects nothing twice."""
    seen_hash: dict[str, str] = {h: uid for h, (_, uid) in known.items()}
    seen_uid: set[str] = set(seen_hash.values())
    out: list[InstructionRecord] = []
    rejections: list[IngestRejection] = []
    already = 0
    matched_known: set[str] = set()
    n = 0
    for rec in records:
        n += 1
        item = to_instruction(rec, source, max_record_bytes)
        if isinstance(item, IngestRejection):
            rejections.append(item)
            continue
        if item.norm_hash in seen_hash:
            if (
                item.norm_hash in known
                and known[item.norm_hash][1] == item.uid
                and item.norm_hash not in matched_known
            ):
                matched_known.add(item.norm_hash)
                already += 1  # stored by an earlier run of this build: not a duplicate
            else:
                rejections.append(
                    IngestRejection(
                        item.line_no,
                        "duplicate",
                        f"same normalised text as instruction {seen_hash[item.norm_hash]!r}",
                        rec.raw,
                        source,
                    )
                )
            continue
        if item.uid in seen_uid:
            rejections.append(
                IngestRejection(
                    item.line_no, "duplicate_id", f"id {item.uid!r} already used", rec.raw, source
                )
            )
            continue
        if decontaminator is not None:
            reason = decontaminator.check(item.prompt)
            if reason:
                rejections.append(
                    IngestRejection(item.line_no, "eval_overlap", reason, rec.raw, source)
                )
                continue
        seen_hash[item.norm_hash] = item.uid
        seen_uid.add(item.uid)
        out.append(item)
    return IngestResult(out, rejections, already, n)


# -- stage over the store (its Prefect task is flows.stages.ingest_task) ----------------------


class InputError(ValueError):
    """The input as a whole is unusable (missing file, unknown format): stop with one line."""


def ingest_file(
    store: Store,
    path: Path,
    *,
    decontaminate: bool = True,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> dict[str, int]:
    """Ingest one file into the store (idempotent: the same bytes are skipped on a rerun)."""
    if not path.is_file():
        raise InputError(f"instructions file not found: {path}")
    source = str(path.resolve())
    digest = sha256_file(path)
    previous = store.source_file(source)
    if previous is not None and previous.sha256 == digest:
        return {"records": previous.records, "accepted": 0, "rejected": 0, "skipped_file": 1}
    try:
        records = list(read_records(path, max_record_bytes))
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    except Exception as exc:  # a parquet/csv the loader cannot open at all
        raise InputError(f"cannot read {path.name}: {type(exc).__name__}: {exc}") from exc
    decon = Decontaminator.from_files() if decontaminate else None
    result = ingest_records(records, source, store.known_instructions(), decon, max_record_bytes)
    with store.session() as s:
        # A changed file is ingested again: its earlier per-line rejections are replaced.
        for old in s.exec(
            select(Rejection).where(Rejection.stage == "ingest", Rejection.source == source)
        ).all():
            s.delete(old)
        s.add_all(
            Instruction(
                uid=r.uid,
                prompt=r.prompt,
                norm_hash=r.norm_hash,
                length=r.length,
                lang=r.lang,
                source=r.source,
                input_file=source,
                line_no=r.line_no,
            )
            for r in result.instructions
        )
        s.add_all(
            Rejection(
                stage="ingest",
                reason=r.reason,
                detail=r.detail,
                source=source,
                line_no=r.line_no,
                raw=r.raw,
            )
            for r in result.rejections
        )
        s.merge(
            SourceFile(
                path=source,
                sha256=digest,
                records=result.records,
                accepted=len(result.instructions) + result.already_stored,
                rejected=len(result.rejections),
            )
        )
        s.commit()
    return {
        "records": result.records,
        "accepted": len(result.instructions),
        "already_stored": result.already_stored,
        "rejected": len(result.rejections),
        "skipped_file": 0,
    }
