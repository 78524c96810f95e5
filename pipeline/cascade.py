"""The teacher re-rank cascade (`score.rerank_top`): pure maths, numpy only, shared by score and eval.

The encoder ranks every corpus row; the teacher (exact gradient influence, the sketch stage's
computation) is run on the encoder's top-K rows only, and those K rows are re-ordered. They keep the
top-K block (ranks 1..K); rows past K keep the encoder's order and ranks. Orders are always "score
descending, ties by id ascending" (codes.ranking_order, ranking.py), so a cascade ranking is
deterministic.

How the block is re-ordered (`score.rerank_by`, RERANK_BY):
- `fused` (the default): reciprocal-rank fusion of the two rankings inside the block,
  1 / (RRF_K + encoder rank) + 1 / (RRF_K + teacher rank). The encoder (distilled, and blended with
  the plain encoder where fit chose a blend) and the teacher make partly independent errors; where
  either alone is the weaker ranker for an application, re-ordering by it alone throws away what the
  other knew. Fusion needs no labels and no tuning: RRF_K is the constant of the method's paper
  (Cormack, Clarke & Buettcher, SIGIR 2009), fixed before any measurement here.
- `teacher`: the teacher's score alone (the cascade of METHOD.md: the block in teacher order).

Rows the teacher could not score (it rejected the row: e.g. nothing of the response survives
`teacher.max_len`) carry a NaN teacher score: they stay in the block, after every teacher-scored
row, in their encoder order. The teacher has no evidence for them, so they neither jump ahead of
rows it did score nor fall behind rows it was never asked about.

The score stage applies `rerank` to the first K rows of its merged ranking. The eval stage uses
`cascade_order` / `cascade_scores` (aggregate ranking, for AUPRC) and `per_query_cascade_scores`
(each query's own top-K re-ranked by that query's teacher cosine, for Recall@k and MRR).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from pipeline.ranking import rows_for_fraction

RERANK_BY = ("fused", "teacher")
"""How the cascade re-orders its block (`score.rerank_by`, whose default is `fused`). The functions
here take it without a default: a caller always says which order it means."""
RRF_K = 60
"""Reciprocal-rank fusion's constant (Cormack et al. 2009's value; not tuned on any data here)."""


def resolve_k(rerank_top: float, n: int) -> int:
    """Rows re-ranked out of n: a fraction in (0, 1) -> ceil(fraction * n) (at least 1 when n > 0,
    as `score.select_top_frac` rounds); a count >= 1 -> min(count, n)."""
    if n <= 0:
        return 0
    if not rerank_top > 0:
        raise ValueError(f"rerank_top must be > 0; got {rerank_top}")
    if rerank_top < 1:
        return min(n, max(1, rows_for_fraction(rerank_top, n)))
    if float(rerank_top) != int(rerank_top):
        raise ValueError(f"rerank_top >= 1 is a row count and must be a whole number; got {rerank_top}")
    return min(n, int(rerank_top))


def _order(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Score descending, ties by id ascending (the same key as codes.ranking_order and ranking.py)."""
    return np.lexsort((np.asarray(ids, dtype=str), -np.asarray(scores, dtype=np.float64)))


def rerank(block_ids, teacher_scores, by: str) -> np.ndarray:
    """Permutation of a top-K block (given in encoder order) into cascade order.

    Teacher-scored rows first, ordered by `by` (RERANK_BY): `teacher`, the teacher score descending;
    `fused`, the reciprocal-rank fusion of the row's place in the block (its encoder rank) and its
    rank by teacher score among the scored rows. Ties by id. Rows with a NaN teacher score come after
    them, in the order given (the encoder's).
    """
    ids = np.asarray(block_ids, dtype=str)
    t = np.asarray(teacher_scores, dtype=np.float64)
    if ids.shape != t.shape or ids.ndim != 1:
        raise ValueError(f"one teacher score per block row is needed: {ids.shape} ids, {t.shape} scores")
    if by not in RERANK_BY:
        raise ValueError(f"rerank_by must be one of {RERANK_BY}; got {by!r}")
    scored = np.flatnonzero(~np.isnan(t))
    unscored = np.flatnonzero(np.isnan(t))
    key = t[scored]
    if by == "fused":
        teacher_rank = np.empty(len(scored))
        teacher_rank[_order(ids[scored], key)] = np.arange(1, len(scored) + 1)
        key = 1.0 / (RRF_K + scored + 1) + 1.0 / (RRF_K + teacher_rank)  # scored + 1: the encoder rank
    return np.concatenate([scored[_order(ids[scored], key)], unscored]).astype(np.int64)


