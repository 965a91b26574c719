"""`longwriter train` end to end on CPU: a tiny random Llama trains from a parquet shard (loss
drops, over-long sample skipped and reported, model reloads and generates, GGUF written), and
DPO runs from a pairs file. Offline: the tokenizer is built locally (tests/fixtures_train.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("trl")

from flows.train import add_cli, config_from_args, train_flow  # noqa: E402
from tasks.train.config import TrainConfig  # noqa: E402
from tests.fixtures_train import (  # noqa: E402
    build_small_tokenizer,
    build_tiny_llama,
    sample_records,
    write_pairs,
    write_shards,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("tiny")
    return build_tiny_llama(base / "model", build_small_tokenizer(base / "tok"))


def _artifact_markdown(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    assert arts, f"no artifact {key}"
    return str(sorted(arts, key=lambda a: a.created)[-1].data)


def test_sft_flow_loss_drops_skips_long_sample_and_reloads(
    prefect_api: None, tiny: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_shards(tmp_path / "build", sample_records(24, long_id="too-long"))
    general = tmp_path / "general.jsonl"
    general.write_text(
        "".join(
            json.dumps({"prompt": "Write a short poem about the sea.", "completion": "Waves."})
            + "\n"
            for _ in range(20)
        )
    )
    cfg = TrainConfig(
        data=data,
        out=tmp_path / "model",
        base_model=tiny,
        general=general,
        general_ratio=0.2,
        max_seq_len=160,
        epochs=10,
        lr=3e-3,
        batch_size=4,
        grad_accum=1,
        max_steps=12,
    )
    report = train_flow(cfg)

    losses = [loss for _, loss in report["losses"]]
    assert report["steps"] == 12 and len(losses) == 12
    assert losses[-1] < losses[0] - 1.0, losses  # it learns the repeated samples
    print(f"SFT loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert [s["id"] for s in report["skipped"]] == ["too-long"]
    assert report["mix"]["general_used"] == 6 and report["samples"] == 24 + 6
    assert report["packing"] is False and report["attn_implementation"] == "sdpa"

    md = _artifact_markdown("train-report")
    assert "too-long" in md and "skipped (> 160 tokens) | 1" in md and "## Loss" in md
    assert (cfg.out / "train_report.md").read_text() == md

    # The output reloads with plain transformers and generates.
    tok = AutoTokenizer.from_pretrained(str(cfg.out))
    model = AutoModelForCausalLM.from_pretrained(str(cfg.out))
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "Write a short poem about the sea."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    new = out[0, enc["input_ids"].shape[1] :]
    assert len(new) >= 1
    assert tok.decode(new, skip_special_tokens=True).strip()  # it writes text it was taught
    assert report["gguf"] and Path(report["gguf"]).stat().st_size > 0


def test_dpo_flow_runs_from_pairs(prefect_api: None, tiny: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    pairs = write_pairs(tmp_path / "pairs.jsonl", 8)
    cfg = TrainConfig(
        data=pairs,
        out=tmp_path / "dpo",
        base_model=tiny,
        dpo=True,
        max_seq_len=160,
        lr=1e-3,
        batch_size=2,
        grad_accum=1,
        max_steps=3,
        export_gguf=False,
    )
    report = train_flow(cfg)
    assert report["mode"] == "dpo" and report["steps"] == 3 and report["samples"] == 8
    losses = [loss for _, loss in report["losses"]]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy == reference at step 1
    assert losses[-1] < losses[0]
    AutoModelForCausalLM.from_pretrained(str(cfg.out))


def test_cli_parses_into_train_config(tmp_path: Path) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--general", "g.jsonl",
            "--general-ratio", "0.3", "--lora", "--max-seq-len", "4096", "--epochs", "2",
            "--lr", "1e-4", "--no-gguf",
        ]
    )  # fmt: skip
    cfg = config_from_args(args)
    assert cfg.general_ratio == 0.3 and cfg.lora and cfg.max_seq_len == 4096
    assert cfg.epochs == 2 and cfg.lr == 1e-4 and not cfg.export_gguf and cfg.base_model is None
    assert args.handler.__name__ == "cmd_train"
    bad = parser.parse_args(["train", "--data", "d", "--out", "o", "--general-ratio", "0.5"])
    assert args.handler(bad) == 2  # ratio without --general is refused before any work
