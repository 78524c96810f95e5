"""The fit stage: distil the teacher's sketch cosines into the text encoder with Ray Train.

Reads `sketch/anchors/*.parquet` and `sketch/pool/*.parquet`, trains `TextEncoder` with the
block loss of `pipeline.distill` on the train split (train anchors x train pool), evaluates the
held-out eval split (eval anchors x eval pool) after every epoch, and writes:

- `fit/encoder/`: the exported encoder (loads with `AutoModel` and `SentenceTransformer`);
- `fit/metrics.json`: `untrained` and per-epoch held-out Spearman, the exported epoch, split sizes,
  timings, truncation counts;
- `fit/curves.png`: loss and Spearman by epoch, the untrained level as a horizontal line.

Crash recovery: every epoch ends with a Ray Train checkpoint (weights as safetensors, optimiser and
scheduler state, RNG state, the metric history) under the stage's work dir. A worker failure
restarts the worker group from the latest checkpoint (`fit.max_failures`), and a rerun of a killed
driver resumes the same run, because the run name and storage path are keyed by the stage identity.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.artifacts import StageRun
from pipeline.config import FitConfig, to_dict
from pipeline.distill import cosine_targets
from pipeline.errors import ArtifactMissingError, ConfigError, InputDataError, ResourceError, StageError
from pipeline.models import resolve_encoder
from pipeline.schema import ID, SKETCH, SPLIT, TEXT

log = logging.getLogger("influcoder")

SIDES = ("anchors", "pool")
SPLITS = ("train", "eval")
NORM_TOL = 1e-3  # sketches are float32 unit vectors; anything further off was not normalised
WEIGHTS = "model.safetensors"
BEST_WEIGHTS = "best.safetensors"
TRAIN_STATE = "train_state.pt"
HISTORY = "history.json"


# --------------------------------------------------------------------------- inputs


@dataclass
class SplitRows:
    ids: list[str]
    texts: list[str]
    sketches: np.ndarray  # float32 [n, proj_dim], unit rows


@dataclass
class FitData:
    """Everything the workers need; small (targets are a few thousand x a few thousand floats)."""

    train_anchors: SplitRows
    train_pool: SplitRows
    eval_anchors: SplitRows
    eval_pool: SplitRows
    targets: np.ndarray       # train anchors x train pool cosines (distillation targets)
    ground_truth: np.ndarray  # eval anchors x eval pool cosines (held-out)

    def sizes(self) -> dict[str, int]:
        return {"train_anchors": len(self.train_anchors.ids), "train_pool": len(self.train_pool.ids),
                "eval_anchors": len(self.eval_anchors.ids), "eval_pool": len(self.eval_pool.ids)}


def _read_side(sketch_dir: str, side: str) -> pa.Table:
    folder = storage.join(sketch_dir, side)
    files = storage.list_files(folder, ".parquet")
    if not files:
        raise ArtifactMissingError(f"fit: no Parquet files under {storage.redact(folder)}; rerun the sketch "
                                   f"stage (`influcoder sketch JOB.yaml --overwrite`).")
    tables = []
    for path in files:
        fs, p = storage.filesystem(path)
        names = pq.read_schema(p, filesystem=fs).names
        missing = [c for c in (ID, SPLIT, SKETCH, TEXT) if c not in names]
        if missing:
            raise InputDataError(f"fit: {storage.redact(path)} lacks column(s) {missing} (has {names}); the sketch "
                              f"artifact must carry id, split, sketch and text. Rerun the sketch stage.")
        tables.append(pq.read_table(p, filesystem=fs, columns=[ID, SPLIT, SKETCH, TEXT]))
    return pa.concat_tables(tables, promote_options="permissive")


def _split_rows(table: pa.Table, split: str, side: str, prefix: str) -> SplitRows:
    rows = table.filter(pc.equal(table[SPLIT], split))
    # Sort by id: the result must not depend on how the sketch stage sharded its output.
    rows = rows.take(pc.sort_indices(rows, sort_keys=[(ID, "ascending")]))
    ids = rows[ID].to_pylist()
    texts = rows[TEXT].to_pylist()
    if any(t is None for t in texts):
        raise InputDataError(f"fit: {side} rows with a null `text` in the {split} split; fix the sketch artifact.")
    col = rows[SKETCH].combine_chunks()
    if len(ids):
        width = col.type.list_size
        sketches = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(ids), width)
    else:
        sketches = np.zeros((0, 1), dtype=np.float32)
    norms = np.linalg.norm(sketches, axis=1)
    if len(ids) and np.abs(norms - 1.0).max() > NORM_TOL:
        bad = int(np.argmax(np.abs(norms - 1.0)))
        raise InputDataError(f"fit: {side} sketch of id {ids[bad]!r} has L2 norm {norms[bad]:.4f}; the contract "
                          f"requires unit-norm sketches. Rerun the sketch stage.")
    return SplitRows(ids=ids, texts=[prefix + t for t in texts], sketches=sketches)


def load_fit_data(sketch_dir: str, anchor_prefix: str) -> FitData:
    """Read the sketch artifact, split it and build targets and held-out ground truth."""
    parts: dict[tuple[str, str], SplitRows] = {}
    for side in SIDES:
        table = _read_side(sketch_dir, side)
        ids = table[ID].to_pylist()
        if len(set(ids)) != len(ids):
            raise InputDataError(f"fit: duplicate ids in sketch/{side}; every row must have a unique id.")
        unknown = set(table[SPLIT].to_pylist()) - set(SPLITS)
        if unknown:
            raise InputDataError(f"fit: sketch/{side} has split values {sorted(unknown)}; expected 'train' or 'eval'.")
        for split in SPLITS:
            parts[side, split] = _split_rows(table, split, side, anchor_prefix if side == "anchors" else "")
    for side in SIDES:
        overlap = set(parts[side, "train"].ids) & set(parts[side, "eval"].ids)
        if overlap:  # leakage (METHOD.md 4.4): unique ids already make this impossible, keep it explicit
            raise InputDataError(f"fit: ids in both train and eval {side}: {sorted(overlap)[:3]}")
    for (side, split), rows in parts.items():
        minimum = 2 if side == "pool" else 1  # Spearman over the pool needs two items
        if len(rows.ids) < minimum:
            raise InputDataError(f"fit: the {split} split has {len(rows.ids)} {side} rows, at least {minimum} needed; "
                                 f"raise sketch.{split}_{side if side == 'pool' else 'anchors'}.")
    return FitData(
        train_anchors=parts["anchors", "train"], train_pool=parts["pool", "train"],
        eval_anchors=parts["anchors", "eval"], eval_pool=parts["pool", "eval"],
        targets=cosine_targets(parts["anchors", "train"].sketches, parts["pool", "train"].sketches),
        ground_truth=cosine_targets(parts["anchors", "eval"].sketches, parts["pool", "eval"].sketches),
    )


# --------------------------------------------------------------------------- resources


@dataclass(frozen=True)
class WorkerPlan:
    num_workers: int
    use_gpu: bool
    cpus_per_worker: int


def plan_workers(fit: FitConfig) -> WorkerPlan:
    """Size the Ray Train worker group from the cluster's real resources (never ask for what is absent).

    A GPU or CPU request the cluster cannot meet would leave the worker group pending forever,
    so it fails fast with `ResourceError` instead.
    """
    import ray

    from pipeline.ray_runtime import cluster_cpus_gpus

    cpus, gpus = cluster_cpus_gpus()
    if fit.use_gpu and gpus < 1:
        raise ResourceError(f"`fit.use_gpu` is true but the Ray cluster has no GPU (CPU={cpus:g}, GPU=0). "
                            f"Use `--set fit.use_gpu=false` to train on CPUs, or add GPU nodes.")
    use_gpu = fit.use_gpu if fit.use_gpu is not None else gpus >= 1
    if use_gpu:
        n = fit.num_workers or int(gpus)
        if n > gpus:
            raise ResourceError(f"`fit.num_workers`={n} GPU workers, but the cluster has {gpus:g} GPUs; "
                                f"lower fit.num_workers.")
        return WorkerPlan(num_workers=n, use_gpu=True, cpus_per_worker=1)
    # CPU: one worker by default (DDP between processes of one small machine only adds overhead).
    n = fit.num_workers or 1
    node_cpus = max((node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive")), default=cpus)
    if n > cpus:
        raise ResourceError(f"`fit.num_workers`={n} CPU workers need {n} CPUs, but the cluster has {cpus:g}; "
                            f"lower fit.num_workers.")
    per_worker = max(1, min(int(cpus // n), int(node_cpus)))  # a worker must fit on one node
    return WorkerPlan(num_workers=n, use_gpu=False, cpus_per_worker=per_worker)


# --------------------------------------------------------------------------- driver


def run(ctx: StageRun, *, fail_once_at_epoch: Optional[int] = None) -> None:
    """Train, export and report. `fail_once_at_epoch` is a test hook: the first attempt's worker
    raises in that epoch, so tests can check that training resumes from the last checkpoint."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.ray_runtime import ensure_ray

    job, fit = ctx.job, ctx.job.fit
    t0 = time.perf_counter()
    # Inputs are validated before Ray starts: a bad artifact or config fails in a second.
    data = load_fit_data(ctx.upstream_dir("sketch"), job.encoder.anchor_prefix)
    sizes = data.sizes()
    if fit.block_candidates > sizes["train_pool"]:
        raise ConfigError(f"config key `fit.block_candidates`: got {fit.block_candidates}, but the train pool has "
                          f"{sizes['train_pool']} rows; lower it or raise sketch.train_pool.")
    leaked = _eval_texts_seen_in_train(data)
    if leaked:
        log.warning("fit: %d eval texts also occur (under other ids) in the train split; held-out metrics are "
                    "optimistic. Deduplicate the anchors/pool inputs.", leaked)
    model_dir = resolve_encoder(job.encoder.model)
    truncated = _count_truncated(model_dir, data, job.encoder.max_len, job.encoder.trust_remote_code)
    if any(v for k, v in truncated.items() if k != "max_len"):
        log.warning("fit: texts longer than encoder.max_len=%d are truncated (the encoder never sees their tail): "
                    "%s. Raise encoder.max_len if answers sit at the end.", job.encoder.max_len, truncated)
    ensure_ray(job.ray)
    plan = plan_workers(fit)
    log.info("fit: %s; %d worker(s), gpu=%s, %d CPU each", sizes, plan.num_workers, plan.use_gpu,
             plan.cpus_per_worker)
    setup_s = time.perf_counter() - t0

    # One object-store copy, fetched by each worker (also after a restart) instead of being
    # pickled into every worker's config.
    data_ref = ray.put(data)
    storage_path = storage.join(ctx.work_dir, "ray_train")
    if not storage.is_uri(storage_path):
        storage_path = os.path.abspath(storage.local_path(storage_path))
    resources = {"CPU": plan.cpus_per_worker, **({"GPU": 1} if plan.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "data_ref": data_ref, "model_dir": model_dir, "max_len": job.encoder.max_len,
            "trust_remote_code": job.encoder.trust_remote_code, "fit": to_dict(fit), "seed": job.seed,
            "torch_threads": plan.cpus_per_worker, "fail_once_at_epoch": fail_once_at_epoch,
        },
        scaling_config=ScalingConfig(num_workers=plan.num_workers, use_gpu=plan.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=f"fit-{ctx.identity}", storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=fit.max_failures),
        ),
    )
    t1 = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001 - Ray wraps worker errors in its own types
        raise StageError(f"fit: training failed after {fit.max_failures} allowed restart(s) "
                         f"(fit.max_failures): {e}") from e
    train_s = time.perf_counter() - t1
    if result.checkpoint is None:
        raise StageError("fit: training ended without a checkpoint; see the Ray Train logs above.")

    t2 = time.perf_counter()
    with result.checkpoint.as_directory() as ckpt_dir:
        with open(os.path.join(ckpt_dir, HISTORY)) as f:
            history = json.load(f)
        weights = os.path.join(ckpt_dir, BEST_WEIGHTS if fit.restore_best else WEIGHTS)
        _export_encoder(model_dir, weights, job.encoder.max_len, job.encoder.trust_remote_code,
                        storage.join(ctx.out_dir, "encoder"))
    export_s = time.perf_counter() - t2

    epochs = history["epochs"]
    if [e["epoch"] for e in epochs] != list(range(1, fit.epochs + 1)):
        raise StageError(f"fit: the checkpoint history holds epochs {[e['epoch'] for e in epochs]}, "
                         f"expected 1..{fit.epochs}")
    selected = history["best_epoch"] if fit.restore_best else fit.epochs
    metrics = {
        "untrained": history["untrained"],
        "epochs": epochs,
        "selected_epoch": selected,
        "restore_best": fit.restore_best,
        "select_best_on": fit.select_best_on,
        "resumed_from_epochs": history["resumed_from_epochs"],
        "splits": sizes,
        "truncated": truncated,
        "eval_texts_seen_in_train": leaked,
        "workers": {"num_workers": plan.num_workers, "use_gpu": plan.use_gpu,
                    "cpus_per_worker": plan.cpus_per_worker},
        "timings": {"setup_s": round(setup_s, 3), "train_s": round(train_s, 3), "export_s": round(export_s, 3)},
    }
    storage.write_json_atomic(storage.join(ctx.out_dir, "metrics.json"), metrics)
    _plot_curves(metrics, storage.join(ctx.out_dir, "curves.png"))
    chosen = next(e for e in epochs if e["epoch"] == selected)
    ctx.record(rows=sizes, fit={
        "selected_epoch": selected, "restore_best": fit.restore_best,
        "spearman_aggregated": chosen["spearman_aggregated"],
        "spearman_per_anchor": chosen["spearman_per_anchor"],
        "untrained": history["untrained"], "truncated": truncated,
        "resumed_from_epochs": history["resumed_from_epochs"], "timings": metrics["timings"],
        "workers": metrics["workers"],
    })
    log.info("fit: epoch %d held-out spearman aggregated %.4f per-anchor %.4f (untrained %.4f / %.4f)",
             selected, chosen["spearman_aggregated"], chosen["spearman_per_anchor"],
             history["untrained"]["spearman_aggregated"], history["untrained"]["spearman_per_anchor"])


