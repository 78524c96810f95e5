"""Quality metrics shared by the fit stage (held-out Spearman) and the eval stage (METHOD.md 1f).

Pure numpy/scipy/scikit-learn. Rank statistics come from scipy and sklearn rather than hand-written
rank maths, so ties and edge cases follow their documented conventions.
"""

from __future__ import annotations

import math
import warnings
from typing import Hashable, Iterable, Sequence

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


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
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
    rhos = np.array([_spearman(p, g) for p, g in zip(pred, gt)], dtype=np.float64)
    rhos = np.nan_to_num(rhos, nan=0.0)
    return float(rhos.mean()), float(rhos.std())


def spearman_aggregated(pred: np.ndarray, gt: np.ndarray) -> float:
    """Spearman of the anchor-mean vectors: how well pool items are ranked by mean influence.

    This is the ranking used to filter a corpus (mean over anchors, METHOD.md 1e). NaN -> 0.
    """
    pred, gt = _check_pair(pred, gt)
    rho = _spearman(pred.mean(axis=0), gt.mean(axis=0))
    return 0.0 if math.isnan(rho) else rho


def average_precision(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """sklearn's average precision (step-wise area under the precision-recall curve)."""
    labels = np.asarray(labels)
    if labels.sum() == 0:
        raise ValueError("average precision needs at least one positive label")
    return float(skm.average_precision_score(labels, np.asarray(scores, dtype=np.float64)))


def pr_curve(labels: Sequence[int] | np.ndarray,
             scores: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) from sklearn's precision_recall_curve."""
    precision, recall, thresholds = skm.precision_recall_curve(np.asarray(labels),
                                                              np.asarray(scores, dtype=np.float64))
    return precision, recall, thresholds


def auprc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Trapezoidal area under the PR curve, `auc(recall, precision)`: DATE-LM's toxicity metric."""
    precision, recall, _ = pr_curve(labels, scores)
    return float(skm.auc(recall, precision))


def recall_at_k(ranked_ids_per_query: Sequence[Sequence[Hashable]],
                relevant_sets: Sequence[Iterable[Hashable]], k: int) -> float:
    """Mean over queries of |top-k ∩ relevant| / |relevant| (DATE-LM Recall@k).

    Queries without any relevant item are skipped (their recall is undefined); if none has one,
    the result is NaN.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    _check_lengths(ranked_ids_per_query, relevant_sets)
    values = []
    for ranked, relevant in zip(ranked_ids_per_query, relevant_sets):
        rel = set(relevant)
        if rel:
            values.append(len(rel.intersection(list(ranked)[:k])) / len(rel))
    return float(np.mean(values)) if values else float("nan")


def mrr(ranked_ids_per_query: Sequence[Sequence[Hashable]],
        relevant_sets: Sequence[Iterable[Hashable]]) -> float:
    """Mean reciprocal rank of the first relevant item (0 when none is retrieved).

    Queries without any relevant item are skipped, as in `recall_at_k`.
    """
    _check_lengths(ranked_ids_per_query, relevant_sets)
    values = []
    for ranked, relevant in zip(ranked_ids_per_query, relevant_sets):
        rel = set(relevant)
        if not rel:
            continue
        rr = 0.0
        for rank, item in enumerate(ranked, start=1):
            if item in rel:
                rr = 1.0 / rank
                break
        values.append(rr)
    return float(np.mean(values)) if values else float("nan")


def _check_lengths(ranked: Sequence, relevant: Sequence) -> None:
    if len(ranked) != len(relevant):
        raise ValueError(f"one ranking per query is needed: {len(ranked)} rankings for "
                         f"{len(relevant)} relevant sets")
