"""The build's optional judge gate: every accepted sample is scored on the six
LongBench-Write dimensions by the same judge code as `longwriter eval` (tasks.eval.judge), the
scores are stored on the sample (and exported as its `quality` field), and a sample whose
S_q is under `--min-quality` is rejected with its scores.

S_q is LongBench-Write's quality score on a 0-100 scale: each 1-5 rating maps to
(rating - 1) * 25 and S_q is their mean. A sample the judge could not score (no parseable
answer within its attempts) is rejected too: a gate that could not look must not pass it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from storage.models import Sample
from tasks.eval.judge import judge_answer
from tasks.eval.scoring import DIMENSIONS, dimension_score
from tasks.runtime import BuildRuntime, Stage

# The gate's settings; defined where no stage is imported (the runtime holds one), read from
# here too.
from tasks.stage_config import JudgeGate as JudgeGate


@dataclass
class GateVerdict:
    """What `tasks.eval.judge.judge_answer` fills for one sample."""

    status: str = "pending"
    scores_json: str | None = None
    raw: str | None = None
    error: str | None = None
    truncated: bool = False
    attempts: int = 0
    call_keys: str = ""


def quality_record(ratings: dict[str, float]) -> dict[str, float]:
    """The six 1-5 ratings plus S_q (0-100): what the shard's `quality` field holds."""
    record = {d: float(ratings[d]) for d in DIMENSIONS}
    record["S_q"] = round(sum(dimension_score(ratings[d]) for d in DIMENSIONS) / len(DIMENSIONS), 2)
    return record


async def judge_sample(rt: BuildRuntime, sample: Sample, prompt: str) -> bool:
    """Score one accepted sample; store the scores, or reject it. True when it passes."""
    gate = rt.judge_gate
    judge = rt.judge_client or rt.client
    assert gate is not None
    verdict = GateVerdict()
    await judge_answer(
        verdict,
        prompt,
        sample.text,
        store=rt.store,
        client=judge,
        progress=rt.progress,
        slots=rt.judge_slots,
        formats=gate,
        attempts=gate.attempts,
        max_tokens=gate.max_tokens,
        temperature=gate.temperature,
        context_window=gate.context_window,
    )
    iid = sample.instruction_id
    if verdict.status != "scored" or verdict.scores_json is None:
        rt.store.reject(iid, "judge", "unjudged", verdict.error or "no score", raw=verdict.raw)
        return False
    quality = quality_record(json.loads(verdict.scores_json))
    sample.quality_json = json.dumps(quality, sort_keys=True)
    if quality["S_q"] < gate.min_quality:
        rt.store.save(sample)
        scores = ", ".join(f"{d} {quality[d]:g}" for d in DIMENSIONS)
        rt.store.reject(
            iid,
            "judge",
            "low_quality",
            f"S_q {quality['S_q']:.1f} under {gate.min_quality:g} ({scores}; judge {judge.model})",
        )
        return False
    rt.store.save(sample)
    return True


def unjudged_samples(rt: BuildRuntime, instruction_ids: list[int]) -> list[tuple[Sample, str]]:
    """The batch's accepted samples not scored yet, with their instructions (none without
    a gate)."""
    if rt.judge_gate is None:
        return []
    return rt.store.unjudged_samples(instruction_ids)


async def _judge_one(rt: BuildRuntime, todo: tuple[Sample, str]) -> bool:
    passed = await judge_sample(rt, *todo)
    if not passed:  # it had been counted accepted by the filter
        rt.progress.accepted -= 1
        rt.progress.rejected += 1
    return passed


# Judge the accepted, not yet scored samples of a batch; counts the ones that pass.
JUDGE_GATE_STAGE = Stage("judge", BuildRuntime, unjudged_samples, _judge_one)
