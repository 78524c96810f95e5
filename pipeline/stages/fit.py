"""The fit stage: distil the teacher's sketch cosines into the text encoder with Ray Train.

Reads `sketch/anchors/*.parquet` and `sketch/pool/*.parquet`, trains `TextEncoder` with the
block loss of `pipeline.distill` on the train split (train anchors x train pool), evaluates the
held-out eval split (eval anchors x eval pool) after every epoch, and writes:

- `fit/encoder/`: the exported encoder (loads with `AutoModel` and `SentenceTransformer`);
- `fit/metrics.json`: `untrained` (epoch 0) and per-epoch validation and held-out Spearman, the
  candidates compared on validation and the one exported (`exported`: its held-out Spearman with
  bootstrap 95 % CIs, beside the starting encoder's), split sizes, timings, truncation counts;
- `fit/curves.png`: loss and Spearman by epoch, the untrained level as a horizontal line.

Crash recovery: every epoch ends with a Ray Train checkpoint (weights as safetensors, optimiser and
scheduler state, the metric history; dropout is reseeded per (seed, epoch, rank)) under the stage's work dir. A worker failure
restarts the worker group from the latest checkpoint (`fit.max_failures`), and a rerun of a killed
driver resumes the same run, because the run name and storage path are keyed by the stage identity.

Inputs are read and checked in `fit_data.py`; the per-worker training loop and its checkpoints are
in `fit_worker.py`; this module plans the workers, runs the TorchTrainer and exports the result.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional

import pyarrow.fs as pafs

from pipeline import storage
from pipeline.artifacts import StageRun
from pipeline.config import FitConfig, to_dict
from pipeline.errors import ConfigError, ResourceError, StageError
from pipeline.models import resolve_encoder
from pipeline.stages.fit_data import FitData, load_fit_data
from pipeline.stages.fit_worker import BEST_WEIGHTS, HISTORY, WEIGHTS, train_loop

log = logging.getLogger("influcoder")


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
        raise ResourceError(
            f"`fit.use_gpu` is true but the Ray cluster has no GPU (CPU={cpus:g}, GPU=0). "
            f"Use `--set fit.use_gpu=false` to train on CPUs, or add GPU nodes."
        )
    use_gpu = fit.use_gpu if fit.use_gpu is not None else gpus >= 1
    if use_gpu:
        n = fit.num_workers or int(gpus)
        if n > gpus:
            raise ResourceError(
                f"`fit.num_workers`={n} GPU workers, but the cluster has {gpus:g} GPUs; lower fit.num_workers."
            )
        return WorkerPlan(num_workers=n, use_gpu=True, cpus_per_worker=1)
    # CPU: one worker by default (DDP between processes of one small machine only adds overhead).
    n = fit.num_workers or 1
    node_cpus = max((node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive")), default=cpus)
    if n > cpus:
        raise ResourceError(
            f"`fit.num_workers`={n} CPU workers need {n} CPUs, but the cluster has {cpus:g}; lower fit.num_workers."
        )
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
    data = load_fit_data(ctx.upstream_dir("sketch"), job.encoder.anchor_prefix, fit.val_frac, job.seed)
    sizes = data.sizes()
    if fit.block_candidates > sizes["train_pool"]:
        raise ConfigError(
            f"config key `fit.block_candidates`: got {fit.block_candidates}, but the train pool has "
            f"{sizes['train_pool']} rows; lower it or raise sketch.train_pool."
        )
    leaked = _eval_texts_seen_in_train(data)
    if leaked:
        log.warning(
            "fit: %d eval texts also occur (under other ids) in the train split; held-out metrics are "
            "optimistic. Deduplicate the anchors/pool inputs.",
            leaked,
        )
    model_dir = resolve_encoder(job.encoder.model)
    truncated = _count_truncated(model_dir, data, job.encoder.max_len, job.encoder.trust_remote_code)
    if any(v for k, v in truncated.items() if k != "max_len"):
        log.warning(
            "fit: texts longer than encoder.max_len=%d are cut (plain texts lose their tail, instruction "
            "rows the head of their prompt): %s. Raise encoder.max_len to show the encoder more.",
            job.encoder.max_len,
            truncated,
        )
    ensure_ray(job.ray)
    plan = plan_workers(fit)
    log.info("fit: %s; %d worker(s), gpu=%s, %d CPU each", sizes, plan.num_workers, plan.use_gpu, plan.cpus_per_worker)
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
            "data_ref": data_ref,
            "model_dir": model_dir,
            "max_len": job.encoder.max_len,
            "trust_remote_code": job.encoder.trust_remote_code,
            "fit": to_dict(fit),
            "seed": job.seed,
            "torch_threads": plan.cpus_per_worker,
            "fail_once_at_epoch": fail_once_at_epoch,
        },
        scaling_config=ScalingConfig(
            num_workers=plan.num_workers, use_gpu=plan.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=f"fit-{ctx.identity}",
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=fit.max_failures),
        ),
    )
    t1 = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001 - Ray wraps worker errors in its own types
        raise StageError(
            f"fit: training failed after {fit.max_failures} allowed restart(s) (fit.max_failures): {e}"
        ) from e
    train_s = time.perf_counter() - t1
    if result.checkpoint is None:
        raise StageError("fit: training ended without a checkpoint; see the Ray Train logs above.")

    t2 = time.perf_counter()
    with result.checkpoint.as_directory() as ckpt_dir:
        with open(os.path.join(ckpt_dir, HISTORY)) as f:
            history = json.load(f)
        epochs = history["epochs"]
        if [e["epoch"] for e in epochs] != list(range(1, fit.epochs + 1)):
            raise StageError(
                f"fit: the checkpoint history holds epochs {[e['epoch'] for e in epochs]}, expected 1..{fit.epochs}"
            )
        selected = history["best_epoch"] if fit.restore_best else fit.epochs
        # Epoch 0 is the starting encoder itself: no weights file, the model folder is the export.
        weights = None if selected == 0 else os.path.join(ckpt_dir, BEST_WEIGHTS if fit.restore_best else WEIGHTS)
        choice = _choose_and_export(
            job, data, model_dir, weights, history, selected, storage.join(ctx.out_dir, "encoder")
        )
    export_s = time.perf_counter() - t2

    metrics = {
        "untrained": history["untrained"],
        "epochs": epochs,
        "selected_epoch": selected,
        "interpolation_weight": choice["weight"],
        "candidates": choice["candidates"],
        "exported": choice["exported"],
        "restore_best": fit.restore_best,
        "select_best_on": fit.select_best_on,
        "dropout": fit.dropout,
        "resumed_from_epochs": history["resumed_from_epochs"],
        "splits": sizes,
        "truncated": truncated,
        "eval_texts_seen_in_train": leaked,
        "workers": {"num_workers": plan.num_workers, "use_gpu": plan.use_gpu, "cpus_per_worker": plan.cpus_per_worker},
        "timings": {"setup_s": round(setup_s, 3), "train_s": round(train_s, 3), "export_s": round(export_s, 3)},
    }
    storage.write_json_atomic(storage.join(ctx.out_dir, "metrics.json"), metrics)
    _plot_curves(metrics, storage.join(ctx.out_dir, "curves.png"))
    exported = choice["exported"]
    ctx.record(
        rows=sizes,
        fit={
            "selected_epoch": selected,
            "restore_best": fit.restore_best,
            "interpolation_weight": choice["weight"],
            "spearman_aggregated": exported["spearman_aggregated"],
            "spearman_aggregated_ci": exported["spearman_aggregated_ci"],
            "spearman_per_anchor": exported["spearman_per_anchor"],
            "untrained": history["untrained"],
            "truncated": truncated,
            "resumed_from_epochs": history["resumed_from_epochs"],
            "timings": metrics["timings"],
            "workers": metrics["workers"],
        },
    )
    how = (
        f"chosen on validation, weight {choice['weight']:.2f} toward it from the start"
        if fit.restore_best
        else "the last epoch"
    )
    log.info(
        "fit: exported epoch %d (%s); held-out spearman aggregated %.3f %s, per-anchor %.3f "
        "(starting encoder %.3f / %.3f)",
        selected,
        how,
        exported["spearman_aggregated"],
        _ci_text(exported["spearman_aggregated_ci"]),
        exported["spearman_per_anchor"],
        history["untrained"]["spearman_aggregated"],
        history["untrained"]["spearman_per_anchor"],
    )


def _ci_text(ci: Optional[list[float]]) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "[-]"


def _choose_and_export(
    job, data: FitData, model_dir: str, weights: Optional[str], history: dict[str, Any], selected: int, out_dir: str
) -> dict[str, Any]:
    """Pick the exported weights on validation and export them; report the held-out figures with CIs.

    Candidates: the starting encoder (w = 0), the selected epoch (w = 1) and, with restore_best, the
    weight interpolations (1 - w) * start + w * selected for w in `fit.interpolate`. Interpolating in
    weight space keeps what the starting encoder knew while adding what the teacher taught, and
    costs one forward pass of the validation split per w. Only the validation split chooses; the
    held-out split is then measured once, on the exported encoder.
    """
    import torch
    from safetensors.torch import load_file

    from pipeline.encoder import TextEncoder
    from pipeline.metrics import spearman_aggregated, spearman_per_anchor, spearman_with_ci
    from pipeline.stages.fit_worker import encoder_scores

    fit = job.fit
    enc = TextEncoder(model_dir, max_len=job.encoder.max_len, trust_remote_code=job.encoder.trust_remote_code)
    start = {k: v.detach().clone() for k, v in enc.model.state_dict().items()}
    key = "val_spearman_aggregated" if fit.select_best_on == "aggregated" else "val_spearman_per_anchor"
    best_record = (
        history["untrained"] if selected == 0 else next(e for e in history["epochs"] if e["epoch"] == selected)
    )
    candidates = [{"weight": 1.0, "validation": best_record.get(key)}]
    tuned = load_file(weights) if weights else start
    if weights and fit.restore_best and data.val_anchors is not None:
        candidates.append({"weight": 0.0, "validation": history["untrained"][key]})
        for w in sorted(fit.interpolate, reverse=True):
            _load_mix(enc, start, tuned, w)
            pred = encoder_scores(enc, data.val_anchors, data.val_pool, fit.embed_batch_size)
            score = (
                spearman_aggregated(pred, data.val_truth)
                if fit.select_best_on == "aggregated"
                else spearman_per_anchor(pred, data.val_truth)[0]
            )
            candidates.append({"weight": w, "validation": score})
    # Ties go to the earlier candidate: the selected epoch, then the start, then larger weights.
    chosen = max(candidates, key=lambda c: c["validation"] if c["validation"] is not None else -2.0)
    _load_mix(enc, start, tuned, chosen["weight"])
    with torch.inference_mode():
        pred = encoder_scores(enc, data.eval_anchors, data.eval_pool, fit.embed_batch_size)
    exported = spearman_with_ci(pred, data.ground_truth, seed=job.seed)
    exported["validation"] = chosen["validation"]
    _save_encoder(enc, out_dir)
    return {"weight": chosen["weight"], "candidates": candidates, "exported": exported}


def _load_mix(enc, start: dict, tuned: dict, weight: float) -> None:
    """Load (1 - weight) * start + weight * tuned into the encoder (floating tensors; others from tuned)."""
    mixed = {
        k: ((1.0 - weight) * start[k] + weight * tuned[k]) if start[k].is_floating_point() else tuned[k] for k in start
    }
    enc.model.load_state_dict(mixed, strict=True)


def _eval_texts_seen_in_train(data: FitData) -> int:
    """Eval rows whose exact text is also a train row: a leak that distinct ids do not rule out."""
    train = set(data.train_anchors.texts) | set(data.train_pool.texts)
    return sum(t in train for t in data.eval_anchors.texts + data.eval_pool.texts)


def _count_truncated(model_dir: str, data: FitData, max_len: int, trust_remote_code: bool) -> dict[str, int]:
    """Views cut to encoder.max_len per split (METHOD.md 4.5): a plain text loses its tail, an
    instruction row the head of its prompt (its response is kept)."""
    from transformers import AutoTokenizer

    from pipeline.textview import tokenize_views

    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    out = {"max_len": max_len}
    splits = [
        ("train_anchors", data.train_anchors),
        ("train_pool", data.train_pool),
        ("eval_anchors", data.eval_anchors),
        ("eval_pool", data.eval_pool),
    ]
    if data.val_anchors is not None:
        splits += [("val_anchors", data.val_anchors), ("val_pool", data.val_pool)]
    for name, rows in splits:
        out[name] = int(tokenize_views(tok, rows.views, max_len)[1].sum())
    return out


def _save_encoder(enc, out_dir: str) -> None:
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
        if all(key in e for e in metrics["epochs"]):
            ax_rho.plot(
                epochs, [e[key] for e in metrics["epochs"]], marker="o", color=color, label=f"{label} (held-out)"
            )
        ax_rho.axhline(metrics["untrained"][key], color=color, linestyle="--", label=f"{label} (starting encoder)")
        if "val_" + key in metrics["untrained"]:
            ax_rho.plot(
                epochs,
                [e["val_" + key] for e in metrics["epochs"]],
                marker=".",
                linestyle=":",
                color=color,
                label=f"{label} (validation)",
            )
    ax_rho.axvline(metrics["selected_epoch"], color="grey", linestyle=":", label="exported epoch")
    ax_rho.set(xlabel="epoch", ylabel="held-out Spearman", title="held-out Spearman vs teacher")
    ax_rho.legend(fontsize=8)
    fig.tight_layout()
    fs, local = storage.filesystem(path)
    with fs.open_output_stream(local) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
