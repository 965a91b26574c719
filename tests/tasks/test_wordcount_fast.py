"""tasks.wordcount's fast paths (issue 12) against the plain computations they replace: units
and counts from a byte table where a text has no CJK, a draft's sentences and units from one
pass (cached and shared by the repetition, restatement and echo checks), and repetition_share
and repeated_sentence ruled out from what the checks built. Every value must be the plain
one: texts in Chinese and English, verse, empty and short texts, odd characters."""

from __future__ import annotations

import random
import re
import sys

import pytest

from tasks import wordcount
from tasks.wordcount import (
    cjk_share,
    count_words,
    estimate_tokens,
    first_unit,
    letter_runs,
    repeated_sentence,
    repetition_share,
    text_units,
    units,
)
from tests.fake_openai import prose

_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_RE = re.compile(f"[{_CJK}]")
_WORD_RE = re.compile(r"[a-zA-Z]+")
_UNIT_RE = re.compile(f"[a-zA-Z]+|[{_CJK}]")
_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?。！？])\s*|\n+")


# -- the plain computations (as tasks.wordcount wrote them before) --------------------------


def plain_units(text: str) -> list[str]:
    return _UNIT_RE.findall(text.lower())


def plain_count_words(text: str) -> int:
    return len(_CJK_RE.findall(text)) + len(_WORD_RE.findall(text)) if text else 0


def plain_cjk_share(text: str) -> float:
    cjk = len(_CJK_RE.findall(text))
    total = cjk + len(_WORD_RE.findall(text))
    return cjk / total if total else 0.0


def plain_repetition_share(text: str, n: int) -> float:
    tokens = plain_units(text)
    if len(tokens) < n + 1:
        return 0.0
    total = len(tokens) - n + 1
    return (total - len(set(zip(*(tokens[i:] for i in range(n)), strict=False)))) / total


def plain_sentences(text: str) -> list[tuple[str, ...]]:
    return [tuple(plain_units(s)) for s in _SENTENCE_SPLIT_RE.split(text)]


def plain_repeated_sentence(text: str, earlier: list[str], min_units: int) -> str | None:
    seen: set[tuple[str, ...]] = set()
    for before in earlier:
        seen |= {k for k in plain_sentences(before) if len(k) >= min_units}
    for sentence in _SENTENCE_SPLIT_RE.split(text):
        key = tuple(plain_units(sentence))
        if len(key) < min_units:
            continue
        if key in seen:
            return sentence.strip()
        seen.add(key)
    return None


# -- the texts ------------------------------------------------------------------------------

TEXTS = [
    "",
    " ",
    "\n\n",
    "a",
    "Hello.",
    "。",
    "长",
    "12345 ... ！？",
    "It's 2024 and don't panic",
    "我爱Python和AI",
    "𠀀 rare ext-B char is not in the paper's range",
    "The café’s naïve owner — “Ünïcode” — said: ‘fine…’",
    "Kelvin \u212a, dotted \u0130stanbul, dotless \u0131, long \u017f, sigma ΣΑΣ.",
    "Full-width Ｗｏｒｄｓ and ｱｲｳ kana, 한국어, \u4dc0 hexagram, \uf900 compat ideograph.",
    "lone surrogate \ud800 here? yes! no. maybe\u3000。next",
    "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。\n床前明月光，疑是地上霜。",
    "Roses are red\nViolets are blue\nRoses are red\nViolets are blue",
    "Line one.\r\nLine two!\u2028Line three?\x0bfour\x1cfive",
    "长江从青藏高原一路向东流去，穿过四川盆地和三峡，最后在上海汇入东海。" * 2,
    "The island of Ravenshire - a place where dreams and reality had been intertwined "
    "forever but now it would change. Alex looked away. The island of Ravenshire - A place "
    "where dreams and reality had been intertwined forever, but now it would change!",
    "word " * 40,
    "是" * 40,
    "Yes. " * 30,
    "x" * 500,
    prose("wc-en", 300),
    prose("wc-zh", 300, chinese=True),
    prose("wc-en2", 300) + " " + prose("wc-zh2", 100, chinese=True),
]
_ALPHABET = list("abXYZ \t\r\n\n.!?。！？长城是的’—…éİıſKΣσ\u3000\u2028\x0b\x1c?&<>") + [
    "\ud800",
    "𠀀",
    "ｱ",
    "가",
    "\u4dc0",
    "\uf900",
    "Ａ",
    "hello",
    "World",
    "the",
    ". ",
]


def _random_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(_ALPHABET) for _ in range(rng.randrange(60))) for _ in range(count)]


ALL = TEXTS + _random_texts(3000, 12)


