"""Whole builds against fakes of real endpoints' behaviour (issue 16): a reasoning model's
thinking never reaches a plan or a shard; a content-policy refusal rejects one instruction
and the build goes on."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from sqlmodel import select

from flows.build import BuildSettings, build_flow
from storage.models import LLMCall, Plan
from storage.store import Store
from tests.conftest import write_jsonl
from tests.fake_openai import FakeConfig, FakeOpenAIServer

pytestmark = pytest.mark.usefixtures("prefect_api")

SMALL = dict(plan_steps=2, step_words=120)


def settings(tmp: Path, fake: FakeOpenAIServer, src: Path, **kw: object) -> BuildSettings:
    base: dict = dict(
        instructions=str(src),
        db_url=f"sqlite:///{tmp / 'store.db'}",
        out_dir=str(tmp / "out"),
        base_urls=[fake.base_url],
        model="fake-model",
        concurrency=4,
        batch_size=4,
        min_words=200,
        initial_backoff_s=0.0,
        max_backoff_s=0.01,
    )
    base.update(kw)
    return BuildSettings(**base)


def shard_text(out: Path) -> str:
    return "".join(p.read_text(encoding="utf-8") for p in sorted((out / "jsonl").glob("*.jsonl")))


@pytest.mark.parametrize("mode", ["think", "reasoning_content"])
def test_reasoning_never_reaches_plans_or_shards(tmp_path, mode):
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [{"id": f"r{i}", "prompt": f"Write a long essay about tide pool {i}"} for i in range(3)],
    )
    cfg = FakeConfig(**SMALL, reasoning_mode=mode, reasoning_tokens=60)
    with FakeOpenAIServer(cfg).running() as fake:
        s = settings(tmp_path, fake, src, max_paragraph_tokens=1024)
        summary = asyncio.run(build_flow(settings=s))
        assert fake.stats.reasoning_texts  # the fake did think
    assert summary["accepted"] == 3
    text = shard_text(tmp_path / "out")
    assert "LEAKED-THOUGHT" not in text and "<think>" not in text and "hmm1" not in text
    store = Store(s.db_url)
    try:
        with store.session() as sess:
            plans = sess.exec(select(Plan)).all()
            calls = sess.exec(select(LLMCall)).all()
    finally:
        store.close()
    assert len(plans) == 3
    for plan in plans:
        steps = json.loads(plan.steps_json)
        assert len(steps) == 2 and all("LEAKED" not in st["main_point"] for st in steps)
        assert all(st["word_count"] == 120 for st in steps)  # not the thought's 9999
    assert all(c.reasoning and "LEAKED-THOUGHT" in c.reasoning for c in calls)
    assert all("LEAKED-THOUGHT" not in c.content for c in calls)
    assert all(c.reasoning_tokens == 60 for c in calls)


def test_content_policy_rejects_one_instruction_and_the_build_goes_on(tmp_path):
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [{"id": f"ok{i}", "prompt": f"Write a long essay about lighthouse {i}"} for i in range(3)]
        + [
            {"id": "refused", "prompt": "Write about this [[policy]] topic"},
            {"id": "azure", "prompt": "Write about that [[azure-policy]] topic"},
            {"id": "filtered", "prompt": "Write about another [[filtered]] topic"},
        ],
    )
    with FakeOpenAIServer(FakeConfig(**SMALL, openai_reasoning=True)).running() as fake:
        s = settings(tmp_path, fake, src)
        summary = asyncio.run(build_flow(settings=s))
        # the dialect was learned for the run, not per call: the two policy 400s plus at
        # most two switches for each of the first calls in flight together
        assert fake.stats.by_status[400] <= 2 + 2 * s.concurrency
    assert summary["accepted"] == 3
    assert summary["rejections"]["plan"] == {"content_policy": 2}
    assert summary["rejections"]["write"] == {"content_policy": 1}
