"""The Ray Train worker loop of the fit stage, and its epoch checkpoints.

Every worker runs `train_loop` (DDP over anchor blocks). Rank 0 evaluates the validation and the
held-out splits and writes a checkpoint after every epoch: weights as safetensors, optimiser/scheduler
state (`torch.load(weights_only=True)` on resume: no pickle), the metric history, with
`restore_best` the weights of the best epoch on validation (epoch 0, the starting encoder, is a
candidate), and the split scores of the epochs the export may pick (`PREDICTIONS`), which the
driver reuses instead of embedding those splits again. Dropout (when enabled) is reseeded per
(seed, epoch, rank), so a resumed epoch replays exactly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import tempfile
import time
from typing import Any, Optional

import numpy as np

from pipeline.config import FitConfig
from pipeline.stages.fit_data import FitData

log = logging.getLogger("influcoder.fit")

WEIGHTS = "model.safetensors"
BEST_WEIGHTS = "best.safetensors"
TRAIN_STATE = "train_state.pt"
HISTORY = "history.json"
# Encoder cosines of the validation and held-out splits, keyed `{epoch}.{split}` (split: `val`,
# `heldout`), for epoch 0 (the starting encoder), the last epoch and, with restore_best, the best one.
PREDICTIONS = "predictions.safetensors"


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: DDP over anchor blocks, held-out eval and a checkpoint after every epoch.

    Every worker runs this. Rank 0 evaluates and writes checkpoints; all ranks call
    `ray.train.report` the same number of times (it is a barrier).
    """
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from pipeline.distill import (
        CandidateSampler,
        block_loss,
        candidate_rng,
        check_finite,
        derive_seed,
        epoch_blocks,
        lr_lambda,
        steps_per_epoch,
        worker_block_ids,
    )
    from pipeline.encoder import TextEncoder
    from pipeline.hardware import encoder_autocast_bf16

    data: FitData = ray.get(config["data_ref"])
    fit = FitConfig(**config["fit"])
    seed = int(config["seed"])
    train_ctx = ray.train.get_context()
    rank, world = train_ctx.get_world_rank(), train_ctx.get_world_size()
    torch.set_num_threads(int(config["torch_threads"]))
    device = ray.train.torch.get_device()
    use_bf16 = encoder_autocast_bf16(device)

    enc = TextEncoder(
        config["model_dir"], max_len=config["max_len"], trust_remote_code=config["trust_remote_code"], device=device
    )
    _freeze_unused(enc)
    if fit.dropout is not None:
        set_dropout(enc, fit.dropout)
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    params = [p for p in enc.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=fit.lr, weight_decay=fit.weight_decay)
    n_anchors = len(data.train_anchors.ids)
    n_blocks = math.ceil(n_anchors / fit.block_anchors)
    total_steps = steps_per_epoch(n_blocks, world) * fit.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, fit.warmup_frac))
    sampler = CandidateSampler(data.targets, m=fit.block_candidates, hard_ratio=fit.hard_ratio)

    history: dict[str, Any] = {
        "untrained": None,
        "epochs": [],
        "resumed_from_epochs": [],
        "best_epoch": None,
        "best_score": None,
    }
    best_state = None
    predictions: dict[str, np.ndarray] = {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            history, best_state = _load_checkpoint(ckpt_dir, enc, optimizer, scheduler, fit.restore_best)
            predictions = load_predictions(ckpt_dir)
        history["resumed_from_epochs"].append(len(history["epochs"]))
        if history.get("compute") != enc.compute:  # kept on other hardware: scores of this run would differ
            predictions = {}
    # The driver reuses the kept split scores only where it embeds the same way (`TextEncoder.compute`).
    history["compute"] = enc.compute
    model = ray.train.torch.prepare_model(enc)  # DDP when world > 1; weights broadcast from rank 0

    select_key = "val_" + ("spearman_aggregated" if fit.select_best_on == "aggregated" else "spearman_per_anchor")
    if history["untrained"] is None:  # epoch 0: the starting encoder, a candidate for export
        kept: dict[str, np.ndarray] = {}
        untrained = evaluate_splits(enc, data, fit.embed_batch_size, keep=kept) if rank == 0 else {}
        predictions.update({f"0.{split}": pred for split, pred in kept.items()})
        history["untrained"] = untrained or None
        if fit.restore_best and rank == 0:
            history["best_epoch"], history["best_score"] = 0, untrained[select_key]
        ray.train.report({"epoch": 0, "loss": None, **untrained})

    for epoch in range(len(history["epochs"]) + 1, fit.epochs + 1):
        t0 = time.perf_counter()
        # Reseeding per (epoch, rank) makes dropout masks reproducible after a resume.
        torch.manual_seed(derive_seed(seed, epoch, rank))
        blocks = epoch_blocks(n_anchors, fit.block_anchors, seed, epoch)
        my_blocks = worker_block_ids(len(blocks), rank, world)
        model.train()
        loss_sum, steps = 0.0, 0
        for block_id in my_blocks:
            a_idx = blocks[block_id]
            c_idx = sampler.sample(a_idx, candidate_rng(seed, epoch, block_id))
            # Internal invariant: candidates are train-pool columns, never eval rows.
            assert 0 <= c_idx.min() and c_idx.max() < len(data.train_pool.ids)
            texts = [data.train_anchors.views[a] for a in a_idx] + [data.train_pool.views[c] for c in c_idx]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                z = model(texts)
            z = z.float()
            scores = z[: len(a_idx)] @ z[len(a_idx) :].T
            target = torch.as_tensor(data.targets[np.ix_(a_idx, c_idx)], device=device)
            loss = block_loss(scores, target, fit.alpha, fit.tau)
            check_finite(float(loss.detach()), epoch, int(block_id))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, fit.grad_clip)
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach())
            steps += 1
        epoch_loss = _mean_over_workers(loss_sum, steps, device, world)
        train_s = time.perf_counter() - t0
        if rank != 0:
            ray.train.report({"epoch": epoch, "loss": epoch_loss})
            continue
        t1 = time.perf_counter()
        kept = {}
        scores = evaluate_splits(enc, data, fit.embed_batch_size, heldout=fit.heldout_every_epoch, keep=kept)
        record = {
            "epoch": epoch,
            "loss": epoch_loss,
            **scores,
            "steps": steps,
            "lr_last": float(scheduler.get_last_lr()[0]),
            "train_s": round(train_s, 3),
            "eval_s": round(time.perf_counter() - t1, 3),
        }
        history["epochs"].append(record)
        if fit.restore_best and (history["best_score"] is None or record[select_key] > history["best_score"]):
            history["best_epoch"], history["best_score"] = epoch, record[select_key]
            best_state = _cpu_state(enc)
        # Kept: the start, this (so far the last) epoch and the best one; no other epoch is ever exported.
        keep_epochs = {0, epoch, history["best_epoch"]}
        predictions = {k: v for k, v in predictions.items() if int(k.split(".")[0]) in keep_epochs}
        predictions.update({f"{epoch}.{split}": pred for split, pred in kept.items()})
        with tempfile.TemporaryDirectory() as tmp:
            _save_checkpoint(tmp, enc, optimizer, scheduler, history, best_state, predictions)
            ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        _tell_driver(config.get("progress"), {**record, "epochs": fit.epochs})


