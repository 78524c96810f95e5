"""The encoder on Ray Data, shared by the stages that embed rows with the fitted encoder: the encode
stage (the corpus) and the score stage (the queries).

`CodeEncoder` loads the encoder once per actor and turns canonical rows into codes; rejected rows
pass through with a zero code and their reason. `encode_stream` maps a dataset through it and turns
an actor's failure into a StageError naming the stage and the input file; `encode_small` runs it in
this process for a small table (the score stage's queries, the encode stage's fidelity sample),
where an actor pool's start-up would cost more than the embedding.

Precision: `choose_precision` decides once per encode run, on a seeded sample of the corpus and on
the kind of device the actors get, whether `encode.dtype` may run in bf16 (the agreement gate in
`TextEncoder.choose_precision`); every actor of the run then gets that concrete precision, and the
score stage passes the precision the encode stage recorded, so queries and codes always match.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import corpus, storage
from pipeline.codes import numpy_dtype, quantize
from pipeline.codestore import CODE_SCALE, CodeSpec, CodeStore, code_array
from pipeline.config import JobConfig
from pipeline.errors import ArtifactMissingError, InputDataError, StageError
from pipeline.ray_runtime import stream_outputs
from pipeline.schema import CODE, ID, ROW, SOURCE, split_by_reason
from pipeline.stages.shared_teacher import actor_failure, failure_marker

log = logging.getLogger("influcoder.encode")

TRUNCATED = "truncated"
WINDOW_BATCHES = 16  # rows per actor call = encode.batch_size x this: what is sorted and packed
PRECISION_ROWS, PRECISION_QUERIES = 256, 8  # the agreement sample (rows scored against queries)
PRECISION_POOL = 4096  # the sample is drawn from the first this-many good rows of the corpus
# Up to this many rows are embedded in the calling process: starting an actor (a process importing
# torch and transformers, loading the model) takes seconds, embedding a few hundred rows less.
IN_PROCESS_MAX_ROWS = 2048


class CodeEncoder:
    """Ray Data callable class: canonical rows -> (id, code, code_scale, source, row, truncated).

    Rejected rows pass through with a zero code and their `reject_reason` so that the driver can
    route them (one output schema per batch is what Ray Data needs).
    """

    def __init__(
        self,
        model_dir: str,
        max_len: int,
        code_dtype: str,
        torch_threads: Optional[int],
        batch_size: int,
        use_gpu: bool = False,
        text_prefix: str = "",
        trust_remote_code: bool = False,
        compute_dtype: str = "float32",
        token_budget: Optional[int] = None,
        progress_counter=None,
    ):
        import torch

        from pipeline.encoder import TextEncoder
        from pipeline.models import local_model_dir

        if torch_threads is not None:  # None: in the caller's process, whose thread count stays its own
            torch.set_num_threads(torch_threads)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        model_dir = local_model_dir(model_dir)  # a URI: this node's copy
        # compute_dtype is concrete (float32/bfloat16): the run's choice, made once by choose_precision.
        self.encoder = TextEncoder(
            model_dir, max_len, trust_remote_code=trust_remote_code, device=device, dtype=compute_dtype
        )
        self.code_dtype, self.batch_size, self.prefix = code_dtype, batch_size, text_prefix
        self.token_budget = token_budget
        self.progress_counter = progress_counter  # ray_runtime.remote_progress: rows that never reach the driver

    def __call__(self, batch: pa.Table) -> pa.Table:
        try:
            out = self._encode(batch)
            if self.progress_counter is not None:
                self.progress_counter.add.remote(batch.num_rows)
            return out
        except Exception as e:  # noqa: BLE001 - re-raised with the input file named, for the driver's StageError
            raise failed_on_files(batch, e) from e

    def _encode(self, batch: pa.Table) -> pa.Table:
        from pipeline.textview import table_views

        n = batch.num_rows
        good = pc.is_null(batch.column(corpus.REJECT_REASON)).to_numpy(zero_copy_only=False)
        idx = np.nonzero(good)[0]
        # The encoder's view of each row (response kept when an instruction row overflows max_len).
        texts = table_views(batch.take(pa.array(idx)), prefix=self.prefix)
        dim = self.encoder.dim
        codes = np.zeros((n, dim), dtype=numpy_dtype(self.code_dtype))
        scales = np.ones(n, np.float32)
        truncated = np.zeros(n, bool)
        if len(texts):
            emb, truncated[idx] = self.encoder.embed(
                texts, batch_size=self.batch_size, return_truncated=True, token_budget=self.token_budget
            )
            q = quantize(emb, self.code_dtype)
            codes[idx], scales[idx] = q.codes, q.scales
        return pa.table(
            {
                ID: batch.column(ID),
                CODE: code_array(codes),
                CODE_SCALE: pa.array(scales),
                SOURCE: batch.column(SOURCE),
                ROW: batch.column(ROW),
                TRUNCATED: pa.array(truncated),
                corpus.REJECT_REASON: batch.column(corpus.REJECT_REASON),
            }
        )


def failed_on_files(batch: pa.Table, error: Exception) -> RuntimeError:
    """The error a worker raises for a batch it could not process: the batch's input files named in
    front (`failure_marker`), so that `iter_stage`'s StageError can name them to the user."""
    files = [str(s) for s in batch.column(SOURCE).unique().to_pylist()]
    return RuntimeError(f"{failure_marker('file', files)} {type(error).__name__}: {error}")


