"""The sketch stage (teacher): exact per-sample LoRA-gradient CountSketches on Ray Data.

Flow: stream anchors and pool rows (Ray Data reads) -> seeded prefix-stable selection of the
eval/train splits on the driver (only the selected rows are kept) -> shards of `rows_per_shard`
rows -> `map_batches` over a stateful `SketchActor` (teacher loaded once per actor; one GPU per
actor, or fractional CPU actors) -> the driver writes each shard atomically into the work dir as
soon as all its rows are back. A crash loses at most the shards in flight: a rerun recomputes only
shards without a file. Finally the shards are assembled into `sketch/anchors/` and `sketch/pool/`
and a fidelity check (exact vs sketched cosines) is recorded in the manifest. The same check is the
precision gate: each checked row's sketch must match the CountSketch of its float32 batch-size-1
gradient (cosine >= sketch.fidelity_min_cos), else the stage fails naming the rows and the fix.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import corpus, sampling, storage
from pipeline.artifacts import StageRun
from pipeline.config import JobConfig
from pipeline.ray_runtime import ActorPlan, ensure_ray, plan_actors
from pipeline.schema import (
    ID,
    PROMPT,
    REASON,
    REJECTS,
    RESPONSE,
    ROW,
    SKETCH,
    SOURCE,
    SPLIT,
    sketch_artifact_schema,
    sketch_matrix,
    split_by_reason,
)
from pipeline.stages.shared_teacher import finished_shards, shard_rows, sketch_shards

log = logging.getLogger("influcoder.sketch")

ROLES = ("anchors", "pool")


def input_fingerprint(job: JobConfig) -> dict[str, Any]:
    """Changing the input files changes which rows are sampled, so it changes the sketches; so do the
    teacher's weights (a local folder edited in place keeps its `teacher.model` key)."""
    from pipeline.models import model_fingerprint

    return {
        "anchors": corpus.files_fingerprint(corpus.discover(job.anchors, "anchors")),
        "pool": corpus.files_fingerprint(corpus.discover(job.pool_dataset, "pool" if job.pool else "corpus")),
        "teacher_weights": model_fingerprint(job.teacher.model),
    }


# --------------------------------------------------------------------------- selection


def _select(
    job: JobConfig, role: str, ds_cfg, files, n_eval: int, n_train: int, exclude: set[str]
) -> tuple[list[dict], list[dict], pa.Table, int]:
    """Stream a dataset once; keep the n_eval + n_train smallest keys. Returns eval, train, rejects, rows read."""
    import ray

    reject_tables: list[pa.Table] = []
    total = 0

    def first_occurrences():
        """Good rows, each id once: the first in file order wins, later ones are rejected."""
        nonlocal total
        seen: set[str] = set()
        for batch in corpus.read_dataset(ds_cfg, files).iter_batches(batch_format="pyarrow", batch_size=None):
            total += batch.num_rows
            good, bad = corpus.split_rejects(batch)
            reject_tables.append(bad)
            dup_rows = []
            for row in good.to_pylist():
                rid = row[ID]
                if rid in seen:
                    dup_rows.append(
                        {
                            SOURCE: row[SOURCE],
                            ROW: row[ROW],
                            ID: rid,
                            REASON: f"duplicate_id: `{rid}` appeared earlier in the {role} data",
                        }
                    )
                    continue
                seen.add(rid)
                yield row
            reject_tables.append(pa.Table.from_pylist(dup_rows, schema=REJECTS))

    data_ctx = ray.data.DataContext.get_current()
    previous_order = data_ctx.execution_options.preserve_order
    # Duplicate ids: the first in file order wins, every run. Only this pass needs ordered output,
    # so the global setting is restored afterwards (later stages stream unordered).
    data_ctx.execution_options.preserve_order = True
    try:
        ordered = sampling.select(first_occurrences(), job.sketch.split_seed, n_eval + n_train, exclude)
    finally:
        data_ctx.execution_options.preserve_order = previous_order
    eval_rows, train_rows = sampling.split_rows(ordered, n_eval, n_train)
    for r in eval_rows:
        r[SPLIT] = "eval"
    for r in train_rows:
        r[SPLIT] = "train"
    if len(ordered) < n_eval + n_train:
        from pipeline.errors import InputDataError

        # Say why rows are missing (the real cause is often a mapping that rejects every row).
        by_reason: dict[str, int] = {}
        for t in reject_tables:
            for reason in t.column(REASON).to_pylist():
                by_reason[reason.split(":")[0]] = by_reason.get(reason.split(":")[0], 0) + 1
        raise InputDataError(
            f"sketch: {role} needs {n_eval} eval + {n_train} train rows but only {len(ordered)} good rows are "
            f"available in {storage.redact(ds_cfg.path)} ({total} rows read, {sum(by_reason.values())} rejected"
            + (f": {by_reason}" if by_reason else "")
            + (f", {len(exclude)} taken as anchors" if exclude else "")
            + f"); fix the rejected rows or lower sketch.eval_{role} / sketch.train_{role}."
        )
    rejects = pa.concat_tables(reject_tables) if reject_tables else REJECTS.empty_table()
    return eval_rows, train_rows, rejects, total


