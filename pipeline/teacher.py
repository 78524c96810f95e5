"""The teacher: LoRA-gradient CountSketches of a causal LM (METHOD.md 1a, 1b, 6.3-6.4).

``TeacherSketcher`` loads the target LM, attaches a fresh seeded LoRA adapter, and turns
(prompt, response) pairs into L2-normalised CountSketches of each sample's exact response-only
loss gradient. The pairwise dot products of the sketches are the ground-truth influence
(METHOD.md 1b).

Speed without changing what is computed:
- Token-budget batching: rows are sorted by length and packed so that rows x longest row stays
  within ``token_budget`` (``token_budget_batches``): short rows share a pass, long rows are not
  padded to a random long neighbour. Per-sample gradients are exact (``pipeline.gradients``), so
  results do not depend on how rows are grouped.
- bf16 compute where the hardware has it natively (``native_bf16``): forward and backward under
  bf16 autocast, with the LM head, the loss, the per-sample gradient products and the sketch in
  float32. ``precision_check`` is the gate: the stage compares its sketches of a few rows with the
  CountSketch of float32 batch-size-1 reference gradients and fails on a miss.

Pure torch/transformers/peft; no Ray here.
"""

from __future__ import annotations

import logging
import warnings
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

from pipeline.config import TeacherConfig
from pipeline.errors import ConfigError, InputDataError, StageError
from pipeline.gradients import (
    IGNORE_INDEX,
    LogitsMode,
    PerSampleGradients,
    collate,
    hf_loss,
    per_sample_loss,
    reference_per_sample_grads,
)
from pipeline.batching import token_budget_batches
from pipeline.hardware import autocast_dtype, native_bf16
from pipeline.sketching import CountSketch, l2_normalize

log = logging.getLogger("influcoder.teacher")

__all__ = [
    "Example",
    "build_example",
    "SketchResult",
    "TeacherSketcher",
    "fidelity_report",
    "resolve_autocast_dtype",
    "native_bf16",
    "token_budget_batches",
    "precision_check",
    "MIN_ROW_COSINE",
]

MIN_ROW_COSINE = 0.999
"""Per-row cosine between the stage's sketch and the CountSketch of the float32 batch-size-1
reference gradient below which a precision/batching path is not trusted (``precision_check``)."""


# --------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class Example:
    """One tokenised sample: ``input_ids = prompt ‖ response``, labels -100 on the prompt."""

    input_ids: list[int]
    labels: list[int]
    prompt_truncated: bool
    """The prompt lost its head to fit ``max_len`` (left truncation)."""
    response_truncated: bool
    """The response (+ EOS) was longer than ``max_len // 2`` and lost its tail."""

    @property
    def loss_tokens(self) -> int:
        """Positions that carry loss (a label at position 0 is never predicted)."""
        return sum(1 for y in self.labels[1:] if y != IGNORE_INDEX)


def build_example(
    tokenizer: Any, prompt: Optional[str], response: Optional[str], max_len: int
) -> tuple[Optional[Example], Optional[str]]:
    """Tokenise one sample, response first (METHOD.md 1a and pitfall 4.5).

    The response + EOS is tokenised first without special tokens and capped at ``max_len // 2``
    tokens, so the loss span can never be truncated away by a long prompt. The prompt (no
    special tokens) keeps its LAST ``max_len - len(response_ids)`` tokens. No BOS is added.

    Returns:
        ``(example, None)``, or ``(None, reason)`` when the sample has no usable loss span:
        ``missing_response``, ``empty_response`` or ``empty_loss_span``.
    """
    if max_len < 8:
        raise ConfigError(f"teacher.max_len={max_len}; expected an integer >= 8")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError(
            "the teacher tokenizer has no EOS token; the response loss span needs one "
            "(METHOD.md 1a). Use a tokenizer that defines eos_token."
        )
    if response is None:
        return None, "missing_response"
    if not response.strip():
        return None, "empty_response"
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if not response_ids:
        return None, "empty_response"
    response_ids = list(response_ids) + [eos]
    cap = max_len // 2
    response_truncated = len(response_ids) > cap
    response_ids = response_ids[:cap]

    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else []
    budget = max_len - len(response_ids)  # >= max_len / 2 > 0
    prompt_truncated = len(prompt_ids) > budget
    if prompt_truncated:
        prompt_ids = prompt_ids[len(prompt_ids) - budget :]

    example = Example(
        input_ids=prompt_ids + response_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + response_ids,
        prompt_truncated=prompt_truncated,
        response_truncated=response_truncated,
    )
    if example.loss_tokens == 0:
        return None, "empty_loss_span"
    return example, None


