"""Near-duplicate samples (tasks.near_duplicates): the fast shingle hashing gives datasketch's
own MinHash values, so every estimate and verdict is the one datasketch's default path gives;
copies and paraphrases are found, in English and Chinese, and distinct samples are not."""

import random

import numpy as np
import pytest
from datasketch import MinHash
from datasketch.hashfunc import sha1_hash32

from tasks.near_duplicates import (
    HASH_CHUNK,
    NUM_PERM,
    SHINGLE,
    THRESHOLD,
    find_near_duplicates,
    minhash,
    shingle_hashes,
)
from tasks.wordcount import ngrams, units
from tests.fake_openai import VOCAB, prose


def reference_minhash(text: str) -> MinHash:
    """The way the export hashed shingles before: datasketch's default (SHA-1, 32 bits) over
    each distinct shingle's UTF-8 bytes, in one update_batch."""
    grams = {" ".join(g).encode("utf-8") for g in ngrams(units(text), SHINGLE)}
    m = MinHash(num_perm=NUM_PERM, seed=1)
    if grams:
        m.update_batch(list(grams))
    return m


def sample(seed: str, words: int = 1800, chinese: bool = False) -> str:
    return "\n\n".join(prose(f"{seed}|{k}", words // 6, chinese=chinese) for k in range(6))


def replace_words(text: str, share: float, seed: int) -> str:
    rng = random.Random(seed)
    words = text.split(" ")
    for i in rng.sample(range(len(words)), int(len(words) * share)):
        words[i] = rng.choice(VOCAB)
    return " ".join(words)


TEXTS = [
    "",
    "too short",  # under SHINGLE units: no shingle at all
    "one two three four five",  # exactly one shingle
    "Word " * 40,  # one shingle, repeated
    sample("en"),
    sample("zh", chinese=True),
    sample("mixed") + "\n\n" + sample("mixed-zh", 600, chinese=True),
    "Ünïcödé façade naïve 東京 и кириллица " * 30,
    prose("boundary", HASH_CHUNK + SHINGLE - 1),  # exactly HASH_CHUNK shingles
    prose("long", 3 * HASH_CHUNK + 7),  # several chunks
]


@pytest.mark.parametrize("text", TEXTS)
def test_minhash_equals_datasketch_default_path(text):
    mine, ref = minhash(text), reference_minhash(text)
    assert mine.hashvalues.dtype == ref.hashvalues.dtype
    assert np.array_equal(mine.hashvalues, ref.hashvalues)
    assert mine.seed == ref.seed and mine.scheme == ref.scheme
    assert np.array_equal(mine.permutations, ref.permutations)


@pytest.mark.parametrize("text", TEXTS)
def test_shingle_hashes_are_sha1_hash32_of_each_shingle(text):
    grams = [" ".join(g).encode("utf-8") for g in ngrams(units(text), SHINGLE)]
    assert shingle_hashes(text) == [sha1_hash32(g) for g in grams]


def test_similarities_equal_the_reference_estimates():
    base = sample("pairs")
    others = [base, replace_words(base, 0.01, 1), replace_words(base, 0.03, 2), sample("x")]
    for other in others:
        assert minhash(base).jaccard(minhash(other)) == reference_minhash(base).jaccard(
            reference_minhash(other)
        )


def test_copies_and_paraphrases_are_found_distinct_samples_are_not():
    en = [sample(f"en{i}") for i in range(8)]
    zh = [sample(f"zh{i}", chinese=True) for i in range(4)]
    texts = [*en, *zh]
    later = [
        en[2],  # exact copy
        replace_words(en[5], 0.01, 3),  # one word in a hundred changed
        zh[1],  # Chinese copy
        zh[3][:40] + "，" + zh[3][40:],  # one punctuation mark added: the same units
        "\n\n".join(reversed(en[6].split("\n\n"))),  # paragraphs reordered
    ]
    found = find_near_duplicates(enumerate([*texts, *later], start=1))
    n = len(texts)
    assert {(d.key, d.of) for d in found} == {
        (n + 1, 3),
        (n + 2, 6),
        (n + 3, 10),
        (n + 4, 12),
        (n + 5, 7),
    }
    by_key = {d.key: d.similarity for d in found}
    assert by_key[n + 1] == by_key[n + 3] == by_key[n + 4] == 1.0
    assert THRESHOLD <= by_key[n + 2] < 1.0
    assert by_key[n + 5] >= THRESHOLD  # only the few shingles across the moved breaks differ


def test_a_duplicate_is_reported_once_against_the_earliest_kept_sample():
    text = sample("thrice")
    found = find_near_duplicates([(1, text), (2, text), (3, text), (4, sample("other"))])
    assert [(d.key, d.of) for d in found] == [(2, 1), (3, 1)]


def test_half_a_sample_again_is_not_a_near_duplicate():
    a = sample("half")
    b = "\n\n".join(a.split("\n\n")[:3] + sample("other half").split("\n\n")[3:])
    assert find_near_duplicates([(1, a), (2, b)]) == []
