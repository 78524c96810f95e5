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
from pipeline.config import JobConfig, TeacherConfig
from pipeline.ray_runtime import ActorPlan, ensure_ray, plan_actors
from pipeline.schema import ID, PROMPT, REASON, RESPONSE, ROW, SKETCH, SOURCE, SPLIT, TEXT, sketch_schema

log = logging.getLogger("influcoder")

ROLES = ("anchors", "pool")
SHARD = "shard"


def input_fingerprint(job: JobConfig) -> dict[str, Any]:
    """Changing the input files changes which rows are sampled, so it changes the sketches."""
    return {
        "anchors": corpus.files_fingerprint(corpus.discover(job.anchors, "anchors")),
        "pool": corpus.files_fingerprint(corpus.discover(job.pool_dataset, "pool" if job.pool else "corpus")),
    }


# --------------------------------------------------------------------------- actor


class SketchActor:
    """Ray Data actor: loads the teacher once, turns batches of rows into unit-norm sketches."""

    def __init__(
        self,
        teacher: TeacherConfig,
        proj_dim: int,
        proj_seed: int,
        lora_seed: int,
        batch_size: int,
        torch_threads: int,
        use_gpu: bool,
        token_budget: int | None = None,
    ):
        from pipeline.teacher import TeacherSketcher

        self.batch_size, self.token_budget = batch_size, token_budget
        self.sketcher = TeacherSketcher(
            teacher,
            proj_dim=proj_dim,
            proj_seed=proj_seed,
            lora_seed=lora_seed,
            device="cuda" if use_gpu else "cpu",
            torch_threads=torch_threads,
        )
        self.proj_dim = proj_dim

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        t0 = time.perf_counter()
        res = self.sketcher.sketch(
            batch.column(PROMPT).to_pylist(), batch.column(RESPONSE).to_pylist(), self.batch_size, self.token_budget
        )
        compute_s = time.perf_counter() - t0  # model load excluded: it happened in __init__
        flat = np.zeros((n, self.proj_dim), dtype=np.float32)
        valid = np.zeros(n, dtype=bool)
        if len(res.ok_index):
            flat[np.asarray(res.ok_index)] = res.sketches
            valid[np.asarray(res.ok_index)] = True
        reasons: list[str | None] = [None] * n
        for i, reason in res.rejects:
            reasons[i] = reason
        # Rejected rows keep their place (so the driver can count a shard complete) with a null sketch.
        sketches = pa.FixedSizeListArray.from_arrays(
            pa.array(flat.reshape(-1), pa.float32()), self.proj_dim, mask=pa.array(~valid)
        )
        return pa.table(
            {
                SHARD: batch.column(SHARD),
                ID: batch.column(ID),
                SPLIT: batch.column(SPLIT),
                SOURCE: batch.column(SOURCE),
                ROW: batch.column(ROW),
                TEXT: batch.column(TEXT),
                PROMPT: batch.column(PROMPT),
                RESPONSE: batch.column(RESPONSE),  # the encoder's view (fit)
                SKETCH: sketches,
                REASON: pa.array(reasons, pa.string()),
                "tokens": pa.array([res.tokens if i == 0 else 0 for i in range(n)], pa.int64()),
                "compute_s": pa.array([compute_s if i == 0 else 0.0 for i in range(n)], pa.float64()),
                "dtype": pa.array([self.sketcher.dtype_name] * n, pa.string()),  # the precision, for the manifest
            }
        )


# --------------------------------------------------------------------------- selection


def _select(
    job: JobConfig, role: str, ds_cfg, files, n_eval: int, n_train: int, exclude: set[str]
) -> tuple[list[dict], list[dict], pa.Table, int]:
    """Stream a dataset once; keep the n_eval + n_train smallest keys. Returns eval, train, rejects, rows read."""
    import ray

    keeper = sampling.SmallestKeys(n_eval + n_train)
    seen: set[str] = set()
    reject_tables: list[pa.Table] = []
    total = 0
    data_ctx = ray.data.DataContext.get_current()
    previous_order = data_ctx.execution_options.preserve_order
    # Duplicate ids: the first in file order wins, every run. Only this pass needs ordered output,
    # so the global setting is restored afterwards (later stages stream unordered).
    data_ctx.execution_options.preserve_order = True
    try:
        ds = corpus.read_dataset(ds_cfg, files)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            total += batch.num_rows
            good, bad = corpus.split_rejects(batch)
            if bad.num_rows:
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
                if rid in exclude:
                    continue
                keeper.offer(sampling.order_key(job.sketch.split_seed, rid), rid, row)
            if dup_rows:
                reject_tables.append(pa.Table.from_pylist(dup_rows))
    finally:
        data_ctx.execution_options.preserve_order = previous_order
    ordered = keeper.sorted_rows()
    eval_rows, train_rows = sampling.split_rows(ordered, n_eval, n_train)
    for r in eval_rows:
        r[SPLIT] = "eval"
    for r in train_rows:
        r[SPLIT] = "train"
    if len(ordered) < n_eval + n_train:
        from pipeline.errors import InputDataError

        raise InputDataError(
            f"sketch: {role} needs {n_eval} eval + {n_train} train rows but only {len(ordered)} good rows are "
            f"available in {storage.redact(ds_cfg.path)}; lower sketch.eval_{role} / sketch.train_{role}."
        )
    rejects = (
        pa.concat_tables(
            [
                t.select([SOURCE, ROW, ID, REASON]).cast(
                    pa.schema([(SOURCE, pa.string()), (ROW, pa.int64()), (ID, pa.string()), (REASON, pa.string())])
                )
                for t in reject_tables
            ]
        )
        if reject_tables
        else None
    )
    return eval_rows, train_rows, rejects, total


