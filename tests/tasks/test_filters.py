import pytest

from tasks.filters import FilterConfig, SampleCandidate, repetition_share, run_filters
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
