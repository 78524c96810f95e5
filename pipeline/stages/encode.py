"""The encode stage: every corpus row -> one code in LanceDB, incrementally and crash-safely.

Shape: Ray Data reads the corpus files and `map_batches` a stateful `CodeEncoder` actor (model
loaded once per actor, GPU actors when the cluster has GPUs), then a fragment-writer task
(`write_fragment_batch`) where the codes are: it writes them as Lance data files of the table
(`codestore.write_code_fragments`, up to FRAGMENT_ROWS rows each) and returns only their metadata.
Codes never pass through the driver: it commits each wave's fragments in one Lance Append and
keeps the ledger. Progress comes from the actors (`ray_runtime.remote_progress`).

Exactly once: the rows of every file to (re-)encode are deleted before its wave, a wave becomes
visible in one atomic commit, and files are marked done in the ledger only after it. A crash before
the commit leaves no rows (the written files belong to no version); a crash after it leaves rows the
ledger does not claim, which the rerun deletes and encodes again. Rows are appended, not merged on
id: a repeated corpus id (within a file or across files) fails the stage naming the files
(`CodeStore.id_audit`) instead of one copy silently replacing the other.

Incremental: the table's `Ledger` lists the files whose rows are all in the table (path, size,
mtime). A run encodes only files missing from it, deletes the rows of files that changed or left
the corpus, and marks files done one *wave* (whole files, up to WAVE_BYTES or WAVE_ROWS) at a time.
`input_fingerprint` lists the corpus files, so a new shard makes `run_stage` rerun this stage
(without --overwrite), and only the new shard is encoded.

Rejected rows: per file, in `<table>.rejects/` next to the ledger (so rejects of files encoded by
earlier runs are not lost), gathered into `encode/rejects.parquet` for the current corpus.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import corpus, storage
from pipeline.codes import bytes_per_row, quantization_fidelity
from pipeline.codestore import (
    CODE_DTYPE,
    CODE_SCALE,
    ENCODED_UTC,
    ENCODER_FINGERPRINT,
    FRAGMENT_ROWS,
    CodeSpec,
    CodeStore,
    Ledger,
    codes_from_arrow,
    write_code_fragments,
)
from pipeline.artifacts import utc_now
from pipeline.config import JobConfig, stable_hash
from pipeline.schema import CODE, ID, REJECTS, ROW, SOURCE
from pipeline.progress import Progress
from pipeline.models import local_model_dir
from pipeline.ray_runtime import remote_progress
from pipeline.stages.shared_encode import (
    TRUNCATED,
    choose_precision,
    encode_small,
    encoded_dataset,
    failed_on_files,
    fit_encoder_path,
    iter_stage,
    split_output,
)

log = logging.getLogger("influcoder.encode")

WAVE_BYTES = 256 * 1024 * 1024  # input bytes per wave: the unit of crash recovery
# ...and rows (known for Parquet): well-compressed text packs millions of rows into 256 MB, and a
# crash would then redo all of them (a 1M-row T0 corpus is 192 MB of Parquet: a single wave).
WAVE_ROWS = 250_000
WRITER_CPUS = 0.25  # a fragment writer mostly waits on I/O; it must not hold back the encoder actors
FIDELITY_ROWS = 256  # rows embedded in float32 to measure int8 ranking fidelity
RECALL_QUERIES, RECALL_K = 100, 10


# --------------------------------------------------------------------------- stage helpers


def code_spec(job: JobConfig, model_dir: str) -> CodeSpec:
    """What the codes are: the encoder (weights + max_len), the text view of the corpus, the dtype."""
    from pipeline.models import code_dim, model_fingerprint

    view = {
        k: getattr(job.corpus, k)
        for k in ("id_column", "prompt_column", "response_column", "text_column", "encoder_text_column")
    }
    return CodeSpec(
        encoder_fingerprint=f"{model_fingerprint(model_dir)}-len{job.encoder.max_len}-view{stable_hash(view)[:8]}",
        dim=code_dim(model_dir),
        code_dtype=job.encode.code_dtype,
    )


def input_fingerprint(job: JobConfig) -> dict[str, Any]:
    """The corpus files (path, size, mtime): a new or changed shard reruns the stage incrementally."""
    files = corpus.files_fingerprint(corpus.discover(job.corpus, "corpus"))
    out: dict[str, Any] = {
        "corpus_files": len(files),
        "corpus_bytes": sum(f["size"] for f in files),
        "corpus_digest": stable_hash(files),
    }
    if len(files) <= 50:  # keep manifests readable for big corpora: the digest identifies the rest
        out["files"] = files
    return out


def waves(files: list, max_bytes: int, max_rows: int = WAVE_ROWS) -> Iterator[list]:
    """Consecutive groups of whole files, each within max_bytes and max_rows (or a single file)."""
    wave, size, rows = [], 0, 0
    for f in files:
        n = f.num_rows or 0  # JSONL row counts are unknown until read: bounded by bytes only
        if wave and (size + f.size > max_bytes or rows + n > max_rows):
            yield wave
            wave, size, rows = [], 0, 0
        wave.append(f)
        size, rows = size + f.size, rows + n
    if wave:
        yield wave


class RejectFiles:
    """Per-input-file rejects, kept next to the ledger: `<uri>/<table>.rejects/<hash>.parquet`."""

    def __init__(self, uri: str, table: str):
        self.dir = storage.join(uri, f"{table}.rejects")

    def _path(self, source: str) -> str:
        return storage.join(self.dir, hashlib.sha1(source.encode()).hexdigest()[:20] + ".parquet")

    def write(self, source: str, rejects: pa.Table) -> None:
        path = self._path(source)
        if rejects.num_rows == 0:
            if storage.exists(path):
                fs, p = storage.filesystem(path)
                fs.delete_file(p)
            return
        storage.makedirs(self.dir)
        fs, p = storage.filesystem(path)
        pq.write_table(rejects.cast(REJECTS), p, filesystem=fs)

    def forget(self, sources: list[str]) -> None:
        self.write_many({s: REJECTS.empty_table() for s in sources})

    def write_many(self, by_source: dict[str, pa.Table]) -> None:
        for s, t in by_source.items():
            self.write(s, t)

    def clear(self) -> None:
        storage.delete_dir(self.dir)

    def gather(self, sources: list[str]) -> pa.Table:
        tables = []
        for s in sources:
            path = self._path(s)
            if storage.exists(path):
                fs, p = storage.filesystem(path)
                tables.append(pq.read_table(p, filesystem=fs))
        return pa.concat_tables(tables) if tables else REJECTS.empty_table()


# --------------------------------------------------------------------------- the stage


def run(ctx) -> None:
    from pipeline.ray_runtime import ensure_ray

    job: JobConfig = ctx.job
    cfg = job.encode
    files = corpus.discover(job.corpus, "corpus")
    model_src = fit_encoder_path(job)  # what the actors open: a URI run_dir's copy on each node
    model_dir = local_model_dir(model_src)  # this process's copy (the code spec is read from it)
    # Start Ray before LanceDB spins up its runtime threads: Ray forks helper processes.
    ensure_ray(job.ray)
    spec = code_spec(job, model_dir)
    uri = job.lancedb_uri
    storage.makedirs(uri)
    # One writer per table: two encodes racing on a stale snapshot would both insert every id.
    # The second waits here, then finds the first one's files in the ledger and adds nothing.
    with storage.exclusive_lock(storage.join(uri, f".{cfg.table}.lock"), f"LanceDB table `{cfg.table}`"):
        store = CodeStore(uri, cfg.table)
        opened = store.prepare(spec)
        ledger = Ledger(uri, cfg.table).load({"spec": spec.to_json()})
        rejects_store = RejectFiles(uri, cfg.table)
        if opened["action"] != "reused" or (store.count_rows() == 0 and ledger.files):
            ledger.reset()  # a new or replaced table holds none of the ledger's files
            rejects_store.clear()

        # The run's compute precision (encode.dtype, gated on a corpus sample): codes and the score
        # stage's queries must share it, so files encoded in another precision are encoded again.
        precision = choose_precision(job, model_src, files) if files else {"requested": cfg.dtype, "dtype": None}

        def done(p: str, f) -> bool:
            made_in = ledger.files.get(p, {}).get("precision")  # absent: encoded before it was recorded
            return ledger.is_done(p, f.size, f.mtime) and made_in in (None, precision["dtype"])

        # Files that left the corpus or changed since they were encoded: their rows go.
        current = {f.path: f for f in files}
        stale = [p for p in ledger.files if p not in current or not done(p, current[p])]
        todo = [f for f in files if not done(f.path, f)]
        deleted = store.delete_sources(sorted(set(stale) | {f.path for f in todo}))
        ledger.forget(stale)
        rejects_store.forget([p for p in stale if p not in current])
        log.info(
            "encode: %d corpus files, %d already encoded, %d to encode, %d rows of stale files removed",
            len(files),
            len(files) - len(todo),
            len(todo),
            deleted,
        )

        written = truncated = 0
        t0 = time.perf_counter()
        if todo:
            known = [f.num_rows for f in todo]  # JSONL counts are unknown until read
            progress = Progress("encode: corpus rows", None if None in known else sum(known))
            with remote_progress(progress) as counter:
                for wave in waves(todo, WAVE_BYTES):
                    n, t = _encode_wave(
                        job, wave, model_src, spec, store, ledger, rejects_store, counter, precision["dtype"]
                    )
                    written, truncated = written + n, truncated + t
            progress.close()
            store.optimize()
        encode_s = time.perf_counter() - t0

        total = store.count_rows()
        all_rejects = rejects_store.gather([f.path for f in files])
        ctx.write_rejects(all_rejects, total + all_rejects.num_rows, cfg.max_reject_frac, "encode: corpus")
        index = _maybe_index(job, store, spec, written)
        audit = store.id_audit()
        distinct = None if audit is None else audit["distinct"]
        ctx.record(
            rows={"encoded": written, "in_table": total, "rejected": all_rejects.num_rows},
            lancedb={
                "uri": uri,
                "table": cfg.table,
                "version": store.version,
                "opened": opened,
                "rows_deleted": deleted,
                "distinct_ids": distinct,
            },
            code_spec=spec.__dict__,
            encoder_fingerprint=spec.encoder_fingerprint,
            code_dtype=spec.code_dtype,
            bytes_per_row=bytes_per_row(spec.dim, spec.code_dtype),
            files={"corpus": len(files), "encoded_this_run": len(todo), "stale_removed": len(stale)},
            truncated_rows=truncated,
            encode_seconds=round(encode_s, 3),
            rows_per_s=round(written / encode_s, 2) if written and encode_s > 0 else None,
            index=index,
            precision=precision,
            code_fidelity=_fidelity(job, files, model_src, precision["dtype"]) if spec.code_dtype == "int8" else None,
        )
        if audit is not None and audit["duplicates"]:
            from pipeline.errors import InputDataError

            shown = "; ".join(f"id {i!r} in {', '.join(srcs)}" for i, srcs in audit["duplicates"][:5])
            raise InputDataError(
                f"encode: {total - distinct} corpus rows repeat the id of another row ({shown}). Every corpus "
                f"row needs its own id: fix the files named and rerun `influcoder encode JOB.yaml`, or point "
                f"corpus.id_column at a unique column and rerun with --overwrite."
            )


def _encode_wave(
    job, wave, model_src, spec, store, ledger, rejects_store, progress_counter, compute_dtype: str
) -> tuple[int, int]:
    """Encode one wave of files in `compute_dtype`: workers write its codes as Lance fragments, this
    process commits them in one Append, then marks the files done (with the precision they were
    encoded in). Returns (rows, truncated)."""
    ds = encoded_dataset(
        job,
        corpus.read_dataset(job.corpus, wave),
        model_src,
        spec.code_dtype,
        compute_dtype=compute_dtype,
        progress_counter=progress_counter,
    ).map_batches(
        write_fragment_batch,
        fn_kwargs={"dataset_uri": store.dataset_uri, "spec_json": spec.to_json(), "stamp": utc_now()},
        batch_size=FRAGMENT_ROWS,
        batch_format="pyarrow",
        num_cpus=WRITER_CPUS,
    )
    per_file = {
        f.path: {"size": f.size, "mtime": f.mtime, "rows": 0, "rejects": 0, "precision": compute_dtype} for f in wave
    }
    rejects: dict[str, list[pa.Table]] = {f.path: [] for f in wave}
    fragments: list[str] = []
    written = truncated = 0
    for summary in iter_stage(ds, "encode"):
        for r in summary.to_pylist():
            fragments += json.loads(r["fragments"])
            truncated += r["truncated"]
            for src, (rows, rejected) in json.loads(r["counts"]).items():
                per_file[src]["rows"] += rows
                per_file[src]["rejects"] += rejected
                written += rows
            rej = pa.ipc.open_stream(r["rejects"]).read_all()
            for src in set(rej.column(SOURCE).to_pylist()):
                rejects[src].append(rej.filter(pc.equal(rej.column(SOURCE), src)))
    # The wave's one commit: before it the table holds none of its rows, after it all of them.
    store.commit_fragments(fragments)
    rejects_store.write_many({s: pa.concat_tables(t) if t else REJECTS.empty_table() for s, t in rejects.items()})
    ledger.mark_done({p: {**e, "done_utc": utc_now()} for p, e in per_file.items()})
    log.debug("encode: wave of %d files done (%d rows, %d fragments)", len(wave), written, len(fragments))
    return written, truncated


def write_fragment_batch(batch: pa.Table, dataset_uri: str, spec_json: str, stamp: str) -> pa.Table:
    """Ray Data task, run where the codes are: write a batch of encoder output (up to FRAGMENT_ROWS
    rows) as Lance fragments of the table, and return one summary row for the driver: the fragments'
    metadata, per input file (rows written, rows rejected), truncated rows and the rejects (Arrow IPC)."""
    try:
        spec = CodeSpec.from_json(spec_json)
        good, rej = split_output(batch)
        n = good.num_rows
        rows = pa.table(
            {
                ID: good.column(ID),
                CODE: good.column(CODE),
                SOURCE: good.column(SOURCE),
                ROW: good.column(ROW),
                ENCODER_FINGERPRINT: pa.array([spec.encoder_fingerprint] * n, pa.string()),
                CODE_DTYPE: pa.array([spec.code_dtype] * n, pa.string()),
                CODE_SCALE: good.column(CODE_SCALE),
                ENCODED_UTC: pa.array([stamp] * n, pa.string()),
            }
        )
        fragments = write_code_fragments(dataset_uri, rows, spec) if n else []
        counts: dict[str, list[int]] = {}
        for i, col in enumerate((good.column(SOURCE), rej.column(SOURCE))):
            for src, cnt in zip(*_value_counts(col)):
                counts.setdefault(src, [0, 0])[i] += cnt
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, REJECTS) as w:
            w.write_table(rej.cast(REJECTS))
        return pa.table(
            {
                "fragments": [json.dumps(fragments)],
                "counts": [json.dumps(counts)],
                "truncated": pa.array([int(pc.sum(good.column(TRUNCATED)).as_py() or 0)], pa.int64()),
                "rejects": pa.array([sink.getvalue().to_pybytes()], pa.binary()),
            }
        )
    except Exception as e:  # noqa: BLE001 - re-raised with the input files named, for the driver's StageError
        raise failed_on_files(batch, e) from e


def _value_counts(col) -> tuple[list, list]:
    if len(col) == 0:
        return [], []
    vc = pc.value_counts(col)
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()


def _maybe_index(job: JobConfig, store: CodeStore, spec: CodeSpec, written: int) -> dict[str, Any]:
    """Build (or refresh) the vector index as configured, and measure its recall@k on real codes."""
    cfg, n = job.encode, store.count_rows()
    if cfg.index == "none":
        return {"type": None, "reason": "encode.index=none"}
    if cfg.index == "auto" and n < cfg.index_min_rows:
        return {"type": None, "reason": f"{n} rows < encode.index_min_rows={cfg.index_min_rows}"}
    if spec.code_dtype == "int8":
        # LanceDB 0.40 refuses vector indices on int8 vectors ("cannot be created on ... Int8").
        return {"type": None, "reason": "LanceDB cannot index int8 codes; scoring is exact"}
    kind = "ivf_hnsw_sq" if cfg.index == "auto" else cfg.index
    if store.has_vector_index() and written == 0:
        info = {"type": kind, "reused": True}
    elif store.has_vector_index() and written < 0.5 * n:
        store.optimize()  # folds the new rows into the existing partitions
        info = {"type": kind, "refreshed": True}
    else:
        info = store.build_index(kind, spec.dim)
    info["recall"] = store.index_recall(
        RECALL_K, RECALL_QUERIES, job.score.nprobes, job.score.refine_factor, spec.code_dtype, seed=job.seed
    )
    return info


def _fidelity(job: JobConfig, files, model_dir: str, compute_dtype: str) -> dict[str, Any]:
    """Spearman of scores from int8 codes vs float32 embeddings of the same real rows."""
    sample = []
    for batch in corpus.iter_file(files[0], job.corpus):
        good = batch.filter(pc.is_null(batch.column(corpus.REJECT_REASON)))
        sample.append(good)
        if sum(t.num_rows for t in sample) >= FIDELITY_ROWS:
            break
    table = pa.concat_tables(sample).slice(0, FIDELITY_ROWS) if sample else None
    if table is None or table.num_rows < 8:
        return {"samples": 0, "reason": "too few rows in the first corpus file"}
    out = encode_small(job, table, model_dir, "float32", compute_dtype=compute_dtype)
    emb = codes_from_arrow(out.column(CODE), "float32")
    return quantization_fidelity(emb, "int8")
