import pytest

from tasks.eval.scoring import (
    DIMENSIONS,
    ScoredRow,
    aggregate,
    bucket_of,
    dimension_score,
    length_score,
    report,
)

# (required l, output l', S_l worked out by hand from the paper's formula)
LENGTH_TABLE = [
    (1000, 1000, 100.0),  # l' = l
    (1, 1, 100.0),
    (1000, 0, 0.0),  # empty output: 0, not a ZeroDivisionError
    (100, 0, 0.0),
    (1000, 4000, 0.0),  # 4x long: 1 - (4 - 1)/3 = 0
    (250, 1000, 0.0),  # 4x long again
    (1000, 5000, 0.0),  # longer still: clipped at 0
    (1000, 2000, 100 * 2 / 3),  # 1 - (2 - 1)/3
    (1000, 1300, 90.0),  # 1 - 0.3/3
    (100, 150, 100 * (1 - 0.5 / 3)),  # 83.33
    (300, 400, 100 * (1 - 1 / 9)),  # l'/l = 4/3: 1 - (1/3)/3
    (1000, 500, 50.0),  # half: 1 - (2 - 1)/2
    (1000, 800, 87.5),  # 1 - (1.25 - 1)/2
    (600, 400, 75.0),  # 1 - (1.5 - 1)/2
    (5000, 3000, 100 * 2 / 3),  # 1 - (5/3 - 1)/2
    (1000, 334, 100 * (1 - (1000 / 334 - 1) / 2)),  # just above a third: about 0.3
    (900, 300, 0.0),  # exactly a third: 1 - (3 - 1)/2 = 0
    (1000, 250, 0.0),  # a quarter: clipped at 0
    (1000, 1, 0.0),
    (25000, 30000, 100 * (1 - 0.2 / 3)),  # ruler-sized: 93.33
]


@pytest.mark.parametrize(("required", "output", "expected"), LENGTH_TABLE)
def test_length_score_matches_hand_computed_table(required, output, expected):
    assert length_score(required, output) == pytest.approx(expected, abs=1e-9)


def test_length_score_is_bounded_and_peaks_at_required():
    for l_out in range(0, 5001, 50):
        s = length_score(1000, l_out)
        assert 0.0 <= s <= 100.0
    assert max(range(1, 3000), key=lambda x: length_score(1000, x)) == 1000


def test_length_score_rejects_a_nonpositive_requirement():
    with pytest.raises(ValueError):
        length_score(0, 10)


@pytest.mark.parametrize(
    ("required", "bucket"),
    [
        (0, "0-500"),
        (100, "0-500"),
        (499, "0-500"),
        (500, "500-2k"),
        (1999, "500-2k"),
        (2000, "2k-4k"),
        (3999, "2k-4k"),
        (4000, "4k-20k"),
        (20000, "4k-20k"),  # the paper's last bucket is closed: [4k, 20k]
        (20001, "20k+"),
        (30000, "20k+"),
    ],
)
def test_buckets_by_required_length(required, bucket):
    assert bucket_of(required) == bucket


def test_dimension_score_maps_1_to_5_onto_0_to_100():
    assert [dimension_score(x) for x in (1, 2, 3, 4, 5)] == [0, 25, 50, 75, 100]
    assert dimension_score(3.5) == 62.5


def _row(length, out, ratings=None, lang="en", type_="t", status=None):
    return ScoredRow(
        prompt=f"p{length}-{out}",
        length=length,
        type=type_,
        lang=lang,
        response_length=out,
        ratings=ratings,
        judge_status=status or ("scored" if ratings else "unparsed"),
    )


def test_aggregate_by_hand():
    r1 = dict.fromkeys(DIMENSIONS, 5.0)  # every dimension 100
    r2 = dict.fromkeys(DIMENSIONS, 3.0)  # every dimension 50
    r2["clarity"] = 1.0  # clarity 0
    rows = [
        _row(1000, 1000, r1),  # S_l 100
        _row(1000, 500, r2),  # S_l 50
        _row(1000, 0, None, status="empty_response"),  # S_l 0, unscored
        _row(1000, 2000, None, status="unparsed"),  # S_l 66.67, unscored
    ]
    g = aggregate(rows, judged=True)
    assert g["n"] == 4
    assert g["S_l"] == pytest.approx((100 + 50 + 0 + 200 / 3) / 4, abs=1e-3)
    # Dimensions average the two scored rows only: (mean rating - 1) * 25.
    assert g["dimensions"]["relevance"] == pytest.approx((4 - 1) * 25)
    assert g["dimensions"]["clarity"] == pytest.approx((3 - 1) * 25)
    s_q = (5 * 75 + 50) / 6
    assert g["S_q"] == pytest.approx(s_q, abs=1e-3)
    assert g["S"] == pytest.approx(((100 + 50 + 0 + 200 / 3) / 4 + s_q) / 2, abs=1e-3)
    assert (g["scored"], g["unscored"], g["judge_unparsed"]) == (2, 2, 1)
    assert g["empty_responses"] == 1
    assert g["max_response_length"] == 2000
    assert g["mean_response_length"] == pytest.approx(875.0)


def test_aggregate_without_judge_has_null_quality():
    g = aggregate([_row(100, 100), _row(100, 50)], judged=False)
    assert g["S_l"] == 75.0
    assert g["S_q"] is None and g["S"] is None and g["dimensions"] is None
    assert g["unscored"] is None


def test_report_groups_every_bucket_language_and_type():
    rows = [
        _row(100, 100, dict.fromkeys(DIMENSIONS, 4.0), lang="zh", type_="a"),
        _row(3000, 1500, dict.fromkeys(DIMENSIONS, 2.0), lang="en", type_="b"),
        _row(30000, 30000, dict.fromkeys(DIMENSIONS, 3.0), lang="en", type_="b"),
    ]
    rep = report(rows, judged=True)
    assert list(rep["buckets"]) == ["0-500", "500-2k", "2k-4k", "4k-20k", "20k+"]
    assert rep["buckets"]["500-2k"]["n"] == 0 and rep["buckets"]["500-2k"]["S_l"] is None
    assert rep["buckets"]["2k-4k"]["S_l"] == 50.0
    assert rep["buckets"]["0-500"]["S_q"] == 75.0
    assert rep["languages"]["en"]["n"] == 2 and rep["languages"]["zh"]["S"] == 87.5
    assert rep["types"]["b"]["S_q"] == pytest.approx(37.5)
    assert rep["overall"]["max_response_length"] == 30000
    assert [r["S_l"] for r in rep["rows"]] == [100.0, 50.0, 100.0]
    assert rep["rows"][0]["scores"] == dict.fromkeys(DIMENSIONS, 4.0)
    # Without an over-range prompt, only the paper's four buckets are reported.
    assert list(report(rows[:2], judged=True)["buckets"]) == ["0-500", "500-2k", "2k-4k", "4k-20k"]
