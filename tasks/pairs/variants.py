"""DPO pairs' stages over the store: write K AgentWrite variants on each stored plan, judge
them, select and export the pairs (see tasks.pairs for the rule)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlmodel import col, select

from prompts import prompt_version
from storage.models import Instruction, InstructionStatus, Plan, Sample
from storage.pair_models import PairDecision, PairJudgement, VariantParagraph, VariantSample
from storage.store import Store
from tasks.eval.judge import judge_answer
from tasks.filters import FilterConfig, SampleCandidate, run_filters
from tasks.flags import derive
from tasks.llm.client import LLMClient
from tasks.pairs.selection import (
    RejectedMode,
    VariantScore,
    export_pairs,
    margin_stats,
    pair_record,
    select_pair,
    variant_score,
)
from tasks.plan import PlanStep, steps_from_json
from tasks.runtime import Progress, Stage
from tasks.settings import PAIRS
from tasks.wordcount import count_words, join_paragraphs
from tasks.write import ContextBudget, DraftFailed, DraftSettings, draft_paragraph

# -- stages over the store (their Prefect tasks are in flows.stages) ----------------------------

# Instructions whose plan is accepted: the build planned them and did not reject them.
ELIGIBLE_STATUSES = (
    InstructionStatus.ACCEPTED,
    InstructionStatus.WRITTEN,
    InstructionStatus.PLANNED,
)


@dataclass
class PairsConfig:
    """What the pair stages read of PairsSettings (flows.pairs derives it in one call)."""

    variants: int = PAIRS.variants
    temperature: float = PAIRS.temperature
    max_paragraph_tokens: int = PAIRS.max_paragraph_tokens
    max_continuations: int = PAIRS.max_continuations
    # Continue a paragraph under this share of its words.
    min_paragraph_share: float = PAIRS.min_paragraph_share
    max_repetition: float = PAIRS.max_repetition
    judge_attempts: int = PAIRS.judge_attempts
    judge_max_tokens: int = PAIRS.judge_max_tokens
    judge_temperature: float = PAIRS.judge_temperature
    judge_context_window: int | None = None
    min_margin: float = PAIRS.min_margin
    rejected: RejectedMode = PAIRS.rejected


@dataclass
class PairsRuntime:
    """What the pair tasks share in one run; tasks get its id (see tasks.runtime)."""

    store: Store
    client: LLMClient
    judge_client: LLMClient
    config: PairsConfig
    judge_format: str
    budget: ContextBudget = field(default_factory=ContextBudget)
    slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(8))
    write_progress: Progress = field(default_factory=Progress)
    judge_progress: Progress = field(default_factory=Progress)
    counts: Counter[str] = field(default_factory=Counter)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def judge_version(self) -> str:
        return prompt_version("judge")


def eligible_ids(store: Store, limit: int | None = None) -> list[int]:
    """Instructions with a stored plan that the build has not rejected, in id order."""
    with store.session() as s:
        q = (
            select(Instruction.id)
            .join(Plan, col(Plan.instruction_id) == col(Instruction.id))
            .where(col(Instruction.status).in_(list(ELIGIBLE_STATUSES)))
            .order_by(col(Instruction.id))
        )
        if limit is not None:
            q = q.limit(limit)
        return [i for i in s.exec(q).all() if i is not None]


@dataclass(frozen=True)
class _Item:
    instruction: Instruction
    steps: list[PlanStep]
    sample: Sample | None


def _load_items(store: Store, ids: list[int]) -> list[_Item]:
    with store.session() as s:
        insts = {i.id: i for i in s.exec(select(Instruction).where(col(Instruction.id).in_(ids)))}
        plans = {
            p.instruction_id: p
            for p in s.exec(select(Plan).where(col(Plan.instruction_id).in_(ids)))
        }
        samples = {
            x.instruction_id: x
            for x in s.exec(select(Sample).where(col(Sample.instruction_id).in_(ids)))
        }
    items = []
    for i in ids:
        if i in insts and i in plans:
            inst = insts[i]
            sample = samples.get(i) if inst.status == InstructionStatus.ACCEPTED else None
            items.append(_Item(inst, steps_from_json(plans[i].steps_json), sample))
    return items


def variant_filter_reason(
    paragraphs: list[str], planned: int, truncated: list[int], cfg: PairsConfig
) -> str | None:
    """The first quality filter a variant fails, None when clean. The build's length floor is
    left out: length is what S_l scores."""
    verdict = run_filters(
        SampleCandidate(join_paragraphs(paragraphs), paragraphs, planned, truncated),
        derive(FilterConfig, cfg, min_words=0),
    )
    return None if verdict.keep else verdict.reason


def _ensure_original(rt: PairsRuntime, item: _Item) -> None:
    """Variant 0: the accepted build sample, copied so every candidate is judged alike."""
    inst = item.instruction
    if item.sample is None or inst.id is None:
        return
    with rt.store.session() as s:
        if s.get(VariantSample, (inst.id, 0)) is not None:
            return
    rt.store.save(
        VariantSample(
            instruction_id=inst.id,
            variant=0,
            origin="build",
            text=item.sample.text,
            words=item.sample.words,
            n_paragraphs=item.sample.n_paragraphs,
            model=item.sample.model,
        )
    )


def _variant_affinity(item: _Item, variant: int) -> str:
    # Each variant has its own text so far: its calls share a prefix with each other only.
    return f"instruction:{item.instruction.id}:variant:{variant}"


async def _write_paragraph(
    rt: PairsRuntime, item: _Item, variant: int, written: list[str], step: int
) -> VariantParagraph | str:
    """Paragraph `step` of one variant, drafted exactly as the build drafts paragraphs
    (continued when cut or short, ended at a sentence when still cut) so that chosen and
    rejected differ by sampling only; stored. Or the reason it could not be written."""
    inst = item.instruction
    assert inst.id is not None
    cfg = rt.config
    settings = derive(DraftSettings, cfg)
    try:
        draft = await draft_paragraph(
            rt,
            inst,
            item.steps,
            written,
            step,
            settings,
            rt.write_progress,
            seed=variant,
            affinity=_variant_affinity(item, variant),
        )
    except DraftFailed as exc:
        return f"{exc.reason}: {exc.detail}"
    para = VariantParagraph(
        instruction_id=inst.id,
        variant=variant,
        step=step,
        call_key=draft.call_key,
        continuation_keys=",".join(draft.continuation_keys),
        text=draft.text,
        words=draft.words,
        truncated=draft.truncated,
        prompt_version=draft.prompt_version,
    )
    rt.store.save(para)  # committed as it finishes: a crash loses at most calls in flight
    return para


async def write_variant(rt: PairsRuntime, item: _Item, variant: int) -> VariantSample:
    """The stored variant, or write its missing paragraphs in order and store it (a variant
    that cannot be written is stored as `failed` with the reason)."""
    inst = item.instruction
    assert inst.id is not None
    with rt.store.session() as s:
        existing = s.get(VariantSample, (inst.id, variant))
        paras = list(
            s.exec(
                select(VariantParagraph)
                .where(
                    VariantParagraph.instruction_id == inst.id,
                    VariantParagraph.variant == variant,
                )
                .order_by(col(VariantParagraph.step))
            ).all()
        )
    if existing is not None:
        rt.counts["variants_reused"] += 1
        return existing
    row = VariantSample(
        instruction_id=inst.id,
        variant=variant,
        model=rt.client.model,
        temperature=rt.config.temperature,
        seed=variant,
    )
    async with rt.slots:
        for step in range(len(paras) + 1, len(item.steps) + 1):
            got = await _write_paragraph(rt, item, variant, [p.text for p in paras], step)
            if isinstance(got, str):
                row.status, row.error = "failed", got
                break
            paras.append(got)
        rt.client.release_affinity(_variant_affinity(item, variant))
    if row.status != "failed":
        texts = [p.text for p in paras]
        row.text = join_paragraphs(texts)
        row.words = count_words(row.text)
        row.n_paragraphs = len(paras)
        row.filter_reason = variant_filter_reason(
            texts, len(item.steps), [p.step for p in paras if p.truncated], rt.config
        )
    rt.store.save(row)
    rt.counts["variants_written" if row.status == "written" else "variants_failed"] += 1
    return row


async def judge_variant(
    rt: PairsRuntime, item: _Item, variant: VariantSample
) -> PairJudgement | None:
    """The stored verdict on one variant, or up to `judge_attempts` judge calls (each a varied
    request: another seed and temperature, so another key) until one parses."""
    inst = item.instruction
    assert inst.id is not None
    judge_model = rt.judge_client.model
    version = rt.judge_version
    with rt.store.session() as s:
        existing = s.get(PairJudgement, (inst.id, variant.variant, judge_model, version))
    if existing is not None:
        return existing
    if variant.status != "written" or not variant.text.strip():
        return None
    cfg = rt.config
    row = PairJudgement(
        instruction_id=inst.id,
        variant=variant.variant,
        judge_model=judge_model,
        prompt_version=version,
        status="unparsed",
    )
    await judge_answer(
        row,
        inst.prompt,
        variant.text,
        store=rt.store,
        client=rt.judge_client,
        progress=rt.judge_progress,
        slots=rt.slots,
        formats=rt,
        attempts=cfg.judge_attempts,
        max_tokens=cfg.judge_max_tokens,
        temperature=cfg.judge_temperature,
        context_window=cfg.judge_context_window,
    )
    rt.store.save(row)
    return row


def _variant_numbers(item: _Item, k: int) -> list[int]:
    return ([0] if item.sample is not None else []) + list(range(1, k + 1))


def variants_to_write(rt: PairsRuntime, instruction_ids: list[int]) -> list[tuple[_Item, int]]:
    """(instruction, variant) for the K extra variants of every instruction of a batch, once
    each instruction's build sample is recorded as variant 0."""
    items = _load_items(rt.store, instruction_ids)
    for item in items:
        _ensure_original(rt, item)
    return [(item, v) for item in items for v in range(1, rt.config.variants + 1)]


