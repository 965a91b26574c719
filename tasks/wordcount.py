"""Length as the LongWriter paper counts it: CJK characters plus English words.

The paper (and LongBench-Write's scorer) counts `[a-zA-Z]+` runs as words and every CJK
ideograph as one unit, so a Chinese sample of 3,000 字 and an English one of 3,000 words score
alike. Digits and punctuation do not count. Every stage (filters, export, eval) uses this one
function so lengths agree everywhere.

The other text helpers every stage shares live here too (units and n-grams, repetition, the
token estimate, joining paragraphs into a sample): this module imports no stage, so any stage
can use them without an import cycle.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Iterable, Iterator, Sequence

# CJK Unified Ideographs + Extension A + Compatibility Ideographs: the ranges the paper's
# `count_words` helper matches (it uses \u4e00-\u9fff; we add the rarer blocks that also
# appear in Chinese text).
_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_RE = re.compile(f"[{_CJK}]")
_WORD_RE = re.compile(r"[a-zA-Z]+")
# Runs, not single characters: one match per run of Chinese text, where a match per character
# costs ~8x more (an object each).
_CJK_RUN_RE = re.compile(f"[{_CJK}]+")

# Fast paths without a regex (the quality checks run these over every draft; sre finds the
# words of a 300-word paragraph in ~35 us, a byte table and a split in ~10 us, and counts them
# in ~2 us). A text holds no counted CJK character
# when its UTF-8 has none of the lead bytes of U+3000-U+9FFF and U+F000-U+FFFF, which hold
# every range in _CJK: then its units are exactly its runs of ASCII letters.
_CJK_UTF8_LEADS = b"\xe3\xe4\xe5\xe6\xe7\xe8\xe9\xef"
# Every other byte: deleted, what is left of a text's UTF-8 is its lead bytes of those ranges.
_NOT_CJK_LEADS = bytes(b for b in range(256) if b not in _CJK_UTF8_LEADS)
# ASCII letters kept, every other byte a space (non-ASCII characters arrive as "?" from
# encode(errors="replace"), one per character, so they split runs as the regex does).
_LETTERS_ONLY = bytes(b if chr(b).isascii() and chr(b).isalpha() else 0x20 for b in range(256))
# Every ASCII letter as "a", every other byte a space: the runs counted without building them.
_LETTER_MARKS = bytes(0x61 if chr(b).isascii() and chr(b).isalpha() else 0x20 for b in range(256))


def no_cjk(text: str) -> bool:
    """True when `text` holds no character of the counted CJK ranges (may say False for a
    text with other characters of those lead bytes: CJK punctuation, kana, Hangul)."""
    if text.isascii():
        return True
    # One C pass (bytes.translate deleting every other byte), short texts included.
    return not text.encode("utf-8", "surrogatepass").translate(None, _NOT_CJK_LEADS)


def letter_runs(text: str) -> int:
    """Number of `[a-zA-Z]+` runs in `text` (its English words)."""
    marks = text.encode("ascii", "replace").translate(_LETTER_MARKS)
    return marks.count(b" a") + marks.startswith(b"a")


# Texts whose counts are kept: the quality checks ask for the same paragraph's length and
# language several times, and the filters again per sample.
_COUNT_CACHE_TEXTS = 4096


@functools.lru_cache(maxsize=_COUNT_CACHE_TEXTS)
def _unit_counts(text: str) -> tuple[int, int]:
    """(CJK characters, English words) of `text`."""
    return _cjk_count(text), letter_runs(text)


def _cjk_count(text: str) -> int:
    """len(_CJK_RE.findall(text)). no_cjk is exact when it says True (an ASCII text in
    nanoseconds, an English one with curly quotes in one C pass): the regex scans only a text
    that may hold CJK."""
    return 0 if no_cjk(text) else sum(map(len, _CJK_RUN_RE.findall(text)))


def count_words(text: str) -> int:
    """Return the number of CJK characters plus English words in `text`. Cached: the quality
    checks ask for the same paragraph's length and language several times."""
    if not text:
        return 0
    cjk, words = _unit_counts(text)
    return cjk + words


