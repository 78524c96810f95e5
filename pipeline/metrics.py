"""Quality metrics shared by the fit stage (held-out Spearman) and the eval stage (METHOD.md 1f).

Pure numpy/scipy/scikit-learn. Ranks come from scipy's `rankdata` (average ranks for ties) and
average precision from sklearn. The precision-recall curve and the bootstrap statistics are numpy
re-statements of sklearn's and scipy's definitions, vectorised because a 95 % CI needs 1,000 of them
per method; tests/test_metrics_fast.py holds them equal to the library calls, ties included.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Hashable, Iterable, Sequence

import numpy as np

# scipy.stats and sklearn are imported where they are used: together they cost ~1 s of import, which
# every process that loads pipeline.codes (encode actors, fragment writers, score workers) would pay
# for metrics it never computes.


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"pred and gt must both be [n_anchors, n_pool]; got {pred.shape} and {gt.shape}")
    if pred.shape[1] < 2:
        raise ValueError(f"Spearman needs at least 2 pool items; got {pred.shape[1]}")
    return pred, gt


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """scipy's Spearman rho; NaN (a constant input) is returned as NaN for the caller to handle."""
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConstantInputWarning: handled by the NaN convention
        rho = stats.spearmanr(x, y).statistic
    return float(rho)


def spearman_per_anchor(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """(mean, std) over anchors of Spearman(pred[i, :], gt[i, :]).

    A row where either side is constant has no defined rank correlation; it counts as 0 (the
    current method's convention) instead of being skipped, so degenerate students are not flattered.
    """
    pred, gt = _check_pair(pred, gt)
    rhos = np.array([spearman(p, g) for p, g in zip(pred, gt)], dtype=np.float64)
    rhos = np.nan_to_num(rhos, nan=0.0)
    return float(rhos.mean()), float(rhos.std())


def spearman_aggregated(pred: np.ndarray, gt: np.ndarray) -> float:
    """Spearman of the anchor-mean vectors: how well pool items are ranked by mean influence.

    This is the ranking used to filter a corpus (mean over anchors, METHOD.md 1e). NaN -> 0.
    """
    pred, gt = _check_pair(pred, gt)
    rho = spearman(pred.mean(axis=0), gt.mean(axis=0))
    return 0.0 if math.isnan(rho) else rho


def average_precision(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """sklearn's average precision (step-wise area under the precision-recall curve)."""
    labels = np.asarray(labels)
    if labels.sum() == 0:
        raise ValueError("average precision needs at least one positive label")
    from sklearn import metrics as skm

    return float(skm.average_precision_score(labels, np.asarray(scores, dtype=np.float64)))


def pr_curve(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds), decreasing recall: sklearn's `precision_recall_curve`
    (drop_intermediate=False), in numpy without its input validation, which cost ~2 ms a call and
    dominated the bootstrap (1,000 curves per method). One point per distinct score, ties together;
    tests/test_metrics_fast.py checks it against sklearn, ties included. Needs a positive label."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D of one length; got {y.shape} and {s.shape}")
    order = np.argsort(s, kind="stable")[::-1]
    s, y = s[order], (y[order] == 1).astype(np.float64)
    thresholds = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]  # the last index of each run of ties
    tps = np.cumsum(y)[thresholds]
    if tps[-1] == 0:
        raise ValueError("a precision-recall curve needs at least one positive label")
    fps = 1 + thresholds - tps
    precision, recall = tps / (tps + fps), tps / tps[-1]
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], s[thresholds][::-1]


