"""The teacher on Ray Data, shared by every stage that sketches rows: the sketch stage itself, eval's
gradient method and the score/eval cascade.

- `SketchActor`: loads the teacher once per actor and turns batches of canonical rows into
  unit-norm sketches (rejected rows keep their place with a null sketch and a reason).
- `sketch_shards`: runs the actor pool over named shards and writes each shard file atomically as
  soon as all its rows are back (a crash loses at most the shards in flight).
- `teacher_sketch_groups`: sketches named groups of rows in resumable shards and returns them
  aligned with the input rows by id.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import JobConfig, TeacherConfig
from pipeline.errors import StageError
from pipeline.progress import Progress
from pipeline.ray_runtime import ActorPlan, plan_actors, stream_outputs
from pipeline.schema import ID, PROMPT, REASON, RESPONSE, ROW, SKETCH, SOURCE, SPLIT, TEXT, sketch_matrix

log = logging.getLogger("influcoder.teacher")

SHARD = "shard"
_FAILED = re.compile(r"\[influcoder: failed on (shard|file)s? ([^\]]*)\]")


def failure_marker(kind: str, names: list[str]) -> str:
    """The text an actor puts in front of its error, so the driver can name the shard that failed
    (Ray hands the driver only the exception's text, wrapped in its own)."""
    return f"[influcoder: failed on {kind}s {', '.join(sorted(names)[:5])}]"


def actor_failure(stage: str, error: BaseException, pending: list[str], kind: str = "shard") -> StageError:
    """A StageError naming the stage and the shard (or input file) whose batch failed in an actor."""
    text = str(error)
    found = _FAILED.search(text)
    where = f"{found.group(1)}s {found.group(2)}" if found else f"one of the {kind}s {', '.join(pending[:5])}"
    cause = next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), type(error).__name__)
    return StageError(
        f"{stage}: an actor failed on {where}: {cause[:500]}. Finished {kind}s are kept: fix the cause "
        f"(see the Ray worker log above) and rerun to resume."
    )


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
        try:
            return self._sketch(batch)
        except Exception as e:  # noqa: BLE001 - re-raised with the shard named, for the driver's StageError
            shards = [str(s) for s in batch.column(SHARD).unique().to_pylist()]
            raise RuntimeError(f"{failure_marker('shard', shards)} {type(e).__name__}: {e}") from e

    def _sketch(self, batch: pa.Table) -> pa.Table:
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


def sketch_stage_precision(job: JobConfig) -> JobConfig:
    """`job` with teacher.dtype `auto` replaced by the precision the sketch stage chose and gated.
    Callers after the sketch stage (eval's gradient method, the score cascade) compute in it, so their
    sketches compare with its sketches."""
    if job.teacher.dtype != "auto":
        return job
    from pipeline.artifacts import read_manifest

    chosen = _chosen_precision(read_manifest(job, "sketch"))
    if chosen not in ("float32", "bfloat16"):
        return job
    return dataclasses.replace(job, teacher=dataclasses.replace(job.teacher, dtype=chosen))


def _chosen_precision(sketch_manifest: Optional[dict[str, Any]]) -> Optional[str]:
    """The precision the sketch stage chose and gated, as its manifest records it (None: no manifest)."""
    return ((sketch_manifest or {}).get("precision") or {}).get("chosen")


# --------------------------------------------------------------------------- shards


def shard_rows(name: str, rows: list[dict], rows_per_shard: int) -> list[tuple[str, list[dict]]]:
    """`<name>-r<rows_per_shard>-<nnnnn>` shards of `rows_per_shard` consecutive rows. The name carries the
    layout: a rerun with another sketch.rows_per_shard (execution-only, so the same work dir) must not take
    a finished shard of the old layout for the new shard of the same number (other rows: rows dropped or
    duplicated); old-layout files are simply not reused."""
    return [
        (f"{name}-r{rows_per_shard}-{i // rows_per_shard:05d}", rows[i : i + rows_per_shard])
        for i in range(0, len(rows), rows_per_shard)
    ]


def finished_shards(shard_dir: str) -> set[str]:
    """Names of the shard files already written (a shard file exists only once it is complete)."""
    return {p.rsplit("/", 1)[-1][: -len(".parquet")] for p in storage.list_files(shard_dir, ".parquet")}


