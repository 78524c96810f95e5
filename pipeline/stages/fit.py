"""The fit stage: distil the teacher's sketch cosines into the text encoder with Ray Train.

Reads `sketch/anchors/*.parquet` and `sketch/pool/*.parquet`, trains `TextEncoder` with the
block loss of `pipeline.distill` on the train split (train anchors x train pool), evaluates the
held-out eval split (eval anchors x eval pool) after every epoch, and writes:

- `fit/encoder/`: the exported encoder (loads with `AutoModel` and `SentenceTransformer`); when a
  score-space blend with the starting encoder won on validation (`fit.blend`), also that encoder under
  `plain/` and the blend weight in `influcoder_blend.json` (`TextEncoder` loads both halves);
- `fit/metrics.json`: `untrained` (epoch 0) and per-epoch validation and held-out Spearman, the
  candidates compared on validation and the one exported (`exported`: its held-out Spearman with
  bootstrap 95 % CIs, beside the starting encoder's), split sizes, timings, truncation counts;
- `fit/curves.png`: loss and Spearman by epoch, the untrained level as a horizontal line;
- `fit/heldout_scores.parquet`: the exported encoder's cosine of every held-out anchor x pool row
  (`anchor_id`, `pool_id`, `score`; how they were computed in the schema metadata): eval's
  influcoder held-out fidelity is computed from them, without embedding the split again;
- `fit/teacher_center.json` (only with `fit.center_teacher`): the mean train-pool sketch that every
  influence cosine removes first (fit's targets and truth here; eval and the score cascade read it).

Crash recovery: every epoch ends with a Ray Train checkpoint (weights as safetensors, optimiser and
scheduler state, the metric history, the split scores the export reuses; dropout is reseeded per
(seed, epoch, rank)) under the stage's work dir. A worker failure
restarts the worker group from the latest checkpoint (`fit.max_failures`), and a rerun of a killed
driver resumes the same run, because the run name and storage path are keyed by the stage identity.

Inputs are read and checked in `fit_data.py`; the per-worker training loop and its checkpoints are
in `fit_worker.py`; this module plans the workers, runs the TorchTrainer and exports the result.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import threading
import time
from typing import Any, Optional

import pyarrow.fs as pafs

from pipeline import storage
from pipeline.artifacts import StageRun
from pipeline.config import JobConfig, to_dict
from pipeline.errors import ConfigError, StageError
from pipeline.report import blend_lead_text
from pipeline.models import resolve_encoder
from pipeline.stages.fit_data import FitData, load_fit_data, texts_from_inputs, write_heldout_scores
from pipeline.stages import fit_worker
from pipeline.stages.fit_worker import BEST_WEIGHTS, HISTORY, WEIGHTS
from pipeline.stages.shared_teacher import write_teacher_center

log = logging.getLogger("influcoder.fit")


# --------------------------------------------------------------------------- driver


def input_fingerprint(job: JobConfig) -> dict[str, Any]:
    """The starting encoder's weights: a local folder edited in place keeps its `encoder.model` key."""
    from pipeline.models import model_fingerprint

    return {"encoder_weights": model_fingerprint(job.encoder.model)}


