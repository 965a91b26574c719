"""LongBench-Write scoring (LongWriter paper, arXiv 2408.07055, section 2): pure functions.

Length score S_l of one output, with required length l and output length l' (both counted by
`tasks.wordcount.count_words`):

    S_l = 100 * max(0, 1 - (l'/l - 1) / 3)   if l' > l
    S_l = 100 * max(0, 1 - (l/l' - 1) / 2)   otherwise

so writing too little is punished harder than writing too much (a 4x-long output already
scores 0, a third of the length scores 0). An empty output scores 0 (the formula would divide
by zero).

Quality score S_q: a judge rates six dimensions 1-5; each dimension's score is
(mean - 1) * 25 over the scored prompts (so 0..100) and S_q is the mean of the six. The total
is S = (S_l + S_q) / 2. Figures are reported overall and per group (required-length bucket,
output language, prompt type); S_l always averages every prompt of a group, S_q only its
scored prompts, and the unscored ones are counted, never silently dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

DIMENSIONS: tuple[str, ...] = (
    "relevance",
    "accuracy",
    "coherence",
    "clarity",
    "breadth_and_depth",
    "reading_experience",
)

# (name, low inclusive, high exclusive); the paper's last bucket [4k, 20k] includes 20,000.
BUCKETS: tuple[tuple[str, int, int], ...] = (
    ("0-500", 0, 500),
    ("500-2k", 500, 2000),
    ("2k-4k", 2000, 4000),
    ("4k-20k", 4000, 20001),
)
# Required lengths above the paper's range (LongWrite-Ruler goes to 30,000) get their own
# bucket instead of being folded into 4k-20k; it is reported only when such prompts exist.
OVER_BUCKET = "20k+"

ROUND = 3  # decimals kept in reports; enough to compare figures, short enough to read


def length_score(required: int, output: int) -> float:
    """S_l of one output (0..100); 0 for an empty output."""
    if required <= 0:
        raise ValueError(f"required length must be positive, got {required}")
    if output <= 0:
        return 0.0
    if output > required:
        return 100.0 * max(0.0, 1.0 - (output / required - 1.0) / 3.0)
    return 100.0 * max(0.0, 1.0 - (required / output - 1.0) / 2.0)


def bucket_of(required: int) -> str:
    for name, low, high in BUCKETS:
        if low <= required < high:
            return name
    if required >= BUCKETS[-1][2]:
        return OVER_BUCKET
    raise ValueError(f"required length out of range: {required}")


def dimension_score(mean_rating: float) -> float:
    """A dimension's mean 1-5 rating on the 0-100 scale."""
    return (mean_rating - 1.0) * 25.0


@dataclass
class ScoredRow:
    """One prompt's outcome: what the report is computed from."""

    prompt: str
    length: int
    type: str
    lang: str
    response_length: int
    # None: not judged (judge off, empty response) or the judge's answer never parsed.
    ratings: dict[str, float] | None = None
    judge_status: str = "skipped"  # scored | unparsed | empty_response | skipped | error
    generation_status: str = "ok"  # ok | bad_output | context_overflow
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def S_l(self) -> float:  # noqa: N802 - the paper's name
        return length_score(self.length, self.response_length)

    @property
    def bucket(self) -> str:
        return bucket_of(self.length)

    @property
    def S_q(self) -> float | None:  # noqa: N802 - the paper's name
        """This prompt's quality on the 0-100 scale (mean of its six dimension scores)."""
        if self.ratings is None:
            return None
        return _mean([dimension_score(self.ratings[d]) for d in DIMENSIONS])


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, ROUND)


def aggregate(rows: Sequence[ScoredRow], judged: bool) -> dict[str, Any]:
    """Every figure of one group of rows. With `judged` False (no judge), S_q and S are None."""
    n = len(rows)
    scored = [r.ratings for r in rows if r.ratings is not None]
    s_l = _mean([r.S_l for r in rows]) if rows else None
    dims: dict[str, float | None] = {
        d: (dimension_score(_mean([ratings[d] for ratings in scored])) if scored else None)
        for d in DIMENSIONS
    }
    s_q: float | None = None
    if judged and scored:
        s_q = _mean([v for v in dims.values() if v is not None])
    s = (s_l + s_q) / 2.0 if s_l is not None and s_q is not None else None
    lengths = [r.response_length for r in rows]
    return {
        "n": n,
        "S_l": _r(s_l),
        "S_q": _r(s_q),
        "S": _r(s),
        "dimensions": {d: _r(v) for d, v in dims.items()} if judged else None,
        "scored": len(scored),
        "unscored": (n - len(scored)) if judged else None,
        "judge_unparsed": sum(r.judge_status == "unparsed" for r in rows) if judged else None,
        "empty_responses": sum(r.response_length == 0 for r in rows),
        "mean_required_length": _r(_mean([float(r.length) for r in rows])) if rows else None,
        "mean_response_length": _r(_mean([float(x) for x in lengths])) if rows else None,
        "max_response_length": max(lengths) if rows else None,
    }


def group_figures(
    rows: Iterable[ScoredRow],
    key: Callable[[ScoredRow], str],
    judged: bool,
    always: Sequence[str] = (),
) -> dict[str, dict[str, Any]]:
    """`aggregate` per group; groups named in `always` appear even when empty (n=0)."""
    groups: dict[str, list[ScoredRow]] = {name: [] for name in always}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    ordered = list(always) + sorted(k for k in groups if k not in always)
    return {name: aggregate(groups[name], judged) for name in ordered}


def bucket_names(rows: Iterable[ScoredRow]) -> list[str]:
    """The paper's four buckets, plus the over-range one when some prompt needs it."""
    names = [b[0] for b in BUCKETS]
    if any(r.bucket == OVER_BUCKET for r in rows):
        names.append(OVER_BUCKET)
    return names


def report(rows: Sequence[ScoredRow], judged: bool) -> dict[str, Any]:
    """Overall, per-bucket, per-language and per-type figures, plus one dict per row."""
    return {
        "overall": aggregate(rows, judged),
        "buckets": group_figures(rows, lambda r: r.bucket, judged, bucket_names(rows)),
        "languages": group_figures(rows, lambda r: r.lang, judged),
        "types": group_figures(rows, lambda r: r.type, judged),
        "rows": [row_dict(r) for r in rows],
    }


def row_dict(r: ScoredRow) -> dict[str, Any]:
    return {
        "prompt": r.prompt,
        "length": r.length,
        "type": r.type,
        "lang": r.lang,
        "bucket": r.bucket,
        "response_length": r.response_length,
        "S_l": _r(r.S_l),
        "S_q": _r(r.S_q),
        "scores": dict(r.ratings) if r.ratings is not None else None,
        "judge_status": r.judge_status,
        "generation_status": r.generation_status,
        **r.extra,
    }