def encoder_kwargs(job: JobConfig, plan, model_dir: str, code_dtype: str, text_prefix: str, compute_dtype: str) -> dict:
    """CodeEncoder's constructor arguments for this job and actor plan, wherever it runs (actors or
    this process)."""
    return {
        "model_dir": model_dir,
        "max_len": job.encoder.max_len,
        "code_dtype": code_dtype,
        "torch_threads": plan.torch_threads,
        "batch_size": job.encode.batch_size,
        "use_gpu": plan.use_gpu,
        "text_prefix": text_prefix,
        "trust_remote_code": job.encoder.trust_remote_code,
        "compute_dtype": compute_dtype,
        "token_budget": job.encode.token_budget,
    }


def encoded_dataset(
    job: JobConfig,
    ds,
    model_dir: str,
    code_dtype: str,
    text_prefix: str = "",
    compute_dtype: str = "float32",
    progress_counter=None,
):
    """`ds` (canonical rows) mapped through CodeEncoder actors (sized by the `encode` config section)
    computing in `compute_dtype` (float32/bfloat16: `choose_precision`'s answer). Lazy: iterate it
    with `iter_stage`, or map it further (the encode stage's fragment writers)."""
    from pipeline.ray_runtime import plan_actors

    plan = plan_actors(job.encode.use_gpu, job.encode.num_actors, "encode")
    kwargs = encoder_kwargs(job, plan, model_dir, code_dtype, text_prefix, compute_dtype)
    return ds.map_batches(
        CodeEncoder,
        fn_constructor_kwargs={**kwargs, "progress_counter": progress_counter},
        # A window of many passes: the encoder sorts it by token count and packs it to the budget.
        batch_size=job.encode.batch_size * WINDOW_BATCHES,
        batch_format="pyarrow",
        **plan.map_batches_kwargs(),
    )


def iter_stage(ds, stage: str) -> Iterator[pa.Table]:
    """Yield a mapped dataset's output batches; an actor's or task's failure becomes a StageError
    naming `stage` (and the input file, when the failing batch named it)."""
    try:
        for batch in stream_outputs(ds):
            yield batch
    except Exception as e:  # noqa: BLE001 - Ray wraps the actor's error in its own types
        raise actor_failure(stage, e, [], kind="file") from e


def encode_stream(
    job: JobConfig,
    ds,
    model_dir: str,
    code_dtype: str,
    text_prefix: str = "",
    stage: str = "encode",
    compute_dtype: str = "float32",
) -> Iterator[pa.Table]:
    """The code rows of `ds` (`encoded_dataset`), streamed to this process: for inputs this process
    may hold (`encode_small` above IN_PROCESS_MAX_ROWS rows); the corpus's codes are written by workers."""
    return iter_stage(encoded_dataset(job, ds, model_dir, code_dtype, text_prefix, compute_dtype), stage)


