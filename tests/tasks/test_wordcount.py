import pytest

from tasks.wordcount import count_words, detect_lang, repeated_sentence


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0),
        ("Hello, world!", 2),
        ("It's 2024 and don't panic", 6),  # it, s, and, don, t, panic: the paper's [a-zA-Z]+
        ("长城很长", 4),
        ("我爱Python和AI", 5),  # 我 爱 和 + Python + AI -> 3 CJK + 2 words
        ("12345 ... ！？", 0),
        (
            "𠀀 rare ext-B char is not in the paper's range",
            11,
        ),  # ext-B is outside the counted blocks
    ],
)
def test_count_words_counts_cjk_chars_and_english_words(text, expected):
    assert count_words(text) == expected


def test_detect_lang():
    assert detect_lang("写一篇关于长城的文章") == "zh"
    assert detect_lang("Write an essay about the Great Wall") == "en"
    assert detect_lang("") == "en"


@pytest.mark.parametrize(
    ("text", "repeated"),
    [
        # SmolLM2's loop inside one paragraph (the demo): a 20-word sentence said again.
        (
            "The island of Ravenshire - a place where dreams and reality had been intertwined "
            "forever but now it would change. Alex looked away. The island of Ravenshire - A "
            "place where dreams and reality had been intertwined forever, but now it would "
            "change!",
            "The island of Ravenshire",
        ),
        ("长江从青藏高原一路向东流去，穿过四川盆地和三峡，最后在上海汇入东海。" * 2, "长江"),
        # Anaphora repeats an opening, not the sentence; short lines may repeat.
        (
            "I have a dream that one day this nation will rise up and live out its creed. "
            "I have a dream that one day on the red hills of Georgia the sons will sit down "
            "together. Yes. Yes.",
            None,
        ),
    ],
)
def test_repeated_sentence(text: str, repeated: str | None) -> None:
    found = repeated_sentence(text)
    if repeated is None:
        assert found is None
    else:
        assert found is not None and found.startswith(repeated)


def test_repeated_sentence_from_an_earlier_paragraph() -> None:
    said = "The locals make up a very unique way of life for themselves, and they eat spices."
    assert repeated_sentence("Food is good. " + said, earlier=["Sydney is big. " + said])
    assert repeated_sentence("Food is good. " + said, earlier=["Sydney is big."]) is None
