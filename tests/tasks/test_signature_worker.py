"""The signature worker (tasks.signature_worker): a real spawned process computes each stored
sample's signature beside the filter stage, the export reads it, and the export's verdicts
and shards are those it gives with no stored signature at all."""

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

from sqlmodel import select

from storage.models import Rejection, Sample, SampleSignature
from storage.store import Store
from tasks.export import drop_near_duplicates, export_store
from tasks.filters import filter_instruction, written_instructions
from tasks.near_duplicates import from_signature, minhash, text_sha1, text_signature
from tasks.runtime import Progress
from tasks.signature_worker import SignatureWorker
from tests.tasks.test_export import fill
from tests.tasks.test_filters import CFG, written_store
from tests.tasks.test_near_duplicates import replace_words, sample


def accepted_store(path: Path, texts: list[str]) -> Store:
    """Accepted samples with these texts, instructions 1..n, and no stored signature."""
    store = Store(f"sqlite:///{path}")
    fill(store, len(texts), texts)
    return store


def signatures(store: Store) -> dict[int, tuple[str, bytes]]:
    with store.session() as s:
        return {
            r.instruction_id: (r.text_sha1, r.hashvalues) for r in s.exec(select(SampleSignature))
        }


def outcome(store: Store) -> list[tuple[int, str, str]]:
    with store.session() as s:
        rows = s.exec(select(Rejection).order_by(Rejection.instruction_id)).all()
        return [(r.instruction_id, r.reason, r.detail) for r in rows]


def test_filter_stage_stores_each_accepted_samples_signature(tmp_path):
    store = written_store(tmp_path / "s.db")

    async def run() -> SignatureWorker:
        async with SignatureWorker(store) as worker:
            rt = SimpleNamespace(
                store=store,
                config=SimpleNamespace(filters=CFG),
                progress=Progress(),
                client=SimpleNamespace(model="m"),
                signatures=worker,
            )
            for state in written_instructions(rt, [1, 2, 3, 4]):
                await filter_instruction(rt, state)
        return worker

    worker = asyncio.run(run())
    stored = signatures(store)
    with store.session() as s:
        texts = {x.instruction_id: x.text for x in s.exec(select(Sample))}
    assert sorted(stored) == sorted(texts) == [1, 4]  # the accepted ones, English and Chinese
    assert worker.stored == 2 and not worker.failed
    for iid, text in texts.items():
        assert stored[iid] == text_signature(text)
        assert stored[iid][0] == text_sha1(text)
        assert (from_signature(stored[iid][1]).hashvalues == minhash(text).hashvalues).all()


def test_export_verdicts_and_shards_equal_with_and_without_stored_signatures(tmp_path):
    base = sample("base")
    texts = [
        base,
        sample("other"),
        replace_words(base, 0.01, 1),  # a near-duplicate of 1
        sample("zh", chinese=True),
        sample("third"),
    ]
    plain = accepted_store(tmp_path / "plain.db", texts)
    signed = accepted_store(tmp_path / "signed.db", texts)
    stale = accepted_store(tmp_path / "stale.db", texts)

    async def sign(store: Store, given: dict[int, str]) -> None:
        async with SignatureWorker(store) as worker:
            for iid, text in given.items():
                worker.submit(iid, text)

    asyncio.run(sign(signed, dict(enumerate(texts, 1))))
    # Signatures of other texts (an earlier version of each sample): never used.
    asyncio.run(sign(stale, {i: sample(f"old{i}") for i in range(1, 6)}))
    assert len(signatures(signed)) == 5

    manifests = [export_store(s, tmp_path / name) for s, name in [(plain, "a"), (signed, "b")]]
    manifests.append(export_store(stale, tmp_path / "c"))
    rejections = [outcome(s) for s in (plain, signed, stale)]
    assert rejections[0] == rejections[1] == rejections[2]
    assert [(r[0], r[1]) for r in rejections[0]] == [(3, "near_duplicate")]
    assert "instruction u1" in rejections[0][0][2]
    assert [m["counts"] for m in manifests] == [manifests[0]["counts"]] * 3
    rows = [
        [json.loads(line) for f in sorted((tmp_path / d / "jsonl").iterdir()) for line in f.open()]
        for d in "abc"
    ]
    assert rows[0] == rows[1] == rows[2] and len(rows[0]) == 4
    # The export stored what it computed, for the stale texts too: the next one reads them.
    for store in (plain, stale):
        assert signatures(store) == {i: text_signature(t) for i, t in enumerate(texts, 1)}


def test_a_damaged_stored_signature_is_computed_again(tmp_path):
    base = sample("base")
    store = accepted_store(tmp_path / "s.db", [base, base])
    store.save(SampleSignature(instruction_id=2, text_sha1=text_sha1(base), hashvalues=b"\0" * 7))
    assert drop_near_duplicates(store) == 1
    assert signatures(store)[2] == text_signature(base)


def test_a_worker_that_cannot_start_fails_nothing(tmp_path, monkeypatch):
    """A cache: a worker that died leaves the build going and the export computing."""
    store = accepted_store(tmp_path / "s.db", [sample("a")])

    def broken(self):  # noqa: ANN001
        raise OSError("no process for you")

    monkeypatch.setattr(SignatureWorker, "_executor", broken)

    async def run() -> SignatureWorker:
        async with SignatureWorker(store) as worker:
            worker.submit(1, sample("a"))
            await asyncio.sleep(0)
        worker.submit(1, sample("a"))  # after a failure: nothing more is sent
        return worker

    worker = asyncio.run(run())
    assert worker.failed and worker.stored == 0 and signatures(store) == {}
    assert drop_near_duplicates(store) == 0
    assert list(signatures(store)) == [1]