def _eval_texts_seen_in_train(data: FitData) -> int:
    """Eval rows whose exact text is also a train row: a leak that distinct ids do not rule out."""
    train = set(data.train_anchors.texts) | set(data.train_pool.texts)
    return sum(t in train for t in data.eval_anchors.texts + data.eval_pool.texts)


def _count_truncated(model_dir: str, data: FitData, max_len: int, trust_remote_code: bool) -> dict[str, int]:
    """Texts longer than encoder.max_len per split: their tail is invisible to the encoder (METHOD.md 4.5)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    out = {"max_len": max_len}
    for name, rows in (("train_anchors", data.train_anchors), ("train_pool", data.train_pool),
                       ("eval_anchors", data.eval_anchors), ("eval_pool", data.eval_pool)):
        lengths = tok(rows.texts, truncation=False, add_special_tokens=True, return_length=True,
                      verbose=False)["length"]
        out[name] = int(sum(n > max_len for n in lengths))
    return out


def _export_encoder(model_dir: str, weights: str, max_len: int, trust_remote_code: bool, out_dir: str) -> None:
    from safetensors.torch import load_file

    from pipeline.encoder import TextEncoder

    enc = TextEncoder(model_dir, max_len=max_len, trust_remote_code=trust_remote_code)
    enc.model.load_state_dict(load_file(weights), strict=True)
    fs, local = storage.filesystem(out_dir)
    if storage.is_uri(out_dir):  # TextEncoder.save writes local files; stage them, then upload
        with tempfile.TemporaryDirectory() as tmp:
            enc.save(tmp)
            pafs.copy_files(tmp, local, destination_filesystem=fs)
    else:
        enc.save(local)


def _plot_curves(metrics: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [e["epoch"] for e in metrics["epochs"]]
    fig, (ax_loss, ax_rho) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [e["loss"] for e in metrics["epochs"]], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="distillation loss")
    styles = (("spearman_aggregated", "aggregated", "C0"), ("spearman_per_anchor", "per-anchor mean", "C1"))
    for key, label, color in styles:
        ax_rho.plot(epochs, [e[key] for e in metrics["epochs"]], marker="o", color=color, label=label)
        ax_rho.axhline(metrics["untrained"][key], color=color, linestyle="--", label=f"{label} (untrained)")
    ax_rho.axvline(metrics["selected_epoch"], color="grey", linestyle=":", label="exported epoch")
    ax_rho.set(xlabel="epoch", ylabel="held-out Spearman", title="held-out Spearman vs teacher")
    ax_rho.legend(fontsize=8)
    fig.tight_layout()
    fs, local = storage.filesystem(path)
    with fs.open_output_stream(local) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- Ray Train worker


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: DDP over anchor blocks, held-out eval and a checkpoint after every epoch.

    Every worker runs this. Rank 0 evaluates and writes checkpoints; all ranks call
    `ray.train.report` the same number of times (it is a barrier).
    """
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from pipeline.distill import (CandidateSampler, block_loss, candidate_rng, derive_seed, epoch_blocks,
                                  lr_lambda, steps_per_epoch, worker_block_ids)
    from pipeline.encoder import TextEncoder

    data: FitData = ray.get(config["data_ref"])
    fit = FitConfig(**config["fit"])
    seed = int(config["seed"])
    train_ctx = ray.train.get_context()
    rank, world = train_ctx.get_world_rank(), train_ctx.get_world_size()
    torch.set_num_threads(int(config["torch_threads"]))
    device = ray.train.torch.get_device()
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()

    enc = TextEncoder(config["model_dir"], max_len=config["max_len"],
                      trust_remote_code=config["trust_remote_code"], device=device)
    _freeze_unused(enc)
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    params = [p for p in enc.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=fit.lr, weight_decay=fit.weight_decay)
    n_anchors = len(data.train_anchors.ids)
    n_blocks = math.ceil(n_anchors / fit.block_anchors)
    total_steps = steps_per_epoch(n_blocks, world) * fit.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, fit.warmup_frac))
    sampler = CandidateSampler(data.targets, m=fit.block_candidates, hard_ratio=fit.hard_ratio)

    history: dict[str, Any] = {"untrained": None, "epochs": [], "resumed_from_epochs": [],
                               "best_epoch": None, "best_score": None}
    best_state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            history, best_state = _load_checkpoint(ckpt_dir, enc, optimizer, scheduler, fit.restore_best)
        history["resumed_from_epochs"].append(len(history["epochs"]))
    model = ray.train.torch.prepare_model(enc)  # DDP when world > 1; weights broadcast from rank 0

    if history["untrained"] is None:  # epoch 0: the untrained encoder, the cost-matched control
        untrained = _evaluate(enc, data, fit.embed_batch_size) if rank == 0 else {}
        history["untrained"] = untrained or None
        ray.train.report({"epoch": 0, "loss": None, **untrained})

    select_key = "spearman_aggregated" if fit.select_best_on == "aggregated" else "spearman_per_anchor"
    for epoch in range(len(history["epochs"]) + 1, fit.epochs + 1):
        t0 = time.perf_counter()
        # Reseeding per (epoch, rank) makes dropout masks reproducible after a resume.
        torch.manual_seed(derive_seed(seed, epoch, rank))
        blocks = epoch_blocks(n_anchors, fit.block_anchors, seed, epoch)
        my_blocks = worker_block_ids(len(blocks), rank, world)
        model.train()
        loss_sum, steps = 0.0, 0
        for i, block_id in enumerate(my_blocks):
            if checkpoint is None and config.get("fail_once_at_epoch") == epoch and i == min(1, len(my_blocks) - 1):
                raise RuntimeError(f"injected failure in epoch {epoch} (fit test hook)")
            a_idx = blocks[block_id]
            c_idx = sampler.sample(a_idx, candidate_rng(seed, epoch, block_id))
            # Internal invariant: candidates are train-pool columns, never eval rows.
            assert 0 <= c_idx.min() and c_idx.max() < len(data.train_pool.ids)
            texts = [data.train_anchors.texts[a] for a in a_idx] + [data.train_pool.texts[c] for c in c_idx]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                z = model(texts)
            z = z.float()
            scores = z[: len(a_idx)] @ z[len(a_idx):].T
            target = torch.as_tensor(data.targets[np.ix_(a_idx, c_idx)], device=device)
            loss = block_loss(scores, target, fit.alpha, fit.tau)
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
        record = {"epoch": epoch, "loss": epoch_loss, **_evaluate(enc, data, fit.embed_batch_size),
                  "steps": steps, "lr_last": float(scheduler.get_last_lr()[0]),
                  "train_s": round(train_s, 3), "eval_s": round(time.perf_counter() - t1, 3)}
        history["epochs"].append(record)
        if fit.restore_best and (history["best_score"] is None or record[select_key] > history["best_score"]):
            history["best_epoch"], history["best_score"] = epoch, record[select_key]
            best_state = _cpu_state(enc)
        with tempfile.TemporaryDirectory() as tmp:
            _save_checkpoint(tmp, enc, optimizer, scheduler, history, best_state)
            ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(tmp))


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
        log.info("fit: %d parameter tensors do not reach the embedding and stay frozen: %s",
                 len(unused), unused[:4])


