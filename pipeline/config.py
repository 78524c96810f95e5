"""Job configuration: one YAML per job, one frozen dataclass per stage.

The dataclasses are the single source of truth for keys and defaults (the README's reference
table is generated from them). A job is validated completely, before any Ray work starts:
unknown keys, wrong types and out-of-range values raise ``ConfigError`` naming the dotted key,
the value and what is allowed.

Fields whose ``metadata`` has ``hash=False`` tune *how* a stage runs (batch sizes, actor counts)
but not *what* it computes; they are left out of the stage's config hash so that changing them
does not invalidate finished artifacts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import posixpath
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from pipeline.errors import ConfigError

EXEC_ONLY = {"hash": False}  # metadata marker: does not change results

# Keys that did nothing or no longer do anything: accepted with a warning that says why, so a job
# written for an older release still runs. Listed by dotted name.
RETIRED_KEYS = {
    "eval.timing_rows": "eval times each encoder method on 128 rows chosen to time like all of them, the teacher on "
    "every row (ms_per_sample); this key was never read",
}

_retired_warned: set[str] = set()

log = logging.getLogger("influcoder.config")

DEFAULT_ANCHOR_PREFIX = "Instruct: Given a sample, find the passages closest to that sample.\nQuery: "


class _FieldError(ConfigError):
    """A field out of range. A ConfigError itself, so that a dataclass built directly (e.g. by
    `prepare`) still exits 2 with the key named; `_build` re-raises it with the dotted prefix."""

    def __init__(self, key: str, value: Any, allowed: str):
        super().__init__(f"`{key}`: got {value!r}, expected {allowed}.")
        self.key, self.value, self.allowed = key, value, allowed


def _require(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise _FieldError(key, value, allowed)


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None:
            _require(value > 0, name, value, "a number > 0")


def _fraction(obj: Any, *names: str, closed_right: bool = True) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None:
            ok = 0.0 <= value <= 1.0 if closed_right else 0.0 <= value < 1.0
            _require(ok, name, value, "a number in [0, 1]" if closed_right else "a number in [0, 1)")


@dataclass(frozen=True)
class DatasetConfig:
    """Where a dataset lives and which columns hold what (same mapping for every dataset section)."""

    path: str
    """File, directory, glob or URI (s3://, gs://, file://) of Parquet, JSONL or Arrow files; a folder written
    by Hugging Face `datasets.save_to_disk` (a Dataset, or a DatasetDict: every split) reads as is."""
    format: Literal["auto", "parquet", "jsonl", "arrow"] = "auto"
    """File format; `auto` decides from the file extension (.parquet/.pq, .jsonl/.json, .arrow)."""
    id_column: Optional[str] = None
    """Column with unique row ids. When absent, ids are derived from the source file and row number."""
    prompt_column: Optional[str] = "prompt"
    """Column with the context/instruction (no loss is taken on it)."""
    response_column: Optional[str] = "response"
    """Column with the response (the loss span of the teacher)."""
    text_column: Optional[str] = None
    """Use a single text column instead of prompt/response (not beside them); the loss then spans the whole text."""
    encoder_text_column: Optional[str] = None
    """Optional column with the text the encoder sees (default: prompt + newline + response)."""
    label_column: Optional[str] = None
    """Optional label column (used by eval, e.g. 1 for rows to find)."""

    def __post_init__(self) -> None:
        _require(bool(self.path), "path", self.path, "a non-empty path or URI")
        _require(
            self.text_column is not None or self.response_column is not None,
            "response_column",
            self.response_column,
            "a column name, or set text_column",
        )
        # text_column replaces prompt/response: mapping both would drop the response without a word.
        # Only names other than the defaults can be told apart from "not set" here.
        given = {
            k: getattr(self, k)
            for k, default in (("prompt_column", "prompt"), ("response_column", "response"))
            if getattr(self, k) not in (None, default)
        }
        _require(
            self.text_column is None or not given,
            "text_column",
            self.text_column,
            "no text_column when "
            + " and ".join(f"{k} ({v!r})" for k, v in given.items())
            + (" are" if len(given) > 1 else " is")
            + " set in the same section: text_column replaces them (the whole text becomes the loss span). "
            "Drop text_column to keep the prompt/response split, or drop "
            + " and ".join(given)
            + f" to use the single column {self.text_column!r}",
        )

    def location(self) -> str:
        """The dataset's path normalised for comparison: `data/x`, `./data/x/` and `file:///abs/data/x`
        name the same files, so sections can be compared by where they read, not by spelling."""
        from pipeline import storage

        if storage.is_uri(self.path):
            scheme, rest = self.path.split("://", 1)
            return f"{scheme.lower()}://{posixpath.normpath(rest)}"
        return os.path.realpath(os.path.expanduser(storage.local_path(self.path)))

    def same_location(self, other: "DatasetConfig") -> bool:
        return self.location() == other.location()


@dataclass(frozen=True)
class TeacherConfig:
    """The target LM whose LoRA gradients define influence (METHOD.md 1a)."""

    model: str = "smollm2-135m-instruct"
    """HF id, local directory, or the offline alias `smollm2-135m-instruct`."""
    max_len: int = 256
    """Token budget per sample; the response gets at most half, the prompt is left-truncated."""
    lora_rank: int = 8
    """Rank of the fresh LoRA adapter whose gradients define influence."""
    lora_alpha: Optional[float] = None
    """LoRA alpha; default 2 * lora_rank."""
    target_modules: str = "all-linear"
    """`all-linear` (PEFT excludes lm_head) or comma-separated module names, e.g. `q_proj,v_proj`."""
    lora_seed: Optional[int] = None
    """Seed set right before the adapter is attached; default: the job seed."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """`auto`: bf16 forward/backward (fp32 head, loss, per-sample gradients and sketch) where the hardware
    has native bf16 (GPUs with compute capability >= 8, CPUs with AVX512-BF16 or AMX) and the sketch stage's
    probe of the gate rows holds sketch.fidelity_min_cos, fp32 otherwise. `bfloat16` forces it (the gate
    fails the stage on a miss). The sketch manifest records the precision chosen and why."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """Attention kernel; sdpa is faster and per-sample gradients stay exact with it."""
    trust_remote_code: bool = False
    """Run model code shipped with a checkpoint. Off unless you trust the checkpoint."""

    def __post_init__(self) -> None:
        _positive(self, "max_len", "lora_rank", "lora_alpha")
        _require(self.max_len >= 8, "max_len", self.max_len, "an integer >= 8")

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.lora_rank


@dataclass(frozen=True)
class SketchConfig:
    """Teacher gradient sketches for anchors and pool (METHOD.md 1a, 1b)."""

    batch_size: int = field(default=64, metadata=EXEC_ONLY)
    """Most samples per forward/backward. Results do not depend on it (per-sample gradients are exact)."""
    token_budget: int = field(default=2048, metadata=EXEC_ONLY)
    """Most padded tokens (rows x longest row) per forward/backward; rows are sorted by length within
    each shard and packed to it. Results do not depend on it."""
    proj_dim: int = 8192
    """CountSketch width."""
    proj_seed: int = 42
    """Seed of the CountSketch buckets and signs."""
    split_seed: int = 42
    """Seed of the anchor/pool sampling. Eval takes the front of the seeded order, train the next rows."""
    train_anchors: int = 64
    """Anchors whose sketches become distillation targets (train split)."""
    train_pool: int = 128
    """Pool rows of the train split (targets = train anchors x train pool cosines)."""
    eval_anchors: int = 16
    """Held-out anchors: ground truth for fit and eval, never trained on."""
    eval_pool: int = 64
    """Held-out pool rows of the ground-truth matrix."""
    fidelity_samples: int = 8
    """Samples whose exact gradients are kept to check sketch fidelity (0 disables)."""
    fidelity_warn_max_err: float = 0.15
    """Warn when max |exact cosine - sketch cosine| passes this (raise proj_dim)."""
    fidelity_min_cos: float = field(default=0.999, metadata=EXEC_ONLY)
    """Precision gate: on the fidelity_samples rows, the cosine of each stage sketch with the CountSketch of
    its float32 batch-size-1 gradient must reach this, else the stage fails (fix: teacher.dtype=float32)."""
    max_reject_frac: float = 0.05
    """Fail the stage when more than this fraction of input rows is rejected."""
    rows_per_shard: int = field(default=64, metadata=EXEC_ONLY)
    """Rows per output shard; the unit of crash recovery."""
    num_actors: Optional[int] = field(default=None, metadata=EXEC_ONLY)
    """Sketcher actors; default one per GPU, or as many as CPUs allow."""
    use_gpu: Optional[bool] = field(default=None, metadata=EXEC_ONLY)
    """Default: use GPUs when the cluster has them. True on a GPU-less cluster fails fast."""

    def __post_init__(self) -> None:
        _positive(self, "batch_size", "token_budget", "proj_dim", "rows_per_shard", "num_actors")
        for name in ("train_anchors", "train_pool", "eval_anchors", "eval_pool", "fidelity_samples"):
            _require(getattr(self, name) >= 0, name, getattr(self, name), "an integer >= 0")
        _require(self.fidelity_samples != 1, "fidelity_samples", 1, "0 or an integer >= 2")
        _fraction(self, "max_reject_frac", "fidelity_warn_max_err", "fidelity_min_cos")


@dataclass(frozen=True)
class EncoderConfig:
    """The student text encoder (METHOD.md 1c)."""

    model: str = "all-minilm-l6-v2"
    """HF id, local directory, or the offline alias `all-minilm-l6-v2`."""
    max_len: int = 256
    """Encoder token budget; longer texts are truncated and counted in the manifest."""
    anchor_prefix: str = ""
    """Prepended to anchor and query texts (not to pool/corpus rows). Empty by default: MiniLM-style
    encoders were never trained with an instruction prefix, and on the demo the prefix cut the plain
    encoder's AUPRC from 0.66 to 0.26. Set it (e.g. to DEFAULT_ANCHOR_PREFIX in pipeline/config.py)
    for instruction-tuned encoders."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint. Off unless you trust it."""

    def __post_init__(self) -> None:
        _positive(self, "max_len")


@dataclass(frozen=True)
class FitConfig:
    """Distillation of the sketches' influence rankings into the encoder (METHOD.md 1d)."""

    epochs: int = 8
    """Training epochs; the last epoch is exported unless restore_best."""
    lr: float = 5e-5
    """AdamW learning rate (linear warm-up, then linear decay to 0)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_frac: float = 0.1
    """Fraction of optimiser steps spent warming up the learning rate."""
    grad_clip: float = 1.0
    """Gradient-norm clip."""
    alpha: float = 0.5
    """Weight of the Pearson term; 1 - alpha weights the listwise KL term."""
    tau: float = 0.05
    """Softmax temperature of the listwise KL term."""
    block_anchors: int = 8
    """k: anchors per training block."""
    block_candidates: int = 16
    """m: pool candidates shared by the block."""
    hard_ratio: float = 0.0
    """Fraction of candidates drawn from the block's top targets (never 1.0)."""
    dropout: Optional[float] = None
    """Dropout probability inside the encoder while fitting; null keeps the model's own (MiniLM: 0.1)."""
    val_frac: float = 0.0
    """Fraction of the sketch's train anchors and of its train pool rows kept aside as a validation
    split (seeded by id) on which `restore_best` chooses; 0 fits on every train row. Choices are never
    made on the held-out eval split. On the demo, holding out 0.25 cost more than choosing bought
    (bench/bench_fit_quality.py, recipe `validated` vs `classic`), so it is off by default."""
    restore_best: bool = False
    """Export the best candidate on the validation split (any epoch, the starting encoder as epoch 0,
    and the weight interpolations of `fit.interpolate`) instead of the last epoch. Needs val_frac > 0."""
    select_best_on: Literal["aggregated", "per_anchor"] = "aggregated"
    """Validation metric that picks the exported candidate when restore_best is on."""
    interpolate: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    """Weights w tried between the starting encoder and the best epoch, (1 - w) * start + w * best
    (weight-space ensembling: keeps what the encoder knew while adding what the teacher taught);
    chosen on validation with w = 0 and w = 1 always candidates. [] disables."""
    blend: list[float] = field(default_factory=list)
    """Weights b of the starting encoder tried on the validation split in a score-space blend with the
    distilled one: the codes become [sqrt(1 - b) * distilled, sqrt(b) * plain], so a score is
    (1 - b) * distilled cosine + b * plain cosine, and b = 0 (the distilled encoder alone) is always a
    candidate. A chosen b > 0 keeps what the starting encoder knew where the teacher agrees with it
    and costs twice the code width and two forward passes per encoded row. Each blend's paired gain
    over the distilled encoder alone on validation, with its 95 % CI, is in fit/metrics.json
    (`candidates`: `gain`, `gain_ci`). Needs val_frac > 0."""
    center_teacher: bool = False
    """Remove the direction every teacher gradient shares before any influence cosine: sketches become
    normalise(sketch - mean train-pool sketch) for fit's targets, validation and held-out truth, eval's
    gradient method and the score cascade (fit writes the center to fit/teacher_center.json; the
    sketch artifact is unchanged, so turning it on reruns fit and what follows, not sketch)."""
    num_workers: Optional[int] = None
    """Ray Train workers; default one per GPU, else 1 on small CPU clusters. It changes results, so it is
    part of fit's config hash: each worker takes one anchor block per optimiser step (DDP averages them),
    so n workers make ceil(blocks / n) steps per epoch on n-block batches. With the default (null) the
    count follows the cluster: set it to make a fit reproducible across clusters."""
    use_gpu: Optional[bool] = field(default=None, metadata=EXEC_ONLY)
    """Default: train on GPUs when the cluster has them; true on a GPU-less cluster fails fast."""
    max_failures: int = field(default=2, metadata=EXEC_ONLY)
    """Worker failures tolerated; training resumes from the last epoch checkpoint."""
    embed_batch_size: int = field(default=64, metadata=EXEC_ONLY)
    """Texts per forward pass when embedding for held-out evaluation."""
    heldout_every_epoch: bool = field(default=True, metadata=EXEC_ONLY)
    """Measure the held-out split after every epoch (the Spearman-by-epoch curves); false measures it
    only for the starting and the exported encoder, which is all that choices and reports need."""

    def __post_init__(self) -> None:
        _positive(
            self,
            "epochs",
            "lr",
            "tau",
            "block_anchors",
            "block_candidates",
            "grad_clip",
            "num_workers",
            "embed_batch_size",
        )
        _require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        _fraction(self, "alpha")
        _fraction(self, "warmup_frac", "hard_ratio", "dropout", closed_right=False)
        _require(0.0 <= self.val_frac < 0.9, "val_frac", self.val_frac, "a number in [0, 0.9)")
        _require(
            all(isinstance(b, (int, float)) and 0.0 < b < 1.0 for b in self.blend),
            "blend",
            self.blend,
            "a list of numbers in (0, 1)",
        )
        _require(
            not (self.blend and self.val_frac == 0),
            "blend",
            self.blend,
            "an empty list when val_frac is 0 (the blend weight is chosen on the validation split; set val_frac)",
        )
        _require(
            not (self.restore_best and self.val_frac == 0),
            "restore_best",
            self.restore_best,
            "false when fit.val_frac is 0 (choosing needs a validation split)",
        )
        for w in self.interpolate:
            _require(0.0 < w < 1.0, "interpolate", self.interpolate, "weights strictly between 0 and 1")
        _require(self.max_failures >= 0, "max_failures", self.max_failures, "an integer >= 0")


@dataclass(frozen=True)
class EncodeConfig:
    """Corpus codes in LanceDB (issue: encode)."""

    batch_size: int = field(default=64, metadata=EXEC_ONLY)
    """Most texts per encoder forward pass."""
    token_budget: int = field(default=4096, metadata=EXEC_ONLY)
    """Most padded tokens (texts x longest text) per encoder forward pass. Each actor sorts a window of
    16 x batch_size rows by token count and packs them to it, so a pass pads only to its own longest
    row. Results do not depend on it (tested at atol 1e-5 in float32)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Encoder compute precision. `auto`: bf16 autocast where the hardware has native bf16 (GPUs with
    compute capability >= 8, CPUs with AVX512-BF16 or AMX), float32 elsewhere. Every run that would use
    bf16 first embeds a seeded sample of the corpus (256 rows, 8 rows as queries) in both precisions and
    keeps bf16 only if each query's Spearman of scores vs float32 is >= 0.999 and the mean top-10 overlap
    is >= 0.9; a miss falls back to float32 (logged). The encode manifest records the precision used
    and the agreement; the score stage embeds its queries in the same precision as the codes."""
    code_dtype: Literal["float16", "int8", "float32"] = "float16"
    """Stored code precision; int8 is scalar-quantised with its fidelity loss measured."""
    lancedb_uri: Optional[str] = None
    """LanceDB database; default `<run_dir>/lancedb`."""
    table: str = "codes"
    """LanceDB table of the codes."""
    index: Literal["auto", "none", "ivf_pq", "ivf_hnsw_sq"] = "auto"
    """Vector index for interactive top-k; `auto` builds IVF_HNSW_SQ once the table is large enough."""
    index_min_rows: int = 5000
    """`index: auto` builds the vector index once the table has this many rows."""
    max_reject_frac: float = 0.05
    """Fail the stage when more than this fraction of corpus rows is rejected."""
    num_actors: Optional[int] = field(default=None, metadata=EXEC_ONLY)
    """Encoder actors; default one per GPU, or as many as CPUs allow."""
    use_gpu: Optional[bool] = field(default=None, metadata=EXEC_ONLY)
    """Default: use GPUs when the cluster has them; true on a GPU-less cluster fails fast."""

    def __post_init__(self) -> None:
        _positive(self, "batch_size", "token_budget", "index_min_rows", "num_actors")
        _require(bool(self.table), "table", self.table, "a non-empty table name")
        _fraction(self, "max_reject_frac")


@dataclass(frozen=True)
class ScoreConfig:
    """Batch scoring of every corpus row against queries (issue: score)."""

    queries: Optional[DatasetConfig] = None
    """The queries whose influence sources are sought (required by the score stage)."""
    top_k: int = 100
    """Rows kept per query in topk.parquet."""
    ann: bool = False
    """Use the vector index (with refinement) for per-query top-k instead of exact search."""
    refine_factor: int = 10
    """ANN only: re-rank refine_factor x top_k candidates with the stored codes."""
    nprobes: int = 20
    """ANN only: IVF partitions probed per query."""
    select_top_frac: Optional[float] = None
    """Select the top fraction of rows by mean score (for curation)."""
    select_threshold: Optional[float] = None
    """Select rows whose mean score is >= this threshold."""
    select_action: Literal["drop", "keep"] = "drop"
    """What the selected rows are for: ids to drop (e.g. toxic sources) or to keep."""
    batch_rows: int = field(default=65536, metadata=EXEC_ONLY)
    """Corpus rows per scoring batch (bounds memory)."""
    scan: Literal["auto", "driver", "workers"] = field(default="auto", metadata=EXEC_ONLY)
    """Where the pass over the codes runs: `driver` streams the table through the job's own process;
    `workers` runs one Ray task per group of Lance fragments, each spilling sorted score runs under the
    run dir, so the driver reads no codes (what a cluster needs); `auto` picks `workers` on a
    multi-node cluster or from 2,000,000 rows. Same scores, ranks and top-k either way."""
    rerank_top: Optional[float] = None
    """Teacher re-rank cascade: a fraction in (0, 1) of the corpus rows, or a count >= 1. The teacher
    computes exact gradient influence (the sketch stage's cosine) of the encoder's top rows by mean
    score against the queries, and those rows are re-ordered by it (they keep the top block; later
    rows keep the encoder order). scores.parquet gains teacher_score and reranked; the selection
    follows the new ranks; score/teacher_sketches.parquet keeps the block's and the queries' raw
    sketches (proj_dim x 4 bytes a row), which eval reuses instead of running the teacher on them
    again. Costs a teacher backward pass per re-ranked row. null: off."""
    rerank_by: Literal["fused", "teacher"] = "fused"
    """How the cascade re-orders its block. `fused`: reciprocal-rank fusion (constant 60, not tuned)
    of the encoder's and the teacher's ranks, so neither ranker's knowledge is thrown away (on the
    demo, re-ordering by the teacher alone lost AUPRC to the encoder; fusion kept it). `teacher`: the
    teacher's score alone: the choice when the teacher's own ranking is what you want (attribution
    rather than filtering), or when the encoder is weak for the task (fit's held-out fidelity far
    below 1 and no better than the plain encoder's). See pipeline/cascade.py."""

    def __post_init__(self) -> None:
        _positive(self, "top_k", "refine_factor", "nprobes", "batch_rows")
        _fraction(self, "select_top_frac")
        if self.rerank_top is not None:
            _require(
                0 < self.rerank_top < 1 or (self.rerank_top >= 1 and float(self.rerank_top).is_integer()),
                "rerank_top",
                self.rerank_top,
                "a fraction in (0, 1) or a whole row count >= 1",
            )


@dataclass(frozen=True)
class FilterConfig:
    """The curated corpus: the corpus minus the rows score selected to drop, or only the rows it selected
    to keep (`score.select_action`), written as Parquet under `run_dir/filter/corpus/` (issue 15)."""

    keep_rejected: bool = False
    """Keep the rows the corpus reader rejected (empty or null text, bad id or label; see
    `encode/rejects.parquet`). Off by default: those rows were never encoded or scored, so there is no
    evidence either way about them, and a row with no usable text rarely belongs in a training set. The
    manifest counts them per file either way. JSONL lines that are not JSON objects have no columns to
    write and are always left out (counted as `unwritable`)."""
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    """Parquet compression of the filtered files (every reader, `datasets` included, reads all four)."""


# The eval methods (the one list: the default, the validation and the report's order).
EVAL_METHODS = ("influcoder", "gradient", "untrained_encoder", "bm25", "random", "cascade")


@dataclass(frozen=True)
class EvalConfig:
    """Fidelity and application metrics against baselines (issue: eval)."""

    methods: list[str] = field(default_factory=lambda: list(EVAL_METHODS))
    """Methods compared on the same rows and queries (influcoder, gradient, untrained_encoder, bm25, random,
    cascade). cascade (the encoder's top rows re-ranked with the teacher, see score.rerank_top and rerank_by) is evaluated
    only when score.rerank_top is set, and needs influcoder."""
    recall_k: list[int] = field(default_factory=lambda: [10, 50])
    """k values of Recall@k (retrieval metrics; relevant rows are the corpus rows with label 1)."""
    max_rows: Optional[int] = None
    """Evaluate on a seeded sample of this many corpus rows (every method sees the same rows);
    default: all rows. The gradient method costs a teacher backward pass per row."""

    def __post_init__(self) -> None:
        known = set(EVAL_METHODS)
        for m in self.methods:
            _require(m in known, "methods", self.methods, f"a list drawn from {sorted(known)}")
        # The cascade re-ranks influcoder's ranking: without it there is nothing to re-rank.
        _require(
            "cascade" not in self.methods or "influcoder" in self.methods,
            "methods",
            self.methods,
            "a list that has influcoder whenever it has cascade",
        )
        for k in self.recall_k:
            _require(isinstance(k, int) and k > 0, "recall_k", self.recall_k, "positive integers")
        _positive(self, "max_rows")


@dataclass(frozen=True)
class RayConfig:
    """Where Ray runs. Nothing here changes results."""

    address: Optional[str] = field(default=None, metadata=EXEC_ONLY)
    """None: start an in-process local Ray; `auto` or `ray://host:port`: join a cluster."""
    num_cpus: Optional[int] = field(default=None, metadata=EXEC_ONLY)
    """CPUs of the local Ray (default: all); ignored when joining a cluster."""
    include_dashboard: bool = field(default=True, metadata=EXEC_ONLY)
    """Start the dashboard (bound to 127.0.0.1) with the local Ray. It also serves Ray's State API,
    which Ray Train's placement-group cleaner polls every second during `fit`: without it, each poll
    fails and logs a warning."""

    def __post_init__(self) -> None:
        _positive(self, "num_cpus")


@dataclass(frozen=True)
class JobConfig:
    """A whole job: every artifact lives under `run_dir`."""

    run_dir: str
    """Where every artifact of the job lives (local path or URI)."""
    corpus: DatasetConfig
    """The corpus to encode and score."""
    anchors: DatasetConfig
    """Query-like samples whose influence sources are sought (teacher + distillation anchors)."""
    seed: int = 0
    """Job seed: LoRA init (unless teacher.lora_seed), distillation order, random baseline."""
    pool: Optional[DatasetConfig] = None
    """Where distillation pool rows are sampled from; default: the corpus. Point it elsewhere to keep
    the evaluation corpus out of distillation (leak-free protocol, METHOD.md 4.4)."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    sketch: SketchConfig = field(default_factory=SketchConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    @property
    def pool_dataset(self) -> DatasetConfig:
        return self.pool if self.pool is not None else self.corpus

    @property
    def lora_seed(self) -> int:
        return self.teacher.lora_seed if self.teacher.lora_seed is not None else self.seed

    @property
    def lancedb_uri(self) -> str:
        from pipeline.storage import join

        return self.encode.lancedb_uri or join(self.run_dir, "lancedb")


STAGES = ("sketch", "fit", "encode", "score", "filter", "eval")

# Which parts of the job each stage's output depends on (upstream stages enter through their
# manifests' hashes, see artifacts.py).
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "sketch": ("seed", "anchors", "pool_dataset", "teacher", "sketch"),
    "fit": ("seed", "encoder", "fit"),
    "encode": ("corpus", "encode"),
    "score": ("score",),
    "filter": ("corpus", "filter"),
    "eval": ("corpus", "score", "teacher", "eval", "seed"),
}
STAGE_UPSTREAM: dict[str, tuple[str, ...]] = {
    "sketch": (),
    "fit": ("sketch",),
    "encode": ("fit",),
    "score": ("encode",),
    "filter": ("encode", "score"),
    "eval": ("sketch", "fit", "encode", "score"),
}


# --------------------------------------------------------------------------- loading


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp: Any) -> str:
    tp, optional = _strip_optional(tp)
    if typing.get_origin(tp) is Literal:
        name = "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    elif typing.get_origin(tp) is list:
        name = f"a list of {_type_name(typing.get_args(tp)[0])}"
    elif dataclasses.is_dataclass(tp):
        name = f"a mapping ({tp.__name__})"
    else:
        name = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))
    return name + (" or null" if optional else "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; build nested dataclasses."""
    base, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key `{key}`: got null, expected {_type_name(tp)}.")
    origin = typing.get_origin(base)
    if dataclasses.is_dataclass(base):
        if not isinstance(value, dict):
            raise ConfigError(f"config key `{key}`: got {value!r}, expected {_type_name(base)}.")
        return _build(base, value, key + ".")
    if origin is Literal:
        allowed = typing.get_args(base)
        if value not in allowed:
            raise ConfigError(f"config key `{key}`: got {value!r}, expected {_type_name(base)}.")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key `{key}`: got {value!r}, expected {_type_name(base)}.")
        (item_tp,) = typing.get_args(base)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key `{key}`: got {value!r}, expected true or false.")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key `{key}`: got {value!r}, expected an integer.")
        return value
    if base is float:
        if isinstance(value, str):
            # YAML 1.1 reads `1e-4` (no dot) as a string; accept any numeric spelling.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key `{key}`: got {value!r}, expected a number.")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key `{key}`: got {value!r}, expected a string.")
        return value
    raise ConfigError(f"config key `{key}`: unsupported type {tp}")  # programming error


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in [n for n in data if prefix + n in RETIRED_KEYS]:
        if prefix + name not in _retired_warned:  # once per process: finished runs' manifests hold it too
            _retired_warned.add(prefix + name)
            log.warning(
                "config key `%s%s` is ignored: %s; remove it from your job file.",
                prefix,
                name,
                RETIRED_KEYS[prefix + name],
            )
        data = {k: v for k, v in data.items() if k != name}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key `{prefix}{unknown[0]}`; allowed keys here: {', '.join(sorted(fields))}.")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key `{prefix}{name}` ({_type_name(hints[name])}).")
    try:
        return cls(**kwargs)
    except _FieldError as e:
        raise ConfigError(f"config key `{prefix}{e.key}`: got {e.value!r}, expected {e.allowed}.") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse one `--set a.b.c=value`; the value is read as YAML (numbers, booleans, null, lists)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. sketch.batch_size=4.")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: the key must be dotted names, e.g. sketch.batch_size.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = json.loads(json.dumps(data))  # deep copy of plain YAML data
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: `{part}` is not a section.")
            node = child
        node[parts[-1]] = value
    return data