def _tell_driver(queue, record: dict[str, Any]) -> None:
    """Hand an epoch's record to the driver's progress log; never block or fail training over it."""
    if queue is None:
        return
    try:
        queue.put_nowait(record)
    except Exception:  # noqa: BLE001 - a full or gone queue only costs a progress line
        pass


def _freeze_unused(enc) -> None:
    """Stop training parameters the pooled embedding does not depend on (e.g. BERT's pooler).

    DDP fails on parameters that never receive a gradient unless `find_unused_parameters` makes it
    scan the graph every step; freezing them is free. One probe backward finds them, identically on
    every rank.
    """
    enc.zero_grad(set_to_none=True)
    enc(["probe text", "a second probe"]).sum().backward()
    unused = [name for name, p in enc.named_parameters() if p.requires_grad and p.grad is None]
    for name, p in enc.named_parameters():
        if name in unused:
            p.requires_grad_(False)
    enc.zero_grad(set_to_none=True)
    if unused:
        log.info("fit: %d parameter tensors do not reach the embedding and stay frozen: %s", len(unused), unused[:4])


def set_dropout(enc, p: float) -> None:
    """Set every dropout probability in the encoder (hidden and attention dropout alike: BERT-style
    attention reads its module's `p`)."""
    import torch

    for module in enc.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p


