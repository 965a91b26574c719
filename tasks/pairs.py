"""DPO preference pairs from AgentWrite variants (LongWriter paper, arXiv 2408.07055, sec. 4.1).

The paper's long-output DPO data: for each writing instruction, sample 4 outputs, score them
with the quality judge combined with the length-following score S_l, take the highest-scoring
output as the chosen answer and one of the others, at random, as the rejected one.

Here the candidates of one instruction are its accepted build sample (variant 0) and K extra
AgentWrite samples written on the SAME stored plan with other sampling: variant v sends
`seed=v` (and the configured temperature), so every variant call has its own idempotency key
and goes through the store cache (`tasks.runtime.generate`): a rerun never pays twice.

Score of a candidate, on 0-100 (`combined_score`):
  S_q = mean of the six judge dimensions, each (rating - 1) * 25, as LongBench-Write scores
        quality (`tasks.scoring`); the judge sees the instruction and the response only;
  S_l = the paper's length score against the instruction's required length, when known;
  S   = (S_q + S_l) / 2, LongBench-Write's total, when the length is known; else S = S_q
        (an instruction without a required length has nothing to follow; the comparison is
        within one instruction, so the scale stays consistent).

Selection (`select_pair`): chosen = the best-scoring variant that passes the quality filters
(`tasks.filters` without the length floor: no refusal, truncation, error text, loops); rejected
= a random lower-scoring variant whose margin is at least `min_margin` (the paper's rule;
`rejected="worst"` takes the lowest instead). Any scored variant may be rejected, filtered
ones included: a truncated or looping answer is a genuine bad answer. An instruction is
skipped, with the reason stored, when fewer than two variants were scored (unscored judge
answers are counted, never dropped silently), when no clean variant was scored, or when no
variant is `min_margin` below the best (a tie is never a preference).

Pure core first (scores, selection, records, export); the stages over the store follow.
Their thin Prefect tasks are in flows/stages.py, the flow in flows/pairs.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from sqlmodel import col, select

from prompts import prompt_version
from storage.models import Instruction, InstructionStatus, Plan, Sample
from storage.pair_models import PairDecision, PairJudgement, VariantParagraph, VariantSample
from storage.store import Store
from tasks.filters import FilterConfig, SampleCandidate, run_filters
from tasks.flags import derive
from tasks.judge import judge_answer
from tasks.judge import judge_format_for as judge_format_for  # flows.pairs reads it from here
from tasks.llm_client import LLMClient
from tasks.plan import PlanStep, steps_from_json
from tasks.runtime import Progress, gather_all
from tasks.scoring import DIMENSIONS, dimension_score, length_score
from tasks.settings import PAIRS
from tasks.wordcount import count_words, join_paragraphs
from tasks.write import ContextBudget, DraftFailed, DraftSettings, draft_paragraph

RejectedMode = Literal["random", "worst"]

# -- scores ---------------------------------------------------------------------------------


def quality_score(ratings: dict[str, float]) -> float:
    """S_q of one response (0-100): the mean of the six dimensions on LongBench-Write's scale."""
    return math.fsum(dimension_score(ratings[d]) for d in DIMENSIONS) / len(DIMENSIONS)


def combined_score(quality: float, s_l: float | None) -> float:
    """LongBench-Write's S = (S_q + S_l) / 2 when the required length is known, else S_q."""
    return quality if s_l is None else (quality + s_l) / 2.0


@dataclass(frozen=True)
class VariantScore:
    """One candidate of an instruction, as selection sees it."""

    variant: int
    words: int
    quality: float | None  # S_q; None: not scored (unparsed, judge error, failed write)
    length_score: float | None  # S_l; None when the required length is unknown
    filter_reason: str | None = None  # first failing quality filter; None: clean
    status: str = "scored"  # scored | unparsed | error | failed | missing

    @property
    def score(self) -> float | None:
        return None if self.quality is None else combined_score(self.quality, self.length_score)


def variant_score(
    variant: int,
    words: int,
    ratings: dict[str, float] | None,
    required_length: int | None,
    *,
    filter_reason: str | None = None,
    status: str = "scored",
) -> VariantScore:
    s_l = length_score(required_length, words) if required_length else None
    quality = quality_score(ratings) if ratings is not None else None
    return VariantScore(
        variant=variant,
        words=words,
        quality=quality,
        length_score=s_l,
        filter_reason=filter_reason,
        status=status if ratings is None else "scored",
    )