def write_atomic(table: pa.Table, path: str) -> None:
    tmp = f"{path}.tmp"
    fs, p = storage.filesystem(tmp)
    pq.write_table(table, p, filesystem=fs)
    storage.move(tmp, path)


def sketch_shards(
    job: JobConfig,
    plan: ActorPlan,
    pending: list[tuple[str, list[dict]]],
    shard_dir: str,
    dtypes: set[str] | None = None,
    stage: str = "sketch",
) -> tuple[int, float]:
    """Run the actor pool over pending shards; write each shard file when all its rows are back.
    Returns (tokens processed, actor compute seconds); ``dtypes``, if given, receives the compute
    precisions the actors used (``bfloat16``/``float32``). An actor's failure becomes a StageError
    naming `stage` and the shard."""
    import ray

    if not pending:
        return 0, 0.0
    cfg = job.sketch
    job = sketch_stage_precision(job)
    if not plan.use_gpu:  # CPU actors run on CPUs like the driver's: said here, not only in their logs
        import torch

        from pipeline.hardware import emulated_bf16_note

        note = emulated_bf16_note(job.teacher.dtype, torch.device("cpu"), "teacher.dtype")
        if note:
            log.warning("%s: %s", stage, note)
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
    progress = Progress(f"{stage}: teacher gradients", sum(expected.values()))
    try:
        for batch in stream_outputs(ds):
            progress.update(batch.num_rows)
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
                    write_atomic(table, storage.join(shard_dir, f"{name}.parquet"))
                    log.debug("%s: shard %s done (%d rows)", stage, name, table.num_rows)
    except Exception as e:  # noqa: BLE001 - Ray wraps the actor's error in its own types
        raise actor_failure(stage, e, [n for n in expected if got.get(n, 0) != expected[n]]) from e
    progress.close()
    missing = [n for n in expected if got.get(n, 0) != expected[n]]
    if missing:
        raise StageError(f"{stage}: shards {missing[:5]} came back incomplete; rerun to resume.")
    return tokens, compute_s


# --------------------------------------------------------------------------- named groups of rows


