"""The build's judge gate against the fake server: scores stored and exported, samples under
--min-quality rejected with their scores, an unscorable sample rejected, nothing re-paid on a
rerun."""

import asyncio
import json
import re
from typing import Any

import pytest

from flows.build import BuildSettings, build_flow
from storage.models import Rejection, Sample
from storage.store import Store
from tasks.eval.scoring import DIMENSIONS
from tasks.quality_gate import quality_record
from tests.conftest import write_jsonl
from tests.fake_openai import FakeConfig, FakeOpenAIServer, default_answer

pytestmark = pytest.mark.usefixtures("prefect_api")


def test_quality_record_is_sq_on_0_100() -> None:
    assert quality_record(dict.fromkeys(DIMENSIONS, 5))["S_q"] == 100.0
    assert quality_record(dict.fromkeys(DIMENSIONS, 1))["S_q"] == 0.0
    mixed = quality_record({**dict.fromkeys(DIMENSIONS, 3), "clarity": 5})
    assert mixed["S_q"] == pytest.approx((50 * 5 + 100) / 6, abs=0.01)


def judged(stage: str, body: dict[str, Any], cfg: FakeConfig) -> str:
    if stage != "judge":
        return default_answer(stage, body, cfg)
    request = re.search(r"<request>\s*(.*?)\s*</request>", body["messages"][-1]["content"], re.S)
    assert request is not None
    if "[[mute]]" in request.group(1):
        return "A fine piece, I would say."
    rating = 2 if "[[dull]]" in request.group(1) else 4
    return json.dumps(dict.fromkeys(DIMENSIONS, rating))


def test_judge_gate_rejects_under_min_quality_and_exports_scores(tmp_path, db_url):
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"id": "good", "prompt": "Write a long report about river number one"},
            {"id": "dull", "prompt": "Write a long report about river two [[dull]]"},
            {"id": "mute", "prompt": "Write a long report about river three [[mute]]"},
        ],
    )
    with FakeOpenAIServer(FakeConfig(), answer=judged).running() as fake:
        settings = BuildSettings(
            instructions=str(src),
            db_url=db_url,
            out_dir=str(tmp_path / "out"),
            base_urls=[fake.base_url],
            model="writer",
            min_quality=50,
        )
        summary = asyncio.run(build_flow(settings=settings))
        judge_calls = fake.stats.by_stage["judge"]
        again = asyncio.run(build_flow(settings=settings))
        assert fake.stats.by_stage["judge"] == judge_calls  # nothing judged twice
    assert summary["accepted"] == again["accepted"] == 1
    assert summary["rejections"]["judge"] == {"low_quality": 1, "unjudged": 1}
    store = Store(db_url)
    with store.session() as s:
        (low,) = s.query(Rejection).filter(Rejection.reason == "low_quality").all()
        assert "S_q 25.0 under 50" in low.detail and "clarity 2" in low.detail
        scored = {
            r.instruction_id: json.loads(r.quality_json) for r in s.query(Sample) if r.quality_json
        }
    store.close()
    assert sorted(q["S_q"] for q in scored.values()) == [25.0, 75.0]
    (shard,) = (tmp_path / "out" / "jsonl").iterdir()
    (record,) = [json.loads(line) for line in shard.open()]
    assert record["id"] == "good" and record["quality"]["S_q"] == 75.0
    assert record["quality"]["relevance"] == 4.0