def _shards(role: str, rows: list[dict], rows_per_shard: int) -> list[tuple[str, list[dict]]]:
    return [
        (f"{role}-{i // rows_per_shard:05d}", rows[i : i + rows_per_shard]) for i in range(0, len(rows), rows_per_shard)
    ]


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
    same_source = job.anchors.path == job.pool_dataset.path
    for role in ROLES:
        ds_cfg, section, n_eval, n_train = sources[role]
        files = corpus.discover(ds_cfg, section)
        exclude = {r[ID] for r in selected.get("anchors", [])} if (role == "pool" and same_source) else set()
        eval_rows, train_rows, bad, total = _select(job, role, ds_cfg, files, n_eval, n_train, exclude)
        selected[role] = eval_rows + train_rows
        rows_read += total
        if bad is not None:
            rejects.append(bad)

    # Shards are the unit of crash recovery: finished ones are files in the work dir.
    shard_dir = storage.join(ctx.work_dir, "shards")
    storage.makedirs(shard_dir)
    done = {
        storage.local_path(p).rsplit("/", 1)[-1][: -len(".parquet")] for p in storage.list_files(shard_dir, ".parquet")
    }
    all_shards = [s for role in ROLES for s in _shards(role, selected[role], cfg.rows_per_shard)]
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
    tokens, compute_s = _sketch_shards(run_job, plan, pending, shard_dir, dtypes=dtypes)
    sketch_seconds = time.perf_counter() - t0

    tables = {role: [] for role in ROLES}
    for name, _ in all_shards:
        tables[name.split("-")[0]].append(pq.read_table(storage.local_path(storage.join(shard_dir, f"{name}.parquet"))))
    counts: dict[str, dict[str, int]] = {}
    for role in ROLES:
        table = pa.concat_tables(tables[role]) if tables[role] else None
        if table is None:
            continue
        bad_mask = pa.compute.is_valid(table.column(REASON))
        if pa.compute.any(bad_mask).as_py():
            b = table.filter(bad_mask)
            rejects.append(
                pa.table({SOURCE: b.column(SOURCE), ROW: b.column(ROW), ID: b.column(ID), REASON: b.column(REASON)})
            )
        good = table.filter(pa.compute.invert(bad_mask))
        out = good.select([ID, SPLIT, SKETCH, TEXT, PROMPT, RESPONSE]).cast(
            pa.schema(
                [
                    *sketch_schema(cfg.proj_dim),
                    pa.field(TEXT, pa.string()),
                    pa.field(PROMPT, pa.string()),
                    pa.field(RESPONSE, pa.string()),
                ]
            )
        )
        role_dir = storage.join(ctx.out_dir, role)
        storage.makedirs(role_dir)
        fs, path = storage.filesystem(storage.join(role_dir, "part-00000.parquet"))
        pq.write_table(out, path, filesystem=fs)
        splits = out.column(SPLIT).to_pylist()
        counts[role] = {"eval": splits.count("eval"), "train": splits.count("train")}

    all_rejects = (
        pa.concat_tables(rejects)
        if rejects
        else pa.table(
            {
                SOURCE: pa.array([], pa.string()),
                ROW: pa.array([], pa.int64()),
                ID: pa.array([], pa.string()),
                REASON: pa.array([], pa.string()),
            }
        )
    )
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


