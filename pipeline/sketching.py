"""Global CountSketch of flattened gradients (METHOD.md 1a, "Projection = CountSketch, global").

One bucket ``h_i ∈ {0..d-1}`` and one sign ``s_i ∈ {±1}`` per trainable parameter, drawn once
from a CPU ``torch.Generator`` seeded with ``seed``: **buckets first, then signs**, so the same
(num_params, proj_dim, seed) gives the same sketch on every machine and device. Then

    sketch(g)[j] = Σ_{i : h_i = j} s_i · g_i

which is linear in ``g``. Linearity is what lets callers feed one parameter block at a time
(``project_segment``) into an accumulator, so the full ``[B, P]`` per-sample gradient matrix
never has to exist. The cost does not depend on ``d``. Pure torch; no Ray here.
"""

from __future__ import annotations

import torch

from pipeline.errors import ConfigError

__all__ = ["CountSketch", "l2_normalize"]


class CountSketch:
    """A seeded global CountSketch ``R^P -> R^d``.

    Args:
        num_params: P, the length of the flattened gradient.
        proj_dim: d, the sketch width.
        seed: seed of the CPU generator that draws the buckets, then the signs.
        device: where the hash tables live and where projections run.
    """

    def __init__(self, num_params: int, proj_dim: int, seed: int, device: str | torch.device = "cpu"):
        if num_params <= 0:
            raise ConfigError(f"CountSketch: num_params={num_params}; expected > 0 (are any parameters trainable?).")
        if proj_dim <= 0:
            raise ConfigError(f"CountSketch: proj_dim={proj_dim}; expected > 0 (sketch.proj_dim).")
        self.num_params = int(num_params)
        self.proj_dim = int(proj_dim)
        self.seed = int(seed)
        self.device = torch.device(device)
        # Always drawn on the CPU so GPU and CPU runs share the same tables.
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        buckets = torch.randint(0, self.proj_dim, (self.num_params,), generator=gen, dtype=torch.int64)
        signs = torch.randint(0, 2, (self.num_params,), generator=gen, dtype=torch.int64) * 2 - 1
        # int64 buckets: scatter_add_ needs them, and it was the fastest CPU kernel measured
        # (about 2x index_add_ along dim 1, 10x index_add_ with int32 indices).
        self.buckets = buckets.to(self.device)
        self.signs = signs.to(device=self.device, dtype=torch.float32)

    def new_accumulator(self, batch: int) -> torch.Tensor:
        """A zero fp32 ``[batch, d]`` accumulator for ``project_segment``."""
        return torch.zeros(batch, self.proj_dim, dtype=torch.float32, device=self.device)

    def project_segment(self, acc: torch.Tensor, offset: int, grads_segment: torch.Tensor) -> torch.Tensor:
        """Add the sketch of one parameter block to ``acc`` in place and return ``acc``.

        Args:
            acc: fp32 ``[B, d]`` accumulator (see ``new_accumulator``).
            offset: index of the block's first parameter in the flattened gradient.
            grads_segment: ``[B, n]`` per-sample gradients of parameters ``offset .. offset+n-1``
                (any float dtype; accumulated in fp32).
        """
        if grads_segment.dim() != 2 or grads_segment.shape[0] != acc.shape[0]:
            raise ValueError(
                f"project_segment: grads_segment shape {tuple(grads_segment.shape)}, "
                f"expected [{acc.shape[0]}, n] to match the accumulator {tuple(acc.shape)}"
            )
        n = grads_segment.shape[1]
        if offset < 0 or offset + n > self.num_params:
            raise ValueError(
                f"project_segment: block [{offset}, {offset + n}) is outside the {self.num_params} sketched parameters"
            )
        idx = self.buckets[offset : offset + n]
        src = grads_segment.to(device=acc.device, dtype=torch.float32) * self.signs[offset : offset + n]
        # scatter_add_ with a broadcast (expanded, zero-copy) index: one pass, fp32 accumulation.
        acc.scatter_add_(1, idx.expand(acc.shape[0], n), src)
        return acc

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """Sketch full flattened gradients ``[B, P]`` (or ``[P]``) into fp32 ``[B, d]`` (or ``[d]``)."""
        single = grads.dim() == 1
        g = grads.unsqueeze(0) if single else grads
        if g.dim() != 2 or g.shape[1] != self.num_params:
            raise ValueError(f"project: grads shape {tuple(grads.shape)}, expected [B, {self.num_params}]")
        out = self.project_segment(self.new_accumulator(g.shape[0]), 0, g)
        return out[0] if single else out

    def dense_matrix(self) -> torch.Tensor:
        """The explicit ``[d, P]`` matrix with ``M[h_i, i] = s_i`` (reference for tests; small P only)."""
        if self.num_params * self.proj_dim > 50_000_000:
            raise ValueError(f"dense_matrix: {self.proj_dim} x {self.num_params} is too large for a reference")
        m = torch.zeros(self.proj_dim, self.num_params, dtype=torch.float32, device=self.device)
        m[self.buckets, torch.arange(self.num_params, device=self.device)] = self.signs
        return m


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Row-wise (last dim) L2 normalisation in fp32. Zero rows stay zero instead of becoming NaN;
    callers that need unit rows reject zero rows beforehand."""
    x = x.to(torch.float32)
    norm = x.norm(dim=-1, keepdim=True)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))