def auprc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Trapezoidal area under the PR curve, `auc(recall, precision)`: DATE-LM's toxicity metric.
    Raises ValueError without a positive label (a bootstrap resample without one counts as NaN)."""
    precision, recall, _ = pr_curve(labels, scores)
    return float(-np.trapezoid(precision, recall))  # recall decreases along the curve


def recall_at_k_per_query(
    ranked_ids_per_query: Sequence[Sequence[Hashable]], relevant_sets: Sequence[Iterable[Hashable]], k: int
) -> np.ndarray:
    """|top-k ∩ relevant| / |relevant| per query; NaN for a query without relevant items."""
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    _check_lengths(ranked_ids_per_query, relevant_sets)
    out = []
    for ranked, relevant in zip(ranked_ids_per_query, relevant_sets):
        rel = set(relevant)
        out.append(len(rel.intersection(list(ranked)[:k])) / len(rel) if rel else float("nan"))
    return np.asarray(out, dtype=np.float64)


def reciprocal_ranks(
    ranked_ids_per_query: Sequence[Sequence[Hashable]], relevant_sets: Sequence[Iterable[Hashable]]
) -> np.ndarray:
    """1 / rank of the first relevant item per query (0 when none is retrieved; NaN without relevant items)."""
    _check_lengths(ranked_ids_per_query, relevant_sets)
    out = []
    for ranked, relevant in zip(ranked_ids_per_query, relevant_sets):
        rel = set(relevant)
        if not rel:
            out.append(float("nan"))
            continue
        out.append(next((1.0 / rank for rank, item in enumerate(ranked, start=1) if item in rel), 0.0))
    return np.asarray(out, dtype=np.float64)


def recall_at_k(
    ranked_ids_per_query: Sequence[Sequence[Hashable]], relevant_sets: Sequence[Iterable[Hashable]], k: int
) -> float:
    """Mean over queries of |top-k ∩ relevant| / |relevant| (DATE-LM Recall@k).

    Queries without any relevant item are skipped (their recall is undefined); if none has one,
    the result is NaN.
    """
    return _nanmean(recall_at_k_per_query(ranked_ids_per_query, relevant_sets, k))


def mrr(ranked_ids_per_query: Sequence[Sequence[Hashable]], relevant_sets: Sequence[Iterable[Hashable]]) -> float:
    """Mean reciprocal rank of the first relevant item (0 when none is retrieved).

    Queries without any relevant item are skipped, as in `recall_at_k`.
    """
    return _nanmean(reciprocal_ranks(ranked_ids_per_query, relevant_sets))


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def _check_lengths(ranked: Sequence, relevant: Sequence) -> None:
    if len(ranked) != len(relevant):
        raise ValueError(f"one ranking per query is needed: {len(ranked)} rankings for {len(relevant)} relevant sets")


# --------------------------------------------------------------------------- uncertainty


def _rank_correlation(rp: np.ndarray, rg: np.ndarray) -> np.ndarray:
    """Pearson correlation of two rank arrays along the last axis; NaN where either side is constant."""
    rp = rp - rp.mean(axis=-1, keepdims=True)
    rg = rg - rg.mean(axis=-1, keepdims=True)
    denom = np.sqrt((rp * rp).sum(axis=-1) * (rg * rg).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (rp * rg).sum(axis=-1) / denom, np.nan)


def spearman_rows(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Spearman rho of each row pair along the last axis (average ranks for ties), vectorised over
    any leading axes; 0 where a row is constant (the `spearman_per_anchor` convention)."""
    from scipy import stats

    rho = _rank_correlation(stats.rankdata(pred, axis=-1), stats.rankdata(gt, axis=-1))
    return np.nan_to_num(rho, nan=0.0)


def bootstrap_indices(sizes: Sequence[int], resamples: int = 1000, seed: int = 0) -> list[np.ndarray]:
    """One `[resamples, sizes[i]]` array of indices per axis, drawn with replacement. The same
    (sizes, resamples, seed) give the same indices, so replicates of two methods computed alike are
    paired (see `paired_difference`)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) % (1 << 63), 0x1B007]))
    out = [np.empty((resamples, n), dtype=np.int64) for n in sizes]
    for r in range(resamples):  # replicate by replicate, axis by axis: the draw order is part of the seed
        for axis, n in enumerate(sizes):
            out[axis][r] = rng.integers(0, n, n)
    return out


def bootstrap_replicates(
    statistic: Callable[..., float], sizes: Sequence[int], resamples: int = 1000, seed: int = 0
) -> np.ndarray:
    """The statistic on `resamples` bootstrap resamples (`bootstrap_indices`): each call gets one
    index array per axis. Replicates where the statistic is undefined (it raises ValueError, e.g. a
    resample without a positive label) come back NaN."""
    indices = bootstrap_indices(sizes, resamples, seed)
    out = np.empty(resamples, dtype=np.float64)
    for r in range(resamples):
        try:
            out[r] = statistic(*(axis[r] for axis in indices))
        except ValueError:
            out[r] = float("nan")
    return out


def percentile_ci(replicates: np.ndarray, level: float = 0.95) -> list[float] | None:
    """[low, high] percentile interval of the finite replicates (None when there are none)."""
    finite = replicates[np.isfinite(replicates)]
    if finite.size == 0:
        return None
    lo, hi = np.quantile(finite, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]


def bootstrap_ci(
    statistic: Callable[..., float], sizes: Sequence[int], resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> list[float] | None:
    """Percentile bootstrap confidence interval of `statistic` (see `bootstrap_replicates`)."""
    return percentile_ci(bootstrap_replicates(statistic, sizes, resamples, seed), level)


def paired_difference(reps_a: np.ndarray, reps_b: np.ndarray, level: float = 0.95) -> list[float] | None:
    """CI of (a - b) from paired replicates (same resampled indices for both)."""
    return percentile_ci(np.asarray(reps_a) - np.asarray(reps_b), level)


# Values per chunk of the fidelity bootstrap: resamples x pool float64 values, ~32 MB an array.
_FIDELITY_CHUNK_VALUES = 4_000_000
# Pool sizes up to this rank each anchor's row with one [P, P] comparison matrix and a matmul per chunk of
# resamples (fast, exact: the entries are halves); larger pools sort each row once and re-count it per
# resample (the matrix would grow as P squared).
_RANK_MATMUL_MAX_POOL = 2048


def _counts(indices: np.ndarray, n: int) -> np.ndarray:
    """[resamples, n] multiplicity of each item in each resample of `indices` ([resamples, n])."""
    r = indices.shape[0]
    flat = (indices + n * np.arange(r)[:, None]).ravel()
    return np.bincount(flat, minlength=r * n).reshape(r, n).astype(np.float64)


def _average_ranks(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Average ranks (1-based, ties share their mean rank) that scipy's `rankdata` gives each item of
    the list holding item j `counts[..., j]` times: the items before j's run of ties, plus the middle
    of that run. Items with count 0 get a rank too, which weighted sums ignore."""
    return _ranks_in_order(_sorted_runs(values), counts)