# --------------------------------------------------------------------------- stage


def run(ctx: StageRun) -> None:
    job = ctx.job
    cfg = job.sketch
    ensure_ray(job.ray)
    plan = plan_actors(cfg.use_gpu, cfg.num_actors, "sketch")

    sources = {
        "anchors": (job.anchors, "anchors", cfg.eval_anchors, cfg.train_anchors),
        "pool": (job.pool_dataset, "pool" if job.pool else "corpus", cfg.eval_pool, cfg.train_pool),
    }
    selected: dict[str, list[dict]] = {}
    rejects: list[pa.Table] = []
    rows_read = 0
    same_source = job.anchors.same_location(job.pool_dataset)  # `data/x` and `./data/x/` are one dataset
    for role in ROLES:
        ds_cfg, section, n_eval, n_train = sources[role]
        files = corpus.discover(ds_cfg, section)
        exclude = {r[ID] for r in selected.get("anchors", [])} if (role == "pool" and same_source) else set()
        eval_rows, train_rows, bad, total = _select(job, role, ds_cfg, files, n_eval, n_train, exclude)
        selected[role] = eval_rows + train_rows
        rows_read += total
        rejects.append(bad)

    # Shards are the unit of crash recovery: finished ones are files in the work dir.
    shard_dir = storage.join(ctx.work_dir, "shards")
    storage.makedirs(shard_dir)
    done = finished_shards(shard_dir)
    all_shards = [s for role in ROLES for s in shard_rows(role, selected[role], cfg.rows_per_shard)]
    pending = [(name, rows) for name, rows in all_shards if name not in done]
    log.info(
        "sketch: %d anchors + %d pool rows in %d shards (%d already done), %s",
        len(selected["anchors"]),
        len(selected["pool"]),
        len(all_shards),
        len(all_shards) - len(pending),
        plan,
    )
    t0 = time.perf_counter()
    # The fp32 reference of the gate rows comes first: with teacher.dtype=auto it also decides the
    # precision (bf16 only where native AND it holds the gate's tolerance on these rows).
    reference = _reference(job, plan, selected)
    run_job = dataclasses.replace(job, teacher=dataclasses.replace(job.teacher, dtype=reference["chosen"]))
    dtypes: set[str] = set()
    tokens, compute_s = sketch_shards(run_job, plan, pending, shard_dir, dtypes=dtypes)
    sketch_seconds = time.perf_counter() - t0

    tables = {role: [] for role in ROLES}
    for name, _ in all_shards:
        tables[name.split("-")[0]].append(storage.read_table(storage.join(shard_dir, f"{name}.parquet")))
    counts: dict[str, dict[str, int]] = {}
    for role in ROLES:
        table = pa.concat_tables(tables[role]) if tables[role] else None
        if table is None:
            continue
        good, bad = split_by_reason(table, REASON)  # rows the teacher rejected (no loss span, too long)
        rejects.append(bad)
        schema = sketch_artifact_schema(cfg.proj_dim)
        out = good.select(schema.names).cast(schema)
        role_dir = storage.join(ctx.out_dir, role)
        storage.makedirs(role_dir)
        fs, path = storage.filesystem(storage.join(role_dir, "part-00000.parquet"))
        pq.write_table(out, path, filesystem=fs)
        splits = out.column(SPLIT).to_pylist()
        counts[role] = {"eval": splits.count("eval"), "train": splits.count("train")}

    all_rejects = pa.concat_tables(rejects) if rejects else REJECTS.empty_table()
    ctx.write_rejects(all_rejects, total_rows=rows_read, max_frac=cfg.max_reject_frac, what="sketch")
    n_sketched = sum(t.num_rows for ts in tables.values() for t in ts)
    fidelity = _fidelity_check(job, reference, ctx.out_dir, dtypes)
    ctx.record(
        rows=counts,
        rows_read=rows_read,
        seeds={"seed": job.seed, "split_seed": cfg.split_seed, "proj_seed": cfg.proj_seed, "lora_seed": job.lora_seed},
        resources={"actors": plan.num_actors, "gpus_per_actor": plan.num_gpus, "cpus_per_actor": plan.num_cpus},
        throughput={
            "samples": n_sketched,
            "seconds": round(sketch_seconds, 3),
            "tokens_this_run": tokens,
            "actor_compute_s": round(compute_s, 3),
            "samples_per_s": round(len([r for _, rows in pending for r in rows]) / max(sketch_seconds, 1e-9), 3),
        },
        fidelity=fidelity,
        # `compute`: what the actors of THIS run used (empty when every shard was already done).
        precision={
            "requested": job.teacher.dtype,
            "chosen": reference["chosen"],
            "probe": reference["probe"],
            "compute": sorted(dtypes),
            "accumulate": "float32",
            "token_budget": cfg.token_budget,
            "gate": fidelity.get("precision_gate"),
        },
    )


