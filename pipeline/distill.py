"""Distillation maths (METHOD.md 1d): targets, block loss, candidate sampler, block order, LR schedule.

Pure torch/numpy, no Ray: every piece is unit-tested on its own, and the Ray Train loop in
`pipeline.stages.fit` only wires them together.

Randomness never touches a global RNG (the original's hard-negative subsample used the unseeded
`torch.randperm`, METHOD.md 4.6). Every draw comes from a `numpy.random.Generator` derived from
(job seed, stream tag, epoch, block id), so a block's anchors and candidates are the same whatever
the number of DDP workers, and a resumed run redraws exactly what the crashed one would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

# Stream tags keep the epoch shuffle and the per-block candidate draws statistically independent.
_STREAM_SHUFFLE = 0
_STREAM_CANDIDATES = 1
_STREAM_TORCH = 2


# --------------------------------------------------------------------------- targets


def teacher_center(pool_sketches: np.ndarray) -> np.ndarray:
    """The direction every row's teacher gradient shares: the mean of the (train) pool's unit sketches,
    float32 [proj_dim]. `center_sketches` removes it (fit.center_teacher)."""
    p = np.asarray(pool_sketches, dtype=np.float64)
    if p.ndim != 2 or len(p) == 0:
        raise ValueError(f"the teacher's center needs a non-empty 2-D sketch matrix; got shape {p.shape}")
    return p.mean(axis=0).astype(np.float32)


def center_sketches(sketches: np.ndarray, center: Optional[np.ndarray]) -> np.ndarray:
    """Unit sketches with the teacher's shared direction removed: normalise(s - center), float32.

    Cosines of unit sketches are dominated by what every row's loss gradient has in common (a
    general language-modelling direction), so rows that share little else still score alike;
    subtracting the pool's mean sketch leaves what is specific to each row. A zero row (a row the
    teacher rejected: no evidence) stays zero, and so does a row equal to the center. `center` None
    returns the sketches unchanged (as float32)."""
    s = np.asarray(sketches, dtype=np.float32)
    if center is None:
        return s
    c = np.asarray(center, dtype=np.float32)
    if s.ndim != 2 or c.shape != (s.shape[1],):
        raise ValueError(f"sketches {s.shape} and center {c.shape} do not match")
    zero = ~s.any(axis=1)
    out = s - c
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    out = np.divide(out, norms, out=np.zeros_like(out), where=norms > 1e-12)
    out[zero] = 0.0
    return out


def cosine_targets(anchor_sketches: np.ndarray, pool_sketches: np.ndarray) -> np.ndarray:
    """Influence of every pool row on every anchor: cosine of the teacher sketches (METHOD.md 1b).

    The sketches are unit-norm by contract, so the cosine is the plain dot product. Returns float32
    [n_anchors, n_pool].
    """
    a = np.asarray(anchor_sketches, dtype=np.float32)
    p = np.asarray(pool_sketches, dtype=np.float32)
    if a.ndim != 2 or p.ndim != 2 or a.shape[1] != p.shape[1]:
        raise ValueError(f"sketch matrices must be 2-D with the same width; got {a.shape} and {p.shape}")
    return a @ p.T


# --------------------------------------------------------------------------- loss


def pearson_term(scores: torch.Tensor, targets: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """1 - Pearson correlation over the whole flattened k x m block (both sides centred)."""
    s = scores.reshape(-1).float()
    y = targets.reshape(-1).float()
    s = s - s.mean()
    y = y - y.mean()
    r = (s * y).sum() / (s.norm() * y.norm() + eps)
    return 1.0 - r


def listwise_kl_term(scores: torch.Tensor, targets: torch.Tensor, tau: float) -> torch.Tensor:
    """Row-wise KL(softmax(Y/tau) || softmax(S/tau)), summed over candidates, averaged over anchors.

    P (the target distribution) comes from the teacher, Q from the student, as in the original;
    'batchmean' divides the summed KL by the number of anchors k.
    """
    log_q = F.log_softmax(scores.float() / tau, dim=-1)
    log_p = F.log_softmax(targets.float() / tau, dim=-1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def block_loss(scores: torch.Tensor, targets: torch.Tensor, alpha: float, tau: float) -> torch.Tensor:
    """alpha * (1 - Pearson) + (1 - alpha) * listwise KL for one block (scores, targets: [k, m])."""
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(
            f"scores and targets must both be [k, m]; got {tuple(scores.shape)} and {tuple(targets.shape)}"
        )
    loss = scores.new_zeros((), dtype=torch.float32)
    if alpha > 0:
        loss = loss + alpha * pearson_term(scores, targets)
    if alpha < 1:
        loss = loss + (1.0 - alpha) * listwise_kl_term(scores, targets, tau)
    return loss


def check_finite(loss: float, epoch: int, block: int) -> None:
    """Refuse a non-finite loss: one NaN step would poison every weight and the export after it."""
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"fit: the distillation loss is {loss} at epoch {epoch}, block {block}; "
            f"lower fit.lr (or raise fit.tau) and rerun with --overwrite."
        )


# --------------------------------------------------------------------------- seeded randomness


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    """A generator that depends only on (seed, keys); never on call order or global state."""
    # SeedSequence wants non-negative entropy; fold negative job seeds into range.
    entropy = [int(seed) % (1 << 63), *(int(k) % (1 << 63) for k in keys)]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit integer seed from (seed, keys), e.g. for `torch.manual_seed` per (epoch, rank)."""
    return int(rng_for(seed, _STREAM_TORCH, *keys).integers(1 << 63))


