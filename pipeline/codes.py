"""Corpus codes: quantisation, exact blockwise scores, streaming top-k. Pure numpy (no Ray, no LanceDB).

A *code* is the encoder's unit-norm embedding of one corpus row, stored in one of three dtypes:

- ``float16`` (default): 2 bytes/dim, relative error <= 2**-11 per component; rankings agree with
  float32 to Spearman > 0.999 (tests/test_codes.py). METHOD.md 5 calls fp16 "lossless for cosine
  in practice"; the test is what verifies it here.
- ``int8``: symmetric scalar quantisation with one float32 scale per row (2 + 4/d bytes/dim less
  than fp16: d + 4 bytes/row). The grid step is max|x|/127 (per row, so rows with a few large
  components do not crush the others), and the stored scale is 1/||q|| so that the de-quantised
  row q * scale is exactly unit norm again: a score is then the cosine with the quantised
  *direction*, which is what a ranking needs. LanceDB cannot index int8 vectors, so int8 tables
  are scored exactly only.
- ``float32``: the encoder's output unchanged (reference; 4 bytes/dim).

Scores are dot products of float32 queries with de-quantised codes. Queries are never quantised.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from pipeline.metrics import spearman

CODE_DTYPES = ("float16", "int8", "float32")
_NP_DTYPES = {"float16": np.float16, "int8": np.int8, "float32": np.float32}
INT8_MAX = 127

# Largest [rows x queries] float32 score block held at once (64 MiB): bounds memory whatever N and Q.
DEFAULT_BLOCK_ELEMS = 16 * 1024 * 1024


def numpy_dtype(code_dtype: str) -> np.dtype:
    if code_dtype not in _NP_DTYPES:
        raise ValueError(f"code dtype {code_dtype!r}: expected one of {CODE_DTYPES}")
    return np.dtype(_NP_DTYPES[code_dtype])


def bytes_per_row(dim: int, code_dtype: str) -> int:
    """Stored bytes of one code (the vector plus, for int8, its float32 scale)."""
    return dim * numpy_dtype(code_dtype).itemsize + (4 if code_dtype == "int8" else 0)


@dataclass(frozen=True)
class Quantized:
    codes: np.ndarray
    """[n, d] in the code dtype."""
    scales: np.ndarray
    """[n] float32; de-quantised row i = codes[i] * scales[i]. All ones for float dtypes."""


def quantize(x: np.ndarray, code_dtype: str = "float16") -> Quantized:
    """Quantise float32 rows [n, d] (normally unit norm) into codes of `code_dtype`."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"quantize expects a 2-D array [rows, dim], got shape {x.shape}")
    n = x.shape[0]
    if code_dtype in ("float16", "float32"):
        return Quantized(x.astype(numpy_dtype(code_dtype), copy=False), np.ones(n, np.float32))
    if code_dtype != "int8":
        numpy_dtype(code_dtype)  # raises with the list of allowed dtypes
    peak = np.abs(x).max(axis=1) if x.size else np.zeros(n, np.float32)
    step = np.where(peak > 0, peak / INT8_MAX, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / step[:, None]), -INT8_MAX, INT8_MAX).astype(np.int8)
    norm = np.linalg.norm(q.astype(np.float32), axis=1)
    # 1/||q|| makes the de-quantised row unit norm (a cosine with the quantised direction);
    # all-zero rows keep scale 0 and score 0 against everything.
    scales = np.where(norm > 0, 1.0 / np.maximum(norm, 1e-30), 0.0).astype(np.float32)
    return Quantized(q, scales)


def dequantize(codes: np.ndarray, scales: Optional[np.ndarray] = None) -> np.ndarray:
    """float32 [n, d] rows from codes of any code dtype."""
    out = np.asarray(codes).astype(np.float32)
    if scales is not None and codes.dtype == np.int8:
        out *= np.asarray(scales, dtype=np.float32)[:, None]
    return out


def _as_tensor(array: np.ndarray):
    """A torch view of a numpy array (no copy; a non-contiguous input is copied once)."""
    import torch

    with warnings.catch_warnings():
        # Arrow-backed arrays are read-only; torch warns on wrapping them, but the tensor is only
        # read here (every block is converted into a new float32 tensor before use).
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(array))


