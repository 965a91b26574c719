"""Lineage, shard -> model -> score: train the tiny model on an exported shard, serve its GGUF
and evaluate it, then follow the chain back from the eval folder and from the model folder
with `longwriter stats --lineage`, every sha256 re-checked (a shard edited after training
shows as CHANGED)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("gguf")

from flows.cli import main as cli_main  # noqa: E402
from flows.eval import EvalSettings, run_eval_sync  # noqa: E402
from flows.train import train_flow  # noqa: E402
from tasks.export import export_store  # noqa: E402
from tasks.files import sha256_file  # noqa: E402
from tasks.lineage import CONFIG_KEY, lineage_chain  # noqa: E402
from tasks.train.config import TrainConfig  # noqa: E402
from tests.conftest import write_jsonl  # noqa: E402
from tests.fixtures_train import build_small_tokenizer, build_tiny_llama  # noqa: E402
from tests.tasks.test_report_html import synthetic_store  # noqa: E402

pytestmark = pytest.mark.usefixtures("prefect_api")
CONTEXT = 1024  # the tiny Llama's max_position_embeddings


@pytest.mark.embedded
def test_shard_to_model_to_score_and_back(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("llama_cpp")
    from huggingface_hub import ModelCard

    from tasks.llm.llama_server import LlamaServer

    # 1. An exported shard with its manifest (the factory's own export, not a hand-made file).
    store = synthetic_store(tmp_path / "s.db", 6, paragraphs=2, words=40)
    build = tmp_path / "build"
    manifest = export_store(store, build, {})
    store.close()
    assert manifest["counts"]["samples"] == 6
    shard = build / "shards" / "train-00000-of-00001.parquet"

    # 2. Train the tiny model on it: the lineage goes into lineage.json, config.json, README.md.
    tiny = build_tiny_llama(tmp_path / "tiny", build_small_tokenizer(tmp_path / "tok"))
    model = tmp_path / "model"
    report = train_flow(
        TrainConfig(
            data=build,
            out=model,
            base_model=tiny,
            max_seq_len=CONTEXT,
            lr=3e-3,
            batch_size=3,
            grad_accum=1,
            max_steps=2,
        )
    )
    assert report["gguf"], report["gguf_error"]
    lin = json.loads((model / "lineage.json").read_text())
    assert lin["data"]["manifest"]["sha256"] == sha256_file(build / "manifest.json")
    assert lin["data"]["files"] == [
        {
            "path": "shards/train-00000-of-00001.parquet",
            "sha256": sha256_file(shard),
            "matches_manifest": True,
        }
    ]
    assert {w["path"] for w in lin["weights"]} == {"model.safetensors", "model.gguf"}
    cfg = json.loads((model / "config.json").read_text())
    assert cfg[CONFIG_KEY]["manifest_sha256"] == lin["data"]["manifest"]["sha256"]
    assert cfg[CONFIG_KEY]["shards"][0]["sha256"] == sha256_file(shard)
    assert sha256_file(shard) in ModelCard.load(model / "README.md").text
    from transformers import AutoConfig

    AutoConfig.from_pretrained(str(model))  # the extra config key does not break loading

    # 3. Evaluate the trained model (its GGUF served by llama.cpp), naming its folder.
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [
            {"prompt": "Write a poem about the sea.", "length": 100, "type": "poem"},
            {"prompt": "Write a story about a lighthouse.", "length": 300, "type": "story"},
        ],
    )
    ev = tmp_path / "eval"
    with LlamaServer(model_path=Path(report["gguf"]), n_ctx=CONTEXT, model_alias="tiny") as srv:
        results = run_eval_sync(
            EvalSettings(
                prompts=str(prompts),
                out_dir=str(ev),
                base_urls=[srv.base_url],
                model=srv.model,
                judge=False,
                max_tokens=32,
                temperature=0.0,
                context_window=CONTEXT,
                concurrency=2,
                request_timeout_s=120.0,
                model_dir=str(model),
            )
        )
    saved = json.loads((ev / "results.json").read_text())
    assert saved["lineage"]["model_dir"] == str(model.resolve())
    assert saved["lineage"]["lineage"] == lin
    assert saved["lineage"]["lineage_sha256"] == sha256_file(model / "lineage.json")
    assert "overall" in saved and "counts" in saved  # existing keys unchanged

    # 4. Follow the chain back: eval -> model -> manifest -> shard, all hashes intact.
    capsys.readouterr()  # the trainer's own prints
    assert cli_main(["stats", "--lineage", str(ev)]) == 0
    chain = capsys.readouterr().out
    print(chain)
    s_l = results["overall"]["S_l"]
    assert chain.splitlines()[0].startswith(f"eval    {(ev / 'results.json').resolve()}")
    assert f"S_l {s_l}" in chain
    assert "(lineage.json ok)" in chain
    assert f"manifest.json sha256 {lin['data']['manifest']['sha256'][:16]}… ok" in chain
    assert f"shards/train-00000-of-00001.parquet sha256 {sha256_file(shard)[:16]}… ok" in chain
    assert cli_main(["stats", "--lineage", str(model)]) == 0
    from_model = capsys.readouterr().out
    assert f"scored  S_l {s_l}" in from_model  # the model folder knows its evaluations
    assert "weights model.gguf" in from_model and "CHANGED" not in from_model

    # A shard edited after training no longer matches what trained the model.
    shard.write_bytes(shard.read_bytes() + b"\0")
    assert any("CHANGED since training" in line for line in lineage_chain(model))


def test_lineage_of_a_folder_without_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "m").mkdir()
    assert cli_main(["stats", "--lineage", str(tmp_path / "m")]) == 0
    assert "no lineage.json" in capsys.readouterr().out
    assert cli_main(["stats", "--lineage", str(tmp_path / "missing")]) == 2