def cjk_share(text: str) -> float:
    """Share of the counted units that are CJK characters (0.0 for empty text)."""
    cjk, words = _unit_counts(text)
    total = cjk + words
    return cjk / total if total else 0.0


def detect_lang(text: str) -> str:
    """'zh' when most counted units are CJK characters, else 'en'."""
    return "zh" if cjk_share(text) > 0.5 else "en"


# Counted units as a token list (lower-cased words and single CJK characters): the unit every
# n-gram measure (repetition, restated paragraphs, near-duplicate samples) works over, so a
# Chinese and an English text are measured alike.
_UNIT_RE = re.compile(f"[a-zA-Z]+|[{_CJK}]")
# The same units found as runs (a CJK run is then split into its characters), and with the
# sentence breaks among them (_sentence_keys).
_UNIT_RUN_RE = re.compile(f"[a-zA-Z]+|[{_CJK}]+")
_UNIT_RUN_OR_BREAK_RE = re.compile(f"[a-zA-Z]+|[{_CJK}]+|[.!?。！？\n]")
_SENTENCE_BREAKS = frozenset(".!?。！？\n")


def _units_of_runs(lower: str) -> list[str]:
    """_UNIT_RE.findall(lower), from runs: an ASCII word stays whole (every ASCII letter is
    below U+3400, every CJK character at or above it), a CJK run gives its characters."""
    out: list[str] = []
    for run in _UNIT_RUN_RE.findall(lower):
        if run[0] < "\u3400":
            out.append(run)
        else:
            out.extend(run)
    return out


def units(text: str) -> list[str]:
    """Lower-cased English words and CJK characters of `text`, in order."""
    # One lower() of the text, not one per token: the audit of 6,000 long samples spent a
    # tenth of its time here. Lower-casing maps no character into a CJK range, so the
    # lowered text is tested.
    lower = text.lower()
    if no_cjk(lower):
        return lower.encode("ascii", "replace").translate(_LETTERS_ONLY).decode("ascii").split()
    return _units_of_runs(lower)


def first_unit(text: str) -> str | None:
    """units(text)[0], or None for a text without units: found without reading the rest."""
    m = _UNIT_RE.search(text.lower())
    return m.group(0) if m else None


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    # zip over n shifted views builds the tuples in C: ~3x faster than slicing per position.
    if len(tokens) < n:
        return []
    return list(zip(*(tokens[i:] for i in range(n)), strict=False))


