"""Quality metrics shared by the fit stage (held-out Spearman) and the eval stage (METHOD.md 1f).

Pure numpy/scipy/scikit-learn. Rank statistics come from scipy and sklearn rather than hand-written
rank maths, so ties and edge cases follow their documented conventions.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Hashable, Iterable, Sequence

import numpy as np
from scipy import stats
from sklearn import metrics as skm


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
    return float(skm.average_precision_score(labels, np.asarray(scores, dtype=np.float64)))


def pr_curve(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) from sklearn's precision_recall_curve."""
    precision, recall, thresholds = skm.precision_recall_curve(np.asarray(labels), np.asarray(scores, dtype=np.float64))
    return precision, recall, thresholds


def auprc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Trapezoidal area under the PR curve, `auc(recall, precision)`: DATE-LM's toxicity metric."""
    precision, recall, _ = pr_curve(labels, scores)
    return float(skm.auc(recall, precision))


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


def spearman_rows(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Spearman rho of each row pair (average ranks for ties), vectorised; 0 where a row is constant
    (the `spearman_per_anchor` convention)."""
    rp = stats.rankdata(pred, axis=1)
    rg = stats.rankdata(gt, axis=1)
    rp = rp - rp.mean(axis=1, keepdims=True)
    rg = rg - rg.mean(axis=1, keepdims=True)
    denom = np.sqrt((rp * rp).sum(axis=1) * (rg * rg).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (rp * rg).sum(axis=1) / denom
    return np.where(denom > 0, rho, 0.0)


def bootstrap_replicates(
    statistic: Callable[..., float], sizes: Sequence[int], resamples: int = 1000, seed: int = 0
) -> np.ndarray:
    """The statistic on `resamples` bootstrap resamples: each call gets one index array per axis,
    drawn with replacement (`sizes[i]` draws from range(sizes[i])). Replicates where the statistic is
    undefined come back NaN. The same (sizes, resamples, seed) give the same indices, so replicates of
    two methods computed alike are paired (see `paired_difference`)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) % (1 << 63), 0x1B007]))
    out = np.empty(resamples, dtype=np.float64)
    for r in range(resamples):
        idx = [rng.integers(0, n, n) for n in sizes]
        try:
            out[r] = statistic(*idx)
        except ValueError:  # e.g. a resample without a positive label
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


def _fidelity_statistics(pred: np.ndarray, gt: np.ndarray) -> tuple[Callable[..., float], Callable[..., float]]:
    """Aggregated and per-anchor Spearman of a resample (anchor indices, pool indices)."""

    def aggregated(ia: np.ndarray, ip: np.ndarray) -> float:
        rho = spearman(pred[np.ix_(ia, ip)].mean(axis=0), gt[np.ix_(ia, ip)].mean(axis=0))
        return float("nan") if math.isnan(rho) else rho

    def per_anchor(ia: np.ndarray, ip: np.ndarray) -> float:
        return float(spearman_rows(pred[np.ix_(ia, ip)], gt[np.ix_(ia, ip)]).mean())

    return aggregated, per_anchor


def spearman_with_ci(pred: np.ndarray, gt: np.ndarray, resamples: int = 1000, seed: int = 0) -> dict[str, object]:
    """Aggregated and per-anchor Spearman with 95 % bootstrap CIs, resampling anchors and pool items
    (both are samples: the anchors of the task, the rows of the corpus)."""
    pred, gt = _check_pair(pred, gt)
    mean, std = spearman_per_anchor(pred, gt)
    aggregated, per_anchor = _fidelity_statistics(pred, gt)
    sizes = pred.shape
    return {
        "spearman_aggregated": spearman_aggregated(pred, gt),
        "spearman_aggregated_ci": bootstrap_ci(aggregated, sizes, resamples, seed),
        "spearman_per_anchor": mean,
        "spearman_per_anchor_std": std,
        "spearman_per_anchor_ci": bootstrap_ci(per_anchor, sizes, resamples, seed),
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
    out: dict[str, object] = {}
    for name, stat_a, stat_b in zip(
        ("spearman_aggregated", "spearman_per_anchor"),
        _fidelity_statistics(pred_a, gt),
        _fidelity_statistics(pred_b, gt),
    ):
        full = (np.arange(gt.shape[0]), np.arange(gt.shape[1]))
        out[name + "_diff"] = float(stat_a(*full) - stat_b(*full))
        out[name + "_diff_ci"] = paired_difference(
            bootstrap_replicates(stat_a, gt.shape, resamples, seed),
            bootstrap_replicates(stat_b, gt.shape, resamples, seed),
        )
    return out
