"""Near-duplicate samples across a dataset: MinHash over word (or CJK character) 5-gram
shingles, with datasketch's LSH index to find candidates in one pass.

Two instructions that produced the same text (a paraphrased instruction, a model that
answered two prompts with one essay) must not both ship: the later one (by instruction id)
is dropped with its reason stored. Pure over texts; the export stage applies it to the store.

A sample's signature (its MinHash's NUM_PERM minima) depends on its text alone, so the build
computes it beside the writing, in a worker process, as each sample is stored
(tasks.signature_worker): the export then reads signatures instead of hashing every shingle of
every sample at the end of the run. The verdicts are the same either way: a signature is the
MinHash's own values, and `find_near_duplicate_signatures` is the one pass both paths take.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

import numpy as np

from tasks.wordcount import units

if TYPE_CHECKING:
    from datasketch import MinHash

SHINGLE = 5
NUM_PERM = 128
# Estimated Jaccard similarity of shingle sets above which two samples are the same text.
THRESHOLD = 0.8
# Shingle hashes handed to MinHash.update_batch at a time. Its permutation step builds
# (shingles x NUM_PERM) uint32 arrays; a 300-word x 6 sample's ~1,800 shingles make ~1 MB
# temporaries, which glibc maps and unmaps on every call (page faults: 2.5x the CPU of the
# same arithmetic in ~200 KB pieces that stay on the heap). The minimum over the pieces is
# the minimum over the whole: the hash values are the same.
HASH_CHUNK = 400
# SHA-1 digests are 20 bytes: five 32-bit words, of which datasketch's sha1_hash32 takes the
# first, little-endian.
_SHA1_WORDS = 5
_DIGEST = operator.methodcaller("digest")


# A signature's bytes: the NUM_PERM minima as little-endian uint32, the dtype datasketch's
# affine32 scheme keeps them in (`from_signature` gives back whatever dtype it keeps).
SIGNATURE_DTYPE = "<u4"


@dataclass(frozen=True)
class NearDuplicate:
    key: int  # the dropped sample (later)
    of: int  # the sample it repeats (kept)
    similarity: float


def shingle_hashes(text: str) -> list[int]:
    """datasketch's default 32-bit hash (sha1_hash32: the first four bytes of SHA-1, little
    endian) of every shingle, the space-joined 5-gram of units in UTF-8, in text order: the
    values the per-shingle calls gave, computed with map() and one numpy view in C instead of
    a Python call, a struct.unpack and a slice per shingle. A shingle that recurs is hashed
    again rather than a set built first: a MinHash keeps minima, so a value given twice
    changes nothing, and the few repeats of accepted prose cost less than the set."""
    toks = units(text)
    grams = map(" ".join, zip(*(toks[i:] for i in range(SHINGLE)), strict=False))
    digests = b"".join(map(_DIGEST, map(hashlib.sha1, map(str.encode, grams))))
    return np.frombuffer(digests, dtype="<u4")[::_SHA1_WORDS].tolist()


@cache
def _empty_minhash() -> MinHash:
    # One MinHash to copy per text: a new one draws its NUM_PERM permutations from a seeded
    # RandomState each time (~0.2 ms). `int` as the hash function: update_batch receives the
    # hash values already computed (shingle_hashes), and int() returns each as it is.
    from datasketch import MinHash

    return MinHash(num_perm=NUM_PERM, seed=1, hashfunc=int)


def minhash(text: str) -> MinHash:
    """The text's MinHash over its shingles: the hash values MinHash(num_perm=NUM_PERM,
    seed=1) with update_batch over the shingles' UTF-8 bytes gives."""
    m = _empty_minhash().copy()
    hashes = shingle_hashes(text)
    for start in range(0, len(hashes), HASH_CHUNK):
        m.update_batch(hashes[start : start + HASH_CHUNK])
    return m


def text_sha1(text: str) -> str:
    """The digest a stored signature is valid for (its sample's text, UTF-8)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def signature(m: MinHash) -> bytes:
    """A MinHash's minima as SIGNATURE_DTYPE bytes (NUM_PERM x 4 = 512 bytes)."""
    return m.hashvalues.astype(SIGNATURE_DTYPE).tobytes()


def text_signature(text: str) -> tuple[str, bytes]:
    """(text_sha1, signature) of a text: what tasks.signature_worker computes for a sample."""
    return text_sha1(text), signature(minhash(text))


def from_signature(data: bytes) -> MinHash:
    """The MinHash a signature's bytes hold: the values `minhash` gave, in its dtype, with
    seed 1 and its scheme, so its estimates are the ones the two MinHashes give."""
    from datasketch import LeanMinHash

    values = np.frombuffer(data, dtype=SIGNATURE_DTYPE)
    if values.size != NUM_PERM:
        raise ValueError(f"a signature holds {NUM_PERM} values, not {values.size}")
    # The scheme (datasketch's permutation formula) of the MinHashes the values came from.
    like = _empty_minhash()
    hashvalues = values.astype(like.hashvalues.dtype)
    return LeanMinHash(seed=1, hashvalues=hashvalues, scheme=like.scheme)


def find_near_duplicates(
    texts: Iterable[tuple[int, str]], threshold: float = THRESHOLD
) -> list[NearDuplicate]:
    """Samples (key, text), in order, that repeat an earlier one: each is reported once,
    against the first earlier sample LSH finds at or above `threshold`."""
    return find_near_duplicate_signatures(((k, minhash(t)) for k, t in texts), threshold)


def find_near_duplicate_signatures(
    signatures: Iterable[tuple[int, MinHash]], threshold: float = THRESHOLD
) -> list[NearDuplicate]:
    """`find_near_duplicates` over samples' MinHashes (key, minhash), in order."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    kept: dict[int, MinHash] = {}
    found: list[NearDuplicate] = []
    for key, m in signatures:
        best: tuple[float, int] | None = None
        for other in lsh.query(m):
            sim = float(m.jaccard(kept[other]))
            if sim >= threshold and (best is None or sim > best[0]):
                best = (sim, other)
        if best is not None:
            found.append(NearDuplicate(key, best[1], best[0]))
            continue
        lsh.insert(key, m)
        kept[key] = m
    return found
