"""Run summary figures (tasks.report)."""

import random

import pandas as pd
import pytest

from tasks.report import word_percentiles


def pandas_percentiles(words: list[int]) -> dict[str, int]:
    """How build_summary computed them before: pandas' Series.quantile."""
    series = pd.Series(words, dtype="float64")
    if not len(series):
        return {"p10": 0, "p50": 0, "p90": 0}
    return {f"p{q}": int(series.quantile(q / 100)) for q in (10, 50, 90)}


@pytest.mark.parametrize("seed", range(40))
def test_word_percentiles_equal_pandas_quantiles(seed):
    rng = random.Random(seed)
    for n in (1, 2, 3, 7, 10, 11, 99, rng.randrange(1, 6000)):
        lo = rng.choice((0, 100, 2000))
        hi = lo + rng.choice((1, 10, 5000, 40000))
        words = [rng.randint(lo, hi) for _ in range(n)]
        assert word_percentiles(words) == pandas_percentiles(words), (n, words[:20])


def test_word_percentiles_of_nothing_and_of_ties():
    assert word_percentiles([]) == {"p10": 0, "p50": 0, "p90": 0}
    assert word_percentiles([1800] * 50) == {"p10": 1800, "p50": 1800, "p90": 1800}
    assert word_percentiles([1, 2]) == pandas_percentiles([1, 2]) == {"p10": 1, "p50": 1, "p90": 1}
