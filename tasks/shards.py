"""The shard format and its files: the LongWriter-6k record with the factory's fields, the
parquet + jsonl shards and manifest.json written from a stream of records, the manifest check,
and one streaming read of the shards back (what the card and the report need).

Streaming: records go straight into the open shard, so memory stays flat whatever the dataset
size. Atomic: every file is written under a temporary name and renamed into place; the
manifest (counts, sha256 of every file, histogram, prompt versions, models, settings) is
written last, so a reader that trusts the manifest never sees a half-written shard. Files of
an earlier export that the new manifest does not list are removed after the manifest is in
place.

No store here and no card or report: tasks.export (the store's samples in), tasks.card and
tasks.report_html (the folder's README.md and report.html) and tasks.audit (its kept records)
all build on this module, which imports none of them.
"""

from __future__ import annotations

import io
import json
import math
import os
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from storage.models import Instruction, Plan, Sample
from tasks.eval.scoring import DIMENSIONS
from tasks.files import atomic_write_text, sha256_file
from tasks.plan import steps_from_json
from tasks.settings import BUILD
from tasks.wordcount import detect_lang

SCHEMA = pa.schema(
    [
        pa.field(
            "messages",
            pa.list_(pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])),
        ),
        pa.field("id", pa.string()),
        pa.field("instruction", pa.string()),
        pa.field("response", pa.string()),
        pa.field("words", pa.int64()),
        pa.field(
            "plan",
            pa.list_(
                pa.struct([pa.field("main_point", pa.string()), pa.field("word_count", pa.int64())])
            ),
        ),
        pa.field("model", pa.string()),
        pa.field("prompt_version", pa.string()),
        pa.field("source", pa.string()),
        # Judge scores when the build had a judge gate (six 1-5 ratings and S_q, 0-100);
        # null otherwise.
        pa.field(
            "quality",
            pa.struct([pa.field(d, pa.float64()) for d in (*DIMENSIONS, "S_q")]),
            nullable=True,
        ),
        # S_l against the instruction's required length; null when it gives none.
        pa.field("length_score", pa.float64(), nullable=True),
    ]
)
HISTOGRAM_EDGES = (0, 2000, 4000, 8000, 16000, 32000)


def to_record(sample: Sample, inst: Instruction, plan: Plan) -> dict[str, Any]:
    """One LongWriter-6k record (`messages`) with the factory's extra fields."""
    return {
        "messages": [
            {"role": "user", "content": inst.prompt},
            {"role": "assistant", "content": sample.text},
        ],
        "id": inst.uid,
        "instruction": inst.prompt,
        "response": sample.text,
        "words": sample.words,
        "plan": [
            {"main_point": s.main_point, "word_count": s.word_count}
            for s in steps_from_json(plan.steps_json)
        ],
        "model": sample.model,
        "prompt_version": sample.prompt_version,
        "source": inst.source,
        "quality": json.loads(sample.quality_json) if sample.quality_json else None,
        "length_score": sample.length_score,
    }


def histogram_bucket(words: int) -> str:
    for lo, hi in zip(HISTOGRAM_EDGES, HISTOGRAM_EDGES[1:], strict=False):
        if lo <= words < hi:
            return f"[{lo},{hi})"
    return f"[{HISTOGRAM_EDGES[-1]},inf)"


# The batch's jsonl lines parsed by Arrow's JSON reader against SCHEMA: the same table as
# pa.Table.from_pylist(batch, schema=SCHEMA), one chunk per column as that gives (so the same
# parquet bytes), from text the jsonl twin is written from anyway. Any conversion of Python
# objects (from_pylist, pa.array) makes pyarrow import pandas, ~0.35 s of CPU and a full
# garbage collection that a build needs nowhere else, and is slower than the C++ reader.
_JSON_PARSE = pa_json.ParseOptions(explicit_schema=SCHEMA, unexpected_field_behavior="ignore")
# Integers a float64 column holds exactly: from_pylist refuses a larger one, JSON would round.
_EXACT_INT = 2**53


