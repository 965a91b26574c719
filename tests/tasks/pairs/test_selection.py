"""Pure core of `longwriter pairs`: scores, pair selection, records and the export that
`longwriter train --dpo` reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.eval.judge import judge_format_for
from tasks.eval.scoring import DIMENSIONS
from tasks.pairs.selection import (
    PAIR_SCHEMA,
    Decision,
    VariantScore,
    combined_score,
    export_pairs,
    margin_stats,
    pair_record,
    quality_score,
    select_pair,
    variant_score,
)
from tasks.train.data import read_records


def ratings(*values: float) -> dict[str, float]:
    if len(values) == 1:
        values = values * len(DIMENSIONS)
    return dict(zip(DIMENSIONS, values, strict=True))


def cand(variant: int, score: float | None, *, filtered: str | None = None) -> VariantScore:
    """A candidate whose combined score is `score` (no required length: S = S_q)."""
    return VariantScore(
        variant=variant,
        words=100,
        quality=score,
        length_score=None,
        filter_reason=filtered,
        status="scored" if score is not None else "unparsed",
    )


# -- scores ---------------------------------------------------------------------------------


def test_quality_is_longbench_write_scale() -> None:
    assert quality_score(ratings(5)) == 100.0
    assert quality_score(ratings(1)) == 0.0
    # (4+3+5+2+4+3)/6 = 3.5 -> (3.5 - 1) * 25
    assert quality_score(ratings(4, 3, 5, 2, 4, 3)) == pytest.approx(62.5)


def test_combined_score_is_papers_total_when_length_known() -> None:
    assert combined_score(80.0, 60.0) == 70.0
    assert combined_score(80.0, None) == 80.0


def test_variant_score_uses_required_length() -> None:
    v = variant_score(2, 200, ratings(5), 100)  # 2x long: S_l = 100 * (1 - 1/3)
    assert v.length_score == pytest.approx(200 / 3)
    assert v.score == pytest.approx((100 + 200 / 3) / 2)
    unknown = variant_score(1, 200, ratings(3), None)
    assert unknown.length_score is None and unknown.score == 50.0
    unscored = variant_score(3, 200, None, 100, status="unparsed")
    assert unscored.score is None and unscored.status == "unparsed"
    assert unscored.length_score == pytest.approx(200 / 3)  # known, but no quality: no S
    empty = variant_score(4, 0, ratings(5), 100)
    assert empty.length_score == 0.0 and empty.score == 50.0


# -- selection ------------------------------------------------------------------------------


def test_best_is_chosen_and_rejected_is_a_lower_one() -> None:
    cands = [cand(0, 50.0), cand(1, 90.0), cand(2, 20.0), cand(3, 70.0)]
    d = select_pair(cands, min_margin=5.0, rng_key="x")
    assert d.status == "paired" and d.chosen is not None and d.chosen.variant == 1
    assert d.rejected is not None and d.rejected.variant in (0, 2, 3)
    assert d.margin == 90.0 - d.rejected.score
    worst = select_pair(cands, min_margin=5.0, rejected="worst")
    assert worst.rejected is not None and worst.rejected.variant == 2 and worst.margin == 70.0


def test_random_rejected_is_stable_per_key_and_spread_over_keys() -> None:
    cands = [cand(0, 50.0), cand(1, 90.0), cand(2, 20.0), cand(3, 70.0)]
    first = select_pair(cands, rng_key="instruction-7")
    again = select_pair(cands, rng_key="instruction-7")
    assert first.rejected == again.rejected  # a rerun exports the same pair
    picked = {select_pair(cands, rng_key=f"k{i}").rejected.variant for i in range(50)}  # type: ignore[union-attr]
    assert picked == {0, 2, 3}  # the paper's "randomly choose one of the remaining"


def test_rejected_must_clear_min_margin() -> None:
    cands = [cand(0, 80.0), cand(1, 78.0), cand(2, 60.0)]
    for key in ("a", "b", "c", "d", "e", "f"):
        d = select_pair(cands, min_margin=5.0, rng_key=key)
        assert d.rejected is not None and d.rejected.variant == 2  # 78 is within 5 points
    skipped = select_pair(cands, min_margin=25.0)
    assert (skipped.status, skipped.reason) == ("skipped", "low_margin")
    assert "widest margin 20.00 < min_margin 25.00" in skipped.detail


def test_tie_is_no_preference_even_with_zero_min_margin() -> None:
    d = select_pair([cand(0, 75.0), cand(1, 75.0), cand(2, 75.0)], min_margin=0.0)
    assert (d.status, d.reason) == ("skipped", "low_margin")
    assert "best variant 0" in d.detail and "no variant scores lower" in d.detail


def test_too_few_scored_counts_the_unscored() -> None:
    cands = [
        cand(0, 70.0),
        cand(1, None),
        cand(2, None),
        VariantScore(3, 0, None, None, status="failed"),
    ]
    d = select_pair(cands)
    assert (d.status, d.reason) == ("skipped", "too_few_scored")
    assert d.detail == "1 of 4 variant(s) scored (unscored: failed 1, unparsed 2)"
    assert select_pair([]).reason == "too_few_scored"


def test_filtered_variant_is_never_chosen_but_may_be_rejected() -> None:
    cands = [cand(0, 60.0), cand(1, 95.0, filtered="refusal"), cand(2, 30.0)]
    d = select_pair(cands, rejected="worst")
    assert d.chosen is not None and d.chosen.variant == 0
    assert d.rejected is not None and d.rejected.variant == 2
    # A filtered variant scoring below the chosen one is a fine rejected answer.
    d2 = select_pair([cand(0, 90.0), cand(1, 20.0, filtered="truncated")], rejected="worst")
    assert d2.rejected is not None and d2.rejected.variant == 1
    none_clean = select_pair([cand(0, 60.0, filtered="repetition"), cand(1, 30.0, filtered="x")])
    assert (none_clean.status, none_clean.reason) == ("skipped", "no_clean_best")


def test_best_tie_prefers_the_lower_variant() -> None:
    d = select_pair([cand(3, 90.0), cand(0, 90.0), cand(1, 10.0)], rejected="worst")
    assert d.chosen is not None and d.chosen.variant == 0


def test_margin_stats() -> None:
    assert margin_stats([]) == {"min": None, "mean": None, "max": None}
    assert margin_stats([10.0, 20.0, 45.0]) == {"min": 10.0, "mean": 25.0, "max": 45.0}


def test_judge_format_for() -> None:
    assert judge_format_for("auto", embedded=True) == "json_object"
    assert judge_format_for("auto", embedded=False) == "json_schema"
    assert judge_format_for("none", embedded=True) == "none"
    with pytest.raises(ValueError):
        judge_format_for("xml", embedded=False)


# -- records and export ---------------------------------------------------------------------


def _decision() -> Decision:
    return Decision("paired", chosen=cand(1, 90.0), rejected=cand(2, 40.5))


def test_pair_record_is_trl_conversational() -> None:
    rec = pair_record(
        "u1", "Write 100 words.", "good", "bad", _decision(), required_length=None, judge_model="j"
    )
    assert rec["prompt"] == [{"role": "user", "content": "Write 100 words."}]
    assert rec["chosen"] == [{"role": "assistant", "content": "good"}]
    assert rec["rejected"] == [{"role": "assistant", "content": "bad"}]
    assert (rec["id"], rec["chosen_score"], rec["rejected_score"], rec["margin"]) == (
        "u1",
        90.0,
        40.5,
        49.5,
    )
    assert set(rec) == {f.name for f in PAIR_SCHEMA}


def test_export_is_read_back_by_the_train_loader(tmp_path: Path) -> None:
    recs = [
        pair_record(
            f"u{i}",
            f"Write about {i}.",
            f"chosen {i} 写作",
            f"rejected {i}",
            _decision(),
            required_length=100 if i else None,
            judge_model="j",
        )
        for i in range(3)
    ]
    manifest = export_pairs(recs, tmp_path, {"counts": {"pairs": 3}})
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk == manifest and manifest["format"] == "trl-preference-conversational"
    assert [f["records"] for f in manifest["files"]] == [3, 3]
    assert not list(tmp_path.rglob("*.tmp"))
    # The train loader reads shards/*.parquet first (never manifest.json); same records.
    assert read_records(tmp_path) == recs
    jsonl = tmp_path / "jsonl" / "pairs-00000-of-00001.jsonl"
    assert [json.loads(line) for line in jsonl.read_text().splitlines()] == recs


def test_export_of_no_pairs_writes_empty_files(tmp_path: Path) -> None:
    manifest = export_pairs([], tmp_path, {})
    assert [f["records"] for f in manifest["files"]] == [0, 0]
    assert read_records(tmp_path) == []


def test_exported_pairs_pass_the_dpo_preparation(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from tasks.train.data import prepare_dpo
    from tasks.train.model import ModelRef, load_tokenizer
    from tests.fixtures_train import build_small_tokenizer

    tok = load_tokenizer(ModelRef(build_small_tokenizer(tmp_path / "tok")))
    recs = [
        pair_record(
            "u0",
            "Write a poem.",
            "Waves and light.",
            "No.",
            _decision(),
            required_length=None,
            judge_model="j",
        ),
        pair_record(
            "u1",
            "Write a poem.",
            "x " * 400,
            "No.",
            _decision(),
            required_length=None,
            judge_model="j",
        ),
    ]
    export_pairs(recs, tmp_path / "pairs", {})
    prepared = prepare_dpo(tok, read_records(tmp_path / "pairs"), max_seq_len=200)
    assert [s.id for s in prepared.skipped] == ["u1"]  # too long: skipped and reported
    (row,) = prepared.rows
    assert set(row) == {"prompt", "chosen", "rejected"}
    assert row["chosen"] == [{"role": "assistant", "content": "Waves and light."}]
