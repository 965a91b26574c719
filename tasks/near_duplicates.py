"""Near-duplicate samples across a dataset: MinHash over word (or CJK character) 5-gram
shingles, with datasketch's LSH index to find candidates in one pass.

Two instructions that produced the same text (a paraphrased instruction, a model that
answered two prompts with one essay) must not both ship: the later one (by instruction id)
is dropped with its reason stored. Pure over texts; the export stage applies it to the store.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tasks.wordcount import ngrams, units

SHINGLE = 5
NUM_PERM = 128
# Estimated Jaccard similarity of shingle sets above which two samples are the same text.
THRESHOLD = 0.8


@dataclass(frozen=True)
class NearDuplicate:
    key: int  # the dropped sample (later)
    of: int  # the sample it repeats (kept)
    similarity: float


def _minhash(text: str) -> object:
    from datasketch import MinHash

    grams = {" ".join(g).encode("utf-8") for g in ngrams(units(text), SHINGLE)}
    m = MinHash(num_perm=NUM_PERM, seed=1)
    if grams:
        m.update_batch(list(grams))
    return m


def find_near_duplicates(
    texts: Iterable[tuple[int, str]], threshold: float = THRESHOLD
) -> list[NearDuplicate]:
    """Samples (key, text), in order, that repeat an earlier one: each is reported once,
    against the first earlier sample LSH finds at or above `threshold`."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    kept: dict[int, object] = {}
    found: list[NearDuplicate] = []
    for key, text in texts:
        m = _minhash(text)
        best: tuple[float, int] | None = None
        for other in lsh.query(m):
            sim = float(m.jaccard(kept[other]))  # type: ignore[attr-defined]
            if sim >= threshold and (best is None or sim > best[0]):
                best = (sim, other)
        if best is not None:
            found.append(NearDuplicate(key, best[1], best[0]))
            continue
        lsh.insert(key, m)
        kept[key] = m
    return found