def _block_scores(codes, queries_t, scales):
    """torch [b, Q] scores of a torch code block against queries_t [d, Q]; scales: int8 only, else None."""
    import torch

    # The fp16/int8 -> float32 conversion and the product both stay in torch: torch converts with
    # SIMD (numpy's float16 cast is several times slower), and mixing torch's OpenMP pool with
    # numpy's OpenBLAS threads in one loop made the two pools fight (30x slower in testing).
    s = codes.to(torch.float32) @ queries_t
    if scales is not None:
        # (q_int * scale) . x == scale * (q_int . x): scale after the matmul, one multiply per score.
        s *= scales[:, None]
    return s


def _int8_scales(codes: np.ndarray, scales: Optional[np.ndarray]):
    """The scales as a torch tensor when the codes are int8 (float codes carry none)."""
    return _as_tensor(np.asarray(scales, np.float32)) if scales is not None and codes.dtype == np.int8 else None


def score_block(queries: np.ndarray, codes: np.ndarray, scales: Optional[np.ndarray] = None) -> np.ndarray:
    """[n, Q] float32 scores of code rows against float32 queries (cosines for unit-norm inputs)."""
    queries_t = _as_tensor(np.asarray(queries, np.float32)).T
    return _block_scores(_as_tensor(codes), queries_t, _int8_scales(codes, scales)).numpy()


# Rows per block are capped so that the float32 copy of a block stays cache-resident (8 MiB):
# converting 67 MB blocks then multiplying them went through RAM twice and ran 5x slower
# (0.57 vs 2.9 GB/s of float16 codes, 1M x 384, 16 queries, bench/bench_encode_score.py).
CACHE_BYTES = 8 * 1024 * 1024