def load_job(
    path: str | Path | None = None, overrides: list[str] | None = None, data: dict[str, Any] | None = None
) -> JobConfig:
    """Load and validate a job from a YAML file (or a dict), applying `--set` overrides."""
    if data is None:
        p = Path(path)  # type: ignore[arg-type]
        if not p.is_file():
            raise ConfigError(f"job file {p} does not exist; pass the path of a job YAML (see jobs/).")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"job file {p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"job file {p}: expected a mapping of sections at the top level.")
    data = apply_overrides(data, overrides or [])
    return _build(JobConfig, data)


# --------------------------------------------------------------------------- hashing


def to_dict(obj: Any, *, for_hash: bool = False) -> Any:
    """Plain-data view of a config; `for_hash` drops execution-only fields."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            if for_hash and f.metadata.get("hash", True) is False:
                continue
            out[f.name] = to_dict(getattr(obj, f.name), for_hash=for_hash)
        return out
    if isinstance(obj, list):
        return [to_dict(v, for_hash=for_hash) for v in obj]
    return obj


def stable_hash(data: Any) -> str:
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stage_inputs(job: JobConfig, stage: str) -> dict[str, Any]:
    """The part of the job that determines a stage's output (execution-only fields excluded)."""
    return {name: to_dict(getattr(job, name), for_hash=True) for name in STAGE_INPUTS[stage]}


