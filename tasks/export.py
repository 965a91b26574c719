"""Export accepted samples as LongWriter-6k shards: parquet and jsonl, plus manifest.json,
then the folder's dataset card (README.md) and report.html.

Streaming: samples come from the store in batches and go straight into the open shard
(tasks.shards, the format and its writer), so memory stays flat whatever the dataset size.
Near-duplicate samples are rejected first, so two instructions that produced the same text do
not both ship. Its Prefect task is flows.stages.export_task.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storage.models import SampleSignature, new_row
from storage.store import Store
from tasks.card import write_card_and_report
from tasks.near_duplicates import (
    THRESHOLD,
    find_near_duplicate_signatures,
    from_signature,
    minhash,
    signature,
    text_sha1,
)
from tasks.settings import BUILD

if TYPE_CHECKING:
    from datasketch import MinHash

# The shard format, read from here by its older callers (the CLI, flows, audit, tests).
from tasks.shards import SCHEMA as SCHEMA
from tasks.shards import export_shards, to_record
from tasks.shards import verify_manifest as verify_manifest

# Rows of (instruction id, uid, text, signature) read at a time: memory stays flat, as
# iter_samples'.
TEXT_BATCH = 500


def drop_near_duplicates(store: Store, threshold: float = THRESHOLD) -> int:
    """Reject (stage export, reason near_duplicate) every accepted sample whose text repeats
    an earlier accepted one; the earliest instruction keeps its sample. Returns how many.

    Each sample's MinHash comes from its stored signature when that was computed for the
    sample's text as it is (tasks.signature_worker stores them during the build), else from
    the text; those computed here are stored, so the next export reads them too."""
    uids: dict[int, str] = {}
    computed: list[SampleSignature] = []

    def signatures() -> Iterator[tuple[int, MinHash]]:
        for iid, uid, text, stored_sha1, stored in store.iter_signed_sample_texts(TEXT_BATCH):
            uids[iid] = uid
            digest = text_sha1(text)
            if stored is not None and stored_sha1 == digest:
                try:
                    yield iid, from_signature(stored)
                    continue
                except ValueError:  # a damaged row: computed again below, and replaced
                    pass
            m = minhash(text)
            yield iid, m
            computed.append(
                new_row(
                    SampleSignature, instruction_id=iid, text_sha1=digest, hashvalues=signature(m)
                )
            )

    found = find_near_duplicate_signatures(signatures(), threshold)
    if computed:
        store.save(*computed)
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
    store: Store,
    out_dir: Path,
    settings: dict[str, Any] | None = None,
    shard_size: int = BUILD.shard_size,
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
    write_card_and_report(store, out_dir, manifest)
    return manifest