def encode_small(
    job: JobConfig,
    table: pa.Table,
    model_dir: str,
    code_dtype: str,
    text_prefix: str = "",
    stage: str = "encode",
    compute_dtype: str = "float32",
) -> pa.Table:
    """The code rows of a small canonical `table`: embedded in this process by the same CodeEncoder
    when it has at most IN_PROCESS_MAX_ROWS rows, else through the actors (`encode_stream`). A
    failure is a StageError naming the stage and the input files either way."""
    if table.num_rows > IN_PROCESS_MAX_ROWS:
        import ray.data

        stream = encode_stream(
            job, ray.data.from_arrow(table), model_dir, code_dtype, text_prefix, stage, compute_dtype
        )
        return pa.concat_tables(list(stream))
    from pipeline.ray_runtime import plan_actors

    plan = plan_actors(job.encode.use_gpu, job.encode.num_actors, "encode")
    kwargs = encoder_kwargs(job, plan, model_dir, code_dtype, text_prefix, compute_dtype)
    try:
        # The caller's torch thread count stays its own (None): this is its process, not an actor's.
        encoder = CodeEncoder(**{**kwargs, "torch_threads": None})
        return encoder(table)
    except Exception as e:  # noqa: BLE001 - a batch's failure already names its input files
        raise StageError(
            f"{stage}: embedding {table.num_rows} rows in this process failed: {type(e).__name__}: {e}"
        ) from e


def precision_sample(job: JobConfig, files: list) -> pa.Table:
    """A seeded sample of good corpus rows for the precision gate: up to PRECISION_ROWS +
    PRECISION_QUERIES rows drawn (job.seed) from the first PRECISION_POOL good rows of `files`."""
    pool: list[pa.Table] = []
    have = 0
    for f in files:
        for batch in corpus.iter_file(f, job.corpus):
            good = batch.filter(pc.is_null(batch.column(corpus.REJECT_REASON)))
            pool.append(good)
            have += good.num_rows
            if have >= PRECISION_POOL:
                break
        if have >= PRECISION_POOL:
            break
    table = pa.concat_tables(pool) if pool else corpus.READ_SCHEMA.empty_table()
    n = min(table.num_rows, PRECISION_ROWS + PRECISION_QUERIES)
    pick = np.sort(np.random.default_rng(job.seed).choice(table.num_rows, size=n, replace=False))
    return table.take(pa.array(pick, pa.int64()))


def _precision_probe(
    model_dir: str,
    max_len: int,
    trust_remote_code: bool,
    dtype: str,
    use_gpu: bool,
    torch_threads: Optional[int],
    rows: pa.Table,
    queries: pa.Table,
    prefix: str,
    batch_size: int,
    token_budget: int,
) -> dict[str, Any]:
    """Load the encoder on the actors' kind of device and run its precision gate: a Ray task for GPU
    actors, a call in this process for CPU ones (`torch_threads` None: its thread count stays its own)."""
    import torch

    from pipeline.encoder import TextEncoder
    from pipeline.hardware import native_bf16
    from pipeline.models import local_model_dir
    from pipeline.textview import table_views

    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    model_dir = local_model_dir(model_dir)  # a URI: this node's copy
    enc = TextEncoder(model_dir, max_len, trust_remote_code=trust_remote_code, device=device, dtype=dtype)
    record = enc.choose_precision(
        table_views(rows), table_views(queries, prefix=prefix), batch_size=batch_size, token_budget=token_budget
    )
    return {"native_bf16": native_bf16(enc.device_), **record}