def _sorted_runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, first, last): the sorting permutation along the last axis and, in sorted order, whether
    each position starts or ends a run of equal values."""
    order = np.argsort(values, axis=-1, kind="stable")
    sorted_values = np.take_along_axis(values, order, -1)
    first = np.ones(sorted_values.shape, bool)
    first[..., 1:] = sorted_values[..., 1:] != sorted_values[..., :-1]
    last = np.ones(sorted_values.shape, bool)
    last[..., :-1] = first[..., 1:]
    return order, first, last


def _ranks_in_order(runs: tuple[np.ndarray, np.ndarray, np.ndarray], counts: np.ndarray) -> np.ndarray:
    """`_average_ranks` from `_sorted_runs` (which may broadcast against counts: one row's runs serve
    every resample of it)."""
    order, first, last = (np.broadcast_to(x, counts.shape) for x in runs)
    c = np.take_along_axis(counts, order, -1)
    upto = np.cumsum(c, axis=-1)
    # `upto` never decreases along the axis, so carrying a run's first `before` forward (max) and its
    # last `upto` backward (min) gives every member of a run of ties the run's bounds.
    before = np.maximum.accumulate(np.where(first, upto - c, 0.0), axis=-1)
    after = np.flip(np.minimum.accumulate(np.flip(np.where(last, upto, np.inf), -1), axis=-1), -1)
    ranks = np.empty_like(upto)
    np.put_along_axis(ranks, order, before + (after - before + 1) / 2, -1)
    return ranks


def _row_ranker(row: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """`_average_ranks` of one fixed row of values under any resamples' counts ([resamples, P])."""
    if row.size > _RANK_MATMUL_MAX_POOL:
        runs = _sorted_runs(row)  # sorted once; each resample only re-counts
        return lambda counts: _ranks_in_order(runs, counts)
    # rank_j = sum_k count_k ([x_k < x_j] + [x_k == x_j] / 2) + 1/2, in float32: exact, as every term and
    # partial sum is a multiple of 1/2 below 2 * pool size
    below = ((row[:, None] < row[None, :]) + 0.5 * (row[:, None] == row[None, :])).astype(np.float32)
    return lambda counts: (counts.astype(np.float32) @ below).astype(np.float64) + 0.5