def epoch_blocks(n_anchors: int, k: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The epoch's anchor blocks: a seeded shuffle of all train anchors, taken k at a time.

    The last block holds the remainder (fewer than k anchors) rather than dropping anchors.
    """
    if n_anchors < 1 or k < 1:
        raise ValueError(f"need n_anchors >= 1 and k >= 1; got {n_anchors}, {k}")
    order = rng_for(seed, _STREAM_SHUFFLE, epoch).permutation(n_anchors)
    return [order[i : i + k] for i in range(0, n_anchors, k)]


def worker_block_ids(n_blocks: int, rank: int, world_size: int) -> list[int]:
    """Blocks of DDP worker `rank`: rank::world_size, padded by wrapping around to equal counts.

    DDP all-reduces gradients at every step, so every worker must take the same number of steps;
    a worker with one block less would hang its peers. Padding (re-visiting the epoch's first
    blocks) keeps every anchor in play instead of dropping the remainder.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    per_worker = steps_per_epoch(n_blocks, world_size)
    return [(rank + i * world_size) % n_blocks for i in range(per_worker)]


def steps_per_epoch(n_blocks: int, world_size: int) -> int:
    """Optimiser steps per epoch (the same on every worker)."""
    return math.ceil(n_blocks / world_size)


def candidate_rng(seed: int, epoch: int, block_id: int) -> np.random.Generator:
    """Generator for one block's candidate draw (independent of which worker runs the block)."""
    return rng_for(seed, _STREAM_CANDIDATES, epoch, block_id)


# --------------------------------------------------------------------------- candidate sampler


@dataclass(frozen=True)
class CandidateSampler:
    """Draws the m candidates one block of anchors shares (METHOD.md 1d, "Candidate sampling").

    `targets` is the train-anchor x train-pool cosine matrix; candidates are column indices into it,
    so the sampler can only ever return train-pool rows.
    """

    targets: np.ndarray
    m: int
    hard_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.targets.ndim != 2:
            raise ValueError(f"targets must be [n_anchors, n_pool]; got shape {self.targets.shape}")
        if not 1 <= self.m <= self.n_pool:
            raise ValueError(f"m={self.m} candidates per block, but the train pool has {self.n_pool} rows")
        if not 0.0 <= self.hard_ratio < 1.0:
            raise ValueError(f"hard_ratio must be in [0, 1); got {self.hard_ratio}")

    @property
    def n_pool(self) -> int:
        return int(self.targets.shape[1])

    @property
    def n_hard(self) -> int:
        return int(math.floor(self.m * self.hard_ratio))

    def hard_pool(self, anchor_idx: np.ndarray) -> np.ndarray:
        """Union over the block's anchors of each row's top-(2 * top_k) targets (sorted indices).

        top_k = floor(n_hard / k) + 1 with k the block's anchor count (the configured k except in
        an epoch's last, shorter block).
        """
        if self.n_hard == 0:
            return np.empty(0, dtype=np.int64)
        top_k = self.n_hard // len(anchor_idx) + 1
        take = min(2 * top_k, self.n_pool)
        rows = self.targets[np.asarray(anchor_idx)]
        # Stable sort: ties resolve by index, so the hard set never depends on sort internals.
        top = np.argsort(-rows, axis=1, kind="stable")[:, :take]
        return np.unique(top).astype(np.int64)

    def sample_split(self, anchor_idx: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(hard, easy) candidate indices: disjoint, together m distinct train-pool columns."""
        anchor_idx = np.asarray(anchor_idx)
        if anchor_idx.size == 0:
            raise ValueError("a block needs at least one anchor")
        hard = self.hard_pool(anchor_idx)
        if hard.size > self.n_hard:
            hard = np.sort(rng.choice(hard, size=self.n_hard, replace=False))
        rest = np.setdiff1d(np.arange(self.n_pool, dtype=np.int64), hard, assume_unique=True)
        easy = rng.choice(rest, size=self.m - hard.size, replace=False).astype(np.int64)
        return hard, easy

    def sample(self, anchor_idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """m distinct candidate column indices for the block (hard ones first)."""
        hard, easy = self.sample_split(anchor_idx, rng)
        return np.concatenate([hard, easy])


# --------------------------------------------------------------------------- LR schedule


def warmup_steps(total_steps: int, warmup_frac: float) -> int:
    """W: the first `warmup_frac` of the optimiser steps (floor)."""
    return int(math.floor(warmup_frac * total_steps))


def lr_multiplier(step: int, total_steps: int, warmup: int) -> float:
    """min(1, (s+1)/W) * max(0, 1 - max(0, s-W)/(T-W)): linear warm-up, then linear decay to 0."""
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    span = total_steps - warmup
    decay = max(0.0, 1.0 - max(0, step - warmup) / span) if span > 0 else 1.0
    return warm * decay


def lr_lambda(total_steps: int, warmup_frac: float):
    """A `torch.optim.lr_scheduler.LambdaLR` function for the schedule above."""
    warmup = warmup_steps(total_steps, warmup_frac)
    return lambda step: lr_multiplier(step, total_steps, warmup)