async def _write_one(rt: PairsRuntime, todo: tuple[_Item, int]) -> VariantSample:
    return await write_variant(rt, *todo)


def variants_to_judge(
    rt: PairsRuntime, instruction_ids: list[int]
) -> list[tuple[_Item, VariantSample]]:
    """Every stored variant of a batch's instructions, with its instruction."""
    items = {i.instruction.id: i for i in _load_items(rt.store, instruction_ids)}
    with rt.store.session() as s:
        variants = s.exec(
            select(VariantSample)
            .where(col(VariantSample.instruction_id).in_(list(items)))
            .where(col(VariantSample.variant) <= rt.config.variants)
            .order_by(col(VariantSample.instruction_id), col(VariantSample.variant))
        ).all()
    return [(items[v.instruction_id], v) for v in variants]


async def _judge_one(rt: PairsRuntime, todo: tuple[_Item, VariantSample]) -> PairJudgement | None:
    return await judge_variant(rt, *todo)


# Write the variants of a batch, all chains at once (each chain one variant, step by step);
# counts the variants written.
WRITE_VARIANTS_STAGE = Stage(
    "pairs-write", PairsRuntime, variants_to_write, _write_one, lambda r: r.status == "written"
)
# Judge every written variant of a batch; counts the scored verdicts.
JUDGE_VARIANTS_STAGE = Stage(
    "judge",
    PairsRuntime,
    variants_to_judge,
    _judge_one,
    lambda j: j is not None and j.status == "scored",
)