def run(ctx: StageRun) -> None:
    """Train, export and report."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.ray_runtime import ensure_ray, plan_actors

    job, fit = ctx.job, ctx.job.fit
    t0 = time.perf_counter()
    # Inputs are validated before Ray starts: a bad artifact or config fails in a second.
    data = load_fit_data(
        ctx.upstream_dir("sketch"),
        job.encoder.anchor_prefix,
        fit.val_frac,
        job.seed,
        texts_from_inputs(job),
        center_teacher=fit.center_teacher,
    )
    sizes = data.sizes()
    if fit.block_candidates > sizes["train_pool"]:
        raise ConfigError(
            f"config key `fit.block_candidates`: got {fit.block_candidates}, but the train pool has "
            f"{sizes['train_pool']} rows; lower it or raise sketch.train_pool."
        )
    leaked = _eval_texts_seen_in_train(data)
    if leaked:
        log.warning(
            "fit: %d eval texts also occur (under other ids, up to case and punctuation) in the train "
            "split; held-out metrics are optimistic. Deduplicate the anchors/pool inputs.",
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
    plan = plan_actors(fit.use_gpu, fit.num_workers, "fit", training=True)
    cpus_per_worker = int(plan.num_cpus)
    log.info("fit: %s; %d worker(s), gpu=%s, %d CPU each", sizes, plan.num_actors, plan.use_gpu, cpus_per_worker)
    setup_s = time.perf_counter() - t0

    # One object-store copy, fetched by each worker (also after a restart) instead of being
    # pickled into every worker's config.
    data_ref = ray.put(data)
    storage_path = storage.join(ctx.work_dir, "ray_train")
    if not storage.is_uri(storage_path):
        storage_path = os.path.abspath(storage.local_path(storage_path))
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if plan.use_gpu else {})}
    progress = EpochRelay()
    trainer = TorchTrainer(
        fit_worker.train_loop,  # looked up at call time: a fault-injection test wraps it
        train_loop_config={
            "data_ref": data_ref,
            "model_dir": model_dir,
            "max_len": job.encoder.max_len,
            "trust_remote_code": job.encoder.trust_remote_code,
            "fit": to_dict(fit),
            "seed": job.seed,
            "torch_threads": plan.torch_threads,
            "progress": progress.queue,
        },
        scaling_config=ScalingConfig(num_workers=plan.num_actors, use_gpu=plan.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=f"fit-{ctx.identity}",
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=fit.max_failures),
        ),
    )
    t1 = time.perf_counter()
    try:
        with progress:
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
            job,
            data,
            model_dir,
            weights,
            history,
            selected,
            storage.join(ctx.out_dir, "encoder"),
            fit_worker.load_predictions(ckpt_dir),
        )
    export_s = time.perf_counter() - t2

    metrics = {
        "untrained": history["untrained"],
        "epochs": epochs,
        "selected_epoch": selected,
        "interpolation_weight": choice["weight"],
        "blend_weight": choice["blend"],
        "candidates": choice["candidates"],
        "exported": choice["exported"],
        "restore_best": fit.restore_best,
        "select_best_on": fit.select_best_on,
        "dropout": fit.dropout,
        "resumed_from_epochs": history["resumed_from_epochs"],
        "splits": sizes,
        "truncated": truncated,
        "eval_texts_seen_in_train": leaked,
        "workers": {"num_workers": plan.num_actors, "use_gpu": plan.use_gpu, "cpus_per_worker": cpus_per_worker},
        "timings": {
            "setup_s": round(setup_s, 3),
            "train_s": round(train_s, 3),
            "export_s": round(export_s, 3),
            # The split passes the export ran itself (the worker's kept scores served the rest).
            "export_passes": choice["embedded_here"],
        },
    }
    metrics["teacher_center"] = write_teacher_center(ctx.out_dir, data.teacher_center, sizes["train_pool"])
    write_heldout_scores(
        ctx.out_dir, choice["heldout_scores"], data.eval_anchors.ids, data.eval_pool.ids, choice["compute"]
    )
    storage.write_json_atomic(storage.join(ctx.out_dir, "metrics.json"), metrics)
    _plot_curves(metrics, storage.join(ctx.out_dir, "curves.png"))
    exported = choice["exported"]
    ctx.record(
        rows=sizes,
        fit={
            "selected_epoch": selected,
            "restore_best": fit.restore_best,
            "interpolation_weight": choice["weight"],
            "blend_weight": choice["blend"],
            # The chosen blend's validation lead over the distilled encoder alone, with its CI.
            "blend_gain": choice["blend_gain"],
            "blend_gain_ci": choice["blend_gain_ci"],
            "teacher_centered": data.teacher_center is not None,
            "spearman_aggregated": exported["spearman_aggregated"],
            "spearman_aggregated_ci": exported["spearman_aggregated_ci"],
            "spearman_per_anchor": exported["spearman_per_anchor"],
            "vs_untrained": exported["vs_untrained"],
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
    if choice["blend"]:
        lead = blend_lead_text(choice["blend_gain"], choice["blend_gain_ci"])
        how += (
            f"; scores blended with the starting encoder's, weight {choice['blend']:.2f} (chosen on validation{lead})"
        )
    diff = exported["vs_untrained"]
    log.info(
        "fit: exported epoch %d (%s); held-out spearman aggregated %.3f %s, per-anchor %.3f "
        "(starting encoder %.3f / %.3f; paired gain %+.3f %s / %+.3f %s)",
        selected,
        how,
        exported["spearman_aggregated"],
        _ci_text(exported["spearman_aggregated_ci"]),
        exported["spearman_per_anchor"],
        history["untrained"]["spearman_aggregated"],
        history["untrained"]["spearman_per_anchor"],
        diff["spearman_aggregated_diff"],
        _ci_text(diff["spearman_aggregated_diff_ci"]),
        diff["spearman_per_anchor_diff"],
        _ci_text(diff["spearman_per_anchor_diff_ci"]),
    )


def _ci_text(ci: Optional[list[float]]) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "[-]"


def _choose_and_export(
    job,
    data: FitData,
    model_dir: str,
    weights: Optional[str],
    history: dict[str, Any],
    selected: int,
    out_dir: str,
    kept: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Pick the exported weights on validation and export them; report the held-out figures with CIs.

    Candidates: the starting encoder (w = 0), the selected epoch (w = 1) and, with restore_best, the
    weight interpolations (1 - w) * start + w * selected for w in `fit.interpolate`. Interpolating in
    weight space keeps what the starting encoder knew while adding what the teacher taught, and
    costs one forward pass of the validation split per w. With `fit.blend`, also the score-space
    blends of the selected epoch with the starting encoder, (1 - b) * distilled + b * plain cosine
    (`pipeline.encoder`): their validation scores are mixes of two predictions, computed once.
    Only the validation split chooses; the held-out split is then measured on the exported encoder:
    its scores are the chosen weights' (a blend's, the mix of the selected epoch's and the start's).
    `kept`: the worker's split scores (`fit_worker.PREDICTIONS`), used for the start and the selected
    epoch instead of embedding their splits again where the worker embedded as this process does.
    """
    import torch
    from safetensors.torch import load_file

    from pipeline.encoder import TextEncoder
    from pipeline.metrics import fidelity_difference, spearman_with_ci

    fit = job.fit
    enc = TextEncoder(model_dir, max_len=job.encoder.max_len, trust_remote_code=job.encoder.trust_remote_code)
    start = {k: v.detach().clone() for k, v in enc.model.state_dict().items()}
    tuned = load_file(weights) if weights else start
    scores = SplitScores(enc, start, tuned, data, fit.embed_batch_size, selected, kept, history.get("compute"))
    key = "val_spearman_aggregated" if fit.select_best_on == "aggregated" else "val_spearman_per_anchor"
    best_record = (
        history["untrained"] if selected == 0 else next(e for e in history["epochs"] if e["epoch"] == selected)
    )
    candidates = [{"weight": 1.0, "validation": best_record.get(key)}]
    if weights and fit.restore_best and data.val_anchors is not None:
        candidates.append({"weight": 0.0, "validation": history["untrained"][key]})
        for w in sorted(fit.interpolate, reverse=True):
            candidates.append({"weight": w, "validation": _validation_score(scores.of(w, "val"), data, fit)})
    if weights and fit.blend and data.val_anchors is not None:
        candidates += _blend_candidates(scores, data, fit, job.seed)
    # Ties go to the earlier candidate: the selected epoch, then the start, then larger weights, then blends.
    chosen = max(candidates, key=lambda c: c["validation"] if c["validation"] is not None else -2.0)
    blend = chosen.get("blend", 0.0)
    start_pred = scores.of(0.0, "heldout")
    pred = scores.of(chosen["weight"], "heldout")
    if blend:  # what the blended export's codes give: (1 - b) * distilled + b * plain cosine (blend_codes)
        pred = (1.0 - blend) * pred + blend * start_pred
    exported = spearman_with_ci(pred, data.ground_truth, seed=job.seed)
    exported["validation"] = chosen["validation"]
    # Paired on the same resampled held-out anchors and pool rows: whether distillation moved the
    # encoder toward the teacher beyond the noise of the split (the two marginal CIs overlap widely).
    exported["vs_untrained"] = fidelity_difference(pred, start_pred, data.ground_truth, seed=job.seed)
    with torch.inference_mode():
        _load_mix(enc, start, tuned, 0.0)
        if blend:
            enc.blend_with(copy.deepcopy(enc.model), blend)  # the starting weights, kept beside the tuned ones
        _load_mix(enc, start, tuned, chosen["weight"])
    _save_encoder(enc, out_dir)
    return {
        "weight": chosen["weight"],
        "blend": blend,
        "candidates": candidates,
        "exported": exported,
        "blend_gain": chosen.get("gain"),
        "blend_gain_ci": chosen.get("gain_ci"),
        "embedded_here": scores.embedded,
        "heldout_scores": pred,
        "compute": enc.compute,
    }


