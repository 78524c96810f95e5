"""The sketch stage (teacher): exact per-sample LoRA-gradient CountSketches on Ray Data.

Flow: stream anchors and pool rows (Ray Data reads) -> seeded prefix-stable selection of the
eval/train splits on the driver (only the selected rows are kept) -> shards of `rows_per_shard`
rows -> `map_batches` over a stateful `SketchActor` (teacher loaded once per actor; one GPU per
actor, or fractional CPU actors) -> the driver writes each shard atomically into the work dir as
soon as all its rows are back. A crash loses at most the shards in flight: a rerun recomputes only
shards without a file. Finally the shards are assembled into `sketch/anchors/` and `sketch/pool/`
and a fidelity check (exact vs sketched cosines) is recorded in the manifest.
"""

from __future__ import annotations

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

    def __init__(self, teacher: TeacherConfig, proj_dim: int, proj_seed: int, lora_seed: int,
                 batch_size: int, torch_threads: int, use_gpu: bool):
        from pipeline.teacher import TeacherSketcher

        self.batch_size = batch_size
        self.sketcher = TeacherSketcher(teacher, proj_dim=proj_dim, proj_seed=proj_seed, lora_seed=lora_seed,
                                        device="cuda" if use_gpu else "cpu", torch_threads=torch_threads)
        self.proj_dim = proj_dim

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        t0 = time.perf_counter()
        res = self.sketcher.sketch(batch.column(PROMPT).to_pylist(), batch.column(RESPONSE).to_pylist(),
                                   self.batch_size)
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
        sketches = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), pa.float32()), self.proj_dim,
                                                     mask=pa.array(~valid))
        return pa.table({
            SHARD: batch.column(SHARD), ID: batch.column(ID), SPLIT: batch.column(SPLIT),
            SOURCE: batch.column(SOURCE), ROW: batch.column(ROW), TEXT: batch.column(TEXT),
            SKETCH: sketches, REASON: pa.array(reasons, pa.string()),
            "tokens": pa.array([res.tokens if i == 0 else 0 for i in range(n)], pa.int64()),
            "compute_s": pa.array([compute_s if i == 0 else 0.0 for i in range(n)], pa.float64()),
        })


# --------------------------------------------------------------------------- selection


def _select(job: JobConfig, role: str, ds_cfg, files, n_eval: int, n_train: int,
            exclude: set[str]) -> tuple[list[dict], list[dict], pa.Table, int]:
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
                    dup_rows.append({SOURCE: row[SOURCE], ROW: row[ROW], ID: rid,
                                     REASON: f"duplicate_id: `{rid}` appeared earlier in the {role} data"})
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
    rejects = pa.concat_tables([t.select([SOURCE, ROW, ID, REASON]).cast(
        pa.schema([(SOURCE, pa.string()), (ROW, pa.int64()), (ID, pa.string()), (REASON, pa.string())]))
        for t in reject_tables]) if reject_tables else None
    return eval_rows, train_rows, rejects, total


def _shards(role: str, rows: list[dict], rows_per_shard: int) -> list[tuple[str, list[dict]]]:
    return [(f"{role}-{i // rows_per_shard:05d}", rows[i:i + rows_per_shard]) for i in range(0, len(rows), rows_per_shard)]


# --------------------------------------------------------------------------- stage


def run(ctx: StageRun) -> None:
    job = ctx.job
    cfg = job.sketch
    ensure_ray(job.ray)
    plan = plan_actors(cfg.use_gpu, cfg.num_actors, "sketch")

    sources = {"anchors": (job.anchors, "anchors", cfg.eval_anchors, cfg.train_anchors),
               "pool": (job.pool_dataset, "pool" if job.pool else "corpus", cfg.eval_pool, cfg.train_pool)}
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
    done = {storage.local_path(p).rsplit("/", 1)[-1][: -len(".parquet")] for p in storage.list_files(shard_dir, ".parquet")}
    all_shards = [s for role in ROLES for s in _shards(role, selected[role], cfg.rows_per_shard)]
    pending = [(name, rows) for name, rows in all_shards if name not in done]
    log.info("sketch: %d anchors + %d pool rows in %d shards (%d already done), %s",
             len(selected["anchors"]), len(selected["pool"]), len(all_shards), len(all_shards) - len(pending), plan)
    t0 = time.perf_counter()
    tokens, compute_s = _sketch_shards(job, plan, pending, shard_dir)
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
            rejects.append(pa.table({SOURCE: b.column(SOURCE), ROW: b.column(ROW), ID: b.column(ID), REASON: b.column(REASON)}))
        good = table.filter(pa.compute.invert(bad_mask))
        out = good.select([ID, SPLIT, SKETCH, TEXT]).cast(
            pa.schema([*sketch_schema(cfg.proj_dim), pa.field(TEXT, pa.string())]))
        role_dir = storage.join(ctx.out_dir, role)
        storage.makedirs(role_dir)
        fs, path = storage.filesystem(storage.join(role_dir, "part-00000.parquet"))
        pq.write_table(out, path, filesystem=fs)
        splits = out.column(SPLIT).to_pylist()
        counts[role] = {"eval": splits.count("eval"), "train": splits.count("train")}

    all_rejects = pa.concat_tables(rejects) if rejects else pa.table({SOURCE: pa.array([], pa.string()),
                                                                       ROW: pa.array([], pa.int64()),
                                                                       ID: pa.array([], pa.string()),
                                                                       REASON: pa.array([], pa.string())})
    ctx.write_rejects(all_rejects, total_rows=rows_read, max_frac=cfg.max_reject_frac, what="sketch")
    n_sketched = sum(t.num_rows for ts in tables.values() for t in ts)
    fidelity = _fidelity_check(job, plan, selected, ctx.out_dir)
    ctx.record(
        rows=counts,
        rows_read=rows_read,
        seeds={"seed": job.seed, "split_seed": cfg.split_seed, "proj_seed": cfg.proj_seed, "lora_seed": job.lora_seed},
        resources={"actors": plan.num_actors, "gpus_per_actor": plan.num_gpus, "cpus_per_actor": plan.num_cpus},
        throughput={"samples": n_sketched, "seconds": round(sketch_seconds, 3), "tokens_this_run": tokens,
                    "actor_compute_s": round(compute_s, 3),
                    "samples_per_s": round(len([r for _, rows in pending for r in rows]) / max(sketch_seconds, 1e-9), 3)},
        fidelity=fidelity,
    )