# --------------------------------------------------------------------------- results


@dataclass
class SketchResult:
    """Sketches of the accepted rows, in input order."""

    sketches: np.ndarray
    """float32 ``[n_ok, d]``, each row L2-normalised."""
    ok_index: np.ndarray
    """int64 ``[n_ok]``: input index of each sketch row (ascending)."""
    rejects: list[tuple[int, str]] = field(default_factory=list)
    """``(input index, reason)`` of rows without a sketch, ascending."""
    tokens: int = 0
    """Real (non-pad) tokens run through the model."""
    loss_tokens: int = 0
    """Tokens that carried loss."""
    grad_norms: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    """float32 ``[n_ok]``: L2 norm of each row's exact gradient before sketching."""


def resolve_autocast_dtype(dtype: str, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype for ``teacher.dtype`` on ``device`` (None = plain fp32).

    ``auto`` means bf16 where the device has native bf16 (``native_bf16``: CUDA compute capability
    >= 8, CPUs with AVX512-BF16 or AMX) and fp32 elsewhere (METHOD.md 1a ``hardware_profile``).
    Weights, per-sample gradients and sketches stay fp32 either way.
    """
    return autocast_dtype(dtype, device, "teacher.dtype")


# --------------------------------------------------------------------------- the teacher


class TeacherSketcher:
    """Loads the teacher LM with a fresh seeded LoRA and sketches per-sample gradients.

    Args:
        teacher_cfg: model, max_len, LoRA rank/alpha/targets, dtype, attention implementation.
        proj_dim: CountSketch width d.
        proj_seed: CountSketch seed.
        lora_seed: ``torch.manual_seed`` value set immediately before the adapter is attached.
        device: torch device for the model and the sketch.
        torch_threads: if set, ``torch.set_num_threads`` (process-wide) for CPU runs.
    """

    def __init__(
        self,
        teacher_cfg: TeacherConfig,
        proj_dim: int,
        proj_seed: int,
        lora_seed: int,
        device: str | torch.device = "cpu",
        torch_threads: Optional[int] = None,
    ):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from pipeline.models import resolve_teacher

        if torch_threads is not None:
            torch.set_num_threads(int(torch_threads))
        self.cfg = teacher_cfg
        self.device = torch.device(device)
        self.proj_dim, self.proj_seed, self.lora_seed = int(proj_dim), int(proj_seed), int(lora_seed)
        self.model_path = resolve_teacher(teacher_cfg.model)
        self.autocast_dtype = resolve_autocast_dtype(teacher_cfg.dtype, self.device)

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=teacher_cfg.trust_remote_code)
        base = AutoModelForCausalLM.from_pretrained(
            self.model_path,
            dtype=torch.float32,
            attn_implementation=teacher_cfg.attn_implementation,
            trust_remote_code=teacher_cfg.trust_remote_code,
        )
        targets = teacher_cfg.target_modules.strip()
        target_modules: str | list[str] = (
            "all-linear" if targets == "all-linear" else [m.strip() for m in targets.split(",") if m.strip()]
        )
        if not target_modules:
            raise ConfigError(
                f"teacher.target_modules={teacher_cfg.target_modules!r}; expected 'all-linear' "
                f"or comma-separated module names such as 'q_proj,v_proj'"
            )
        lora_cfg = LoraConfig(
            r=teacher_cfg.lora_rank,
            lora_alpha=teacher_cfg.alpha,
            lora_dropout=0.0,
            bias="none",
            target_modules=target_modules,
            task_type="CAUSAL_LM",
        )
        # The adapter's A matrices are drawn from the global RNG: seed it right before attaching
        # (on the CPU, before any move to the device) so every machine gets the same adapter.
        torch.manual_seed(self.lora_seed)
        try:
            with warnings.catch_warnings():
                # PEFT reads `is_gradient_checkpointing`, which transformers 5 deprecates: a warning
                # about the two libraries, printed by every actor, that the user cannot act on.
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                model = get_peft_model(base, lora_cfg)
        except ValueError as e:
            raise ConfigError(f"teacher.target_modules={teacher_cfg.target_modules!r}: {e}") from None
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)  # only the LoRA weights (METHOD.md 1a)
        model.eval()  # dropout off: deterministic gradients (METHOD.md 4.6)
        self.model = model.to(self.device)

        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.engine = PerSampleGradients(self.model, logits_mode=self._choose_logits_mode())
        self.num_params = self.engine.num_params
        self.sketcher = CountSketch(self.num_params, self.proj_dim, self.proj_seed, self.device)
        log.info(
            "teacher %s: %d LoRA params (r=%d, alpha=%g), sketch d=%d, autocast=%s, logits=%s",
            teacher_cfg.model,
            self.num_params,
            teacher_cfg.lora_rank,
            teacher_cfg.alpha,
            self.proj_dim,
            self.autocast_dtype,
            self.engine.logits_mode,
        )

    def _choose_logits_mode(self) -> LogitsMode:
        """Use head-only-at-loss-positions logits unless the model's own loss disagrees with it.

        The fast path applies ``get_output_embeddings()`` to hidden states directly; models that
        transform their logits (soft-capping, scaling) would silently get a different loss, so
        one probe sample is compared against HF's own loss, in fp32, and `full` is used on a miss.
        """
        probe, _ = build_example(self.tokenizer, "The capital of France is", " Paris, of course.", self.cfg.max_len)
        assert probe is not None
        batch = collate([probe.input_ids], [probe.labels], self.pad_id, self.device)
        with torch.no_grad():
            want = float(hf_loss(self.model, probe.input_ids, probe.labels, self.device))
            for mode in ("gather", "full"):
                try:
                    got = float(per_sample_loss(self.model, batch, mode)[0][0])  # type: ignore[arg-type]
                except ConfigError:
                    continue
                if math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-5):
                    return mode  # type: ignore[return-value]
                log.warning("teacher: %s-logits loss %.6f != HF loss %.6f", mode, got, want)
        raise StageError(
            f"teacher {self.cfg.model}: the response-only loss does not reproduce the model's own "
            f"loss ({want:.6f}); this architecture is not supported by pipeline.gradients."
        )

    # ------------------------------------------------------------------ public API

    def examples(
        self, prompts: Sequence[Optional[str]], responses: Sequence[Optional[str]]
    ) -> tuple[dict[int, Example], list[tuple[int, str]]]:
        """Tokenise every row: accepted examples by input index, and ``(index, reason)`` rejects."""
        if len(prompts) != len(responses):
            raise InputDataError(
                f"teacher: {len(prompts)} prompts but {len(responses)} responses; every row needs both columns"
            )
        accepted: dict[int, Example] = {}
        rejects: list[tuple[int, str]] = []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ex, reason = build_example(self.tokenizer, p, r, self.cfg.max_len)
            if ex is None:
                rejects.append((i, reason or "rejected"))
            else:
                accepted[i] = ex
        return accepted, rejects

    def sketch(
        self,
        prompts: Sequence[Optional[str]],
        responses: Sequence[Optional[str]],
        batch_size: int,
        token_budget: Optional[int] = None,
    ) -> SketchResult:
        """L2-normalised CountSketches of each row's response-only LoRA gradient.

        Rows are sorted by length (longest first, so an out-of-memory error shows up in the first
        batch) and packed by ``token_budget_batches`` (at most ``batch_size`` rows and
        ``token_budget`` padded tokens per pass); the output is in input order and does not
        depend on either. Rows without a loss span, or whose gradient is non-finite or
        zero (METHOD.md 1a: "every row finite and non-zero"), become rejects.
        """
        accepted, rejects = self.examples(prompts, responses)
        keys = sorted(accepted)
        groups = token_budget_batches([len(accepted[i].input_ids) for i in keys], token_budget, batch_size)
        rows: dict[int, tuple[np.ndarray, float]] = {}
        tokens = loss_tokens = 0
        for group in groups:
            chunk = [keys[k] for k in group]
            batch = collate(
                [accepted[i].input_ids for i in chunk], [accepted[i].labels for i in chunk], self.pad_id, self.device
            )
            acc = self.sketcher.new_accumulator(len(chunk))
            stats = self.engine.run(
                batch, lambda off, g: self.sketcher.project_segment(acc, off, g), self.autocast_dtype
            )
            tokens += int(batch.attention_mask.sum())
            loss_tokens += int(stats.loss_tokens.sum())
            finite = (
                torch.isfinite(acc).all(dim=1) & torch.isfinite(stats.sq_norm) & torch.isfinite(stats.loss)
            ).tolist()
            sq_norm = stats.sq_norm.tolist()
            sketch_zero = (acc.abs().amax(dim=1) == 0).tolist()
            unit = l2_normalize(acc).cpu().numpy()
            for k, i in enumerate(chunk):
                if not finite[k]:
                    rejects.append((i, "non_finite_gradient"))
                elif sq_norm[k] == 0.0 or sketch_zero[k]:
                    rejects.append((i, "zero_gradient"))
                else:
                    rows[i] = (unit[k], math.sqrt(sq_norm[k]))
        ok = np.array(sorted(rows), dtype=np.int64)
        sketches = np.stack([rows[i][0] for i in ok]) if len(ok) else np.zeros((0, self.proj_dim), np.float32)
        return SketchResult(
            sketches=sketches,
            ok_index=ok,
            rejects=sorted(rejects),
            tokens=tokens,
            loss_tokens=loss_tokens,
            grad_norms=np.array([rows[i][1] for i in ok], dtype=np.float32),
        )

    @property
    def dtype_name(self) -> str:
        """The compute precision in use: ``bfloat16`` (autocast) or ``float32``."""
        return str(self.autocast_dtype or torch.float32).replace("torch.", "")

    def exact_gradients(self, prompts: Sequence[Optional[str]], responses: Sequence[Optional[str]]) -> np.ndarray:
        """Full flattened fp32 gradients ``[n, P]`` by the one-sample-at-a-time reference, computed
        in this sketcher's precision (build it with ``teacher.dtype=float32`` for the fp32 reference).

        For the fidelity check on a handful of rows: every row must have a loss span.
        """
        accepted, rejects = self.examples(prompts, responses)
        if rejects:
            raise InputDataError(
                f"teacher.exact_gradients: rows {rejects} have no loss span; pass rows that sketch() accepted"
            )
        grads = reference_per_sample_grads(
            self.model,
            [(accepted[i].input_ids, accepted[i].labels) for i in range(len(prompts))],
            self.device,
            self.autocast_dtype,
        )
        return grads.cpu().numpy()

    def fingerprint(self) -> dict[str, Any]:
        """What determines the sketches (for manifests)."""
        from pipeline.models import model_fingerprint

        return {
            "model": self.cfg.model,
            "model_path": self.model_path,
            "model_fingerprint": model_fingerprint(self.model_path),
            "max_len": self.cfg.max_len,
            "lora_rank": self.cfg.lora_rank,
            "lora_alpha": self.cfg.alpha,
            "target_modules": self.cfg.target_modules,
            "lora_seed": self.lora_seed,
            "num_params": self.num_params,
            "proj_dim": self.proj_dim,
            "proj_seed": self.proj_seed,
            "dtype": self.dtype_name,
            "attn_implementation": self.cfg.attn_implementation,
        }


# --------------------------------------------------------------------------- fidelity


def fidelity_report(exact_grads: np.ndarray, sketches: np.ndarray) -> dict[str, float | int]:
    """Compare exact pairwise gradient cosines with sketch cosines (METHOD.md 1a fidelity check).

    Args:
        exact_grads: ``[n, P]`` full gradients of n rows.
        sketches: ``[n, d]`` sketches of the same rows, same order (normalised or not).

    Returns:
        ``samples``, ``mean_abs_err`` and ``max_abs_err`` of the n(n-1)/2 upper-triangle cosines,
        and their ``spearman`` rank correlation (NaN with fewer than 3 pairs' variation).
    """
    from pipeline.metrics import spearman

    g = np.asarray(exact_grads, dtype=np.float64)
    s = np.asarray(sketches, dtype=np.float64)
    if g.ndim != 2 or s.ndim != 2 or g.shape[0] != s.shape[0] or g.shape[0] < 2:
        raise InputDataError(
            f"fidelity_report: exact grads {g.shape} and sketches {s.shape} need the same number of rows (>= 2)"
        )

    def unit(x: np.ndarray) -> np.ndarray:
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.where(norm > 0, norm, 1.0)

    iu = np.triu_indices(g.shape[0], k=1)
    ug, us = unit(g), unit(s)  # g is [n, P] float64: normalise each matrix once
    exact_cos = (ug @ ug.T)[iu]
    sketch_cos = (us @ us.T)[iu]
    err = np.abs(exact_cos - sketch_cos)
    rho = spearman(exact_cos, sketch_cos) if len(err) >= 2 else float("nan")
    return {
        "samples": int(g.shape[0]),
        "mean_abs_err": float(err.mean()),
        "max_abs_err": float(err.max()),
        "spearman": rho,
    }


def precision_check(
    sketches: np.ndarray, reference_sketches: np.ndarray, ids: Sequence[str], min_cos: float = MIN_ROW_COSINE
) -> dict[str, Any]:
    """Per-row cosine of a path's sketches with the reference sketches of the same rows.

    Args:
        sketches: ``[n, d]`` sketches the stage produced (its precision, its batching).
        reference_sketches: ``[n, d]`` CountSketches of the float32 batch-size-1 gradients of the
            same rows, same order, same sketch seed.
        ids: row ids, for the report.
        min_cos: the pass mark.

    Returns:
        ``rows``, ``min_cos`` (the pass mark), ``min``/``mean`` cosine, ``cosines`` per row,
        ``failed`` (ids with a cosine below the pass mark) and ``passed``.
    """
    a = np.asarray(sketches, dtype=np.float64)
    b = np.asarray(reference_sketches, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or len(ids) != a.shape[0]:
        raise InputDataError(
            f"precision_check: sketches {a.shape}, reference {b.shape} and {len(ids)} ids must describe the same rows"
        )
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cos = (a * b).sum(axis=1) / np.where(na * nb > 0, na * nb, 1.0)
    failed = [str(i) for i, c in zip(ids, cos) if not c >= min_cos]  # NaN fails too
    return {
        "rows": int(a.shape[0]),
        "min_cos": float(min_cos),
        "min": float(cos.min()) if len(cos) else float("nan"),
        "mean": float(cos.mean()) if len(cos) else float("nan"),
        "cosines": {str(i): round(float(c), 6) for i, c in zip(ids, cos)},
        "failed": failed,
        "passed": not failed,
    }
