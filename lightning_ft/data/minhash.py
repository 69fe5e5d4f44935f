"""Near-duplicate text at bounded memory: MinHash signatures of word 3-grams, banded into LSH buckets.

Each text becomes the set of word 3-grams of its normalised form (lowercase, punctuation and whitespace
collapsed). MinHash maps a set to ``BANDS * ROWS`` minima of hash functions; two sets agree on one minimum
with probability equal to their Jaccard similarity ``s``. Only a hash of each band of ``ROWS`` minima is
kept (``BANDS`` integers a text: 160 bytes), and two texts become candidates when any band agrees, which
happens with probability ``1 - (1 - s**ROWS)**BANDS``: 0.9996 at ``s = 0.8``, 0.47 at 0.5, 0.05 at 0.3.
Candidates are then confirmed with their exact Jaccard similarity, so a reported pair is never a false
positive; a pair above the threshold is missed with probability below 0.1% at 0.8 (more near a lower
``threshold``). Memory grows with the number of texts (their band hashes), never with the number of pairs:
each text is compared with at most ``PER_BUCKET`` earlier texts of a bucket.
"""

from __future__ import annotations

import itertools
import re
import zlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np

BANDS, ROWS = 20, 5
#: Earlier members of one LSH bucket a text is compared with (bounds the work on buckets of many copies).
PER_BUCKET = 8
_RNG = np.random.default_rng(0x5EED)
# Multiply-shift hashing: (a * x + b) mod 2**64, top 32 bits; a odd. numpy's uint64 arithmetic wraps.
_A = _RNG.integers(1, 2**63, size=BANDS * ROWS, dtype=np.uint64) | np.uint64(1)
_B = _RNG.integers(0, 2**63, size=BANDS * ROWS, dtype=np.uint64)
_MIX = _RNG.integers(1, 2**63, size=ROWS, dtype=np.uint64) | np.uint64(1)
_GRAM = _RNG.integers(1, 2**63, size=3, dtype=np.uint64) | np.uint64(1)


def normalize(text: str) -> str:
    """Lowercase, with runs of punctuation, symbols and whitespace collapsed to one space."""
    return re.sub(r"[\W_]+", " ", text.casefold()).strip()


