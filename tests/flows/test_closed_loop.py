"""The factory's loop closed on CPU: build a shard against the fake server -> SFT a tiny random
Llama on it with the train flow -> export GGUF -> serve that GGUF with the embedded llama.cpp
server -> LongBench-Write eval (length score only) against it. And the preference loop: pairs
from the pairs flow -> DPO with the train flow.

The models are random and tiny (tests/fixtures_train.py), so nothing here measures quality:
the point is that every artifact one stage writes is what the next stage reads."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("gguf")

from flows.build import BuildSettings, build_flow  # noqa: E402
from flows.eval import EvalSettings, run_eval_sync  # noqa: E402
from flows.pairs import pairs_flow  # noqa: E402
from flows.train import train_flow  # noqa: E402
from tasks.eval.scoring import length_score  # noqa: E402
from tasks.train.config import TrainConfig  # noqa: E402
from tasks.train.data import read_records  # noqa: E402
from tasks.wordcount import count_words  # noqa: E402
from tests.conftest import write_jsonl  # noqa: E402
from tests.fake_openai import FakeConfig, FakeOpenAIServer  # noqa: E402
from tests.fixtures_train import build_small_tokenizer, build_tiny_llama  # noqa: E402
from tests.flows.test_pairs import (  # noqa: E402
    build_store,
    fake_answer,
    fake_config,
    pairs_settings,
)

pytestmark = pytest.mark.usefixtures("prefect_api")

CONTEXT = 1024  # the tiny Llama's max_position_embeddings


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("tiny")
    return build_tiny_llama(base / "model", build_small_tokenizer(base / "tok"))


@pytest.mark.embedded
def test_build_sft_gguf_serve_eval(tiny: Path, tmp_path: Path, db_url: str) -> None:
    pytest.importorskip("llama_cpp")
    from tasks.llm.llama_server import LlamaServer

    # 1. A tiny shard from the factory: 6 instructions, two 30-word paragraphs each.
    src = write_jsonl(
        tmp_path / "instructions.jsonl",
        [
            {"id": f"i{i}", "prompt": f"Write a short essay about harbour number {i}"}
            for i in range(6)
        ],
    )
    with FakeOpenAIServer(FakeConfig(plan_steps=2, step_words=30)).running() as fake:
        build = asyncio.run(
            build_flow(
                settings=BuildSettings(
                    instructions=str(src),
                    db_url=db_url,
                    out_dir=str(tmp_path / "build"),
                    base_urls=[fake.base_url],
                    model="fake-writer",
                    min_words=20,
                    concurrency=4,
                )
            )
        )
    assert build["accepted"] == 6 and build["shards"] == 1

    # 2. SFT on the build's OUT dir (shards/*.parquet), a few steps; GGUF exported.
    report = train_flow(
        TrainConfig(
            data=tmp_path / "build",
            out=tmp_path / "sft",
            base_model=tiny,
            max_seq_len=CONTEXT,
            lr=3e-3,
            batch_size=3,
            grad_accum=1,
            max_steps=4,
        )
    )
    assert report["samples"] == 6 and report["skipped"] == [] and report["steps"] == 4
    sft_losses = [loss for _, loss in report["losses"]]
    assert sft_losses[-1] < sft_losses[0], sft_losses  # it learned from the shard
    gguf = Path(report["gguf"])
    assert gguf.is_file(), report["gguf_error"]

    # 3. Serve the exported GGUF and run LongBench-Write's length score against it.
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [
            {"prompt": "Write a poem about the sea.", "length": 100, "type": "poem"},
            {"prompt": "Write a story about a lighthouse.", "length": 300, "type": "story"},
            {"prompt": "Write a letter about winter in the city.", "length": 800, "type": "letter"},
        ],
    )
    out = tmp_path / "eval"
    with LlamaServer(model_path=gguf, n_ctx=CONTEXT, model_alias="tiny-sft") as server:
        results = run_eval_sync(
            EvalSettings(
                prompts=str(prompts),
                out_dir=str(out),
                base_urls=[server.base_url],
                model=server.model,
                judge=False,
                max_tokens=48,
                temperature=0.0,
                context_window=CONTEXT,
                concurrency=2,
                request_timeout_s=120.0,
            )
        )
    saved = json.loads((out / "results.json").read_text())
    assert saved["model"] == "tiny-sft" and saved["judged"] is False
    rows = saved["rows"]
    assert [r["length"] for r in rows] == [100, 300, 800]
    answers = {
        a["prompt"]: a["response"]
        for a in map(json.loads, (out / "responses.jsonl").read_text().splitlines())
    }
    for r in rows:
        assert r["generation_status"] == "ok", r
        assert isinstance(r["S_l"], float) and 0.0 <= r["S_l"] <= 100.0
        # The score is LongBench-Write's formula over what this model wrote (the range above
        # holds by construction; this catches a score of the wrong text or length).
        assert r["response_length"] == count_words(answers[r["prompt"]]), r
        assert r["S_l"] == pytest.approx(length_score(r["length"], r["response_length"]), abs=1e-3)
        assert r["S_q"] is None  # --no-judge
    assert results["overall"]["S_l"] == pytest.approx(
        round(sum(r["S_l"] for r in rows) / 3, 3), abs=1e-3
    )
    print(
        "closed loop: S_l per prompt",
        [r["S_l"] for r in rows],
        "output words",
        [r["response_length"] for r in rows],
    )


def test_pairs_flow_feeds_dpo_training(tiny: Path, tmp_path: Path, db_url: str) -> None:
    """Pairs made by the pairs flow (fake writer + fake judge scoring variants differently)
    are what `longwriter train --dpo --data OUT` trains on."""
    out = tmp_path / "pairs"
    with FakeOpenAIServer(fake_config(), answer=fake_answer).running() as fake:
        build_store(tmp_path, db_url, fake.base_url)
        summary = asyncio.run(pairs_flow(settings=pairs_settings(db_url, out, fake.base_url)))
    assert summary["counts"]["pairs"] == 2
    pairs = read_records(out)
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)

    report = train_flow(
        TrainConfig(
            data=out,
            out=tmp_path / "dpo",
            base_model=tiny,
            dpo=True,
            max_seq_len=CONTEXT,
            lr=1e-3,
            batch_size=2,
            grad_accum=1,
            max_steps=3,
            export_gguf=False,
        )
    )
    assert report["mode"] == "dpo" and report["samples"] == 2 and report["skipped"] == []
    assert report["steps"] == 3
    losses = [loss for _, loss in report["losses"]]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at step 1
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses  # the policy moved toward the chosen answers
    print("DPO losses", [round(x, 4) for x in losses], "margins", [p["margin"] for p in pairs])