class TextUnits:
    """One text's units and the n-gram views the checks share, each built once.

    The checks mostly ask a negative ("no n-gram of this draft is in the template / the
    instruction / the paragraphs before it / twice in the draft"), and answer it from the
    n-grams' hashes: equal n-grams have equal hashes, so hashes that do not meet prove the
    n-grams do not either. Hashes are ints, built with no tuple kept per n-gram (zip hands
    hash() one tuple again and again), which the garbage collector never has to walk; the
    n-grams themselves (list in order, set) are built only for a check that has to know
    which n-grams meet."""

    __slots__ = ("tokens", "_lists", "_hashes", "_distinct", "_spaced")

    def __init__(self, tokens: tuple[str, ...]) -> None:
        self.tokens = tokens
        self._lists: dict[int, tuple[tuple[str, ...], ...]] = {}
        self._hashes: dict[int, tuple[int, ...]] = {}
        # n -> True when no two n-grams have one hash (so no n-gram is there twice); kept
        # after the hash set leaves _recent_hash_set, as a fact about the text.
        self._distinct: dict[int, bool] = {}
        self._spaced: str | None = None

    @property
    def spaced(self) -> str:
        """The units between single spaces, one before and after: a run of units is in the
        text exactly when its own spaced form is a substring of this (no unit holds a space)."""
        if self._spaced is None:
            self._spaced = f" {' '.join(self.tokens)} "
        return self._spaced

    def zipped(self, n: int) -> Iterator[tuple[str, ...]]:
        """The n-grams one at a time (hash() or a lookup keeps none: zip reuses the tuple)."""
        return zip(*[self.tokens[i:] for i in range(n)], strict=False)

    def grams(self, n: int) -> tuple[tuple[str, ...], ...]:
        """The n-grams in order (ngrams(units(text), n))."""
        got = self._lists.get(n)
        if got is None:
            got = self._lists[n] = tuple(ngrams(self.tokens, n))
        return got

    def gram_count(self, n: int) -> int:
        """len(self.grams(n)), without building them."""
        return len(self.tokens) - n + 1 if len(self.tokens) >= n else 0

    def gram_set(self, n: int) -> frozenset[tuple[str, ...]]:
        """The n-grams as a set (for the checks that must know which meet)."""
        return _recent_gram_set(self, n)

    def gram_hashes(self, n: int) -> tuple[int, ...]:
        """hash() of each n-gram, in order."""
        got = self._hashes.get(n)
        if got is None:
            got = self._hashes[n] = tuple(map(hash, self.zipped(n)))
        return got

    def gram_hash_set(self, n: int) -> frozenset[int]:
        return _recent_hash_set(self, n)

    def has_hash_set(self, n: int) -> bool:
        """Whether a check built the n-gram hash set (it may have to be built again)."""
        return n in self._distinct

    def distinct_up_to(self, n: int) -> bool:
        """True when for some m <= n no two m-grams were found to share a hash: then no
        n-gram repeats (two equal n-grams start with two equal m-grams). False says
        nothing."""
        return any(0 < m <= n and once for m, once in self._distinct.items())


# Sets kept: those of the texts of the last few write steps, where one draft's checks share
# them. Few, unlike the units: the garbage collector never untracks a set, and walks every
# entry of every set it keeps at each full collection.
_RECENT_SETS = 64


@functools.lru_cache(maxsize=_RECENT_SETS)
def _recent_gram_set(of: TextUnits, n: int) -> frozenset[tuple[str, ...]]:
    listed = of._lists.get(n)
    return frozenset(listed) if listed is not None else frozenset(of.zipped(n))


@functools.lru_cache(maxsize=_RECENT_SETS)
def _recent_hash_set(of: TextUnits, n: int) -> frozenset[int]:
    got = frozenset(of.gram_hashes(n))
    of._distinct[n] = len(got) == of.gram_count(n)
    return got


# Texts whose units are kept: a draft's are read by several checks in one write step, and an
# earlier paragraph's n-gram hashes by every later one. Bounded (a paragraph's entry is ~15 KB
# with its hashes; its token strings are the sentence cache's); texts longer than a paragraph
# (whole samples) are not kept.
_UNITS_CACHE_TEXTS = 500
_UNITS_CACHE_MAX_CHARS = 20_000


@functools.lru_cache(maxsize=_UNITS_CACHE_TEXTS)
def _cached_text_units(text: str) -> TextUnits:
    # units(text) is its sentences' units one after another (no unit spans a sentence end or
    # a line break): built from the sentences, which repeated_sentence reads for the same
    # draft, one pass over the text serves both and they share the token strings.
    return TextUnits(tuple(itertools.chain.from_iterable(_sentence_keys(text))))


def text_units(text: str) -> TextUnits:
    """units(text) with its n-gram views, shared by every check of the same text."""
    if len(text) > _UNITS_CACHE_MAX_CHARS:
        return TextUnits(tuple(units(text)))
    return _cached_text_units(text)