@dataclass(frozen=True)
class Decision:
    status: str  # paired | skipped
    reason: str = ""  # skipped: too_few_scored | no_clean_best | low_margin
    detail: str = ""
    chosen: VariantScore | None = None
    rejected: VariantScore | None = None

    @property
    def margin(self) -> float | None:
        if self.chosen is None or self.rejected is None:
            return None
        assert self.chosen.score is not None and self.rejected.score is not None
        return self.chosen.score - self.rejected.score


def _rng_for(key: str) -> random.Random:
    """A generator seeded by the instruction (and judge): the same pair on every rerun."""
    return random.Random(int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:16], 16))


def select_pair(
    candidates: Sequence[VariantScore],
    *,
    min_margin: float = 0.0,
    rejected: RejectedMode = PAIRS.rejected,
    rng_key: str = "",
) -> Decision:
    """Chosen and rejected among one instruction's candidates, or why there is no pair."""
    scored = [c for c in candidates if c.score is not None]
    if len(scored) < 2:
        unscored = Counter(c.status for c in candidates if c.score is None)
        why = ", ".join(f"{k} {v}" for k, v in sorted(unscored.items())) or "none other"
        return Decision(
            "skipped",
            "too_few_scored",
            f"{len(scored)} of {len(candidates)} variant(s) scored (unscored: {why})",
        )
    # Best first; on a tie the lower variant (the accepted build sample) wins.
    ranked = sorted(scored, key=lambda c: (-(c.score or 0.0), c.variant))
    clean = [c for c in ranked if c.filter_reason is None]
    if not clean:
        reasons = Counter(c.filter_reason for c in ranked)
        return Decision(
            "skipped",
            "no_clean_best",
            "every scored variant fails a quality filter: "
            + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=str)),
        )
    best = clean[0]
    assert best.score is not None
    # A margin of 0 is no preference at all, whatever min_margin says.
    lower = [
        c
        for c in ranked
        if c is not best
        and c.score is not None
        and best.score - c.score >= min_margin
        and best.score - c.score > 0
    ]
    if not lower:
        others = [c.score for c in ranked if c is not best and c.score is not None]
        widest = best.score - min(others)
        return Decision(
            "skipped",
            "low_margin",
            f"best variant {best.variant} scores {best.score:.2f}; widest margin "
            f"{widest:.2f} < min_margin {min_margin:.2f}"
            if widest > 0
            else f"best variant {best.variant} scores {best.score:.2f}; no variant scores lower",
        )
    if rejected == "worst":
        worse = lower[-1]
    else:
        worse = lower[_rng_for(rng_key).randrange(len(lower))]
    return Decision("paired", chosen=best, rejected=worse)


# -- records and export ---------------------------------------------------------------------

_MESSAGES = pa.list_(pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())]))
PAIR_SCHEMA = pa.schema(
    [
        pa.field("prompt", _MESSAGES),
        pa.field("chosen", _MESSAGES),
        pa.field("rejected", _MESSAGES),
        pa.field("id", pa.string()),
        pa.field("chosen_score", pa.float64()),
        pa.field("rejected_score", pa.float64()),
        pa.field("margin", pa.float64()),
        pa.field("chosen_variant", pa.int64()),
        pa.field("rejected_variant", pa.int64()),
        pa.field("chosen_quality", pa.float64()),
        pa.field("rejected_quality", pa.float64()),
        pa.field("chosen_length_score", pa.float64()),
        pa.field("rejected_length_score", pa.float64()),
        pa.field("chosen_words", pa.int64()),
        pa.field("rejected_words", pa.int64()),
        pa.field("required_length", pa.int64()),
        pa.field("judge_model", pa.string()),
        pa.field("source", pa.string()),
    ]
)
PAIRS_FILE = "pairs-00000-of-00001"


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def pair_record(
    uid: str,
    prompt: str,
    chosen_text: str,
    rejected_text: str,
    decision: Decision,
    *,
    required_length: int | None,
    judge_model: str,
    source: str = "",
) -> dict[str, Any]:
    """One pair in TRL's conversational preference format, plus the figures behind it."""
    c, r = decision.chosen, decision.rejected
    assert c is not None and r is not None
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen_text}],
        "rejected": [{"role": "assistant", "content": rejected_text}],
        "id": uid,
        "chosen_score": _r(c.score),
        "rejected_score": _r(r.score),
        "margin": _r(decision.margin),
        "chosen_variant": c.variant,
        "rejected_variant": r.variant,
        "chosen_quality": _r(c.quality),
        "rejected_quality": _r(r.quality),
        "chosen_length_score": _r(c.length_score),
        "rejected_length_score": _r(r.length_score),
        "chosen_words": c.words,
        "rejected_words": r.words,
        "required_length": required_length,
        "judge_model": judge_model,
        "source": source,
    }


