"""The dataset card (OUT/README.md): a build against the fake server leaves a folder that
`datasets.load_dataset(OUT)` loads as is, and whose YAML huggingface_hub's card tools parse
with every field the Hub needs; the body names models, prompts, rejections and quality."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from huggingface_hub import DatasetCard

from flows.build import BuildSettings, build_flow
from flows.cli import main as cli_main
from prompts import PROMPTS_DIR, prompt_version
from storage.store import Store
from tasks.card import _safe_settings, card_markdown, scan_shards, size_category
from tests.conftest import write_jsonl
from tests.fake_openai import FakeConfig, FakeOpenAIServer
from tests.tasks.test_export import fill

SECRET = "sk-card-test-secret-value-9876"


def _artifact_markdown(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    assert arts, f"no artifact {key}"
    return str(sorted(arts, key=lambda a: a.created)[-1].data)


def test_build_folder_is_a_hub_dataset(prefect_api, tmp_path, db_url, monkeypatch):
    monkeypatch.setenv("LW_CARD_TEST_KEY", SECRET)
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"id": f"e{i}", "prompt": f"Write a long report about harbour number {i}"}
            for i in range(3)
        ]
        # (Chinese samples: see test_quality_scores_when_judged_and_no_store's shard)
        + [{"id": "short", "prompt": "Write briefly [[short]]"}],
    )
    out = tmp_path / "out"
    with FakeOpenAIServer(FakeConfig()).running() as fake:
        summary = asyncio.run(
            build_flow(
                settings=BuildSettings(
                    instructions=str(src),
                    db_url=db_url,
                    out_dir=str(out),
                    base_urls=[fake.base_url],
                    model="fake-model",
                    api_key_env="LW_CARD_TEST_KEY",
                    min_words=1000,
                    concurrency=4,
                    context_window=32768,
                    license="cc-by-4.0",
                )
            )
        )
    accepted = summary["accepted"]
    assert accepted == 3, summary

    # Loads with no data_files: the card's `configs` points at the parquet shards only (the
    # jsonl twins would double every sample).
    # (the export's near-duplicate pass may drop some of the fake's look-alike texts: the
    # manifest says how many shipped)
    shipped = json.loads((out / "manifest.json").read_text())["counts"]["samples"]
    # Its own cache: offline (conftest), datasets may answer a local folder named `out` from
    # the newest cached `out` of any earlier run.
    ds = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "hf-cache"))
    assert list(ds) == ["train"] and len(ds["train"]) == shipped >= 1
    assert {r["id"] for r in ds["train"]} <= {"e0", "e1", "e2"}

    card = DatasetCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert meta["license"] == "cc-by-4.0"
    assert meta["language"] == ["en"]
    assert meta["task_categories"] == ["text-generation"]
    assert meta["tags"] == ["synthetic", "long-form", "sft", "longwriter"]
    assert meta["size_categories"] == ["n<1K"]
    assert meta["annotations_creators"] == ["machine-generated"]
    assert meta["pretty_name"]
    assert meta["configs"] == [
        {
            "config_name": "default",
            "data_files": [{"split": "train", "path": "shards/train-*.parquet"}],
        }
    ]
    body = card.text
    assert f"`fake-model` | {shipped}" in body
    for name in ("plan", "write"):
        version = prompt_version(name)
        assert f"#### `{version}`" in body
        # the template's own text, not just its hash
        first_line = (PROMPTS_DIR / f"{name}.j2").read_text().strip().splitlines()[0]
        assert first_line in body
    assert "| filter | too_short | 1 |" in body
    assert "Not judged" in body
    assert "| [" in body and "█" in body  # the length histogram
    assert "load_dataset(" in body and "## Known limitations" in body
    assert '"min_words": 1000' in body  # settings, as recorded
    for f in ("README.md", "report.html", "manifest.json"):
        assert SECRET not in (out / f).read_text(encoding="utf-8")
    # The Prefect summary artifact links to the browsable report.
    assert (out / "report.html").resolve().as_uri() in _artifact_markdown("build-summary")


def test_size_categories():
    assert [size_category(n) for n in (0, 999, 1000, 6000, 10_000, 250_000)] == [
        "n<1K",
        "n<1K",
        "1K<n<10K",
        "1K<n<10K",
        "10K<n<100K",
        "100K<n<1M",
    ]


def test_settings_never_publish_secrets():
    safe = _safe_settings(
        {
            "api_key": "sk-1",
            "hf_token": "hf_x",
            "db_password": "p",
            "api_key_env": "MY_KEY",
            "model": "m",
        }
    )
    assert safe == {"api_key_env": "MY_KEY", "model": "m"}


def _shard_with_quality(out: Path) -> dict:
    (out / "shards").mkdir(parents=True)
    rows = [
        {
            "id": "a",
            "response": "An English text " * 20,
            "quality": {"relevance": 8, "coherence": 6},
        },
        {"id": "b", "response": "一段中文文本" * 20, "quality": {"relevance": 6, "coherence": 9}},
        {"id": "c", "response": "Not judged " * 20, "quality": None},
    ]
    pq.write_table(pa.Table.from_pylist(rows), out / "shards" / "train-00000-of-00001.parquet")
    return {
        "format": "longwriter-6k",
        "created_at": "2024-01-01T00:00:00+00:00",
        "counts": {"samples": 3, "shards": 1, "words": 300},
        "files": [{"path": "shards/train-00000-of-00001.parquet", "records": 3}],
        "length_histogram": {"[0,2000)": 3},
        "models": {"m": 3},
        "prompt_versions": {"plan@gone,write@gone": 3},
        "sources": {"s": 3},
        "settings": {},
    }


def test_quality_scores_when_judged_and_no_store(tmp_path):
    out = tmp_path / "out"
    manifest = _shard_with_quality(out)
    scan = scan_shards(out, manifest)
    assert scan.records == 3 and scan.judged == 2
    assert dict(scan.languages) == {"en": 2, "zh": 1}
    assert scan.quality["relevance"].mean == 7.0 and scan.quality["coherence"].high == 9.0
    card = DatasetCard(card_markdown(out, manifest, None))
    assert card.data.license == "unknown"  # the default: nothing can be inferred
    assert "2 of 3 samples carry judge scores" in card.text
    assert "| relevance | 2 | 7.00 | 6.00 | 8.00 |" in card.text
    assert "exported without its store" in card.text
    assert "The template changed since this version was used" in card.text


def test_cli_export_license(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 's.db'}"
    store = Store(db)
    fill(store, 3)
    store.close()
    out = tmp_path / "out"
    assert cli_main(["export", "--db", db, "--out", str(out), "--license", "apache-2.0"]) == 0
    assert DatasetCard.load(out / "README.md").data.license == "apache-2.0"
    assert json.loads((out / "manifest.json").read_text())["settings"]["license"] == "apache-2.0"
    capsys.readouterr()


@pytest.mark.parametrize("n", [0])
def test_empty_export_still_has_a_card(tmp_path, n):
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    from tasks.export import export_store

    export_store(store, tmp_path / "out", {})
    card = DatasetCard.load(tmp_path / "out" / "README.md")
    assert card.data.size_categories == ["n<1K"] and "| samples | 0 |" in card.text