def teacher_sketch_groups(
    job: JobConfig,
    groups: dict[str, list[dict[str, Any]]],
    shard_dir: str,
    stage: str,
    center: Optional[np.ndarray] = None,
    known: Optional[dict[tuple[str, str], Optional[np.ndarray]]] = None,
) -> tuple[dict[str, tuple[list[str], np.ndarray, np.ndarray]], dict[str, Any]]:
    """Teacher sketches of named groups of canonical rows, in resumable shards (the sketch stage's actors).

    Shard `<group>-r<rows_per_shard>-<nnnnn>.parquet` (see `shard_rows`) holds `sketch.rows_per_shard`
    rows; a shard file that holds exactly the expected ids is reused, so a crash redoes only unfinished
    shards. `known` (`read_known_sketches`: raw sketches an earlier stage computed with this teacher, by
    (prompt, response); None where it rejected the row) skips the teacher for the rows it holds.
    Returns per group (ids, sketches [n, proj_dim] float32 with zero rows where rejected, valid
    mask) in the given row order, and
    {compute_s, computed_rows, known_rows, rows, shards, resumed_shards}. The shards hold raw sketches; the
    returned ones are centred by `center` (`read_teacher_center`) when given.
    """
    from pipeline.distill import center_sketches  # here: distill imports torch, which a fragment writer never needs

    storage.makedirs(shard_dir)
    known = known or {}
    d = job.sketch.proj_dim
    canonical: dict[str, list[dict[str, Any]]] = {}
    shards: list[tuple[str, list[dict[str, Any]]]] = []
    for name, recs in groups.items():
        canonical[name] = [
            {
                ID: r[ID],
                SPLIT: name,
                SOURCE: r.get(SOURCE),
                ROW: r.get(ROW),
                TEXT: r.get(TEXT),
                PROMPT: r.get(PROMPT),
                RESPONSE: r.get(RESPONSE),
            }
            for r in recs
        ]
        todo = [r for r in canonical[name] if _text_key(r) not in known]
        shards += shard_rows(name, todo, job.sketch.rows_per_shard)

    def path(name: str) -> str:
        return storage.join(shard_dir, f"{name}.parquet")

    existing = finished_shards(shard_dir)
    pending = []
    for name, recs in shards:
        if name in existing:
            have = storage.read_table(path(name), columns=[ID]).column(ID).to_pylist()
            if sorted(have) == sorted(r[ID] for r in recs):
                continue  # finished by an earlier, interrupted run of the same stage identity
        pending.append((name, recs))
    plan = plan_actors(job.sketch.use_gpu, job.sketch.num_actors, "sketch")
    known_rows = sum(len(recs) for recs in canonical.values()) - sum(len(r) for _, r in shards)
    if pending:
        log.info(
            "%s: teacher on %d rows in %d shards (%d resumed%s), %s",
            stage,
            sum(len(r) for _, r in pending),
            len(pending),
            len(shards) - len(pending),
            f"; {known_rows} rows already sketched" if known_rows else "",
            plan,
        )
    _, compute_s = sketch_shards(job, plan, pending, shard_dir, stage=stage)

    out: dict[str, tuple[list[str], np.ndarray, np.ndarray]] = {}
    for group, recs in canonical.items():
        # The group's computed sketches by id. Align by id, never by position: a shard's rows come back
        # from the actors in any order (Ray Data batches span shard blocks), so the file order is not
        # the input order.
        computed: dict[str, Optional[np.ndarray]] = {}
        for name, shard_recs in shards:
            if not name.startswith(group + "-"):
                continue
            t = storage.read_table(path(name), columns=[ID, SKETCH])
            mat, ok = sketch_matrix(t.column(SKETCH), d)
            got = {rid: (mat[i] if ok[i] else None) for i, rid in enumerate(t.column(ID).to_pylist())}
            lost = [r[ID] for r in shard_recs if r[ID] not in got]
            if lost:
                raise StageError(
                    f"{stage}: the teacher's shard {name} lacks {len(lost)} rows (first: {lost[:3]}); rerun {stage}."
                )
            computed.update({r[ID]: got[r[ID]] for r in shard_recs})
        mat = np.zeros((len(recs), d), dtype=np.float32)
        ok = np.zeros(len(recs), dtype=bool)
        for i, r in enumerate(recs):
            key = _text_key(r)
            sk = known[key] if key in known else computed[r[ID]]
            if sk is not None:
                mat[i], ok[i] = sk, True
        out[group] = ([r[ID] for r in recs], mat if center is None else center_sketches(mat, center), ok)
    computed_rows = sum(len(r) for _, r in pending)
    return out, {
        "compute_s": float(compute_s),
        "computed_rows": computed_rows,
        "known_rows": known_rows,
        "rows": sum(len(recs) for recs in canonical.values()),
        "shards": len(shards),
        "resumed_shards": len(shards) - len(pending),
    }


# --------------------------------------------------------------------------- sketches kept for later stages

# The score cascade keeps the raw sketches it computed (`score/teacher_sketches.parquet`) so that eval,
# which runs the same teacher on the same corpus rows and queries, does not compute them again.
KNOWN_SKETCHES_FILE = "teacher_sketches.parquet"
_TEACHER_KEY = b"influcoder.teacher_key"


def _text_key(row: dict[str, Any]) -> tuple[str, str]:
    """What a teacher sketch depends on besides the teacher: the row's prompt and response."""
    return (row.get(PROMPT) or "", row.get(RESPONSE) or "")


def teacher_key(job: JobConfig) -> str:
    """Names the teacher a sketch came from: the sketch stage's identity (its model, weights and
    settings) and the precision it chose (what `auto` resolves to), the teacher's settings, the adapter
    and sketch seeds. Equal keys, equal sketches."""
    from pipeline.artifacts import read_manifest
    from pipeline.config import stable_hash, to_dict

    manifest = read_manifest(job, "sketch") or {}
    return stable_hash(
        {
            "sketch_identity": manifest.get("identity"),
            "sketch_precision": _chosen_precision(manifest),
            "teacher": to_dict(job.teacher, for_hash=True),
            "proj_dim": job.sketch.proj_dim,
            "proj_seed": job.sketch.proj_seed,
            "lora_seed": job.lora_seed,
        }
    )


