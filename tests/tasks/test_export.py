import json

import datasets
from sqlmodel import select

from storage.models import Instruction, LLMCall, Plan, Rejection, Sample, SampleSignature
from storage.store import Store
from tasks.export import export_store, verify_manifest
from tasks.plan import PlanStep, steps_to_json
from tests.fake_openai import prose


def fill(store: Store, n: int, texts: list[str] | None = None) -> None:
    """n accepted samples (instructions 1..n), each with its plan; `texts[i - 1]` is sample
    i's text when given."""
    store.save(LLMCall(key="k", stage="plan", model="m", prompt_version="plan@x", content="{}"))
    for i in range(1, n + 1):
        store.save(
            Instruction(
                id=i,
                uid=f"u{i}",
                prompt=f"Write {i}",
                norm_hash=f"h{i}",
                source="src",
                status="accepted",
            )
        )
        store.save(
            Plan(
                instruction_id=i,
                call_key="k",
                steps_json=steps_to_json([PlanStep("p", 2000 + i)]),
                n_steps=1,
                total_words=2000 + i,
                prompt_version="plan@x",
            ),
            Sample(
                instruction_id=i,
                # distinct prose: identical texts are near-duplicates, dropped at export
                text=texts[i - 1] if texts else prose(f"sample {i}", 60),
                words=2000 + 1000 * i,
                n_paragraphs=1,
                model="m",
                prompt_version="plan@x,write@y",
            ),
        )


def test_export_shards_manifest_and_datasets_load(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    fill(store, 5)
    out = tmp_path / "out"
    manifest = export_store(store, out, {"min_words": 2000}, shard_size=2)
    assert manifest["counts"] == {
        "samples": 5,
        "shards": 3,
        "words": sum(2000 + 1000 * i for i in range(1, 6)),
    }
    assert verify_manifest(out) == []
    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        f"train-0000{i}-of-00003.parquet" for i in range(3)
    ]
    ds = datasets.load_dataset(
        "parquet", data_files=str(out / "shards" / "*.parquet"), split="train"
    )
    assert len(ds) == 5
    row = ds[0]
    assert row["messages"] == [
        {"role": "user", "content": "Write 1"},
        {"role": "assistant", "content": row["response"]},
    ]
    assert {
        "id",
        "instruction",
        "response",
        "words",
        "plan",
        "model",
        "prompt_version",
        "source",
    } <= set(row)
    assert row["plan"] == [{"main_point": "p", "word_count": 2001}]
    lines = [json.loads(line) for f in sorted((out / "jsonl").iterdir()) for line in f.open()]
    assert [r["id"] for r in lines] == ["u1", "u2", "u3", "u4", "u5"]
    assert manifest["length_histogram"] == {"[2000,4000)": 1, "[4000,8000)": 4}
    assert not list(out.rglob("*.tmp"))

    # A later export with fewer shards replaces the old files, and the manifest matches.
    manifest2 = export_store(store, out, {}, shard_size=10)
    assert manifest2["counts"]["shards"] == 1
    assert verify_manifest(out) == []
    assert [p.name for p in (out / "shards").iterdir()] == ["train-00000-of-00001.parquet"]


def test_verify_manifest_detects_tampering(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    fill(store, 2)
    out = tmp_path / "out"
    export_store(store, out, {})
    shard = next((out / "jsonl").iterdir())
    shard.write_text(shard.read_text() + "{}\n")
    assert any("sha256" in p for p in verify_manifest(out))


def test_empty_store_exports_empty_manifest(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    manifest = export_store(store, tmp_path / "out", {})
    assert manifest["counts"]["samples"] == 0 and manifest["files"] == []


def test_signed_sample_texts_are_what_iter_samples_yields(tmp_path):
    """The near-duplicate pass reads columns, not the rows: the same samples, order, joins (a
    sample without a plan is not exported) and filter (a rejected one neither); the outer
    join to the stored signatures neither drops nor repeats a sample."""
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    fill(store, 7)
    store.save(Instruction(id=8, uid="u8", prompt="p", norm_hash="h8", status="accepted"))
    store.save(
        Sample(
            instruction_id=8, text="no plan", words=2, n_paragraphs=1, model="m", prompt_version="v"
        )
    )
    store.reject(4, "export", "near_duplicate", "test")
    store.save(SampleSignature(instruction_id=2, text_sha1="d", hashvalues=b"x"))
    expected = [(s.instruction_id, i.uid, s.text) for s, i, _ in store.iter_samples()]
    rows = [tuple(r) for r in store.iter_signed_sample_texts(batch_size=2)]
    assert [r[:3] for r in rows] == expected
    assert [r[0] for r in expected] == [1, 2, 3, 5, 6, 7]
    assert [r[3:] for r in rows] == [(None, None), ("d", b"x")] + [(None, None)] * 4


def test_near_duplicates_rejected_at_export_with_their_reason(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    fill(store, 4)
    again = prose("sample 2", 60)  # the text fill gave instruction 2
    store.save(
        Instruction(id=5, uid="u5", prompt="p5", norm_hash="h5", status="accepted"),
        Plan(
            instruction_id=5,
            call_key="k",
            steps_json="[]",
            n_steps=0,
            total_words=0,
            prompt_version="plan@x",
        ),
        Sample(
            instruction_id=5, text=again, words=60, n_paragraphs=1, model="m", prompt_version="v"
        ),
    )
    manifest = export_store(store, tmp_path / "out", {})
    assert manifest["counts"]["samples"] == 4
    stats = store.stats()
    assert stats["rejections"]["export"] == {"near_duplicate": 1}
    with store.session() as s:
        detail = s.exec(select(Rejection.detail).where(Rejection.instruction_id == 5)).one()
    assert detail == "100% alike (MinHash, 5-grams) the sample of instruction u2, which is kept"
