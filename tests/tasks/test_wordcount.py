import pytest

from tasks.wordcount import count_words, detect_lang


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