class SplitScores:
    """Encoder cosines of the validation (`val`) or held-out (`heldout`) split for the export candidate
    (1 - w) * start + w * tuned. The start (w = 0) and the selected epoch (w = 1) take the scores the
    worker kept for them (the same weights, embedded the same way: `kept_compute` equal to
    `enc.compute`; `kept` keys `{epoch}.{split}`); any other candidate, or a split the worker did not
    keep, is embedded here."""

    def __init__(self, enc, start, tuned, data: FitData, batch_size: int, selected: int, kept, kept_compute):
        self.enc, self.start, self.tuned, self.data, self.batch_size = enc, start, tuned, data, batch_size
        self.selected = selected
        self.kept = dict(kept or {}) if kept_compute == enc.compute else {}
        self.embedded: list[str] = []  # what had to be embedded here, e.g. ["w=1.00 heldout"]

    def of(self, weight: float, split: str):
        import torch

        from pipeline.stages.fit_worker import encoder_scores

        epoch = {0.0: 0, 1.0: self.selected}.get(weight)
        key = f"{epoch}.{split}"
        if epoch is not None and key in self.kept:
            return self.kept[key]
        d = self.data
        anchors, pool = (d.val_anchors, d.val_pool) if split == "val" else (d.eval_anchors, d.eval_pool)
        with torch.inference_mode():
            _load_mix(self.enc, self.start, self.tuned, weight)
            pred = encoder_scores(self.enc, anchors, pool, self.batch_size)
        if epoch is not None:
            self.kept[key] = pred
        self.embedded.append(f"w={weight:.2f} {split}")
        return pred