def _sketch_shards(
    job: JobConfig,
    plan: ActorPlan,
    pending: list[tuple[str, list[dict]]],
    shard_dir: str,
    dtypes: set[str] | None = None,
) -> tuple[int, float]:
    """Run the actor pool over pending shards; write each shard file when all its rows are back.
    Returns (tokens processed, actor compute seconds); ``dtypes``, if given, receives the compute
    precisions the actors used (``bfloat16``/``float32``)."""
    import ray

    if not pending:
        return 0, 0.0
    cfg = job.sketch
    if job.teacher.dtype == "auto":
        # Callers after the sketch stage (eval's gradient method, the score cascade) compute in the
        # precision the sketch stage chose and gated, so their sketches compare with its sketches.
        from pipeline.artifacts import read_manifest

        chosen = ((read_manifest(job, "sketch") or {}).get("precision") or {}).get("chosen")
        if chosen in ("float32", "bfloat16"):
            job = dataclasses.replace(job, teacher=dataclasses.replace(job.teacher, dtype=chosen))
    cols = [SHARD, ID, SPLIT, SOURCE, ROW, TEXT, PROMPT, RESPONSE]
    blocks = [
        pa.Table.from_pylist([{**{k: r.get(k) for k in cols if k != SHARD}, SHARD: name} for r in rows]).select(cols)
        for name, rows in pending
    ]
    expected = {name: len(rows) for name, rows in pending}
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(
        SketchActor,
        fn_constructor_kwargs=dict(
            teacher=job.teacher,
            proj_dim=cfg.proj_dim,
            proj_seed=cfg.proj_seed,
            lora_seed=job.lora_seed,
            batch_size=cfg.batch_size,
            torch_threads=plan.torch_threads,
            use_gpu=plan.use_gpu,
            token_budget=cfg.token_budget,
        ),
        batch_size=cfg.rows_per_shard,
        batch_format="pyarrow",
        **plan.map_batches_kwargs(),
    )
    buffers: dict[str, list[pa.Table]] = {}
    got: dict[str, int] = {}
    tokens, compute_s = 0, 0.0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        tokens += int(pa.compute.sum(batch.column("tokens")).as_py() or 0)
        compute_s += float(pa.compute.sum(batch.column("compute_s")).as_py() or 0.0)
        if dtypes is not None:
            dtypes.update(batch.column("dtype").unique().to_pylist())
        batch = batch.drop_columns(["tokens", "compute_s", "dtype"])
        for name in set(batch.column(SHARD).to_pylist()):
            part = batch.filter(pa.compute.equal(batch.column(SHARD), name))
            buffers.setdefault(name, []).append(part)
            got[name] = got.get(name, 0) + part.num_rows
            if got[name] == expected[name]:
                table = pa.concat_tables(buffers.pop(name)).drop_columns([SHARD])
                _write_atomic(table, storage.join(shard_dir, f"{name}.parquet"))
                log.info("sketch: shard %s done (%d rows)", name, table.num_rows)
    missing = [n for n in expected if got.get(n, 0) != expected[n]]
    if missing:
        from pipeline.errors import StageError

        raise StageError(f"sketch: shards {missing[:5]} came back incomplete; rerun to resume.")
    return tokens, compute_s


def _write_atomic(table: pa.Table, path: str) -> None:
    tmp = f"{path}.tmp"
    fs, p = storage.filesystem(tmp)
    pq.write_table(table, p, filesystem=fs)
    storage.move(tmp, path)


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

    # max_calls=1: the worker exits right after this one task instead of idling in Ray's pool with
    # torch's thread pools alive (a reused/killed idle worker aborted at teardown in testing).
    @ray.remote(num_cpus=plan.num_cpus if not plan.use_gpu else 1, num_gpus=plan.num_gpus, max_calls=1)
    def exact(teacher, lora_seed, sketch_cfg, prompts, responses, threads, use_gpu):
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
            return (
                ok,
                None,
                None,
                ("float32" if teacher.dtype == "auto" else teacher.dtype),
                "not run: fewer than 2 gate rows with a loss span",
            )
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

    ok, grads, ref, chosen, probe = ray.get(
        exact.remote(
            job.teacher,
            job.lora_seed,
            job.sketch,
            [r[PROMPT] for _, r in keyed],
            [r[RESPONSE] for _, r in keyed],
            plan.torch_threads,
            plan.use_gpu,
        )
    )
    if job.teacher.dtype == "auto":
        log.info("sketch: teacher.dtype=auto -> %s (bf16 probe: %s)", chosen, probe)
    return {"keyed": [keyed[i] for i in ok], "grads": grads, "ref": ref, "chosen": chosen, "probe": probe}


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
        t = pq.read_table(storage.local_path(storage.join(out_dir, role, "part-00000.parquet")), columns=[ID, SKETCH])
        ids = t.column(ID).to_pylist()
        mat = np.asarray(t.column(SKETCH).combine_chunks().flatten()).reshape(len(ids), -1) if ids else None
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