def _exact_in_json(rec: dict[str, Any]) -> bool:
    """False when a float column holds a value its JSON text does not give back exactly: a
    NaN (json writes any NaN as "NaN", its sign and payload lost), an infinity, or an int
    JSON would round where from_pylist raises. Such a batch takes from_pylist."""
    values = [rec.get("length_score")]
    quality = rec.get("quality")
    if isinstance(quality, dict):
        values += quality.values()
    for v in values:
        if (type(v) is float and not math.isfinite(v)) or (type(v) is int and abs(v) > _EXACT_INT):
            return False
    return True


def _arrow_table(batch: list[dict[str, Any]], lines: str) -> pa.Table:
    """The batch as an Arrow table of SCHEMA. from_pylist where the JSON route could differ:
    a float JSON does not give back (_exact_in_json), text UTF-8 cannot hold (a lone
    surrogate), a value Arrow's reader refuses where from_pylist may convert it (12.0 for
    an int)."""
    if all(map(_exact_in_json, batch)):
        try:
            data = lines.encode("utf-8")
            table = pa_json.read_json(
                io.BytesIO(data),
                read_options=pa_json.ReadOptions(use_threads=False, block_size=max(len(data), 1)),
                parse_options=_JSON_PARSE,
            )
        except (UnicodeEncodeError, pa.ArrowInvalid):
            pass
        else:
            if table.schema.equals(SCHEMA) and table.num_rows == len(batch):
                return table.combine_chunks()
    return pa.Table.from_pylist(batch, schema=SCHEMA)


@dataclass
class _Shard:
    """One parquet shard and its jsonl twin, open under temporary names."""

    index: int
    out_dir: Path
    total: int
    records: int = 0
    _pq: pq.ParquetWriter | None = None
    _jsonl: Any = None
    _tmp: list[tuple[Path, Path]] = field(default_factory=list)

    def name(self, ext: str) -> str:
        return f"train-{self.index:05d}-of-{self.total:05d}.{ext}"

    def open(self) -> None:
        token = uuid.uuid4().hex
        pq_final = self.out_dir / "shards" / self.name("parquet")
        js_final = self.out_dir / "jsonl" / self.name("jsonl")
        pq_tmp = pq_final.with_name(f".{pq_final.name}.{token}.tmp")
        js_tmp = js_final.with_name(f".{js_final.name}.{token}.tmp")
        self._tmp = [(pq_tmp, pq_final), (js_tmp, js_final)]
        self._pq = pq.ParquetWriter(pq_tmp, SCHEMA, compression="zstd")
        self._jsonl = js_tmp.open("w", encoding="utf-8")

    def write(self, batch: list[dict[str, Any]]) -> None:
        assert self._pq is not None
        lines = "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in batch)
        self._pq.write_table(_arrow_table(batch, lines))
        self._jsonl.write(lines)
        self.records += len(batch)

    def close(self) -> list[dict[str, Any]]:
        assert self._pq is not None
        self._pq.close()
        self._jsonl.close()
        files = []
        for tmp, final in self._tmp:
            os.replace(tmp, final)
            files.append(
                {
                    "path": str(final.relative_to(self.out_dir)),
                    "sha256": sha256_file(final),
                    "bytes": final.stat().st_size,
                    "records": self.records,
                }
            )
        return files