def _blend_candidates(scores: SplitScores, data: FitData, fit, seed: int) -> list[dict[str, Any]]:
    """Validation scores of (1 - b) * selected + b * starting encoder's cosines, b in `fit.blend`, each
    with its paired bootstrap gain over the selected (distilled) encoder alone: whether a blend's lead is
    beyond the noise of the validation split (it is chosen on its point score)."""
    from pipeline.metrics import fidelity_replicates, paired_difference

    plain, distilled = scores.of(0.0, "val"), scores.of(1.0, "val")
    # The distilled encoder's score and bootstrap replicates, once: every blend is paired with them.
    which = 0 if fit.select_best_on == "aggregated" else 1  # fidelity_replicates: (aggregated, per-anchor)
    alone = _validation_score(distilled, data, fit)
    alone_reps = fidelity_replicates(distilled, data.val_truth, seed=seed)[which]
    out = []
    for b in sorted(fit.blend):
        mix = (1.0 - b) * distilled + b * plain
        validation = _validation_score(mix, data, fit)
        mix_reps = fidelity_replicates(mix, data.val_truth, seed=seed)[which]
        out.append(
            {
                "weight": 1.0,
                "blend": b,
                "validation": validation,
                "gain": validation - alone,
                "gain_ci": paired_difference(mix_reps, alone_reps),
            }
        )
    return out