def test_units_and_counts_equal_the_regexes() -> None:
    for text in ALL:
        assert units(text) == plain_units(text), text
        assert text_units(text).tokens == tuple(plain_units(text)), text
        assert count_words(text) == plain_count_words(text), text
        assert cjk_share(text) == plain_cjk_share(text), text
        assert letter_runs(text) == len(_WORD_RE.findall(text)), text
        plain = plain_units(text)
        assert first_unit(text) == (plain[0] if plain else None), text
        cjk = len(_CJK_RE.findall(text))
        assert estimate_tokens(text) == int((len(text) - cjk) / 3 + cjk * 1.5) + 1, text


def test_sentences_equal_the_split() -> None:
    for text in ALL:
        assert wordcount._sentence_keys(text) == tuple(k for k in plain_sentences(text) if k)


@pytest.mark.parametrize("n", [1, 2, 3, 6, 10, 13])
def test_repetition_share_equals_the_plain_share_with_or_without_built_sets(n: int) -> None:
    for text in ALL:
        assert repetition_share(text, n) == plain_repetition_share(text, n), text
    # Once the checks have built shorter n-grams' hash sets, the share may be ruled out from
    # them.
    for text in ALL:
        for m in (1, 2, 6, 10):
            text_units(text).gram_hash_set(m)
        assert repetition_share(text, n) == plain_repetition_share(text, n), text


def test_gram_views_equal_ngrams() -> None:
    for text in ALL[:400]:
        tu = text_units(text)
        tokens = plain_units(text)
        for n in (1, 3, 6, 10):
            assert list(tu.grams(n)) == wordcount.ngrams(tokens, n)
            assert tu.gram_set(n) == frozenset(wordcount.ngrams(tokens, n))
            assert tu.gram_count(n) == len(wordcount.ngrams(tokens, n))
            hashes = tuple(hash(g) for g in wordcount.ngrams(tokens, n))
            assert tu.gram_hashes(n) == hashes
            assert tu.gram_hash_set(n) == frozenset(hashes)
            assert tu.has_hash_set(n)
            distinct = len(set(wordcount.ngrams(tokens, n))) == len(hashes)
            assert not tu.distinct_up_to(n) or distinct  # never says distinct when not
        assert tu.spaced == " " + " ".join(tokens) + " "


@pytest.mark.parametrize("min_units", [0, 1, 2, 5, 12])
def test_repeated_sentence_equals_the_plain_loop(min_units: int) -> None:
    rng = random.Random(min_units)
    for text in ALL:
        earlier = rng.sample(TEXTS, 3) + [text[: len(text) // 2]]
        for before in ([], earlier):
            got = repeated_sentence(text, before, min_units)
            assert got == plain_repeated_sentence(text, before, min_units), (text, before)


def test_chains_of_generated_paragraphs() -> None:
    """The write stage's pattern: each draft against the paragraphs before it, some drafts
    repeating a sentence of their own or of an earlier paragraph."""
    rng = random.Random(6)
    for i in range(40):
        written: list[str] = []
        for k in range(6):
            text = prose(f"chain-{i}-{k}", 300, chinese=i % 4 == 3)
            sentences = [s for s in _SENTENCE_SPLIT_RE.split(text) if s]
            if k % 3 == 1:
                text += " " + rng.choice(sentences)
            if k % 3 == 2 and written:
                text += " " + rng.choice(written)[:400]
            assert repetition_share(text, 13) == plain_repetition_share(text, 13)
            assert repeated_sentence(text, written) == plain_repeated_sentence(text, written, 12)
            written.append(text)


def test_lower_casing_makes_no_cjk_sentence_end_or_ascii_letter_from_elsewhere() -> None:
    """What the one-pass paths assume: lower() maps no character into a CJK range or onto a
    sentence end or line break, and keeps each of those as it is."""
    breaks = set(".!?。！？\n")
    for code in range(sys.maxunicode + 1):
        ch = chr(code)
        low = ch.lower()
        if ch in breaks or _CJK_RE.match(ch):
            assert low == ch, hex(code)
        else:
            assert not (set(low) & breaks), hex(code)
            assert not _CJK_RE.search(low), hex(code)


def test_no_cjk_is_never_wrong_about_cjk() -> None:
    for code in [0x3400, 0x4DBF, 0x4E00, 0x9FFF, 0xF900, 0xFAFF, 0x3000, 0x20000]:
        ch = chr(code)
        if _CJK_RE.match(ch):
            assert not wordcount.no_cjk("abc" + ch)
    rng = random.Random(3)
    for _ in range(20000):
        text = "".join(chr(rng.randrange(0x80, 0x10000)) for _ in range(3))
        if _CJK_RE.search(text):
            assert not wordcount.no_cjk(text), text