def margin_stats(margins: Sequence[float]) -> dict[str, float | None]:
    if not margins:
        return {"min": None, "mean": None, "max": None}
    return {
        "min": round(min(margins), 3),
        "mean": round(math.fsum(margins) / len(margins), 3),
        "max": round(max(margins), 3),
    }


def export_pairs(
    records: Sequence[dict[str, Any]], out_dir: Path, manifest_extra: dict[str, Any]
) -> dict[str, Any]:
    """OUT/shards/*.parquet + OUT/jsonl/*.jsonl (the layout `longwriter train --data OUT`
    reads, parquet first) and OUT/manifest.json, written last. Each file is written under a
    temporary name and renamed, so a reader trusting the manifest never sees half a file."""
    import os
    import uuid

    from tasks.files import atomic_write_text, sha256_file

    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[dict[str, Any]] = []
    for sub, ext in (("shards", "parquet"), ("jsonl", "jsonl")):
        final = out_dir / sub / f"{PAIRS_FILE}.{ext}"
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
        if ext == "parquet":
            pq.write_table(
                pa.Table.from_pylist(list(records), schema=PAIR_SCHEMA), tmp, compression="zstd"
            )
        else:
            with tmp.open("w", encoding="utf-8") as fh:
                for rec in records:
                    fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, final)
        files.append(
            {
                "path": str(final.relative_to(out_dir)),
                "sha256": sha256_file(final),
                "bytes": final.stat().st_size,
                "records": len(records),
            }
        )
    manifest = {
        "format": "trl-preference-conversational",
        "columns": [f.name for f in PAIR_SCHEMA],
        "files": files,
        **manifest_extra,
    }
    atomic_write_text(
        out_dir / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    )
    return manifest


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


_RUNTIMES: dict[str, PairsRuntime] = {}


def register(rt: PairsRuntime) -> str:
    _RUNTIMES[rt.id] = rt
    return rt.id


def unregister(runtime_id: str) -> None:
    _RUNTIMES.pop(runtime_id, None)


def get_runtime(runtime_id: str) -> PairsRuntime:
    try:
        return _RUNTIMES[runtime_id]
    except KeyError:
        raise RuntimeError(
            f"pairs runtime {runtime_id} is not registered in this process"
        ) from None


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


async def write_variants_batch(runtime_id: str, instruction_ids: list[int]) -> int:
    """Write the K extra variants of every instruction of a batch, all chains at once (each
    chain one variant, step by step). Returns how many variants are written now."""
    rt = get_runtime(runtime_id)
    items = _load_items(rt.store, instruction_ids)
    for item in items:
        _ensure_original(rt, item)
    rows = await gather_all(
        write_variant(rt, item, v) for item in items for v in range(1, rt.config.variants + 1)
    )
    return sum(r.status == "written" for r in rows)


async def judge_variants_batch(runtime_id: str, instruction_ids: list[int]) -> int:
    """Judge every written variant of a batch. Returns how many verdicts are scored."""
    rt = get_runtime(runtime_id)
    items = {i.instruction.id: i for i in _load_items(rt.store, instruction_ids)}
    with rt.store.session() as s:
        variants = s.exec(
            select(VariantSample)
            .where(col(VariantSample.instruction_id).in_(list(items)))
            .where(col(VariantSample.variant) <= rt.config.variants)
            .order_by(col(VariantSample.instruction_id), col(VariantSample.variant))
        ).all()
    verdicts = await gather_all(judge_variant(rt, items[v.instruction_id], v) for v in variants)
    return sum(1 for j in verdicts if j is not None and j.status == "scored")


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