def _validation_score(pred, data: FitData, fit) -> float:
    """The validation Spearman that `fit.select_best_on` names (what every export candidate is chosen by)."""
    from pipeline.metrics import spearman_aggregated, spearman_per_anchor

    if fit.select_best_on == "aggregated":
        return spearman_aggregated(pred, data.val_truth)
    return spearman_per_anchor(pred, data.val_truth)[0]


def _load_mix(enc, start: dict, tuned: dict, weight: float) -> None:
    """Load (1 - weight) * start + weight * tuned into the encoder (floating tensors; others from tuned)."""
    mixed = {
        k: ((1.0 - weight) * start[k] + weight * tuned[k]) if start[k].is_floating_point() else tuned[k] for k in start
    }
    enc.model.load_state_dict(mixed, strict=True)


def _eval_texts_seen_in_train(data: FitData) -> int:
    """Eval rows whose text is also a train row's (`neardup.normalise`d, as eval's leakage audit
    compares texts): a leak that distinct ids do not rule out."""
    from pipeline.neardup import normalise

    train = {normalise(t) for t in data.train_anchors.texts + data.train_pool.texts}
    return sum(normalise(t) in train for t in data.eval_anchors.texts + data.eval_pool.texts)


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
    """The loss and the Spearman by epoch (the eval report draws the same Spearman panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.report import draw_spearman_by_epoch

    epochs = [e["epoch"] for e in metrics["epochs"]]
    fig, (ax_loss, ax_rho) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [e["loss"] for e in metrics["epochs"]], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="distillation loss")
    draw_spearman_by_epoch(ax_rho, metrics)
    fig.tight_layout()
    fs, local = storage.filesystem(path)
    with fs.open_output_stream(local) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


class EpochRelay:
    """Epoch lines on the driver's console while `TorchTrainer.fit()` blocks.

    Worker output reaches the console only with -v (ray_runtime.ensure_ray), and Ray Train returns
    metrics only when training ends; so rank 0 puts each epoch's record on a Ray queue (an actor: it
    works across nodes with no shared disk) and a driver thread logs it.
    """

    def __init__(self) -> None:
        from ray.util.queue import Queue

        self.queue = Queue(maxsize=1000, actor_options={"num_cpus": 0})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._relay, name="fit-epoch-relay", daemon=True)

    def __enter__(self) -> "EpochRelay":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._drain()
        import ray

        ray.kill(self.queue.actor)

    def _relay(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                self._log(self.queue.get(timeout=1.0))
            except Empty:
                continue
            except Exception:  # noqa: BLE001 - the queue is gone: training is over
                return

    def _drain(self) -> None:
        try:
            while not self.queue.empty():
                self._log(self.queue.get_nowait())
        except Exception:  # noqa: BLE001
            pass

    @staticmethod
    def _log(r: dict[str, Any]) -> None:
        parts = [f"loss {r['loss']:.4f}"]
        for key, name in (("val_spearman_aggregated", "validation"), ("spearman_aggregated", "held-out")):
            if isinstance(r.get(key), (int, float)):
                parts.append(f"{name} aggregated ρ {r[key]:+.3f}")
        log.info("fit: epoch %d/%d: %s (%.1f s)", r["epoch"], r["epochs"], ", ".join(parts), r.get("train_s", 0.0))