# -- selection and export (sync; the store holds everything they need) ----------------------


@dataclass
class SelectionResult:
    records: list[dict[str, Any]]
    decisions: Counter[str]  # paired + skipped reasons
    variants: Counter[str]  # variant outcomes: scored, unparsed, error, failed, missing
    margins: list[float]


def select_and_record(
    store: Store,
    ids: list[int],
    judge_model: str,
    cfg: PairsConfig,
) -> SelectionResult:
    """Decide every instruction's pair from the stored variants and verdicts; store each
    decision (paired, or skipped with the reason) and return the pair records."""
    version = prompt_version("judge")
    items = _load_items(store, ids)
    with store.session() as s:
        variants: dict[int, dict[int, VariantSample]] = {}
        for v in s.exec(select(VariantSample).where(col(VariantSample.instruction_id).in_(ids))):
            variants.setdefault(v.instruction_id, {})[v.variant] = v
        verdicts: dict[tuple[int, int], PairJudgement] = {
            (j.instruction_id, j.variant): j
            for j in s.exec(
                select(PairJudgement).where(
                    col(PairJudgement.instruction_id).in_(ids),
                    PairJudgement.judge_model == judge_model,
                    PairJudgement.prompt_version == version,
                )
            )
        }
    result = SelectionResult([], Counter(), Counter(), [])
    decisions: list[PairDecision] = []
    for item in items:
        inst = item.instruction
        assert inst.id is not None
        mine = variants.get(inst.id, {})
        candidates: list[VariantScore] = []
        for n in _variant_numbers(item, cfg.variants):
            v = mine.get(n)
            if v is None:
                status, ratings, words, freason = "missing", None, 0, None
            elif v.status != "written":
                status, ratings, words, freason = "failed", None, v.words, v.filter_reason
            else:
                j = verdicts.get((inst.id, n))
                words, freason = v.words, v.filter_reason
                if j is None:
                    status, ratings = "missing", None
                elif j.status == "scored" and j.scores_json:
                    status = "scored"
                    ratings = {d: float(x) for d, x in json.loads(j.scores_json).items()}
                else:
                    status, ratings = j.status, None
            result.variants[status] += 1
            candidates.append(
                variant_score(n, words, ratings, inst.length, filter_reason=freason, status=status)
            )
        decision = select_pair(
            candidates,
            min_margin=cfg.min_margin,
            rejected=cfg.rejected,
            rng_key=f"{inst.uid}\n{judge_model}",
        )
        scored = sum(c.score is not None for c in candidates)
        row = PairDecision(
            instruction_id=inst.id,
            status=decision.status,
            reason=decision.reason,
            detail=decision.detail,
            scored=scored,
            candidates=sum(1 for n in mine if n <= cfg.variants),
            judge_model=judge_model,
        )
        if decision.status == "paired":
            c, r = decision.chosen, decision.rejected
            assert c is not None and r is not None and decision.margin is not None
            row.chosen_variant, row.rejected_variant = c.variant, r.variant
            row.chosen_score, row.rejected_score = c.score, r.score
            row.margin = decision.margin
            result.margins.append(decision.margin)
            result.records.append(
                pair_record(
                    inst.uid,
                    inst.prompt,
                    mine[c.variant].text,
                    mine[r.variant].text,
                    decision,
                    required_length=inst.length,
                    judge_model=judge_model,
                    source=inst.source,
                )
            )
            result.decisions["paired"] += 1
        else:
            result.decisions[decision.reason] += 1
        decisions.append(row)
    if decisions:
        store.save(*decisions)
    return result


