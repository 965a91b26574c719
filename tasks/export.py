"""Export accepted samples as LongWriter-6k shards: parquet and jsonl, plus manifest.json.

Streaming: samples come from the store in batches and go straight into the open shard, so
memory stays flat whatever the dataset size. Atomic: every file is written under a temporary
name and renamed into place; the manifest (counts, sha256 of every file, histogram, prompt
versions, models, settings) is written last, so a reader that trusts the manifest never sees
a half-written shard. Files of an earlier export that the new manifest does not list are
removed after the manifest is in place.
"""

from __future__ import annotations

import json
import os
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.models import Instruction, Plan, Sample
from tasks.files import atomic_write_text, sha256_file
from tasks.plan import steps_from_json
from tasks.scoring import DIMENSIONS

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
        self._pq.write_table(pa.Table.from_pylist(batch, schema=SCHEMA))
        for rec in batch:
            self._jsonl.write(json.dumps(rec, ensure_ascii=False) + "\n")
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
    shard_size: int = 1000,
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


# -- stage over the store (thin) ------------------------------------------------------------
from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from storage.store import Store  # noqa: E402
from tasks.near_duplicates import THRESHOLD, find_near_duplicates  # noqa: E402


def drop_near_duplicates(store: Store, threshold: float = THRESHOLD) -> int:
    """Reject (stage export, reason near_duplicate) every accepted sample whose text repeats
    an earlier accepted one; the earliest instruction keeps its sample. Returns how many."""
    uids: dict[int, str] = {}

    def texts() -> Iterator[tuple[int, str]]:
        for sample, inst, _plan in store.iter_samples():
            uids[sample.instruction_id] = inst.uid
            yield sample.instruction_id, sample.text

    found = find_near_duplicates(texts(), threshold)
    for dup in found:
        store.reject(
            dup.key,
            "export",
            "near_duplicate",
            f"{dup.similarity:.0%} alike (MinHash, 5-grams) the sample of instruction "
            f"{uids.get(dup.of, dup.of)}, which is kept",
        )
    return len(found)


def export_store(
    store: Store, out_dir: Path, settings: dict[str, Any] | None = None, shard_size: int = 1000
) -> dict[str, Any]:
    """Stream every accepted sample from the store into shards + manifest. Near-duplicate
    samples (MinHash) are rejected first, so two instructions that produced the same text do
    not both ship."""
    drop_near_duplicates(store)
    total = store.stats()["samples"]["accepted"]
    records = (to_record(s, i, p) for s, i, p in store.iter_samples())
    manifest = export_shards(
        records,
        total,
        out_dir,
        shard_size=shard_size,
        settings=settings,
        extra={"store": store.redacted_url},
    )
    # After the manifest: the Hub card (README.md) and report.html describe the shards it lists.
    from tasks.card import write_card_and_report

    write_card_and_report(store, out_dir, manifest)
    return manifest


@task(name="export", cache_policy=NO_CACHE, persist_result=False)
def export_task(
    db_url: str, out_dir: str, settings: dict[str, Any] | None = None, shard_size: int = 1000
) -> dict[str, Any]:
    store = Store(db_url)
    try:
        return export_store(store, Path(out_dir), settings, shard_size)
    finally:
        store.close()
