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


def test_summary_and_histogram_count_only_the_samples_that_ship(tmp_path, monkeypatch):
    """A sample rejected after acceptance (here a near-duplicate at export) stays in its table
    but in no figure of what was accepted: percentiles and histogram agree with `accepted`."""
    import matplotlib.axes

    from storage.store import Store
    from tasks.report import build_summary, length_histogram_png
    from tests.tasks.test_export import fill

    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    fill(store, 3)  # 3,000, 4,000 and 5,000 words
    store.reject(3, "export", "near_duplicate", "test")
    assert store.accepted_sample_words() == [3000, 4000]
    summary = build_summary(store)
    assert summary["accepted"] == 2 and summary["words"]["total"] == 7000
    assert summary["words"]["p90"] < 4000 and summary["words"]["p10"] >= 3000
    plotted: list[list[int]] = []
    real_hist = matplotlib.axes.Axes.hist

    def hist(self, x, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        plotted.append(list(x))
        return real_hist(self, x, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "hist", hist)
    png = length_histogram_png(store, tmp_path / "h.png")
    assert png is not None and png.stat().st_size > 0
    assert plotted == [[3000, 4000]]