def _weighted_rank_correlation(rx: np.ndarray, ry: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Pearson correlation of two rank vectors over the list that holds item j counts[..., j] times;
    NaN where either side is constant. Ranks of n listed items average (n + 1) / 2 exactly."""
    mid = (counts.sum(axis=-1, keepdims=True) + 1) / 2
    dx, dy = rx - mid, ry - mid
    cov = (counts * dx * dy).sum(axis=-1)
    denom = np.sqrt((counts * dx * dx).sum(axis=-1) * (counts * dy * dy).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, cov / denom, np.nan)


def fidelity_replicates(
    pred: np.ndarray, gt: np.ndarray, resamples: int = 1000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(aggregated, per-anchor) Spearman on each bootstrap resample of anchors and pool items: the same
    values as ranking each resampled [anchors, pool] matrix with scipy (tests/test_metrics_fast.py),
    without materialising it. A resample is a multiset, so each statistic is a weighted one over the
    original items, weighted by how often the resample drew them: per-anchor Spearman is a per-row
    statistic under the pool's counts, averaged with the anchors' counts; aggregated ranks the
    count-weighted anchor means. Aggregated is NaN where a resample's anchor means are constant;
    per-anchor counts a constant row as 0, as `spearman_per_anchor` does."""
    pred, gt = _check_pair(pred, gt)
    if not (np.isfinite(pred).all() and np.isfinite(gt).all()):
        # A weighted sum with a zero count would still carry a NaN or inf into the means, and ranks would
        # order it as a number: wrong figures, silently. Scores here are cosines, so this is a bug upstream.
        raise ValueError("fidelity bootstrap: pred and gt must be finite; found NaN or inf")
    n_anchors, n_pool = pred.shape
    anchor_idx, pool_idx = bootstrap_indices(pred.shape, resamples, seed)
    anchor_counts, pool_counts = _counts(anchor_idx, n_anchors), _counts(pool_idx, n_pool)
    step = max(1, _FIDELITY_CHUNK_VALUES // n_pool)
    chunks = [slice(s, s + step) for s in range(0, resamples, step)]
    aggregated = np.empty(resamples, dtype=np.float64)
    for chunk in chunks:
        w = pool_counts[chunk]
        mean_pred, mean_gt = anchor_counts[chunk] @ pred / n_anchors, anchor_counts[chunk] @ gt / n_anchors
        aggregated[chunk] = _weighted_rank_correlation(_average_ranks(mean_pred, w), _average_ranks(mean_gt, w), w)
    per_anchor = np.zeros(resamples, dtype=np.float64)
    for a in range(n_anchors):
        rank_pred, rank_gt = _row_ranker(pred[a]), _row_ranker(gt[a])
        for chunk in chunks:
            w = pool_counts[chunk]
            rho = _weighted_rank_correlation(rank_pred(w), rank_gt(w), w)
            per_anchor[chunk] += anchor_counts[chunk, a] * np.nan_to_num(rho, nan=0.0)
    return aggregated, per_anchor / n_anchors


def spearman_with_ci(pred: np.ndarray, gt: np.ndarray, resamples: int = 1000, seed: int = 0) -> dict[str, object]:
    """Aggregated and per-anchor Spearman with 95 % bootstrap CIs, resampling anchors and pool items
    (both are samples: the anchors of the task, the rows of the corpus)."""
    pred, gt = _check_pair(pred, gt)
    mean, std = spearman_per_anchor(pred, gt)
    aggregated, per_anchor = fidelity_replicates(pred, gt, resamples, seed)
    return {
        "spearman_aggregated": spearman_aggregated(pred, gt),
        "spearman_aggregated_ci": percentile_ci(aggregated),
        "spearman_per_anchor": mean,
        "spearman_per_anchor_std": std,
        "spearman_per_anchor_ci": percentile_ci(per_anchor),
    }


def fidelity_difference(
    pred_a: np.ndarray, pred_b: np.ndarray, gt: np.ndarray, resamples: int = 1000, seed: int = 0
) -> dict[str, object]:
    """a's held-out Spearman minus b's (aggregated and per-anchor) with paired 95 % bootstrap CIs.

    Both are measured on the same resampled anchors and pool rows, so the noise of the split they
    share cancels: two methods whose own CIs overlap widely can still differ beyond the noise, and a
    lead counts only when its CI excludes 0."""
    pred_a, gt = _check_pair(pred_a, gt)
    pred_b, _ = _check_pair(pred_b, gt)
    reps_a = fidelity_replicates(pred_a, gt, resamples, seed)
    reps_b = fidelity_replicates(pred_b, gt, resamples, seed)
    point_a = (spearman_aggregated(pred_a, gt), spearman_per_anchor(pred_a, gt)[0])
    point_b = (spearman_aggregated(pred_b, gt), spearman_per_anchor(pred_b, gt)[0])
    out: dict[str, object] = {}
    for i, name in enumerate(("spearman_aggregated", "spearman_per_anchor")):
        out[name + "_diff"] = float(point_a[i] - point_b[i])
        out[name + "_diff_ci"] = paired_difference(reps_a[i], reps_b[i])
    return out