def _gate_rows(job: JobConfig, selected: dict[str, list[dict]]) -> list[tuple[str, dict]]:
    """The fidelity/precision-gate sample: the first anchors and pool rows of the seeded order."""
    n = job.sketch.fidelity_samples
    return [("anchors", r) for r in selected["anchors"][: n // 2]] + [
        ("pool", r) for r in selected["pool"][: n - n // 2]
    ]


def _reference(job: JobConfig, plan: ActorPlan, selected: dict[str, list[dict]]) -> dict[str, Any]:
    """Float32 batch-size-1 gradients and CountSketches of the gate rows, and the precision to run in.

    `teacher.dtype=auto` becomes `bfloat16` only when the worker has native bf16 and bf16
    token-budget sketches of these rows reach sketch.fidelity_min_cos against the fp32 reference
    (a probe of a few rows), else `float32`; explicit dtypes are kept (the gate judges them later).
    """
    import ray

    keyed = _gate_rows(job, selected) if job.sketch.fidelity_samples >= 2 else []
    if len(keyed) < 2:  # too few rows to judge bf16: auto stays on the float32 side
        chosen = "float32" if job.teacher.dtype == "auto" else job.teacher.dtype
        return {
            "keyed": [],
            "grads": None,
            "ref": None,
            "chosen": chosen,
            "probe": "not run: fewer than 2 gate rows (sketch.fidelity_samples); auto means float32",
        }

    args = (
        job.teacher,
        job.lora_seed,
        job.sketch,
        [r[PROMPT] for _, r in keyed],
        [r[RESPONSE] for _, r in keyed],
    )
    if plan.use_gpu:  # on the actors' kind of device: a GPU worker
        # max_calls=1: the worker exits right after this one task instead of idling in Ray's pool with
        # torch's thread pools alive (a reused/killed idle worker aborted at teardown in testing).
        exact = ray.remote(num_cpus=1, num_gpus=plan.num_gpus, max_calls=1)(_exact_reference)
        ok, grads, ref, chosen, probe = ray.get(exact.remote(*args, plan.torch_threads, True))
    else:  # CPU actors: this process's CPU (its torch thread count untouched), no worker to start
        ok, grads, ref, chosen, probe = _exact_reference(*args, None, False)
    if job.teacher.dtype == "auto":
        log.info("sketch: teacher.dtype=auto -> %s (bf16 probe: %s)", chosen, probe)
    return {"keyed": [keyed[i] for i in ok], "grads": grads, "ref": ref, "chosen": chosen, "probe": probe}


def _exact_reference(teacher, lora_seed, sketch_cfg, prompts, responses, threads, use_gpu):
    """The gate rows' float32 batch-size-1 gradients and CountSketches, and the precision to run in
    (`_reference`). `threads` None keeps the calling process's torch thread count."""
    import numpy as np
    import torch

    from pipeline.sketching import l2_normalize
    from pipeline.teacher import TeacherSketcher, native_bf16, precision_check

    # The reference is float32 whatever the stage runs in: it is what bf16 is measured against.
    ts = TeacherSketcher(
        dataclasses.replace(teacher, dtype="float32"),
        proj_dim=sketch_cfg.proj_dim,
        proj_seed=sketch_cfg.proj_seed,
        lora_seed=lora_seed,
        device="cuda" if use_gpu else "cpu",
        torch_threads=threads,
    )
    accepted, _ = ts.examples(prompts, responses)  # a row without a loss span has no gradient to check
    ok = sorted(accepted)
    prompts, responses = [prompts[i] for i in ok], [responses[i] for i in ok]
    if len(ok) < 2:
        auto = "float32" if teacher.dtype == "auto" else teacher.dtype
        return ok, None, None, auto, "not run: fewer than 2 gate rows with a loss span"
    grads = ts.exact_gradients(prompts, responses)
    ref = l2_normalize(ts.sketcher.project(torch.from_numpy(grads).to(ts.device))).cpu().numpy()
    chosen, probe = teacher.dtype, "not needed: teacher.dtype is explicit"
    if teacher.dtype == "auto":
        if not native_bf16(ts.device):
            chosen, probe = "float32", f"not run: no native bf16 on {ts.device.type}"
        else:
            ts.autocast_dtype = torch.bfloat16  # same weights and adapter, bf16 compute
            res = ts.sketch(prompts, responses, sketch_cfg.batch_size, sketch_cfg.token_budget)
            full = np.zeros_like(ref)
            full[res.ok_index] = res.sketches
            probe = precision_check(full, ref, [str(i) for i in range(len(prompts))], sketch_cfg.fidelity_min_cos)
            chosen = "bfloat16" if probe["passed"] else "float32"
            probe = {k: probe[k] for k in ("rows", "min", "mean", "min_cos", "passed")}
    return ok, grads, ref, chosen, probe


def _fidelity_check(
    job: JobConfig, reference: dict[str, Any], out_dir: str, dtypes: set[str] | None = None
) -> dict[str, Any]:
    """The reference rows' exact float32 batch-size-1 gradients vs the stage's own sketches of them.

    Two checks on the same rows: the pairwise cosine errors of the sketch width (a warning, raise
    proj_dim), and the precision gate (a failure): each row's stage sketch against the CountSketch
    of its fp32 reference gradient, which catches a precision (bf16) or batching path that drifted.
    """
    keyed = reference["keyed"]
    if len(keyed) < 2:
        return {"samples": 0, "precision_gate": {"rows": 0, "skipped": "fewer than 2 gate rows"}}
    sketches = {}
    for role in ROLES:
        t = storage.read_table(storage.join(out_dir, role, "part-00000.parquet"), columns=[ID, SKETCH])
        ids = t.column(ID).to_pylist()
        mat, _ = sketch_matrix(t.column(SKETCH))
        for i, rid in enumerate(ids):
            sketches[(role, rid)] = mat[i]
    present = [k for k, (role, r) in enumerate(keyed) if (role, r[ID]) in sketches]  # rejected rows have none
    if len(present) < 2:
        return {"samples": len(present), "precision_gate": {"rows": 0, "skipped": "fewer than 2 sketched gate rows"}}
    sk = np.stack([sketches[(keyed[k][0], keyed[k][1][ID])] for k in present])
    grads, ref = reference["grads"][present], reference["ref"][present]
    from pipeline.teacher import fidelity_report, precision_check

    report = fidelity_report(grads, sk)
    report["ids"] = [keyed[k][1][ID] for k in present]
    if report["max_abs_err"] > job.sketch.fidelity_warn_max_err:
        log.warning(
            "sketch fidelity: max |exact cos - sketch cos| = %.3f > %.2f; raise sketch.proj_dim.",
            report["max_abs_err"],
            job.sketch.fidelity_warn_max_err,
        )
    else:
        log.info(
            "sketch fidelity: mean |err| %.4f, max |err| %.4f, spearman %.4f",
            report["mean_abs_err"],
            report["max_abs_err"],
            report["spearman"],
        )

    gate = precision_check(sk, ref, report["ids"], job.sketch.fidelity_min_cos)
    report["precision_gate"] = gate
    if not gate["passed"]:
        from pipeline.errors import StageError

        used = sorted(dtypes) if dtypes else [reference["chosen"]]
        worst = ", ".join(f"{i}: {gate['cosines'][i]:.5f}" for i in gate["failed"][:8])
        fix = (
            "--set teacher.dtype=float32 (bf16 does not hold the tolerance for this model and data)"
            if used != ["float32"]
            else "float32 batched gradients disagree with batch-size-1 ones, a per-sample gradient bug for "
            "this model: try --set teacher.attn_implementation=eager, or report it"
        )
        raise StageError(
            f"sketch: precision gate failed: {len(gate['failed'])} of {gate['rows']} checked rows have a cosine "
            f"below sketch.fidelity_min_cos={gate['min_cos']} between the stage's sketch ({', '.join(used)}) and "
            f"the CountSketch of their float32 batch-size-1 gradient ({worst}). Fix: {fix}."
        )
    log.info("sketch precision gate: %d rows, min cosine %.6f >= %.4f", gate["rows"], gate["min"], gate["min_cos"])
    return report