def _evaluate(enc, data: FitData, batch_size: int) -> dict[str, float]:
    """Held-out Spearman of the encoder cosine against the eval ground truth (eval ids only)."""
    from pipeline.metrics import spearman_aggregated, spearman_per_anchor

    za = enc.embed(data.eval_anchors.texts, batch_size=batch_size)
    zp = enc.embed(data.eval_pool.texts, batch_size=batch_size)
    pred = za @ zp.T
    assert pred.shape == data.ground_truth.shape  # eval anchors x eval pool, nothing else
    mean, std = spearman_per_anchor(pred, data.ground_truth)
    return {"spearman_per_anchor": mean, "spearman_per_anchor_std": std,
            "spearman_aggregated": spearman_aggregated(pred, data.ground_truth)}


def _mean_over_workers(loss_sum: float, steps: int, device, world: int) -> float:
    import torch

    if world > 1 and torch.distributed.is_initialized():
        t = torch.tensor([loss_sum, float(steps)], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        loss_sum, steps = float(t[0]), int(t[1])
    return loss_sum / max(steps, 1)


def _cpu_state(enc) -> dict:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in enc.model.state_dict().items()}


def _save_checkpoint(ckpt_dir: str, enc, optimizer, scheduler, history: dict, best_state: Optional[dict]) -> None:
    """Weights as safetensors; optimiser/scheduler state via torch.save (our own transient state,
    read back with weights_only=True); the metric history as JSON."""
    import torch
    from safetensors.torch import save_file

    save_file(_cpu_state(enc), os.path.join(ckpt_dir, WEIGHTS))
    if best_state is not None:
        save_file(best_state, os.path.join(ckpt_dir, BEST_WEIGHTS))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               os.path.join(ckpt_dir, TRAIN_STATE))
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