def encoder_scores(enc, anchors, pool, batch_size: int):
    """Encoder cosines [anchors, pool] of two SplitRows, embedded through their views."""
    return enc.embed(anchors.views, batch_size=batch_size) @ enc.embed(pool.views, batch_size=batch_size).T


def evaluate_splits(
    enc, data: FitData, batch_size: int, heldout: bool = True, keep: Optional[dict[str, np.ndarray]] = None
) -> dict[str, float]:
    """Spearman of the encoder cosine against the teacher on the held-out eval split (reported, never
    chosen on) and, when there is one, the validation split (keys prefixed `val_`: what choices use).
    `keep`, where given, receives each split's encoder cosines under `heldout` and `val`."""
    from pipeline.metrics import spearman_aggregated, spearman_per_anchor

    out: dict[str, float] = {}
    splits = [("", data.eval_anchors, data.eval_pool, data.ground_truth)] if heldout else []
    if data.val_anchors is not None:
        splits.append(("val_", data.val_anchors, data.val_pool, data.val_truth))
    for prefix, anchors, pool, truth in splits:
        pred = encoder_scores(enc, anchors, pool, batch_size)
        assert pred.shape == truth.shape  # that split's anchors x pool, nothing else
        if keep is not None:
            keep["val" if prefix else "heldout"] = pred
        mean, std = spearman_per_anchor(pred, truth)
        out.update(
            {
                f"{prefix}spearman_per_anchor": mean,
                f"{prefix}spearman_per_anchor_std": std,
                f"{prefix}spearman_aggregated": spearman_aggregated(pred, truth),
            }
        )
    return out


def _mean_over_workers(loss_sum: float, steps: int, device, world: int) -> float:
    import torch

    if world > 1 and torch.distributed.is_initialized():
        t = torch.tensor([loss_sum, float(steps)], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        loss_sum, steps = float(t[0]), int(t[1])
    return loss_sum / max(steps, 1)


def _cpu_state(enc) -> dict:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in enc.model.state_dict().items()}


def _save_checkpoint(
    ckpt_dir: str, enc, optimizer, scheduler, history: dict, best_state: Optional[dict], predictions: dict
) -> None:
    """Weights and split scores as safetensors; optimiser/scheduler state via torch.save (our own
    transient state, read back with weights_only=True); the metric history as JSON."""
    import torch
    from safetensors.numpy import save_file as save_arrays
    from safetensors.torch import save_file

    save_file(_cpu_state(enc), os.path.join(ckpt_dir, WEIGHTS))
    save_arrays(
        {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in predictions.items()},
        os.path.join(ckpt_dir, PREDICTIONS),
    )
    if best_state is not None:
        save_file(best_state, os.path.join(ckpt_dir, BEST_WEIGHTS))
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, os.path.join(ckpt_dir, TRAIN_STATE)
    )
    with open(os.path.join(ckpt_dir, HISTORY), "w") as f:
        json.dump(history, f)


def _load_checkpoint(ckpt_dir: str, enc, optimizer, scheduler, restore_best: bool) -> tuple[dict, Optional[dict]]:
    import torch
    from safetensors.torch import load_file

    enc.model.load_state_dict(load_file(os.path.join(ckpt_dir, WEIGHTS)), strict=True)
    state = torch.load(os.path.join(ckpt_dir, TRAIN_STATE), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    with open(os.path.join(ckpt_dir, HISTORY)) as f:
        history = json.load(f)
    best_path = os.path.join(ckpt_dir, BEST_WEIGHTS)
    best = load_file(best_path) if restore_best and os.path.exists(best_path) else None
    return history, best


def load_predictions(ckpt_dir: str) -> dict[str, np.ndarray]:
    """A checkpoint's kept split scores (`PREDICTIONS`); empty for a checkpoint without them."""
    from safetensors.numpy import load_file

    path = os.path.join(ckpt_dir, PREDICTIONS)
    return load_file(path) if os.path.exists(path) else {}