def choose_precision(job: JobConfig, model_dir: str, files: list) -> dict[str, Any]:
    """The precision of this encode run (`encode.dtype` resolved and gated), as a manifest record.

    `float32` asked for: no measurement. Otherwise a probe on the actors' kind of device (a Ray task
    for GPU actors, this process for CPU ones) embeds a seeded corpus sample (`precision_sample`; its
    first PRECISION_QUERIES rows, with the anchor prefix, act as queries) in both precisions; the
    record's `dtype` is what every actor then uses.
    """
    from pipeline.ray_runtime import plan_actors

    cfg = job.encode
    if cfg.dtype == "float32":
        return {"requested": "float32", "dtype": "float32", "agreement": None, "reason": "encode.dtype=float32"}
    import ray

    plan = plan_actors(cfg.use_gpu, cfg.num_actors, "encode")
    sample = precision_sample(job, files)
    nq = min(PRECISION_QUERIES, sample.num_rows // 4)
    model = (model_dir, job.encoder.max_len, job.encoder.trust_remote_code, cfg.dtype, plan.use_gpu)
    sample_args = (sample.slice(nq), sample.slice(0, nq), job.encoder.anchor_prefix, cfg.batch_size, cfg.token_budget)
    if plan.use_gpu:  # the actors' kind of device: a GPU worker
        probe = ray.remote(_precision_probe).options(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus)
        try:
            record = ray.get(probe.remote(*model, plan.torch_threads, *sample_args))
        except Exception as e:  # noqa: BLE001 - Ray wraps the task's error in its own types
            raise actor_failure("encode", e, [], kind="file") from e
    else:  # CPU actors: this process's CPU, without starting a worker only to load the model once more
        try:
            record = _precision_probe(*model, None, *sample_args)
        except Exception as e:  # noqa: BLE001 - any failure of the probe fails the stage, named
            raise StageError(f"encode: the precision probe failed: {type(e).__name__}: {e}") from e
    record = {"requested": cfg.dtype, **record}
    agreement = record.get("agreement")
    if record.get("fell_back") and agreement and agreement["spearman_min"] is None:
        log.warning("encode: %s; encoding in float32", record["reason"])
    elif record.get("fell_back"):
        log.warning(
            "encode: bf16 ranks the sample unlike float32 (per-query Spearman min %.6f < %g or top-%d overlap "
            "mean %.3f < %g on %d rows x %d queries): encoding in float32",
            agreement["spearman_min"] if agreement["spearman_min"] is not None else float("nan"),
            agreement["min_spearman"],
            agreement["k"],
            agreement["topk_overlap_mean"] if agreement["topk_overlap_mean"] is not None else float("nan"),
            agreement["min_topk_overlap"],
            agreement["rows"],
            agreement["queries"],
        )
    elif agreement is not None:
        log.info(
            "encode: precision %s on %s (Spearman vs float32 min %.6f, top-%d overlap mean %.3f; %d rows x %d queries)",
            record["dtype"],
            record["device"],
            agreement["spearman_min"],
            agreement["k"],
            agreement["topk_overlap_mean"],
            agreement["rows"],
            agreement["queries"],
        )
    else:
        log.info("encode: precision %s on %s (%s)", record["dtype"], record["device"], record.get("reason"))
    return record


def split_output(batch: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(good code rows, rejects in the REJECTS schema)."""
    return split_by_reason(batch, corpus.REJECT_REASON)


def fit_encoder_path(job: JobConfig) -> str:
    """Where the fit stage's exported encoder is (a URI under a URI run_dir). Ray actors and tasks take
    this and open their node's copy (`models.local_model_dir`): cluster nodes share no disk."""
    path = storage.join(job.run_dir, "fit", "encoder")
    if not storage.exists(storage.join(path, "config.json")):
        raise ArtifactMissingError(
            f"the fitted encoder {storage.redact(path)} is missing; run `influcoder fit JOB.yaml` first."
        )
    return path


def fit_encoder_dir(job: JobConfig) -> str:
    """The fit stage's exported encoder as a folder this process can open (a URI run_dir's copy is
    fetched once into the local model cache: `models.local_model_dir`)."""
    from pipeline.models import local_model_dir

    return local_model_dir(fit_encoder_path(job))


def encoded_codes(job: JobConfig, encode_manifest: dict[str, Any]) -> tuple[CodeStore, CodeSpec, Any]:
    """The codes table, its spec and the snapshot of it that the finished encode stage recorded: what
    `score` ranks and eval reads. Fails when the table holds another encoder's codes than that stage's."""
    store = CodeStore(job.lancedb_uri, job.encode.table)
    spec = store.check_spec()
    if spec.encoder_fingerprint != encode_manifest.get("encoder_fingerprint"):
        raise InputDataError(
            f"LanceDB table `{job.encode.table}` holds codes of encoder {spec.encoder_fingerprint}, but the "
            f"finished encode stage recorded {encode_manifest.get('encoder_fingerprint')}; rerun "
            f"`influcoder encode JOB.yaml`."
        )
    version = (encode_manifest.get("lancedb") or {}).get("version") or store.version
    return store, spec, store.dataset().checkout_version(version)
