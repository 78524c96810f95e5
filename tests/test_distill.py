"""Distillation maths and metrics: reference computations and hand-checkable cases (pure, fast)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline import distill, metrics


# --------------------------------------------------------------------------- loss


def _reference_loss(S: np.ndarray, Y: np.ndarray, alpha: float, tau: float) -> float:
    """The block loss written out with explicit loops (float64)."""
    k, m = S.shape
    s = [float(v) for v in S.reshape(-1)]
    y = [float(v) for v in Y.reshape(-1)]
    n = len(s)
    ms, my = sum(s) / n, sum(y) / n
    num = sum((s[i] - ms) * (y[i] - my) for i in range(n))
    ds = math.sqrt(sum((s[i] - ms) ** 2 for i in range(n)))
    dy = math.sqrt(sum((y[i] - my) ** 2 for i in range(n)))
    pearson = num / (ds * dy + 1e-8)

    def softmax(row):
        top = max(row)
        e = [math.exp((v - top) / tau) for v in row]
        z = sum(e)
        return [v / z for v in e]

    kl = 0.0
    for i in range(k):
        p = softmax([float(v) for v in Y[i]])
        q = softmax([float(v) for v in S[i]])
        kl += sum(p[j] * (math.log(p[j]) - math.log(q[j])) for j in range(m))
    kl /= k  # batchmean
    return alpha * (1 - pearson) + (1 - alpha) * kl


@pytest.mark.parametrize("alpha,tau", [(0.5, 0.05), (0.3, 0.1), (1.0, 0.05), (0.0, 0.2)])
def test_block_loss_matches_reference(alpha, tau):
    rng = np.random.default_rng(0)
    S = rng.uniform(-0.5, 0.9, size=(3, 5)).astype(np.float32)
    Y = rng.uniform(-0.2, 0.6, size=(3, 5)).astype(np.float32)
    got = float(distill.block_loss(torch.from_numpy(S), torch.from_numpy(Y), alpha, tau))
    assert got == pytest.approx(_reference_loss(S, Y, alpha, tau), rel=1e-4, abs=1e-5)


def test_pearson_term_zero_when_perfectly_correlated():
    Y = torch.tensor([[0.1, 0.5, -0.2], [0.3, 0.0, 0.9]])
    assert float(distill.pearson_term(2.0 * Y + 0.3, Y)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill.pearson_term(-Y, Y)) == pytest.approx(2.0, abs=1e-6)


def test_kl_term_zero_when_scores_equal_targets():
    Y = torch.tensor([[0.1, 0.5, -0.2, 0.4], [0.3, 0.0, 0.9, -0.1]])
    assert float(distill.listwise_kl_term(Y.clone(), Y, tau=0.05)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill.listwise_kl_term(-Y, Y, tau=0.05)) > 0.1


def test_loss_has_gradient_and_rejects_bad_shapes():
    S = torch.randn(2, 4, requires_grad=True)
    distill.block_loss(S, torch.randn(2, 4), 0.5, 0.05).backward()
    assert S.grad is not None and torch.isfinite(S.grad).all()
    with pytest.raises(ValueError, match="k, m"):
        distill.block_loss(torch.zeros(2, 4), torch.zeros(4, 2), 0.5, 0.05)


def test_cosine_targets_are_dot_products_of_unit_sketches():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(3, 8))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    p = rng.normal(size=(4, 8))
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    t = distill.cosine_targets(a, p)
    assert t.shape == (3, 4) and t.dtype == np.float32
    for i in range(3):
        for j in range(4):
            cos = a[i] @ p[j] / (np.linalg.norm(a[i]) * np.linalg.norm(p[j]))
            assert t[i, j] == pytest.approx(cos, abs=1e-6)


# --------------------------------------------------------------------------- sampler


def _sampler(n_anchors=24, n_pool=48, m=16, h=0.5, seed=0):
    targets = np.random.default_rng(seed).normal(size=(n_anchors, n_pool)).astype(np.float32)
    return distill.CandidateSampler(targets, m=m, hard_ratio=h)


def test_sampler_is_seeded_and_reproducible():
    s = _sampler()
    block = np.arange(8)
    a = s.sample(block, distill.candidate_rng(7, epoch=1, block_id=0))
    b = s.sample(block, distill.candidate_rng(7, epoch=1, block_id=0))
    c = s.sample(block, distill.candidate_rng(7, epoch=1, block_id=1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # The global RNGs play no part.
    np.random.seed(123)
    torch.manual_seed(123)
    np.testing.assert_array_equal(a, s.sample(block, distill.candidate_rng(7, epoch=1, block_id=0)))


def test_sampler_hard_and_easy_counts():
    s = _sampler(m=16, h=0.5)
    block = np.arange(8, 16)
    hard, easy = s.sample_split(block, distill.candidate_rng(0, 1, 0))
    assert s.n_hard == 8 and len(hard) == 8 and len(easy) == 8
    # Hard candidates come from the union of each anchor's top-(2 * top_k) targets, top_k = 8 // 8 + 1.
    union = set()
    for a in block:
        row = s.targets[a]
        union |= set(sorted(range(s.n_pool), key=lambda j: -row[j])[:4])
    assert set(hard.tolist()) <= union
    assert not set(hard.tolist()) & set(easy.tolist())


def test_sampler_fills_with_easy_when_hard_union_is_small():
    # Every anchor ranks the pool identically, so the union of top-4 lists has only 4 items.
    row = np.linspace(1.0, -1.0, 40, dtype=np.float32)
    s = distill.CandidateSampler(np.tile(row, (8, 1)), m=16, hard_ratio=0.5)
    hard, easy = s.sample_split(np.arange(8), distill.candidate_rng(0, 1, 0))
    assert sorted(hard.tolist()) == [0, 1, 2, 3] and len(easy) == 12


def test_sampler_without_hard_ratio_is_uniform_only():
    s = _sampler(h=0.0)
    hard, easy = s.sample_split(np.arange(8), distill.candidate_rng(0, 1, 0))
    assert len(hard) == 0 and len(easy) == 16


def test_sampler_only_returns_distinct_train_pool_columns():
    # Columns 0..47 are the train pool; eval ids live elsewhere and must never appear.
    train_ids = [f"train-{j}" for j in range(48)]
    eval_ids = {f"eval-{j}" for j in range(16)}
    s = _sampler(n_pool=48, m=16, h=0.5)
    for epoch in range(1, 4):
        for block_id, block in enumerate(distill.epoch_blocks(24, 8, seed=3, epoch=epoch)):
            cand = s.sample(block, distill.candidate_rng(3, epoch, block_id))
            assert len(cand) == 16 and len(set(cand.tolist())) == 16
            assert cand.min() >= 0 and cand.max() < 48
            assert not {train_ids[c] for c in cand} & eval_ids


def test_sampler_rejects_more_candidates_than_pool():
    with pytest.raises(ValueError, match="m=20"):
        _sampler(n_pool=10, m=20)


# --------------------------------------------------------------------------- blocks and workers


def test_epoch_blocks_are_seeded_shuffled_partitions():
    blocks = distill.epoch_blocks(20, 8, seed=0, epoch=1)
    assert [len(b) for b in blocks] == [8, 8, 4]
    assert sorted(np.concatenate(blocks).tolist()) == list(range(20))
    again = distill.epoch_blocks(20, 8, seed=0, epoch=1)
    assert all(np.array_equal(a, b) for a, b in zip(blocks, again))
    other = distill.epoch_blocks(20, 8, seed=0, epoch=2)
    assert not np.array_equal(np.concatenate(blocks), np.concatenate(other))


@pytest.mark.parametrize("n_blocks,world", [(3, 1), (3, 2), (4, 2), (5, 3), (1, 2)])
def test_worker_blocks_equal_counts_and_cover_all(n_blocks, world):
    per_worker = [distill.worker_block_ids(n_blocks, r, world) for r in range(world)]
    assert len({len(ids) for ids in per_worker}) == 1  # DDP lockstep
    assert len(per_worker[0]) == distill.steps_per_epoch(n_blocks, world)
    assert set().union(*map(set, per_worker)) == set(range(n_blocks))
    for r, ids in enumerate(per_worker):  # worker r takes r::world first
        assert ids[: len(range(r, n_blocks, world))] == list(range(r, n_blocks, world))


# --------------------------------------------------------------------------- LR schedule


def test_lr_schedule_values():
    T, W = 10, distill.warmup_steps(10, 0.2)
    assert W == 2
    got = [distill.lr_multiplier(s, T, W) for s in range(T)]
    expected = [0.5, 1.0, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8]
    assert got == pytest.approx(expected)
    assert distill.lr_multiplier(T, T, W) == 0.0
    # No warm-up: decay from the first step.
    assert distill.lr_multiplier(0, 4, 0) == 1.0 and distill.lr_multiplier(3, 4, 0) == pytest.approx(0.25)


def test_lr_lambda_drives_torch_scheduler():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, distill.lr_lambda(10, 0.2))
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1.25e-4)


# --------------------------------------------------------------------------- metrics


def test_spearman_perfect_reversed_and_constant_rows():
    gt = np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    assert metrics.spearman_per_anchor(gt * 3, gt) == pytest.approx((1.0, 0.0))
    assert metrics.spearman_per_anchor(-gt, gt) == pytest.approx((-1.0, 0.0))
    pred = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]])  # second row constant -> 0
    mean, std = metrics.spearman_per_anchor(pred, np.array([[1, 2, 3, 4], [4, 3, 2, 1.0]]))
    assert (mean, std) == pytest.approx((0.5, 0.5))


def test_spearman_aggregated_ranks_anchor_means():
    gt = np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    pred = np.array([[0.0, 5.0, 1.0], [0.0, 0.0, 9.0]])  # means 0, 2.5, 5 -> same order as gt
    assert metrics.spearman_aggregated(pred, gt) == pytest.approx(1.0)
    assert metrics.spearman_aggregated(-pred, gt) == pytest.approx(-1.0)
    assert metrics.spearman_aggregated(np.ones_like(gt), gt) == 0.0


def test_average_precision_hand_value():
    # Ranking: pos, neg, pos, neg -> AP = (1/1 + 2/3) / 2.
    labels, scores = [1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]
    assert metrics.average_precision(labels, scores) == pytest.approx((1 + 2 / 3) / 2)
    precision, recall, _ = metrics.pr_curve(labels, scores)
    assert precision[-1] == 1.0 and recall[-1] == 0.0 and recall[0] == 1.0
    assert 0.0 < metrics.auprc(labels, scores) <= 1.0


def test_recall_at_k_and_mrr():
    ranked = [["a", "b", "c", "d"], ["x", "y", "z"], ["p"]]
    relevant = [{"b", "d"}, {"x"}, set()]  # the third query has nothing to find and is skipped
    assert metrics.recall_at_k(ranked, relevant, 2) == pytest.approx((0.5 + 1.0) / 2)
    assert metrics.recall_at_k(ranked, relevant, 4) == pytest.approx(1.0)
    assert metrics.mrr(ranked, relevant) == pytest.approx((1 / 2 + 1) / 2)
    assert metrics.mrr([["q"]], [{"r"}]) == 0.0
