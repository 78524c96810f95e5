"""The vectorised metrics equal the library definitions they restate: the precision-recall curve and
its area against sklearn, the bootstrap's Spearman replicates against scipy resample by resample."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from pipeline import metrics


def _cases(rng: np.random.Generator):
    for n, decimals in ((7, 3), (50, 1), (200, 0), (30, None)):
        labels = (rng.random(n) < 0.3).astype(int)
        labels[rng.integers(n)] = 1  # at least one positive
        scores = rng.normal(size=n)
        if decimals is None:
            scores[:] = 0.25  # every score tied: one threshold
        else:
            scores = np.round(scores, decimals)  # coarse rounding: many ties
        yield labels, scores


def test_pr_curve_and_auprc_equal_sklearn_with_ties() -> None:
    rng = np.random.default_rng(0)
    for labels, scores in _cases(rng):
        ours = metrics.pr_curve(labels, scores)
        theirs = skm.precision_recall_curve(labels, scores)
        for a, b in zip(ours, theirs):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-15)
        expected = skm.auc(theirs[1], theirs[0])
        assert metrics.auprc(labels, scores) == pytest.approx(expected, abs=1e-15)


def test_auprc_refuses_no_positive_and_the_bootstrap_counts_it_as_nan() -> None:
    with pytest.raises(ValueError, match="positive"):
        metrics.auprc([0, 0, 0], [0.1, 0.2, 0.3])
    labels = np.array([1, 0, 0, 0, 0, 0])
    scores = np.array([0.9, 0.1, 0.2, 0.3, 0.4, 0.5])
    reps = metrics.bootstrap_replicates(lambda ir: metrics.auprc(labels[ir], scores[ir]), [6], 200, seed=1)
    (idx,) = metrics.bootstrap_indices([6], 200, seed=1)
    without_positive = ~(idx == 0).any(axis=1)
    assert without_positive.any() and (~without_positive).any()  # the seed draws both kinds
    assert np.isnan(reps[without_positive]).all() and np.isfinite(reps[~without_positive]).all()
    assert (reps[~without_positive] == 1.0).all()  # the positive scores highest in every resample


def _scipy_replicate(pred, gt, ia, ip) -> tuple[float, float]:
    p, g = pred[np.ix_(ia, ip)], gt[np.ix_(ia, ip)]
    agg = metrics.spearman(p.mean(axis=0), g.mean(axis=0))  # scipy's spearmanr, NaN when constant
    rows = [metrics.spearman(a, b) for a, b in zip(p, g)]
    return float(agg), float(np.mean([0.0 if math.isnan(r) else r for r in rows]))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("rank_by", ["matmul", "sort"])
def test_fidelity_replicates_equal_scipy_resample_by_resample(ties: bool, rank_by: str, monkeypatch) -> None:
    rng = np.random.default_rng(1)
    pred = rng.normal(size=(6, 15))
    gt = pred + rng.normal(size=pred.shape)
    if ties:
        pred, gt = np.round(pred, 0), np.round(gt, 0)
        pred[2] = 0.5  # a constant anchor row: per-anchor counts it 0
    monkeypatch.setattr(metrics, "_FIDELITY_CHUNK_VALUES", pred.shape[1] * 7)  # several chunks of resamples
    if rank_by == "sort":  # the path pools larger than _RANK_MATMUL_MAX_POOL take
        monkeypatch.setattr(metrics, "_RANK_MATMUL_MAX_POOL", 1)
    agg, per_anchor = metrics.fidelity_replicates(pred, gt, resamples=40, seed=3)
    anchors, pool = metrics.bootstrap_indices(pred.shape, 40, seed=3)
    for r in range(40):
        want_agg, want_pa = _scipy_replicate(pred, gt, anchors[r], pool[r])
        if math.isnan(want_agg):
            assert math.isnan(agg[r])
        else:
            assert agg[r] == pytest.approx(want_agg, abs=1e-12)
        assert per_anchor[r] == pytest.approx(want_pa, abs=1e-12)


def test_fidelity_replicates_nan_where_undefined_and_refuse_non_finite_scores() -> None:
    """Two pool items: a resample that draws one item twice has constant anchor means (aggregated NaN,
    as scipy's) and constant rows (per-anchor 0); the others correlate exactly (+1 here)."""
    pred = np.array([[0.1, 0.9], [0.2, 0.4], [0.3, 0.8]])
    agg, per_anchor = metrics.fidelity_replicates(pred, pred * 2, resamples=50, seed=0)
    _, pool = metrics.bootstrap_indices(pred.shape, 50, seed=0)
    one_item = pool[:, 0] == pool[:, 1]
    assert one_item.any() and (~one_item).any()
    assert np.isnan(agg[one_item]).all() and (per_anchor[one_item] == 0).all()
    assert (agg[~one_item] == pytest.approx(1.0)) and (per_anchor[~one_item] == pytest.approx(1.0))
    for bad in (np.nan, np.inf):
        broken = pred.copy()
        broken[1, 0] = bad
        with pytest.raises(ValueError, match="finite"):
            metrics.fidelity_replicates(broken, pred, resamples=5)


def test_average_ranks_under_counts_equal_rankdata_of_the_repeated_list() -> None:
    from scipy import stats

    rng = np.random.default_rng(4)
    values = np.round(rng.normal(size=(30, 12)), 0)  # many ties
    counts = rng.integers(0, 4, size=values.shape).astype(float)
    counts[0] = 0
    counts[0, 3] = 12  # one item drawn every time
    ranks = metrics._average_ranks(values, counts)
    for v, c, r in zip(values, counts, ranks):
        listed = np.repeat(np.arange(v.size), c.astype(int))
        want = stats.rankdata(v[listed])
        got = r[listed]
        np.testing.assert_array_equal(got, want)


def test_bootstrap_indices_are_the_seeded_draws_in_order() -> None:
    a1, p1 = metrics.bootstrap_indices((3, 5), 4, seed=9)
    a2, p2 = metrics.bootstrap_indices((3, 5), 4, seed=9)
    assert (a1 == a2).all() and (p1 == p2).all() and a1.shape == (4, 3) and p1.shape == (4, 5)
    rng = np.random.default_rng(np.random.SeedSequence([9, 0x1B007]))
    for r in range(4):  # replicate by replicate, axis by axis
        assert (a1[r] == rng.integers(0, 3, 3)).all() and (p1[r] == rng.integers(0, 5, 5)).all()
    assert not (metrics.bootstrap_indices((3, 5), 4, seed=10)[1] == p1).all()