def _sketch_shards(job: JobConfig, plan: ActorPlan, pending: list[tuple[str, list[dict]]],
                   shard_dir: str) -> tuple[int, float]:
    """Run the actor pool over pending shards; write each shard file when all its rows are back.
    Returns (tokens processed, actor compute seconds)."""
    import ray

    if not pending:
        return 0, 0.0
    cfg = job.sketch
    cols = [SHARD, ID, SPLIT, SOURCE, ROW, TEXT, PROMPT, RESPONSE]
    blocks = [pa.Table.from_pylist([{**{k: r.get(k) for k in cols if k != SHARD}, SHARD: name} for r in rows])
              .select(cols) for name, rows in pending]
    expected = {name: len(rows) for name, rows in pending}
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(
        SketchActor,
        fn_constructor_kwargs=dict(teacher=job.teacher, proj_dim=cfg.proj_dim, proj_seed=cfg.proj_seed,
                                   lora_seed=job.lora_seed, batch_size=cfg.batch_size,
                                   torch_threads=plan.torch_threads, use_gpu=plan.use_gpu),
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
        batch = batch.drop_columns(["tokens", "compute_s"])
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


def _fidelity_check(job: JobConfig, plan: ActorPlan, selected: dict[str, list[dict]], out_dir: str) -> dict[str, Any]:
    """Exact gradients of a few samples vs the pipeline's own sketches of the same samples."""
    import ray

    n = job.sketch.fidelity_samples
    if n < 2:
        return {"samples": 0}
    keyed = [("anchors", r) for r in selected["anchors"][: n // 2]] + [("pool", r) for r in selected["pool"][: n - n // 2]]
    sketches = {}
    for role in ROLES:
        t = pq.read_table(storage.local_path(storage.join(out_dir, role, "part-00000.parquet")), columns=[ID, SKETCH])
        ids = t.column(ID).to_pylist()
        mat = np.asarray(t.column(SKETCH).combine_chunks().flatten()).reshape(len(ids), -1) if ids else None
        for i, rid in enumerate(ids):
            sketches[(role, rid)] = mat[i]
    keyed = [(role, r) for role, r in keyed if (role, r[ID]) in sketches]
    if len(keyed) < 2:
        return {"samples": len(keyed)}
    sk = np.stack([sketches[(role, r[ID])] for role, r in keyed])

    # max_calls=1: the worker exits right after this one task instead of idling in Ray's pool with
    # torch's thread pools alive (a reused/killed idle worker aborted at teardown in testing).
    @ray.remote(num_cpus=plan.num_cpus if not plan.use_gpu else 1, num_gpus=plan.num_gpus, max_calls=1)
    def exact(teacher, lora_seed, proj_dim, proj_seed, prompts, responses, threads, use_gpu):
        from pipeline.teacher import TeacherSketcher

        ts = TeacherSketcher(teacher, proj_dim=proj_dim, proj_seed=proj_seed, lora_seed=lora_seed,
                             device="cuda" if use_gpu else "cpu", torch_threads=threads)
        return ts.exact_gradients(prompts, responses)

    grads = ray.get(exact.remote(job.teacher, job.lora_seed, job.sketch.proj_dim, job.sketch.proj_seed,
                                 [r[PROMPT] for _, r in keyed], [r[RESPONSE] for _, r in keyed],
                                 plan.torch_threads, plan.use_gpu))
    from pipeline.teacher import fidelity_report

    report = fidelity_report(grads, sk)
    report["ids"] = [r[ID] for _, r in keyed]
    if report["max_abs_err"] > job.sketch.fidelity_warn_max_err:
        log.warning("sketch fidelity: max |exact cos - sketch cos| = %.3f > %.2f; raise sketch.proj_dim.",
                    report["max_abs_err"], job.sketch.fidelity_warn_max_err)
    else:
        log.info("sketch fidelity: mean |err| %.4f, max |err| %.4f, spearman %.4f",
                 report["mean_abs_err"], report["max_abs_err"], report["spearman"])
    return report
