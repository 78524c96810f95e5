"""Near-duplicate detection between texts: MinHash + LSH (datasketch) for candidates, exact Jaccard to decide.

Pure Python/numpy (no Ray): `prepare` uses it to keep the demo's roles free of near-duplicates, and the eval
stage's leakage audit uses it to count near-duplicates between the evaluated rows and the distillation data.
One definition of "near-duplicate" for both: `is_near_duplicate(a, b)`, i.e. the exact Jaccard similarity of
the two texts' shingle sets is at least `THRESHOLD`. MinHash/LSH only proposes candidate pairs; every reported
pair has been checked exactly, so the LSH can only cost a (bounded, tiny) chance of a miss, never a false hit.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from typing import Hashable, Iterable

from datasketch import MinHash, MinHashLSH

# Shingles: character 5-grams of the normalised text. ToxiGen statements are short (median 17 words, ~100
# characters), and the edits that make a near-copy are a word or two changed. With word 3-grams one changed
# word in a 17-word statement removes 3 of 15 shingles and adds 3 (Jaccard 12/18 = 0.67), so a one-word edit
# already falls under a 0.7 threshold; word unigrams are the opposite failure, short statements about the same
# group share most of their (function) words. Character 5-grams degrade gracefully: one changed word touches
# ~5-10 of the ~90 shingles of a statement (Jaccard ~0.8-0.9), while unrelated statements share few 5-grams
# (on ToxiGen: median Jaccard 0.01, 99th percentile 0.14); 3-grams are too common across unrelated English.
SHINGLE_CHARS = 5
# Jaccard at or above which two texts count as near-duplicates (one or two words changed in a short statement,
# or the same passage under a different T0 template wording).
THRESHOLD = 0.7
NUM_PERM = 128
# LSH banding: a pair at the threshold must become a candidate with probability >= this. False candidates only
# cost an exact Jaccard check, so recall is bought with extra candidates (datasketch's default weighting gives
# ~44 % recall at the threshold with 128 permutations, far too lossy for an audit).
MIN_RECALL_AT_THRESHOLD = 0.999

_NOT_WORD = re.compile(r"[\W_]+")


def normalise(text: str) -> str:
    """Lowercase, punctuation and whitespace runs folded to one space: 'Bi-people' and 'bi people' match.
    Letters of any script are kept."""
    return _NOT_WORD.sub(" ", (text or "").lower()).strip()


def shingles(text: str, k: int = SHINGLE_CHARS) -> frozenset[str]:
    """Character k-grams of the normalised text (a text shorter than k is its own single shingle)."""
    s = normalise(text)
    if len(s) <= k:
        return frozenset([s]) if s else frozenset()
    return frozenset(s[i : i + k] for i in range(len(s) - k + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a or not b:  # an empty text (nothing to compare) is nobody's near-copy, not even another empty one
        return 0.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def is_near_duplicate(a: str, b: str, threshold: float = THRESHOLD) -> bool:
    """The exact definition (no sketching): what the index below approximates only in choosing candidates."""
    return jaccard(shingles(a), shingles(b)) >= threshold


def lsh_bands(threshold: float, num_perm: int, min_recall: float = MIN_RECALL_AT_THRESHOLD) -> tuple[int, int]:
    """(bands, rows per band): the widest band (fewest false candidates) whose chance of proposing a pair with
    Jaccard == threshold, 1 - (1 - t^r)^b, is at least `min_recall`."""
    for r in range(num_perm // 2, 0, -1):
        b = num_perm // r
        if b >= 2 and 1.0 - (1.0 - threshold**r) ** b >= min_recall:
            return b, r
    return num_perm, 1


@dataclass(frozen=True)
class Signature:
    shingles: frozenset[str]
    minhash: MinHash | None


@dataclass
class NearDupIndex:
    """An LSH index of texts; `matches(text)` returns the indexed keys whose exact Jaccard >= threshold.

    `seed` fixes the MinHash permutations, so candidates are reproducible; the answer of `matches` depends
    on it only through the LSH's small chance of missing a pair near the threshold (see lsh_bands)."""

    threshold: float = THRESHOLD
    num_perm: int = NUM_PERM
    seed: int = 0
    _shingles: dict[Hashable, frozenset[str]] = field(default_factory=dict, init=False, repr=False)
    _minhashes: dict[Hashable, MinHash] = field(default_factory=dict, init=False, repr=False)
    _lsh: MinHashLSH = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {self.threshold}")
        self._lsh = MinHashLSH(num_perm=self.num_perm, params=lsh_bands(self.threshold, self.num_perm))
        # Drawing the seeded permutations once (not per MinHash) keeps hashing cost to the shingles themselves.
        self._permutations = MinHash(num_perm=self.num_perm, seed=self.seed).permutations

    @property
    def bands(self) -> tuple[int, int]:
        return self._lsh.b, self._lsh.r

    def _minhash(self, sh: frozenset[str]) -> MinHash:
        # CRC32 instead of datasketch's default SHA-1: shingles are a few bytes, SHA-1 per shingle was most of the
        # cost, and the affine32 scheme mixes every input hash (Murmur3 finaliser) before permuting it.
        m = MinHash(
            num_perm=self.num_perm,
            seed=self.seed,
            hashfunc=zlib.crc32,
            permutations=self._permutations,
            scheme="affine32",
        )
        m.update_batch([s.encode("utf-8") for s in sh])
        return m

    def __len__(self) -> int:
        return len(self._shingles)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._shingles

    def signature(self, text: str) -> Signature:
        """Shingles + MinHash of a text; pass it to `add`/`matches` to hash a text once for both. Valid for
        any index with the same `seed` and `num_perm`."""
        sh = shingles(text)
        return Signature(sh, self._minhash(sh) if sh else None)

    def _sig(self, text: str | Signature) -> Signature:
        return text if isinstance(text, Signature) else self.signature(text)

    def add(self, key: Hashable, text: str | Signature) -> None:
        if key in self._shingles:
            raise KeyError(f"near-duplicate index: key {key!r} added twice")
        sig = self._sig(text)
        self._shingles[key] = sig.shingles
        if sig.minhash is not None:  # an empty text has no shingles and is nobody's near-copy
            self._minhashes[key] = sig.minhash
            self._lsh.insert(key, sig.minhash)

    def _exact(
        self, sh: frozenset[str], candidates: Iterable[Hashable], skip: Hashable = None
    ) -> list[tuple[Hashable, float]]:
        """The candidates whose exact Jaccard with `sh` reaches the threshold (LSH candidates are only likely)."""
        out = []
        for key in candidates:
            if key == skip:
                continue
            j = jaccard(sh, self._shingles[key])
            if j >= self.threshold:
                out.append((key, j))
        return sorted(out, key=lambda kj: (-kj[1], str(kj[0])))

    def matches(self, text: str | Signature) -> list[tuple[Hashable, float]]:
        """Indexed keys that near-duplicate `text`, with their exact Jaccard, most similar first."""
        sig = self._sig(text)
        if sig.minhash is None or not self._minhashes:
            return []
        return self._exact(sig.shingles, self._lsh.query(sig.minhash))

    def matches_of(self, key: Hashable) -> list[tuple[Hashable, float]]:
        """Other indexed keys that near-duplicate the indexed `key` (its MinHash is reused, not recomputed)."""
        if key not in self._minhashes:
            return []
        return self._exact(self._shingles[key], self._lsh.query(self._minhashes[key]), skip=key)


def cross_matches(
    left: Iterable[str], right: Iterable[str], threshold: float = THRESHOLD, seed: int = 0
) -> list[tuple[int, int, float]]:
    """All (i, j, jaccard) with left[i] near-duplicating right[j]."""
    index = NearDupIndex(threshold=threshold, seed=seed)
    for j, t in enumerate(right):
        index.add(j, t)
    return [(i, j, s) for i, t in enumerate(left) for j, s in index.matches(t)]


def count_near_duplicates(
    left: Iterable[str], right: Iterable[str], threshold: float = THRESHOLD, seed: int = 0
) -> int:
    """How many texts of `left` near-duplicate at least one text of `right`."""
    return len({i for i, _, _ in cross_matches(left, right, threshold, seed)})