def top_block(ids, encoder_scores, k: int) -> np.ndarray:
    """Indices of the encoder's top-k rows, in encoder order."""
    return _order(ids, encoder_scores)[:k]


def cascade_order(ids, encoder_scores, teacher_scores, k: int, by: str) -> np.ndarray:
    """Row indices in cascade order: the encoder's top-k re-ranked with `teacher_scores` (`rerank`'s
    `by`), then the rest in encoder order. `teacher_scores` has one entry per row; only the block's
    entries are read."""
    enc = _order(ids, encoder_scores)
    block, rest = enc[:k], enc[k:]
    t = np.asarray(teacher_scores, dtype=np.float64)
    return np.concatenate([block[rerank(np.asarray(ids, dtype=str)[block], t[block], by)], rest])


def scores_from_order(order: np.ndarray) -> np.ndarray:
    """A score vector whose ranking (descending) is exactly `order`, without ties: row order[j]
    gets (n - j) / n. Rank-based metrics (AUPRC, AP, Recall@k, MRR) then measure the cascade's order."""
    n = len(order)
    out = np.empty(n, dtype=np.float64)
    out[np.asarray(order, dtype=np.int64)] = (n - np.arange(n)) / max(n, 1)
    return out


def cascade_scores(ids, encoder_scores, teacher_scores, k: int, by: str) -> np.ndarray:
    """`scores_from_order(cascade_order(...))`: the aggregate cascade ranking as scores."""
    return scores_from_order(cascade_order(ids, encoder_scores, teacher_scores, k, by))


def per_query_cascade_scores(
    ids, encoder_per_query: np.ndarray, teacher_per_query: np.ndarray, k: int, by: str
) -> np.ndarray:
    """[Q, N] scores whose row q re-ranks query q's own encoder top-k with q's teacher cosine (`by`),
    the rest by q's encoder score: a per-query retrieve-then-rerank. NaN teacher entries sink within
    the block."""
    enc = np.asarray(encoder_per_query)
    teach = np.asarray(teacher_per_query)
    if enc.shape != teach.shape or enc.ndim != 2:
        raise ValueError(f"encoder and teacher scores must both be [queries, rows]; got {enc.shape}, {teach.shape}")
    return np.stack([cascade_scores(ids, enc[q], teach[q], k, by) for q in range(enc.shape[0])]) if len(enc) else enc


def rows_needing_teacher(
    ids, encoder_scores: np.ndarray, encoder_per_query: Optional[np.ndarray], k: int
) -> np.ndarray:
    """Sorted indices of every row in the aggregate top-k or in some query's own top-k: the rows a
    cascade evaluation needs teacher scores for."""
    need = set(top_block(ids, encoder_scores, k).tolist())
    if encoder_per_query is not None:
        for row in np.asarray(encoder_per_query):
            need.update(top_block(ids, row, k).tolist())
    return np.array(sorted(need), dtype=np.int64)


def teacher_scores(
    row_sketches: np.ndarray, row_valid: np.ndarray, query_sketches: np.ndarray, query_valid: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(per-query cosines [Q, N], mean over queries [N]) of unit-norm teacher sketches.

    Rows the teacher rejected get NaN (no evidence). Rejected queries are left out of the mean
    (their per-query rows are NaN): a zero sketch would pull every mean toward 0 instead.
    """
    rows = np.asarray(row_sketches, dtype=np.float64)
    qs = np.asarray(query_sketches, dtype=np.float64)
    return mask_rejected(qs @ rows.T, row_valid, query_valid)


def mask_rejected(cosines: np.ndarray, row_valid: np.ndarray, query_valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`teacher_scores` from an already computed [Q, N] cosine matrix (e.g. eval's gradient method,
    whose rejected rows and queries carry zero sketches)."""
    rv, qv = np.asarray(row_valid, dtype=bool), np.asarray(query_valid, dtype=bool)
    if not qv.any():
        raise ValueError("the teacher rejected every query; no teacher score can be computed")
    cos = np.array(cosines, dtype=np.float64)  # a copy: the caller's matrix is left as it was
    cos[~qv, :] = np.nan
    cos[:, ~rv] = np.nan
    mean = cos[qv].mean(axis=0)  # NaN exactly where the row is invalid
    return cos, mean