def write_known_sketches(
    job: JobConfig, groups: dict[str, tuple[list[str], np.ndarray, np.ndarray]], rows: dict[str, list[dict]], path: str
) -> int:
    """Write the raw sketches `teacher_sketch_groups` returned (called with no center) for `rows`
    (the same groups' canonical rows), keyed by the teacher; returns the rows written."""
    d = job.sketch.proj_dim
    recs = [rec for group in groups for rec in rows[group]]
    ids = [rid for g_ids, _, _ in groups.values() for rid in g_ids]
    mat = np.concatenate([m for _, m, _ in groups.values()]) if groups else np.zeros((0, d), np.float32)
    valid = np.concatenate([ok for _, _, ok in groups.values()]) if groups else np.zeros(0, bool)
    prompts = [rec.get(PROMPT) for rec in recs]
    responses = [rec.get(RESPONSE) for rec in recs]
    values = mat.astype(np.float32).reshape(-1)
    table = pa.table(
        {
            ID: pa.array(ids, pa.string()),
            PROMPT: pa.array(prompts, pa.string()),
            RESPONSE: pa.array(responses, pa.string()),
            SKETCH: pa.FixedSizeListArray.from_arrays(pa.array(values), d, mask=pa.array(~valid)),
        }
    ).replace_schema_metadata({_TEACHER_KEY: teacher_key(job).encode()})
    write_atomic(table, path)
    return table.num_rows


def read_known_sketches(job: JobConfig, path: str) -> dict[tuple[str, str], Optional[np.ndarray]]:
    """The raw sketches at `path` by (prompt, response), if they came from this job's teacher
    (`teacher_key`); empty when the file is absent or from another teacher."""
    if not storage.exists(path):
        return {}
    table = storage.read_table(path, columns=[PROMPT, RESPONSE, SKETCH])
    if (table.schema.metadata or {}).get(_TEACHER_KEY) != teacher_key(job).encode():
        log.info("%s: not reused: its sketches come from another teacher", storage.redact(path))
        return {}
    mat, ok = sketch_matrix(table.column(SKETCH), job.sketch.proj_dim)
    keys = zip(table.column(PROMPT).to_pylist(), table.column(RESPONSE).to_pylist())
    return {(p or "", r or ""): (mat[i] if ok[i] else None) for i, (p, r) in enumerate(keys)}


# --------------------------------------------------------------------------- the teacher's center

TEACHER_CENTER_FILE = "teacher_center.json"  # in the fit stage's folder, with fit.center_teacher


def write_teacher_center(fit_dir: str, center: Optional[np.ndarray], rows: int) -> Optional[dict[str, Any]]:
    """Write fit's teacher center (`distill.teacher_center`) for eval and the score cascade; returns
    what fit/metrics.json records about it (None: no centring, nothing written)."""
    if center is None:
        return None
    record = {"rows": int(rows), "norm": float(np.linalg.norm(center)), "dim": int(center.shape[0])}
    storage.write_json_atomic(storage.join(fit_dir, TEACHER_CENTER_FILE), {**record, "center": center.tolist()})
    return record


def read_teacher_center(job: JobConfig) -> Optional[np.ndarray]:
    """The center the fit stage removed from every sketch (float32 [proj_dim]), or None when it fitted
    on raw cosines: every later influence cosine (eval's gradient method and held-out truth, the score
    cascade) must be taken the same way as the targets the encoder learned."""
    from pipeline.artifacts import stage_dir

    path = storage.join(stage_dir(job, "fit"), TEACHER_CENTER_FILE)
    if not storage.exists(path):
        return None
    center = np.asarray(storage.read_json(path)["center"], dtype=np.float32)
    if center.shape != (job.sketch.proj_dim,):
        raise StageError(
            f"{storage.redact(path)} holds a center of width {center.shape}, but sketch.proj_dim is "
            f"{job.sketch.proj_dim}; rerun fit (`influcoder run JOB.yaml --from fit`)."
        )
    return center


def teacher_ms_per_row(shard_dir: str, compute_s: float, rows: int) -> float:
    """The teacher's ms per row, accumulated across resumed runs in `<shard_dir>/timing.json` (a resumed
    run computes only some rows, yet still reports the teacher's cost per row)."""
    timing_path = storage.join(shard_dir, "timing.json")
    timing = storage.read_json(timing_path) if storage.exists(timing_path) else {"compute_s": 0.0, "rows": 0}
    timing = {"compute_s": timing["compute_s"] + compute_s, "rows": timing["rows"] + rows}
    storage.write_json_atomic(timing_path, timing)
    return 1000 * timing["compute_s"] / timing["rows"] if timing["rows"] else float("nan")
