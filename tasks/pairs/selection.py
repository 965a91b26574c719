"""DPO pairs' pure core: candidate scores, the pair selection rule, pair records and their
export (see tasks.pairs for the rule)."""

from __future__ import annotations

import hashlib
import json
import math
import random
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.eval.scoring import DIMENSIONS, dimension_score, length_score
from tasks.settings import PAIRS

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