def shingles(text: str, size: int = 3) -> frozenset[str]:
    """The word ``size``-grams of the normalised text (the whole text when it is shorter)."""
    words = normalize(text).split()
    if len(words) <= size:
        return frozenset([" ".join(words)]) if words else frozenset()
    return frozenset(" ".join(words[i:i + size]) for i in range(len(words) - size + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def _gram_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """A 64-bit hash of each word 3-gram of each normalised text (the same grams as :func:`shingles`), in one pass
    over the batch: ``(hashes, grams per text)``; a text of three words or fewer is one gram, one without words none.
    """
    words = [text.encode("utf-8", "surrogatepass").split() for text in texts]
    counts = np.fromiter(map(len, words), np.int64, len(words))
    hashed = np.fromiter(map(zlib.crc32, itertools.chain.from_iterable(words)), np.uint64, int(counts.sum()))
    padded = np.concatenate([hashed, np.zeros(2, dtype=np.uint64)])
    # sums[k][p]: the gram of up to k + 1 words starting at word p (wraps); a short text uses its own length's.
    sums = [padded[:len(hashed)] * _GRAM[0]]
    for k in (1, 2):
        sums.append(sums[-1] + padded[k:k + len(hashed)] * _GRAM[k])
    grams = np.maximum(counts - 2, 1) * (counts > 0)
    starts = np.repeat(np.cumsum(counts) - counts, grams) + _ranges(grams)
    width = np.repeat(np.minimum(counts, 3) - 1, grams)
    return np.stack(sums)[width, starts], grams


def _ranges(sizes: np.ndarray) -> np.ndarray:
    """``0..size-1`` for each size, concatenated."""
    ends = np.cumsum(sizes)
    return np.arange(int(ends[-1]) if len(ends) else 0) - np.repeat(ends - sizes, sizes)


def band_hashes(texts: Sequence[str], normalized: bool = False) -> np.ndarray:
    """``(len(texts), BANDS)`` LSH band hashes; a text with no word gets zeros (never a candidate).

    ``normalized``: the texts are already :func:`normalize`-d.
    """
    out = np.zeros((len(texts), BANDS), dtype=np.uint64)
    flat, grams = _gram_hashes(texts if normalized else [normalize(text) for text in texts])
    rows = np.flatnonzero(grams)
    if not len(rows):
        return out
    starts = np.cumsum(grams[rows]) - grams[rows]
    # A repeated gram cannot change a minimum: the multiset's MinHash is the set's. One hash function at a time
    # keeps the temporary at one number per gram (all at once would be BANDS * ROWS per gram).
    minima = np.empty((len(rows), BANDS * ROWS), dtype=np.uint64)
    mixed = np.empty_like(flat)
    for k in range(BANDS * ROWS):
        np.multiply(flat, _A[k], out=mixed)
        np.add(mixed, _B[k], out=mixed)
        np.right_shift(mixed, np.uint64(32), out=mixed)
        minima[:, k] = np.minimum.reduceat(mixed, starts)
    bands = (minima.reshape(len(rows), BANDS, ROWS) * _MIX).sum(axis=2)  # wraps: a hash of each band
    out[rows] = np.where(bands == 0, np.uint64(1), bands)
    return out


def candidates(bands: np.ndarray, skip: np.ndarray | None = None) -> Iterator[tuple[int, int]]:
    """Pairs ``(i, j)``, ``i < j``, sharing a band bucket (each ``j`` with at most ``PER_BUCKET`` earlier texts)."""
    live = np.ones(len(bands), dtype=bool) if skip is None else ~skip
    for band in range(bands.shape[1]):
        column = bands[:, band]
        order = np.flatnonzero(live & (column != 0))
        order = order[np.argsort(column[order], kind="stable")]  # equal hashes stay in row order
        values = column[order]
        same = np.flatnonzero(values[1:] == values[:-1])  # positions whose successor shares the bucket
        start = -1
        for position in same.tolist():
            if start < 0 or values[position] != values[start]:
                start = position  # the bucket's first member
            for i in order[start:min(position + 1, start + PER_BUCKET)].tolist():
                yield i, int(order[position + 1])


def cross_candidates(bands: np.ndarray, others: np.ndarray) -> Iterator[tuple[int, int]]:
    """Pairs ``(i, j)`` where ``bands[i]`` and ``others[j]`` share a bucket (at most ``PER_BUCKET`` per j and band)."""
    for band in range(bands.shape[1]):
        column = bands[:, band]
        order = np.argsort(column, kind="stable")
        values = column[order]
        probe = others[:, band]
        low, high = np.searchsorted(values, probe, "left"), np.searchsorted(values, probe, "right")
        for j in np.flatnonzero((high > low) & (probe != 0)):
            for i in order[low[j]:min(high[j], low[j] + PER_BUCKET)]:
                yield int(i), int(j)


def confirmed(pairs: Iterator[tuple[int, int]], left: Callable[[int], frozenset[str]],
              right: Callable[[int], frozenset[str]], threshold: float) -> dict[int, tuple[int, float]]:
    """For each ``j``: the smallest ``i`` among its candidates whose exact Jaccard similarity reaches ``threshold``.

    Args:
        pairs: Candidate pairs, e.g. from :func:`candidates`.
        left: The shingle set of an ``i``; ``right``: of a ``j`` (the same function within one collection).
        threshold: In ``(0, 1]``.
    """
    by_j: dict[int, set[int]] = {}
    for i, j in pairs:
        by_j.setdefault(j, set()).add(i)
    found = {}
    for j in sorted(by_j):
        b = right(j)
        for i in sorted(by_j[j]):
            similarity = jaccard(left(i), b)
            if similarity >= threshold:
                found[j] = (i, similarity)
                break
    return found
