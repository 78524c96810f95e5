"""Exact per-sample gradients of the trainable (LoRA) parameters of a causal LM, batched.

Why hooks and not ``torch.func.vmap``: vmap over a model with sdpa attention and a padding mask
fails (STACK.md pitfall 8), and autocast inside vmap is fragile. Every trainable parameter here is
the weight (or bias) of an ``nn.Linear`` (PEFT's ``lora_A``/``lora_B`` are bias-free Linears), and
for a Linear ``y = x W^T`` the gradient of a loss that is a SUM over samples splits per sample:

    dL/dW = Σ_b Σ_t (dL/dy_{b,t}) x_{b,t}^T   =>   per-sample grad_b = Σ_t (dL_b/dy_{b,t}) x_{b,t}^T

because sample b's loss depends only on row b (no batch-norm in decoders). So one forward saves
each Linear's input, one backward of ``Σ_b L_b`` yields ``dL/dy`` per module through a tensor hook,
and ``einsum('bto,bti->boi')`` gives the exact per-sample weight gradients. They are handed to a
``sink(offset, grads[B, n])`` (e.g. ``CountSketch.project_segment``) module by module during the
backward pass and dropped right away, so the ``[B, P]`` gradient matrix is never materialised.

Loss: each sample's loss is the mean token CE over its response (label != -100) positions, the
same as Hugging Face's loss at batch size 1 (METHOD.md 1a); the batch loss is the sum of those
(never the batch mean, which would couple samples; METHOD.md 4.1). Sequences are RIGHT-padded:
with causal attention no real token attends to the pads after it, so the results equal
one-at-a-time passes up to float rounding. Logits are computed only at the loss positions
(SmolLM2's lm_head is 49152 x 576; full ``[B, T, V]`` fp32 logits would dominate time and memory).

Pure torch; no Ray here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError, StageError

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "collate",
    "Segment",
    "trainable_segments",
    "LogitsMode",
    "per_sample_loss",
    "hf_loss",
    "BatchGradStats",
    "PerSampleGradients",
    "reference_per_sample_grads",
]

IGNORE_INDEX = -100
"""Label of positions without loss (HF convention)."""

Sink = Callable[[int, torch.Tensor], object]
"""``sink(offset, grads)``: receives the per-sample gradients ``[B, n]`` of the flattened
parameters ``offset .. offset+n-1``."""

LogitsMode = Literal["gather", "full"]
"""`gather`: run the decoder body and apply the LM head only at loss positions (fast; valid when
the head is a plain projection, which ``TeacherSketcher`` checks against HF's loss). `full`: call
the whole model and pick the loss positions out of its ``[B, T, V]`` logits (any architecture)."""


@dataclass(frozen=True)
class Batch:
    """A right-padded batch: ``[B, T]`` input ids, attention mask and labels (-100 = no loss)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])