def stage_config_hash(job: JobConfig, stage: str) -> str:
    return stable_hash(stage_inputs(job, stage))


def _user_section(job: JobConfig, name: str) -> str:
    """The job key a user writes for an entry of STAGE_INPUTS: `pool_dataset` is the `pool` section, or
    the `corpus` it defaults to; every other entry is already a job key."""
    if name == "pool_dataset":
        return "pool" if job.pool is not None else "corpus"
    return name


def _flatten(data: Any, prefix: str) -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out
    return {prefix: data}


def _show(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 200 else text[:197] + "..."


_UNSET = object()


def key_changes(job: JobConfig, recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every dotted job key (e.g. `fit.epochs: 3 -> 5`) whose value differs between
    two `stage_inputs` views (what a manifest recorded, what the job says now)."""
    old, new = {}, {}
    for src, dst in ((recorded, old), (current, new)):
        for name, value in src.items():
            dst.update(_flatten(value, _user_section(job, name)))
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _UNSET), new.get(key, _UNSET)
        if a != b:
            a_s = "(not recorded)" if a is _UNSET else _show(a)
            b_s = "(removed)" if b is _UNSET else _show(b)
            out.append(f"{key}: {a_s} -> {b_s}")
    return out


def describe_fields(
    cls: type = JobConfig, prefix: str = "", expand_datasets: bool = True
) -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, help) for every key: the README's job reference is built from it.
    With `expand_datasets=False`, dataset sections are one row each (their keys are listed once)."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    try:
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[attr-defined]
    except (OSError, TypeError):
        pass
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        tp, _ = _strip_optional(hints[f.name])
        key = prefix + f.name
        if dataclasses.is_dataclass(tp) and (expand_datasets or tp is not DatasetConfig):
            rows.extend(describe_fields(tp, key + ".", expand_datasets))
            continue
        if tp is DatasetConfig:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            rows.append(
                (key, "a dataset section (keys below)", "required" if required else "null", docs.get(f.name, ""))
            )
            continue
        if f.default is not dataclasses.MISSING:
            default = json.dumps(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = json.dumps(f.default_factory())
        else:
            default = "required"
        rows.append((key, _type_name(hints[f.name]), default, docs.get(f.name, "")))
    return rows