def repetition_share(text: str, n: int = 13) -> float:
    """Share of n-gram occurrences (over words and CJK characters) that repeat an n-gram seen
    earlier in the text: 0 for fresh prose, near 1 for a model stuck in a loop."""
    tu = text_units(text)
    tokens = tu.tokens
    if len(tokens) < n + 1:
        return 0.0
    total = len(tokens) - n + 1
    # No n-gram twice: seen from hashes (the paragraph checks' shorter n-grams, or these),
    # none of which two n-grams share. Otherwise counted from the n-grams themselves.
    if tu.distinct_up_to(n) or len(set(map(hash, tu.zipped(n)))) == total:
        return 0.0
    # The set straight from the zipped views: no list of every n-gram in between.
    distinct = len(set(tu.zipped(n)))
    return (total - distinct) / total


def estimate_from_counts(length: int, cjk: int) -> int:
    """estimate_tokens of a text of `length` characters, `cjk` of them counted CJK ones. Both
    counts add up over a concatenation, so a joined or templated text is estimated from its
    parts' counts (text_counts) without reading it again; the one expression here, over the
    same integers, keeps such an estimate equal to estimate_tokens of the whole text."""
    return int((length - cjk) / 3 + cjk * 1.5) + 1


def text_counts(text: str) -> tuple[int, int]:
    """(characters, counted CJK characters) of `text`: all that estimate_tokens reads."""
    return len(text), _cjk_count(text)


# Paragraphs whose counts are kept: every write call of a sample estimates each paragraph of
# the text so far again (the same str objects, call after call), so without a cache each call
# rescans the whole text (issue 12); the turns prompt's asks too (the same text rendered again
# per call). Enough for the paragraphs and asks of the samples in flight (chains x steps, ~3
# texts a step); an entry is a pair of ints and a reference to its text. Texts longer than a
# paragraph are counted, not kept.
_PARAGRAPH_COUNT_TEXTS = 8192
_PARAGRAPH_COUNT_MAX_CHARS = 20_000


@functools.lru_cache(maxsize=_PARAGRAPH_COUNT_TEXTS)
def _cached_paragraph_counts(text: str) -> tuple[int, int]:
    return text_counts(text)


def paragraph_counts(text: str) -> tuple[int, int]:
    """text_counts of a text that is estimated again and again (a paragraph of the text so
    far, an ask of the turns prompt); cached up to paragraph size."""
    if len(text) > _PARAGRAPH_COUNT_MAX_CHARS:
        return text_counts(text)
    return _cached_paragraph_counts(text)


def estimate_tokens(text: str) -> int:
    """Conservative token estimate without a tokenizer: ~3 characters per token for Latin
    text, 1.5 tokens per CJK character (small models' vocabularies split Chinese finely).
    Over-estimating only costs context; under-estimating costs a failed call."""
    return estimate_from_counts(*text_counts(text))


def join_paragraphs(paragraphs: list[str]) -> str:
    """The sample: paragraphs in order, separated by blank lines."""
    return "\n\n".join(p.strip() for p in paragraphs if p.strip())


# A sentence this long said twice word for word is a loop, not style: anaphora and refrains
# repeat openings and short lines (verse is judged apart by the caller).
REPEATED_SENTENCE_MIN_UNITS = 12
_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?。！？])\s*|\n+")


# Enough for every paragraph of the samples in flight at once (chains x paragraphs), bounded so a
# long build does not keep every paragraph it ever checked.
_SENTENCE_CACHE_PARAGRAPHS = 4096
# _SENTENCE_SPLIT_RE splits after each sentence end (.!?。！？) and at each line break, and no
# unit holds one of those: a sentence's units are the units between two of them, found in one
# pass over the text (not a split, then a units() call per sentence).
# A text without CJK (so without "。！？", whose lead bytes no_cjk looks for): "." and "!" and a
# line break become a newline, a letter stays, the rest a space. "?" is made a newline before
# the encoding, whose replacement character for a non-ASCII one it is, so here it is a space.
_SENTENCE_MARKS = bytes(
    0x0A if chr(b) in ".!\n" else b if chr(b).isascii() and chr(b).isalpha() else 0x20
    for b in range(256)
)


