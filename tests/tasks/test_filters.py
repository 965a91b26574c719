import asyncio
from types import SimpleNamespace

import pytest
from sqlmodel import select

from storage.models import Instruction, LLMCall, Paragraph, Plan, Rejection, Sample
from storage.store import Store
from tasks.filters import (
    FilterConfig,
    SampleCandidate,
    filter_instruction,
    repetition_share,
    run_filters,
    written_instructions,
)
from tasks.plan import PlanStep, steps_to_json
from tasks.runtime import Progress, gather_all
from tasks.wordcount import count_words
from tests.fake_openai import prose


def cand(paragraphs, planned=None, truncated=()):
    return SampleCandidate(
        text="\n\n".join(paragraphs),
        paragraphs=list(paragraphs),
        planned_steps=len(paragraphs) if planned is None else planned,
        truncated_steps=list(truncated),
    )


GOOD = [prose(f"seed{i}", 500) for i in range(5)]
CFG = FilterConfig(min_words=2000)


def test_good_sample_is_kept():
    assert run_filters(cand(GOOD), CFG).keep


@pytest.mark.parametrize(
    ("candidate", "reason"),
    [
        (cand(["", *GOOD[1:]]), "empty"),
        (cand([*GOOD[:4], GOOD[4] + " Max tries. Failed."]), "error_text"),
        (cand([*GOOD[:4], "Traceback (most recent call last):\n File x"]), "error_text"),
        (cand(["I'm sorry, but I can't write that.", *GOOD[1:]]), "refusal"),
        (cand(["As an AI language model, I cannot", *GOOD[1:]]), "refusal"),
        (cand(["抱歉，我无法完成这个请求。", *GOOD[1:]]), "refusal"),
        (cand(GOOD, truncated=[3]), "truncated"),
        (cand(GOOD, planned=6), "paragraph_count"),
        (cand(GOOD[:2]), "too_short"),
        (cand(["the cat sat on the mat and then it sat again " * 60] * 5), "repetition"),
    ],
)
def test_each_filter_rejects_with_reason(candidate, reason):
    verdict = run_filters(candidate, CFG)
    assert not verdict.keep
    assert verdict.reason == reason
    assert verdict.detail


def test_chinese_sample_counts_characters():
    zh = [prose(f"z{i}", 500, chinese=True) for i in range(5)]
    assert run_filters(cand(zh), CFG).keep
    assert run_filters(cand(zh[:3]), CFG).reason == "too_short"


def test_repetition_share():
    assert repetition_share(prose("x", 3000)) < 0.01
    assert repetition_share("a b c d e f g h i j k l m " * 50) > 0.9
    assert repetition_share("short text") == 0.0


def written_store(path):
    """Four written instructions as the write stage leaves them: kept, too short, error text,
    kept (Chinese)."""
    store = Store(f"sqlite:///{path}")
    texts = {
        1: GOOD,
        2: GOOD[:2],
        3: [*GOOD[:4], GOOD[4] + " Max tries. Failed."],
        4: [prose(f"z{i}", 500, chinese=True) for i in range(5)],
    }
    for i, paragraphs in texts.items():
        steps = [PlanStep(f"point {k}", 500) for k in range(1, len(paragraphs) + 1)]
        store.save(
            Instruction(
                id=i,
                uid=f"u{i}",
                prompt=f"Write {i}",
                norm_hash=f"h{i}",
                length=2500,
                lang="zh" if i == 4 else "en",
                status="written",
            ),
            LLMCall(
                key=f"plan-{i}", stage="plan", model="m", prompt_version="plan@x", content="{}"
            ),
            Plan(
                instruction_id=i,
                call_key=f"plan-{i}",
                steps_json=steps_to_json(steps),
                n_steps=len(steps),
                total_words=2500,
                prompt_version="plan@x",
            ),
        )
        for k, text in enumerate(paragraphs, start=1):
            store.save(
                LLMCall(
                    key=f"w-{i}-{k}",
                    stage="write",
                    model="m",
                    prompt_version="write@y",
                    content=text,
                ),
                Paragraph(
                    instruction_id=i,
                    step=k,
                    call_key=f"w-{i}-{k}",
                    text=text,
                    words=count_words(text),
                    prompt_version="write@y",
                ),
            )
    return store


def outcomes(store):
    with store.session() as s:
        return (
            [(i.id, i.status) for i in s.exec(select(Instruction).order_by(Instruction.id))],
            [
                (r.id, r.stage, r.reason, r.detail, r.instruction_id)
                for r in s.exec(select(Rejection).order_by(Rejection.id))
            ],
            [
                {k: v for k, v in x.model_dump().items() if k != "created_at"}
                for x in s.exec(select(Sample).order_by(Sample.instruction_id))
            ],
        )


def test_filter_stage_batched_writes_store_what_one_transaction_each_stores(tmp_path):
    """The stage writes through the store's batched writer: the rows are those of one
    transaction per sample (each filtered alone, in its own loop)."""
    stores = [written_store(tmp_path / "a.db"), written_store(tmp_path / "b.db")]
    rts = [
        SimpleNamespace(
            store=s,
            config=SimpleNamespace(filters=CFG),
            progress=Progress(),
            client=SimpleNamespace(model="m"),
            signatures=None,
        )
        for s in stores
    ]
    ids = [1, 2, 3, 4]
    for state in written_instructions(rts[0], ids):
        asyncio.run(filter_instruction(rts[0], state))  # alone in its turn: its own commit

    async def stage() -> int:
        done = await gather_all(
            filter_instruction(rts[1], st) for st in written_instructions(rts[1], ids)
        )
        return sum(done)

    assert asyncio.run(stage()) == 2
    assert outcomes(stores[0]) == outcomes(stores[1])
    statuses, rejections, samples = outcomes(stores[1])
    assert [s for _, s in statuses] == ["accepted", "rejected", "rejected", "accepted"]
    assert [r[2] for r in rejections] == ["too_short", "error_text"]
    assert [s["instruction_id"] for s in samples] == [1, 4]
    for rt in rts:
        assert (rt.progress.instructions_done, rt.progress.accepted, rt.progress.rejected) == (
            4,
            2,
            2,
        )
