"""tasks.quality.point_similarity computes each point's features once and skips the edit
similarity when its longest-common-subsequence bound cannot reach the check's limit (issue
12): the same values as the plain computation, and the same verdict at every limit."""

from __future__ import annotations

import itertools
import random
from difflib import SequenceMatcher

from tasks.quality import (
    DUPLICATE_POINT_SIMILARITY,
    _content_cjk,
    _content_words,
    _lcs_length,
    _normal,
    _point,
    _stem,
    point_similarity,
)
from tasks.wordcount import cjk_share
from tests.tasks.quality_corpus import HOLDOUT, load_corpus


def reference(a: str, b: str) -> float:
    """point_similarity as it was written before (every score computed)."""
    na, nb = _normal(a), _normal(b)
    if na == nb:
        return 1.0
    scores = [SequenceMatcher(None, na, nb).ratio() if min(len(na), len(nb)) > 40 else 0.0]
    chinese = cjk_share(a) > 0.5 and cjk_share(b) > 0.5
    wa = {_stem(w) for w in _content_words(a) if len(w) > 2}
    wb = {_stem(w) for w in _content_words(b) if len(w) > 2}
    if wa and wb and not chinese:
        scores.append(len(wa & wb) / len(wa | wb))
    ca, cb = _content_cjk(a), _content_cjk(b)
    if chinese and len(ca) >= 4 and len(cb) >= 4:
        ba = {ca[i : i + 2] for i in range(len(ca) - 1)}
        bb = {cb[i : i + 2] for i in range(len(cb) - 1)}
        scores.append(len(ba & bb) / len(ba | bb))
    return max(scores)


def dp_lcs(a: str, b: str) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _pairs() -> list[tuple[str, str]]:
    points = sorted({p for r in load_corpus() + load_corpus(HOLDOUT) for p in r.plan or ()})
    rng = random.Random(12)
    pairs = rng.sample(list(itertools.combinations(points, 2)), 4000)
    for p in points:  # near copies: what the duplicate check is there to catch
        words = p.split()
        pairs += [(p, p + " today"), (p, p[1:]), (p, " ".join(words[:-1]) or p)]
        if len(words) > 3:
            pairs.append((p, " ".join(words[1:] + words[:1])))
    return pairs


def test_the_same_values_as_before_and_the_same_verdict_at_any_limit() -> None:
    pairs = _pairs()
    over = 0
    for a, b in pairs:
        want = reference(a, b)
        assert point_similarity(a, b) == want, (a, b)
        for limit in (DUPLICATE_POINT_SIMILARITY, 0.5, 0.9):
            got = point_similarity(a, b, limit)
            assert (got >= limit) == (want >= limit), (a, b, limit)
            if want >= limit:
                assert got == want, (a, b, limit)
        over += want >= DUPLICATE_POINT_SIMILARITY
    assert over > 100  # the near copies reach the limit: the comparison is not vacuous


def test_the_bound_is_the_longest_common_subsequence() -> None:
    rng = random.Random(3)
    alphabet = "abcde fgh"
    for _ in range(300):
        a = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 90)))
        b = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 90)))
        assert _lcs_length(_point(a), _point(b)) == dp_lcs(_normal(a), _normal(b))
        na, nb = _normal(a), _normal(b)
        if na and nb:
            ratio = SequenceMatcher(None, na, nb).ratio()
            assert ratio <= 2.0 * _lcs_length(_point(a), _point(b)) / (len(na) + len(nb))