def collate(
    input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int, device: str | torch.device = "cpu"
) -> Batch:
    """Right-pad token lists into a ``Batch`` (pads get mask 0 and label -100)."""
    if not input_ids or len(input_ids) != len(labels):
        raise ValueError(f"collate: got {len(input_ids)} input lists and {len(labels)} label lists")
    width = max(len(x) for x in input_ids)
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)
    lab = torch.full((len(input_ids), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    for row, (x, y) in enumerate(zip(input_ids, labels)):
        if len(x) != len(y):
            raise ValueError(f"collate: row {row} has {len(x)} ids but {len(y)} labels")
        ids[row, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        lab[row, : len(y)] = torch.as_tensor(y, dtype=torch.long)
        mask[row, : len(x)] = 1
    return Batch(ids.to(device), mask.to(device), lab.to(device))


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Segment:
    """One trainable parameter's block in the flattened gradient."""

    name: str
    """Parameter name as ``model.named_parameters()`` reports it."""
    module: nn.Linear
    """The Linear that owns the parameter."""
    kind: Literal["weight", "bias"]
    offset: int
    numel: int


def trainable_segments(model: nn.Module) -> list[Segment]:
    """Trainable parameters in ``model.named_parameters()`` order, with their flattened offsets.

    This order defines the concatenated gradient (METHOD.md 1a: "concatenated in
    ``model.parameters()`` order"). Raises ``ConfigError`` when a trainable parameter is not the
    weight/bias of an ``nn.Linear`` (e.g. LoRA on embeddings), since hooks cannot split it.
    """
    modules = dict(model.named_modules())
    segments: list[Segment] = []
    offset = 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        owner_name, _, kind = name.rpartition(".")
        owner = modules.get(owner_name)
        if not isinstance(owner, nn.Linear) or kind not in ("weight", "bias"):
            raise ConfigError(
                f"trainable parameter `{name}` is not the weight or bias of an nn.Linear "
                f"(owner: {type(owner).__name__}); per-sample gradients support Linear LoRA layers "
                f"only. Drop that module from teacher.target_modules."
            )
        segments.append(Segment(name, owner, kind, offset, param.numel()))  # type: ignore[arg-type]
        offset += param.numel()
    if not segments:
        raise ConfigError("the model has no trainable parameters; attach a LoRA adapter first.")
    return segments


# --------------------------------------------------------------------------- loss


def _loss_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each row's loss is taken, left-packed: ``(pos [B,L], targets [B,L], valid [B,L], counts [B])``.

    Position t's logits predict token t+1, so position t is a loss position when ``labels[t+1]``
    is not -100. Rows are padded to the longest loss span L with position 0 / target -100.
    """
    nxt = labels[:, 1:]
    is_loss = nxt != IGNORE_INDEX
    counts = is_loss.sum(dim=1)
    width = max(int(counts.max()), 1)
    # A stable sort of "not a loss position" moves every row's loss positions to the front, in order.
    pos = torch.argsort((~is_loss).to(torch.int8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=labels.device)[None, :] < counts[:, None]
    pos = torch.where(valid, pos, torch.zeros_like(pos))
    targets = torch.where(valid, nxt.gather(1, pos), torch.full_like(pos, IGNORE_INDEX))
    return pos, targets, valid, counts


def _split_lm(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder body returning hidden states, output head) of an HF causal LM (PEFT-wrapped or not)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(lm, "base_model", None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if body is None or body is lm or head is None:
        raise ConfigError(f"{type(lm).__name__}: cannot find the decoder body and LM head; use logits_mode='full'.")
    return body, head


def per_sample_loss(
    model: nn.Module, batch: Batch, logits_mode: LogitsMode = "gather"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's mean CE over its loss positions, fp32 ``[B]``, and the loss-token counts ``[B]``.

    Rows without a loss position get loss 0 (callers reject them before batching).
    """
    pos, targets, valid, counts = _loss_positions(batch.labels)
    if logits_mode == "gather":
        body, head = _split_lm(model)
        hidden = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)[0]
        picked = hidden.gather(1, pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        # The head and the softmax run in fp32 even under bf16 autocast: bf16 logits carry absolute
        # errors of ~0.05 at logit ~10, i.e. several % in p - onehot, the signal every gradient
        # starts from (measured: per-row cosine vs fp32 0.9989 with a bf16 head). Only the loss
        # positions go through the head, so the fp32 matmul is a small share of the FLOPs.
        with torch.autocast(device_type=picked.device.type, enabled=False):
            logits = head(picked.float())
    elif logits_mode == "full":
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        logits = full.gather(1, pos.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    else:
        raise ConfigError(f"logits_mode={logits_mode!r}; expected 'gather' or 'full'")
    ce = F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(targets)
    return ce.sum(dim=1) / counts.clamp_min(1).to(ce.dtype), counts


def hf_loss(
    model: nn.Module, input_ids: Sequence[int], labels: Sequence[int], device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Hugging Face's own loss for ONE unpadded sample (mean CE over its label tokens)."""
    ids = torch.as_tensor([list(input_ids)], dtype=torch.long, device=device)
    lab = torch.as_tensor([list(labels)], dtype=torch.long, device=device)
    return model(input_ids=ids, labels=lab, use_cache=False).loss


def _autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


# --------------------------------------------------------------------------- per-sample grads


@dataclass(frozen=True)
class BatchGradStats:
    loss: torch.Tensor
    """Per-sample mean response CE, fp32 ``[B]``."""
    sq_norm: torch.Tensor
    """Squared L2 norm of each sample's exact (unsketched) gradient, fp32 ``[B]``."""
    loss_tokens: torch.Tensor
    """Loss positions per sample ``[B]``."""


class PerSampleGradients:
    """Batched exact per-sample gradients of a model's trainable Linear parameters.

    Args:
        model: an HF causal LM (PEFT-wrapped or not) whose only trainable parameters belong to
            ``nn.Linear`` modules.
        logits_mode: see ``LogitsMode``.
    """

    def __init__(self, model: nn.Module, logits_mode: LogitsMode = "gather"):
        self.model = model
        self.logits_mode: LogitsMode = logits_mode
        self.segments = trainable_segments(model)
        self.num_params = sum(s.numel for s in self.segments)
        self.params = [s.module.weight if s.kind == "weight" else s.module.bias for s in self.segments]
        by_module: dict[int, list[Segment]] = {}
        for seg in self.segments:
            by_module.setdefault(id(seg.module), []).append(seg)
        self._by_module = by_module
        # State of the batch being processed (set by run()).
        self._sink: Optional[Sink] = None
        self._sq_norm: Optional[torch.Tensor] = None
        self._batch_size = 0
        self._calls: dict[int, int] = {}

    @contextlib.contextmanager
    def _hooks(self) -> Iterator[None]:
        handles = [segs[0].module.register_forward_hook(self._on_forward) for segs in self._by_module.values()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _on_forward(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        key = id(module)
        self._calls[key] = self._calls.get(key, 0) + 1
        if self._calls[key] > 1:
            # The squared-norm bookkeeping assumes one call per forward (true for LoRA layers).
            raise StageError(
                f"per-sample gradients: module {type(module).__name__} ran twice in one forward "
                f"(shared weights are not supported)"
            )
        if not output.requires_grad:
            return
        saved = [inputs[0].detach()]  # a holder, emptied as soon as the gradient has been used

        def on_grad(grad_out: torch.Tensor) -> None:
            self._emit(module, saved.pop(), grad_out)

        output.register_hook(on_grad)

    def _emit(self, module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        b = self._batch_size
        if x.shape[0] != b or grad_out.shape[0] != b:
            raise StageError(
                f"per-sample gradients: a hooked Linear saw leading dim {x.shape[0]}, expected the batch size {b}"
            )
        # fp32 here: under bf16 autocast both tensors are bf16 (METHOD.md 1a: grads cast to fp32).
        x3 = x.reshape(b, -1, x.shape[-1]).float()
        g3 = grad_out.reshape(b, -1, grad_out.shape[-1]).float()
        for seg in self._by_module[id(module)]:
            if seg.kind == "weight":
                # einsum('bto,bti->boi'); for tall-skinny lora_B blocks (o >> i = r) computing the
                # transposed product and copying is ~4x faster on CPU than bmm(g^T, x) directly.
                if g3.shape[-1] > x3.shape[-1]:
                    per_sample = torch.bmm(x3.transpose(1, 2), g3).transpose(1, 2).reshape(b, -1)
                else:
                    per_sample = torch.bmm(g3.transpose(1, 2), x3).reshape(b, -1)
            else:
                per_sample = g3.sum(dim=1)
            assert self._sq_norm is not None and self._sink is not None
            self._sq_norm += per_sample.square().sum(dim=1)
            self._sink(seg.offset, per_sample)
            del per_sample

    def run(self, batch: Batch, sink: Sink, autocast_dtype: Optional[torch.dtype] = None) -> BatchGradStats:
        """One forward + backward of the batch; feeds every sample's gradient blocks to ``sink``."""
        device = batch.input_ids.device
        self._sink, self._batch_size, self._calls = sink, batch.size, {}
        self._sq_norm = torch.zeros(batch.size, dtype=torch.float32, device=device)
        try:
            with self._hooks(), torch.enable_grad():
                with _autocast(device, autocast_dtype):
                    losses, counts = per_sample_loss(self.model, batch, self.logits_mode)
                # The SUM of per-sample losses: its gradient wrt sample b's activations is exactly
                # dL_b/d(activations_b). Gradients wrt the parameters themselves are not needed
                # (the hooks read dL/dy), but asking for them drives the backward to every hook.
                torch.autograd.grad(losses.sum(), self.params, allow_unused=True)
            return BatchGradStats(losses.detach(), self._sq_norm, counts)
        finally:
            self._sink, self._sq_norm, self._calls = None, None, {}

    def exact(self, batch: Batch, autocast_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, BatchGradStats]:
        """Full flattened per-sample gradients ``[B, P]`` fp32 (tests and small P only)."""
        out = torch.zeros(batch.size, self.num_params, dtype=torch.float32, device=batch.input_ids.device)

        def store(offset: int, grads: torch.Tensor) -> None:
            out[:, offset : offset + grads.shape[1]] += grads

        stats = self.run(batch, store, autocast_dtype)
        return out, stats


def reference_per_sample_grads(
    model: nn.Module,
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    device: str | torch.device = "cpu",
    autocast_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """The authors' bs-1 method: per sample, HF loss + ``torch.autograd.grad``, flattened, fp32.

    Args:
        model: the (PEFT) causal LM.
        examples: ``(input_ids, labels)`` per sample, unpadded.

    Returns:
        ``[n, P]`` fp32 gradients in ``model.named_parameters()`` order of trainable parameters
        (the same order as ``trainable_segments``).
    """
    device = torch.device(device)
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    rows = []
    for ids, labels in examples:
        with torch.enable_grad():
            with _autocast(device, autocast_dtype):
                loss = hf_loss(model, ids, labels, device)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(
            torch.cat([(g if g is not None else torch.zeros_like(p)).float().flatten() for g, p in zip(grads, params)])
        )
    return torch.stack(rows)