def select_and_export(
    db_url: str,
    ids: list[int],
    judge_model: str,
    cfg: PairsConfig,
    out_dir: str,
    manifest_extra: dict[str, Any],
) -> dict[str, Any]:
    """Select every pair, store the decisions, write the files; returns the manifest."""
    store = Store(db_url)
    try:
        sel = select_and_record(store, ids, judge_model, cfg)
    finally:
        store.close()
    manifest_extra = {
        **manifest_extra,
        "counts": {
            "pairs": len(sel.records),
            "instructions": len(ids),
            "decisions": dict(sel.decisions),
            "variants": dict(sel.variants),
            # Written variants whose judge answer never parsed or errored: reported, not hidden.
            "judge_unscored": sel.variants["unparsed"] + sel.variants["error"],
        },
        "margins": margin_stats(sel.margins),
    }
    return export_pairs(sel.records, Path(out_dir), manifest_extra)


def skipped_details(store: Store, ids: Iterable[int]) -> list[tuple[int, str, str]]:
    """(instruction id, reason, detail) of every skipped instruction among `ids`."""
    ids = list(ids)
    with store.session() as s:
        rows = s.exec(
            select(PairDecision)
            .where(col(PairDecision.instruction_id).in_(ids), PairDecision.status == "skipped")
            .order_by(col(PairDecision.instruction_id))
        ).all()
    return [(r.instruction_id, r.reason, r.detail) for r in rows]