def _batched(rows: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for r in rows:
        batch.append(r)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def export_shards(
    records: Iterable[dict[str, Any]],
    total: int,
    out_dir: Path,
    *,
    shard_size: int = BUILD.shard_size,
    settings: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    write_batch: int = 200,
) -> dict[str, Any]:
    """Write `total` records (streamed) into shards of `shard_size`; return the manifest.
    `settings` must already be free of secrets (the caller builds it from a redacted view)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "shards").mkdir(exist_ok=True)
    (out_dir / "jsonl").mkdir(exist_ok=True)
    n_shards = max(1, -(-total // shard_size)) if total else 0
    files: list[dict[str, Any]] = []
    hist: Counter[str] = Counter()
    models: Counter[str] = Counter()
    versions: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    words_total = 0
    count = 0
    shard: _Shard | None = None
    for batch in _batched(records, write_batch):
        for rec in batch:
            hist[histogram_bucket(rec["words"])] += 1
            models[rec["model"]] += 1
            versions[rec["prompt_version"]] += 1
            sources[rec["source"]] += 1
            words_total += rec["words"]
        pos = 0
        while pos < len(batch):
            if shard is None:
                shard = _Shard(len(files) // 2, out_dir, n_shards)
                shard.open()
            room = shard_size - shard.records
            part = batch[pos : pos + room]
            shard.write(part)
            pos += len(part)
            count += len(part)
            if shard.records >= shard_size:
                files += shard.close()
                shard = None
    if shard is not None:
        files += shard.close()
    if count != total:
        raise RuntimeError(f"export expected {total} samples, streamed {count}")
    manifest = {
        "format": "longwriter-6k",
        "created_at": datetime.now(UTC).isoformat(),
        "counts": {"samples": count, "shards": n_shards, "words": words_total},
        "files": files,
        "length_histogram": dict(sorted(hist.items(), key=lambda kv: _bucket_key(kv[0]))),
        "models": dict(models),
        "prompt_versions": dict(versions),
        "sources": dict(sources),
        "settings": settings or {},
        **(extra or {}),
    }
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False))
    keep = {f["path"] for f in files}
    for sub in ("shards", "jsonl"):
        for p in (out_dir / sub).iterdir():
            rel = str(p.relative_to(out_dir))
            if rel not in keep and (p.name.startswith("train-") or p.name.endswith(".tmp")):
                p.unlink(missing_ok=True)
    return manifest


def _bucket_key(bucket: str) -> int:
    return int(bucket[1:].split(",")[0])


def verify_manifest(out_dir: Path) -> list[str]:
    """Problems found when checking the files against manifest.json (empty list: all good)."""
    manifest = json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
    problems = []
    per_format: Counter[str] = Counter()
    for f in manifest["files"]:
        p = out_dir / f["path"]
        if not p.exists():
            problems.append(f"missing {f['path']}")
            continue
        if sha256_file(p) != f["sha256"]:
            problems.append(f"sha256 mismatch {f['path']}")
        per_format[p.suffix] += f["records"]
    for ext, n in per_format.items():
        if n != manifest["counts"]["samples"]:
            problems.append(
                f"{ext} files hold {n} records, manifest says {manifest['counts']['samples']}"
            )
    return problems


# -- reading the shards back ------------------------------------------------------------------

LANG_PREFIX_CHARS = 4000  # language of a sample: its opening is enough, and cheap


@dataclass
class QualityStat:
    """One numeric quality dimension over the judged samples."""

    n: int = 0
    total: float = 0.0
    low: float = float("inf")
    high: float = float("-inf")

    def add(self, x: float) -> None:
        self.n += 1
        self.total += x
        self.low = min(self.low, x)
        self.high = max(self.high, x)

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0


def numeric_leaves(value: Any, prefix: str = "") -> list[tuple[str, float]]:
    """`quality` may be a number or a (nested) dict of numbers; its shape is the judge's, so
    every numeric leaf is a dimension, named by its dotted path."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int | float):
        return [(prefix or "quality", float(value))]
    if isinstance(value, dict):
        out: list[tuple[str, float]] = []
        for k, v in value.items():
            out += numeric_leaves(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return []


@dataclass
class ShardScan:
    """What the card and the report need that the manifest does not hold."""

    records: int = 0
    languages: Counter[str] = field(default_factory=Counter)
    judged: int = 0
    quality: dict[str, QualityStat] = field(default_factory=dict)


def parquet_files(out_dir: Path, manifest: dict[str, Any]) -> list[Path]:
    return [
        out_dir / f["path"] for f in manifest.get("files", []) if f["path"].endswith(".parquet")
    ]


def scan_shards(out_dir: Path, manifest: dict[str, Any], batch_size: int = 256) -> ShardScan:
    """Stream the parquet shards once (two columns, batch by batch: flat memory)."""
    scan = ShardScan()
    for path in parquet_files(out_dir, manifest):
        pf = pq.ParquetFile(path)
        # The `quality` field exists only when the build judged its samples (issue 15).
        cols = ["response"] + (["quality"] if "quality" in pf.schema_arrow.names else [])
        for batch in pf.iter_batches(batch_size=batch_size, columns=cols):
            rows = batch.to_pylist()
            for row in rows:
                scan.records += 1
                scan.languages[detect_lang((row["response"] or "")[:LANG_PREFIX_CHARS])] += 1
                leaves = numeric_leaves(row.get("quality"))
                if leaves:
                    scan.judged += 1
                for name, x in leaves:
                    scan.quality.setdefault(name, QualityStat()).add(x)
    return scan