def block_rows_for(num_queries: int, dim: int, block_elems: int = DEFAULT_BLOCK_ELEMS) -> int:
    """Rows per block: the float32 codes copy and the scores stay under block_elems and in cache."""
    return max(1, min(block_elems // max(num_queries, dim), CACHE_BYTES // (4 * dim)))


def exact_scores(
    queries: np.ndarray,
    codes: np.ndarray,
    scales: Optional[np.ndarray] = None,
    *,
    block_elems: int = DEFAULT_BLOCK_ELEMS,
    on_block: Optional[Callable[[int, np.ndarray], None]] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and max over queries of every row's score, computed in bounded blocks.

    Args:
        queries: [Q, d] float32 query embeddings (unit norm).
        codes: [N, d] codes of any code dtype.
        scales: [N] int8 scales (ignored for float codes).
        block_elems: at most this many float32 values (code copy or scores) are materialised at once.
        on_block: called as ``on_block(row_offset, S)`` with each [b, Q] block of the full score
            matrix, so per-query top-k can be taken from the same matmul.

    Returns:
        (mean [N], max [N]) float32.
    """
    import torch

    queries = np.asarray(queries, np.float32)
    if queries.ndim != 2 or queries.shape[0] == 0:
        raise ValueError(f"exact_scores needs queries [Q>=1, d], got shape {queries.shape}")
    if codes.shape[1] != queries.shape[1]:
        raise ValueError(f"codes have dim {codes.shape[1]} but queries have dim {queries.shape[1]}")
    n, nq = codes.shape[0], queries.shape[0]
    # Everything per block stays in torch (one SIMD conversion, one GEMM, two row reductions):
    # numpy reductions along a 16-wide axis cost as much as the product itself.
    q_t = _as_tensor(queries).T.contiguous()
    x = _as_tensor(codes)
    sc = _int8_scales(codes, scales)
    mean, mx = torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.float32)
    step = block_rows_for(nq, codes.shape[1], block_elems)
    for start in range(0, n, step):
        stop = min(n, start + step)
        s = _block_scores(x[start:stop], q_t, None if sc is None else sc[start:stop])
        # Mean over queries of cosines (METHOD.md 1e); equal to the cosine sum with the mean query.
        torch.mean(s, 1, out=mean[start:stop])
        torch.amax(s, 1, out=mx[start:stop])
        if on_block is not None:
            on_block(start, s.numpy())
    return mean.numpy(), mx.numpy()


def ranking_order(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Indices that sort rows by score descending, ties by id ascending (deterministic)."""
    return np.lexsort((np.asarray(ids, dtype=str), -np.asarray(scores, np.float64)))


class TopK:
    """The k best (score desc, id asc) of a stream of (ids, scores) batches, in O(k + batch) memory."""

    def __init__(self, k: int):
        if k <= 0:
            raise ValueError(f"TopK needs k >= 1, got {k}")
        self.k = k
        self.ids = np.empty(0, dtype=object)
        self.scores = np.empty(0, dtype=np.float32)

    @property
    def threshold(self) -> float:
        """Score a new row must reach (ties included) to possibly enter; -inf until k rows are held."""
        return float(self.scores[-1]) if len(self.scores) >= self.k else -np.inf

    def update(self, ids, scores) -> None:
        scores = np.asarray(scores, np.float32)
        ids = np.asarray(ids, dtype=object)
        keep = scores >= self.threshold
        if len(scores) > self.k:
            # Everything tied with the k-th best of this batch stays a candidate: the id tie-break
            # is decided below, not by argpartition's arbitrary choice among equals.
            kth = np.partition(scores, len(scores) - self.k)[len(scores) - self.k]
            keep &= scores >= kth
        if not keep.any():
            return
        all_ids = np.concatenate([self.ids, ids[keep]])
        all_scores = np.concatenate([self.scores, scores[keep]])
        order = ranking_order(all_ids, all_scores)[: self.k]
        self.ids, self.scores = all_ids[order], all_scores[order]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores), best first."""
        return self.ids, self.scores


class MultiTopK:
    """One TopK per query, fed with [rows, Q] score blocks.

    Only rows that can still enter a query's top-k leave the vectorised compare: once every heap
    is full (after the first block, in practice), a block of a large scan yields a handful of
    candidates, so the per-block cost is one [rows, Q] comparison. `ids` may be a numpy array or
    anything with ``.take(indices)`` (a pyarrow array): ids are materialised for candidates only.
    """

    def __init__(self, num_queries: int, k: int):
        self.k = k
        self.heaps = [TopK(k) for _ in range(num_queries)]
        self._thresholds = np.full(num_queries, -np.inf, np.float32)

    def update(self, ids, scores: np.ndarray) -> None:
        scores = np.asarray(scores, np.float32)  # thresholds are float32: compare like with like
        if not isinstance(ids, np.ndarray) and not hasattr(ids, "take"):
            ids = np.asarray(ids, dtype=object)  # a list: index it like an array
        n = scores.shape[0]
        thr = self._thresholds
        if n > self.k and np.isneginf(thr).any():
            # Some heap is not full yet: the block's own k-th best bounds what can enter it.
            kth = np.partition(scores, n - self.k, axis=0)[n - self.k]
            thr = np.maximum(thr, kth)
        mask = scores >= thr[None, :]
        for q in np.flatnonzero(mask.any(axis=0)):
            rows = np.flatnonzero(mask[:, q])
            self.heaps[q].update(_take(ids, rows), scores[rows, q])
            self._thresholds[q] = self.heaps[q].threshold

    def results(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return [h.result() for h in self.heaps]


def _take(ids, rows: np.ndarray) -> np.ndarray:
    if isinstance(ids, np.ndarray):
        return ids[rows]
    return np.asarray(ids.take(rows).to_pylist(), dtype=object)  # pyarrow: convert candidates only


def quantization_fidelity(emb: np.ndarray, code_dtype: str, num_queries: int = 16) -> dict:
    """How much quantising real embeddings changes rankings: Spearman of scores, quantised vs float32.

    The first `num_queries` rows act as queries (asymmetric, as in scoring: float32 query vs stored
    code), the rest as the corpus. Returns mean/min Spearman over queries and the max |score error|.
    """
    emb = np.asarray(emb, np.float32)
    nq = min(num_queries, max(1, emb.shape[0] // 4))
    queries, docs = emb[:nq], emb[nq:]
    if docs.shape[0] < 3:
        return {"samples": int(emb.shape[0]), "spearman_mean": None, "spearman_min": None, "max_abs_err": None}
    qz = quantize(docs, code_dtype)
    exact = score_block(queries, docs)
    approx = score_block(queries, qz.codes, qz.scales)
    rhos = [spearman(exact[:, j], approx[:, j]) for j in range(nq)]
    return {
        "samples": int(emb.shape[0]),
        "queries": int(nq),
        "spearman_mean": float(np.mean(rhos)),
        "spearman_min": float(np.min(rhos)),
        "max_abs_err": float(np.abs(exact - approx).max()),
    }