@functools.lru_cache(maxsize=_SENTENCE_CACHE_PARAGRAPHS)
def _sentence_keys(text: str) -> tuple[tuple[str, ...], ...]:
    """The units of each sentence of `text` (as _SENTENCE_SPLIT_RE splits it), in order, the
    sentences without any left out. Cached: a draft's are read again as an earlier paragraph
    by every later draft of its sample."""
    lower = text.lower()  # lower-casing maps no character to a sentence end or a CJK one
    if no_cjk(lower):
        marked = lower.replace("?", "\n").encode("ascii", "replace").translate(_SENTENCE_MARKS)
        keys = map(tuple, map(str.split, marked.decode("ascii").split("\n")))
        return tuple(filter(None, keys))  # maps and filter: no Python-level loop per sentence
    # With CJK: runs and breaks in one scan, each run read whole (a sentence of Chinese holds
    # one or two), the sentence closed at each break.
    found: list[tuple[str, ...]] = []
    sentence: list[str] = []
    for run in _UNIT_RUN_OR_BREAK_RE.findall(lower):
        if run in _SENTENCE_BREAKS:
            if sentence:
                found.append(tuple(sentence))
                sentence = []
        elif run[0] < "\u3400":
            sentence.append(run)
        else:
            sentence.extend(run)
    if sentence:
        found.append(tuple(sentence))
    return tuple(found)


@functools.lru_cache(maxsize=_SENTENCE_CACHE_PARAGRAPHS)
def _long_sentences(text: str, min_units: int) -> frozenset[tuple[str, ...]]:
    # Cached: every draft is checked against all the paragraphs before it, so each earlier
    # one's sentences would otherwise be split again per later draft (quadratic in a sample).
    if min_units < 1:  # empty sentences count: only the plain split gives them
        keys: Iterable[tuple[str, ...]] = (tuple(units(s)) for s in _SENTENCE_SPLIT_RE.split(text))
    else:
        keys = _sentence_keys(text)
    return frozenset(k for k in keys if len(k) >= min_units)


def _first_repeated_sentence(text: str, seen: set[tuple[str, ...]], min_units: int) -> str | None:
    """The first sentence of `text` (its own text, stripped) whose units are in `seen` or in
    a sentence before it."""
    for sentence in _SENTENCE_SPLIT_RE.split(text):
        key = tuple(units(sentence))
        if len(key) < min_units:
            continue
        if key in seen:
            return sentence.strip()
        seen.add(key)
    return None


def repeated_sentence(
    text: str, earlier: Sequence[str] = (), min_units: int = REPEATED_SENTENCE_MIN_UNITS
) -> str | None:
    """The first sentence of at least `min_units` words (or CJK characters) that `text` says
    again word for word (case and punctuation aside), or None. SmolLM2 loops this way inside
    one paragraph ("The island of Ravenshire - A place where dreams and reality had been
    intertwined forever ..." three times in 344 words) while its 13-gram repetition share
    stays near 20%, under the sample filter's limit), or that an `earlier` paragraph said
    ("The locals make up a very unique way of life for themselfs; ..." again in paragraph 2)."""
    if min_units >= 1:  # (with min_units < 1 empty sentences count: only the plain split)
        # Whether any sentence repeats, from the cached sentence units; the plain split
        # (which gives the sentence's own text) runs only for a draft that loops. `mine` is
        # the set the next draft reads for this one as an earlier paragraph; set against set
        # compares stored hashes.
        mine = _long_sentences(text, min_units)
        long_ones = sum(len(k) >= min_units for k in _sentence_keys(text))
        if long_ones == len(mine) and all(
            _long_sentences(before, min_units).isdisjoint(mine) for before in earlier
        ):
            return None
    seen: set[tuple[str, ...]] = set()
    for before in earlier:
        seen |= _long_sentences(before, min_units)
    return _first_repeated_sentence(text, seen, min_units)
