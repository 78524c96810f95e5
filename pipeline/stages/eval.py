"""The eval stage: is the encoder as good as the gradients, and how much cheaper?

Every method scores the same corpus rows against the same queries:
- influcoder: the distilled encoder's cosine over the codes encode stored (the product, as `score` ranks
  it; cross-checked against score/scores.parquet, and a sample against a fresh pass of the encoder)
- gradient: the teacher's own sketch cosine (LESS-style upper reference; a backward pass per row)
- untrained_encoder: the starting encoder as its users run it (plain text, no prefix: exactly what
  `SentenceTransformer(model).encode` embeds), the control influcoder has to beat; with a non-empty
  `encoder.anchor_prefix`, `untrained_encoder_prefixed` is reported beside it (never instead)
- bm25 and random (seeded)
- cascade (when score.rerank_top is set): influcoder's top rows re-ranked with the teacher (section at the end)
Metrics (pipeline.metrics, scipy/sklearn):
- application, when the corpus has labels: AUPRC of the mean-over-queries score (label 1 = row to
  find), Recall@k and MRR per query (relevant = label-1 rows)
- fidelity to the teacher: per-anchor and aggregated Spearman on the sketch stage's held-out eval
  split (eval anchors x eval pool), and on the corpus against the gradient method's ranking
- costs, measured in this run: setup_s, ms_per_sample after a warm-up (each encoder method on 128 rows
  that time like all of them: whole passes of its length-sorted rows; the teacher on every row),
  bytes_per_sample.
Every quality figure carries a 95 % percentile-bootstrap CI (`*_ci`): AUPRC resamples queries and
rows, Recall@k and MRR resample queries, held-out Spearman resamples anchors and pool rows; and
influcoder's AUPRC is compared with every other method's through paired replicates (`vs`).
The report (report.md + plots) is written next to the metrics.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from pipeline import corpus, metrics, sampling, storage
from pipeline.artifacts import StageRun
from pipeline.baselines import BaselineScores, bm25_scores, random_scores
from pipeline.config import JobConfig
from pipeline.distill import center_sketches
from pipeline.errors import ArtifactMissingError, ConfigError, InputDataError
from pipeline.ray_runtime import ensure_ray
from pipeline.report import blend_lead_text, teacher_notes, verdict, verdict_text
from pipeline.textview import table_views
from pipeline.schema import ID, LABEL, SKETCH, TEXT, sketch_matrix, split_in_id_order
from pipeline.stages.shared_teacher import (
    KNOWN_SKETCHES_FILE,
    read_known_sketches,
    read_teacher_center,
    teacher_ms_per_row,
    teacher_sketch_groups,
)
from pipeline.stages.shared_encode import encoded_codes, fit_encoder_dir

log = logging.getLogger("influcoder.eval")


def input_fingerprint(job: JobConfig) -> dict[str, Any]:
    """The corpus and query files (eval's method version lives in the stage registry, pipeline.stages)."""
    return {
        "corpus": corpus.files_fingerprint(corpus.discover(job.corpus, "corpus")),
        "queries": corpus.files_fingerprint(corpus.discover(job.score.queries, "score.queries")),
    }


# --------------------------------------------------------------------------- inputs


# The gradient method runs a teacher backward pass per corpus row: past this many rows an eval with
# the default `eval.max_rows` (unbounded) would run for hours, so it asks for an explicit choice.
GRADIENT_MAX_ROWS = 10_000


def distillation_exclusion(job: JobConfig, sketch_ids: dict[str, set[str]]) -> dict[str, set[str]]:
    """Corpus ids that entered distillation, per sketch role: the rows (both splits) of every role whose
    dataset reads the corpus's own files (the pool when `pool` is unset; anchors pointed at the corpus).
    Scoring them would grade the encoder on rows it was fitted to. Roles reading other files are not
    excluded by id: ids derived from file names (`part-00000.parquet#3`) can repeat across datasets."""
    datasets = {"anchors": job.anchors, "pool": job.pool_dataset}
    return {
        role: set(ids)
        for role, ids in sketch_ids.items()
        if role in datasets and datasets[role].same_location(job.corpus) and ids
    }


def _sketch_ids(ctx: StageRun) -> dict[str, set[str]]:
    return {
        role: set(
            storage.read_table(storage.join(ctx.upstream_dir("sketch"), role), columns=[ID]).column(ID).to_pylist()
        )
        for role in ("anchors", "pool")
    }


def _eval_rows(job: JobConfig, exclude: set[str] | None = None, excluded: list[str] | None = None) -> pa.Table:
    """Good, de-duplicated corpus rows; a seeded sample of `eval.max_rows` when set. Rows whose id is in
    `exclude` are left out before sampling (so the sample keeps its size) and appended to `excluded`."""
    exclude = exclude or set()
    files = corpus.discover(job.corpus, "corpus")
    if job.eval.max_rows is None and "gradient" in job.eval.methods:
        known = [f.num_rows for f in files if f.num_rows is not None]
        check_gradient_rows(job, sum(known))  # Parquet footers: refuse before reading a huge corpus

    def first_occurrences():
        seen: set[str] = set()
        for batch in corpus.read_dataset(job.corpus, files).iter_batches(batch_format="pyarrow", batch_size=None):
            good, _ = corpus.split_rejects(batch)
            for row in good.to_pylist():
                if row[ID] in exclude:
                    if excluded is not None and row[ID] not in seen:
                        excluded.append(row[ID])
                    seen.add(row[ID])
                elif row[ID] not in seen:
                    seen.add(row[ID])
                    yield row

    if job.eval.max_rows:
        rows = sampling.select(first_occurrences(), job.seed, job.eval.max_rows)
    else:
        rows = sorted(first_occurrences(), key=lambda r: r[ID])
        check_gradient_rows(job, len(rows))
    return pa.Table.from_pylist(rows)


def check_gradient_rows(job: JobConfig, n_rows: int) -> None:
    """Refuse a gradient eval over more than GRADIENT_MAX_ROWS rows unless `eval.max_rows` is set."""
    if job.eval.max_rows is None and "gradient" in job.eval.methods and n_rows > GRADIENT_MAX_ROWS:
        raise ConfigError(
            f"config key `eval.max_rows`: not set, so eval would score all {n_rows} corpus rows, and the "
            f"`gradient` method runs a teacher backward pass per row (past {GRADIENT_MAX_ROWS} rows, hours on "
            f"CPUs). Set `--set eval.max_rows=N` (a seeded sample; N above {GRADIENT_MAX_ROWS} is allowed "
            f"when set explicitly), or drop `gradient` from eval.methods."
        )


def _queries(job: JobConfig) -> pa.Table:
    q = job.score.queries
    table = corpus.read_local(q, corpus.discover(q, "score.queries"))
    good, _ = corpus.split_rejects(table)
    if good.num_rows == 0:
        raise InputDataError(f"score.queries: no usable query rows in {storage.redact(q.path)}.")
    return good


def _sketch_split(ctx: StageRun, role: str, center: Optional[np.ndarray]) -> tuple[list[str], pa.Table, np.ndarray]:
    """The held-out (eval) split of one side of the sketch artifact: ids, rows, sketches (id order),
    centred as fit centred its truth (`center`: fit.center_teacher)."""
    t = split_in_id_order(storage.read_table(storage.join(ctx.upstream_dir("sketch"), role)), "eval")
    ids = t.column(ID).to_pylist()
    mat, _ = sketch_matrix(t.column(SKETCH))
    return ids, t.drop_columns([SKETCH]), center_sketches(mat, center)


# --------------------------------------------------------------------------- methods


def _stored_codes(ctx: StageRun, ids: list[str]) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(positions in `ids`, float32 codes) of the eval rows whose codes the encode stage stored, or None
    when the table holds another encoder's codes than the finished encode stage recorded."""
    try:
        store, _, snapshot = encoded_codes(ctx.job, ctx.upstream.get("encode") or {})
    except (InputDataError, ArtifactMissingError) as e:
        log.warning("eval: %s influcoder's rows are embedded here instead of read from the table.", e)
        return None
    found, codes = store.codes_of(ids, dataset=snapshot)
    position = {i: k for k, i in enumerate(ids)}
    return np.array([position[i] for i in found], dtype=np.int64), codes


def _gradient_method(
    ctx: StageRun, rows: pa.Table, queries: pa.Table, center: Optional[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Teacher sketches of the eval rows and queries (resumable shards in the work dir), aligned by id,
    centred by `center` (fit.center_teacher; None: raw).

    Returns (query sketches, row sketches, record): rows and queries the teacher rejects (no loss
    span within teacher.max_len) keep a zero sketch, so they score 0; the record counts them
    (`teacher_rejected_rows`, `teacher_rejected_queries`) and gives the teacher's ms per row."""
    shard_dir = storage.join(ctx.work_dir, "gradient_shards")
    sk, info = teacher_sketch_groups(
        ctx.job,
        {"queries": queries.to_pylist(), "rows": rows.to_pylist()},
        shard_dir,
        stage="eval",
        center=center,
        known=_score_stage_sketches(ctx),
    )
    (_, q_mat, q_ok), (_, r_mat, r_ok) = sk["queries"], sk["rows"]
    record = {
        "ms_per_sample": _teacher_ms(ctx, shard_dir, info),
        "teacher_rows_from_score_stage": info["known_rows"],
        "teacher_rejected_rows": int((~r_ok).sum()),
        "teacher_rejected_queries": int((~q_ok).sum()),
    }
    if record["teacher_rejected_rows"] or record["teacher_rejected_queries"]:
        log.warning(
            "eval: the teacher rejected %d of %d rows and %d of %d queries (no response tokens within "
            "teacher.max_len=%d); the gradient method scores them 0.",
            record["teacher_rejected_rows"],
            len(r_ok),
            record["teacher_rejected_queries"],
            len(q_ok),
            ctx.job.teacher.max_len,
        )
    return q_mat, r_mat, record


def _score_stage_sketches(ctx: StageRun) -> dict:
    """The raw teacher sketches the score cascade computed (`score/teacher_sketches.parquet`), by
    (prompt, response), when they come from this job's teacher: eval does not compute them again."""
    return read_known_sketches(ctx.job, storage.join(ctx.upstream_dir("score"), KNOWN_SKETCHES_FILE))


def _teacher_ms(ctx: StageRun, shard_dir: str, info: dict[str, Any]) -> float:
    """The teacher's ms per row over all of eval's teacher rows: the rows eval computed at the rate it
    measured (across resumed runs), the rows taken from the score stage at the rate the score stage
    measured on them. (The two sets differ in length: the score cascade's rows are the encoder's top
    rows, so either rate alone would misstate the teacher's cost per row.)"""
    own_ms = teacher_ms_per_row(shard_dir, info["compute_s"], info["computed_rows"])
    known = info["known_rows"]
    score_ms = ((ctx.upstream.get("score") or {}).get("cascade") or {}).get("teacher_ms_per_row")
    if not known or score_ms is None:
        return own_ms
    own_rows = info["rows"] - known
    if math.isnan(own_ms) or own_rows == 0:
        return float(score_ms)
    return (own_ms * own_rows + float(score_ms) * known) / info["rows"]


# --------------------------------------------------------------------------- metrics


BOOTSTRAP_RESAMPLES = 1000


@dataclass
class PairedSamples:
    """What one method's application metrics leave for paired comparisons with another's (`vs`)."""

    replicates: dict[str, np.ndarray]
    """Bootstrap replicates by metric: `auprc` resamples queries and rows, Recall@k and MRR resample
    queries. Every method draws the same resamples (same seed and shapes), so replicate r of two
    methods is measured on the same queries and rows: their difference is a paired replicate."""


def _application_metrics(
    per_query: np.ndarray, labels: np.ndarray | None, ids: list[str], recall_k: list[int], seed: int
) -> tuple[dict[str, Any], PairedSamples | None]:
    """AUPRC of the mean-over-queries score, Recall@k and MRR per query, each with a bootstrap CI;
    also what paired comparisons across methods need (`PairedSamples`)."""
    if labels is None or labels.sum() == 0:
        return {}, None
    mean_scores = per_query.mean(axis=0)
    relevant = {ids[i] for i in np.flatnonzero(labels == 1)}
    order = np.argsort(-per_query, axis=1, kind="stable")
    ranked = [[ids[j] for j in row] for row in order]

    def auprc_of(iq: np.ndarray, ir: np.ndarray) -> float:
        return metrics.auprc(labels[ir], per_query[np.ix_(iq, ir)].mean(axis=0))

    replicates = {"auprc": metrics.bootstrap_replicates(auprc_of, per_query.shape, BOOTSTRAP_RESAMPLES, seed)}
    out: dict[str, Any] = {
        "auprc": metrics.auprc(labels, mean_scores),
        "auprc_ci": metrics.percentile_ci(replicates["auprc"]),
        "average_precision": metrics.average_precision(labels, mean_scores),
    }
    per_query_values = {"mrr": metrics.reciprocal_ranks(ranked, [relevant] * len(ranked))}
    for k in recall_k:
        per_query_values[f"recall@{k}"] = metrics.recall_at_k_per_query(ranked, [relevant] * len(ranked), k)
    for name, values in per_query_values.items():
        out[name] = metrics._nanmean(values)
        replicates[name] = metrics.bootstrap_replicates(
            lambda iq, v=values: metrics._nanmean(v[iq]), [len(values)], BOOTSTRAP_RESAMPLES, seed
        )
        out[name + "_ci"] = metrics.percentile_ci(replicates[name])
    n_pos = int(labels.sum())
    top = np.argsort(-mean_scores, kind="stable")[:n_pos]
    out["precision@n_pos"] = float(labels[top].mean())
    return out, PairedSamples(replicates)


def _paired_vs(
    a: dict[str, Any], a_samples: PairedSamples, b: dict[str, Any], b_samples: PairedSamples
) -> dict[str, Any]:
    """a's application metrics minus b's, each with its 95 % CI from the paired replicates."""
    out: dict[str, Any] = {}
    for key, reps in a_samples.replicates.items():
        out[key + "_diff"] = a[key] - b[key]
        out[key + "_diff_ci"] = metrics.paired_difference(reps, b_samples.replicates[key])
    return out


def _fidelity(pred: np.ndarray, gt: np.ndarray, seed: int) -> dict[str, Any]:
    return metrics.spearman_with_ci(pred, gt, resamples=BOOTSTRAP_RESAMPLES, seed=seed)


def _fidelity_difference(pred_a: np.ndarray, pred_b: np.ndarray, gt: np.ndarray, seed: int) -> dict[str, Any]:
    return metrics.fidelity_difference(pred_a, pred_b, gt, resamples=BOOTSTRAP_RESAMPLES, seed=seed)


def _leakage(ctx: StageRun, rows: pa.Table, queries: pa.Table) -> dict[str, int]:
    """Overlap (ids, normalised texts, near-duplicates) between evaluated rows/queries and distillation data."""
    from pipeline import neardup

    # Texts compare as `neardup.normalise` makes them (case, punctuation, spacing), as fit's check does.
    distill_ids, distill_texts = set(), set()
    near = neardup.NearDupIndex(seed=ctx.job.seed)  # the same definition `prepare` drops by
    for role in ("anchors", "pool"):
        t = storage.read_table(storage.join(ctx.upstream_dir("sketch"), role), columns=[ID, TEXT])
        distill_ids.update(t.column(ID).to_pylist())
        distill_texts.update(neardup.normalise(s) for s in t.column(TEXT).to_pylist())
        for i, s in enumerate(t.column(TEXT).to_pylist()):
            near.add((role, i), s)
    out = {}
    for name, t in (("corpus", rows), ("queries", queries)):
        out[f"{name}_id_overlap"] = len(distill_ids & set(t.column(ID).to_pylist()))
        out[f"{name}_text_overlap"] = len(distill_texts & {neardup.normalise(s) for s in t.column(TEXT).to_pylist()})
        out[f"{name}_near_dup"] = sum(bool(near.matches(s)) for s in t.column(TEXT).to_pylist())
    return out


# --------------------------------------------------------------------------- stage


def run(ctx: StageRun) -> None:
    from pipeline.models import resolve_encoder
    from pipeline.report import write_report
    from pipeline.stages.eval_encoders import EncoderPasses, embed_rows  # torch: imported when eval runs
    from pipeline.stages.fit_data import read_heldout_scores

    job = ctx.job
    ensure_ray(job.ray)
    methods = job.eval.methods
    distilled = distillation_exclusion(job, _sketch_ids(ctx))
    excluded_ids: list[str] = []
    rows = _eval_rows(job, set().union(*distilled.values()), excluded_ids)
    excluded = {"rows": len(excluded_ids), "roles": sorted(distilled)}
    if excluded_ids:
        log.warning(
            "eval: %d corpus rows entered distillation (the sketch's %s read the corpus files%s) and are left "
            "out of every metric; point `pool` (and `anchors`) at data outside the corpus to evaluate on every row.",
            len(excluded_ids),
            " and ".join(sorted(distilled)),
            ": `pool` is not set" if job.pool is None else "",
        )
    if rows.num_rows == 0:
        raise InputDataError(
            f"eval: no corpus rows left to evaluate in {storage.redact(job.corpus.path)}"
            + (f" ({len(excluded_ids)} entered distillation)" if excluded_ids else "")
            + "; set `pool` to other data than the corpus, or give the corpus more rows."
        )
    queries = _queries(job)
    ids = rows.column(ID).to_pylist()
    labels = None
    if job.corpus.label_column:
        # Rows without a label count as negatives (label 1 marks the rows to find). The cast: a column
        # whose every value is null has Arrow type null, which fill_null cannot fill with an integer.
        labels = pa.compute.fill_null(rows.column(LABEL).cast(pa.int64()), 0).to_numpy().astype(int)
        if not labels.any():
            log.warning(
                "eval: corpus.label_column `%s` has no row labelled 1 among the %d evaluated rows: AUPRC, "
                "Recall@k and MRR are not computed. Check the column (1 = a row to find).",
                job.corpus.label_column,
                len(ids),
            )
    row_texts = rows.column(TEXT).to_pylist()
    q_texts = queries.column(TEXT).to_pylist()
    log.info(
        "eval: %d corpus rows (%s positives), %d queries, methods %s",
        len(ids),
        int(labels.sum()) if labels is not None else "no",
        len(q_texts),
        methods,
    )
    threads = max(1, os.cpu_count() or 1)
    fit_dir = fit_encoder_dir(job)  # a local folder (copied from a URI run_dir once per node)
    center = read_teacher_center(job)
    a_ids, a_rows, a_sk = _sketch_split(ctx, "anchors", center)
    p_ids, p_rows, p_sk = _sketch_split(ctx, "pool", center)
    a_texts, p_texts = a_rows.column(TEXT).to_pylist(), p_rows.column(TEXT).to_pylist()
    heldout_gt = a_sk @ p_sk.T  # ground truth: the teacher's cosines on the held-out split
    seed = job.seed

    results: dict[str, dict[str, Any]] = {}
    per_query: dict[str, np.ndarray] = {}
    heldout_pred: dict[str, np.ndarray] = {}  # held-out predictions: the cascade re-ranks influcoder's
    setup_influcoder = float(ctx.upstream["sketch"].get("seconds", 0)) + float(ctx.upstream["fit"].get("seconds", 0))
    prefix = job.encoder.anchor_prefix
    plain_dir = resolve_encoder(job.encoder.model)
    # (method, model, query inputs, row inputs, held-out anchor inputs, held-out pool inputs)
    encoders = [
        (
            "influcoder",
            fit_dir,
            table_views(queries, prefix),
            table_views(rows),
            table_views(a_rows, prefix),
            table_views(p_rows),
        ),
        # As its users run it: plain texts, no prefix (what SentenceTransformer.encode embeds).
        ("untrained_encoder", plain_dir, q_texts, row_texts, a_texts, p_texts),
    ]
    if prefix and "untrained_encoder" in methods:
        encoders.append(
            (
                "untrained_encoder_prefixed",
                plain_dir,
                [prefix + t for t in q_texts],
                row_texts,
                [prefix + t for t in a_texts],
                p_texts,
            )
        )
    # Every encoder method computes in the precision encode chose for the codes: influcoder's scores then
    # match the score stage's, and the encoders' costs compare like for like.
    precision = ((ctx.upstream.get("encode") or {}).get("precision") or {}).get("dtype") or "float32"
    passes = EncoderPasses(job.encoder.max_len, job.encoder.trust_remote_code, precision, threads)
    # Every encoder method is timed on a sample of the rows that times like all of them (whole passes of
    # its length-sorted rows, spread over the lengths). influcoder's rows are scored with the codes
    # encode stored (what `score` ranks); its sample is also embedded here, which times it and checks the
    # stored codes against a fresh pass.
    stored_codes = _stored_codes(ctx, ids) if "influcoder" in methods else None
    # influcoder's held-out scores are the ones fit measured its export by (the same encoder, inputs and
    # precision), so eval's held-out figures are fit's; a pass here only where they cannot be used.
    fit_heldout, why = (
        read_heldout_scores(ctx.upstream_dir("fit"), a_ids, p_ids, passes.compute(fit_dir))
        if "influcoder" in methods
        else (None, "")
    )
    if why:
        log.info("eval: embedding the held-out split for influcoder: %s", why)
    for name, model_dir, q_in, r_in, a_in, p_in in encoders:
        if name not in methods and name != "untrained_encoder_prefixed":
            continue
        t0 = time.perf_counter()
        known = stored_codes if name == "influcoder" else None
        reuse = name == "influcoder" and fit_heldout is not None
        held_in = None if reuse else (a_in, p_in)
        emb = embed_rows(passes, model_dir, q_in, r_in, held_in, plain_dir=plain_dir, stored=known)
        per_query[name] = emb.queries @ emb.rows.T
        heldout_pred[name] = fit_heldout if reuse else emb.heldout[0] @ emb.heldout[1].T
        # influcoder's codes are what encode stored; a plain encoder's would be float16 of its own width
        # (a blended influcoder export is twice as wide as the plain encoder it started from).
        stored_bytes = (ctx.upstream.get("encode") or {}).get("bytes_per_row") if name == "influcoder" else None
        results[name] = {
            "heldout": _fidelity(heldout_pred[name], heldout_gt, seed),
            "ms_per_sample": emb.ms_per_row,
            "setup_s": emb.load_s + (setup_influcoder if name == "influcoder" else 0.0),
            "bytes_per_sample": float(stored_bytes or emb.dim * 2),
            "seconds": time.perf_counter() - t0,
            "precision": precision,
            "timed_rows": emb.timed_rows,
            "heldout_scores": "fit" if reuse else "embedded",
        }
        if emb.stored_check is not None:
            results[name]["stored_codes"] = emb.stored_check
        if name == "influcoder":  # a blended export scores (1 - b) distilled + b plain cosine (fit.blend)
            fit_record = (ctx.upstream.get("fit") or {}).get("fit") or {}
            results[name]["blend_weight"] = fit_record.get("blend_weight", 0.0)
            if fit_record.get("blend_gain") is not None:
                results[name]["blend_gain"] = fit_record["blend_gain"]
                results[name]["blend_gain_ci"] = fit_record.get("blend_gain_ci")
    if "gradient" in methods:
        t0 = time.perf_counter()
        gq, gr, teacher = _gradient_method(ctx, rows, queries, center)
        per_query["gradient"] = gq @ gr.T
        results["gradient"] = {
            "heldout": _fidelity(heldout_gt, heldout_gt, seed),
            **teacher,
            "setup_s": 0.0,
            "bytes_per_sample": float(job.sketch.proj_dim * 4),
            "seconds": time.perf_counter() - t0,
            "note": "the teacher itself: held-out fidelity is 1 by construction",
        }
    baselines: dict[str, BaselineScores] = {}
    if "bm25" in methods:
        baselines["bm25"] = bm25_scores(q_texts, row_texts)
        heldout_pred["bm25"] = bm25_scores(a_texts, p_texts).scores
        results["bm25"] = {"heldout": _fidelity(heldout_pred["bm25"], heldout_gt, seed)}
    if "random" in methods:
        baselines["random"] = random_scores(len(q_texts), len(row_texts), job.seed)
        heldout_pred["random"] = random_scores(len(a_ids), len(p_ids), job.seed + 1).scores
        results["random"] = {"heldout": _fidelity(heldout_pred["random"], heldout_gt, seed)}
    for name, b in baselines.items():
        per_query[name] = b.scores
        results[name].update(
            {
                "setup_s": b.setup_s,
                "ms_per_sample": 1000 * b.seconds / max(len(ids), 1),
                "bytes_per_sample": b.bytes_per_sample,
            }
        )

    curves = {}
    paired: dict[str, PairedSamples] = {}
    for name, scores in per_query.items():
        res = results[name]
        app, samples = _application_metrics(scores, labels, ids, job.eval.recall_k, seed)
        res.update(app)
        if samples is not None:
            paired[name] = samples
        if "gradient" in per_query and name != "gradient":
            res["corpus_vs_gradient"] = _fidelity(scores, per_query["gradient"], seed)
        if labels is not None and labels.sum() > 0:
            precision, recall, _ = metrics.pr_curve(labels, scores.mean(axis=0))
            curves[name] = {"precision": precision.round(5).tolist(), "recall": recall.round(5).tolist()}

    if "cascade" in methods:  # the teacher re-rank cascade: its own section at the end of this file
        _cascade_method(
            ctx,
            rows,
            queries,
            ids,
            labels,
            per_query,
            heldout_pred,
            heldout_gt,
            p_ids,
            results,
            curves,
            paired,
            center,
        )
    consistency = _check_against_score_stage(ctx, ids, per_query.get("influcoder"))
    if "gradient" in results and "influcoder" in results:
        ms_i, ms_g = results["influcoder"]["ms_per_sample"], results["gradient"]["ms_per_sample"]
        speed = {"influcoder_vs_gradient_ms_ratio": ms_g / ms_i if ms_i else None}
    else:
        speed = {}
    if "influcoder" in paired:  # paired: every method resampled the same queries and rows
        results["influcoder"]["vs"] = {
            name: _paired_vs(results["influcoder"], paired["influcoder"], results[name], samples)
            for name, samples in paired.items()
            if name != "influcoder"
        }
    if "influcoder" in heldout_pred:  # paired on the same resampled held-out anchors and pool rows
        vs = results["influcoder"].setdefault("vs", {})
        for name, pred in heldout_pred.items():
            if name != "influcoder":
                vs.setdefault(name, {})["heldout"] = _fidelity_difference(
                    heldout_pred["influcoder"], pred, heldout_gt, seed
                )
    out = {
        "methods": results,
        "verdict": verdict(results),
        "speed": speed,
        "rows": len(ids),
        "positives": int(labels.sum()) if labels is not None else None,
        "queries": len(q_texts),
        "heldout": {"anchors": len(a_ids), "pool": len(p_ids)},
        # fit.center_teacher: the teacher's cosines (gradient, cascade, held-out truth) were taken
        # between centred sketches, as fit's targets were.
        "teacher_centered": center is not None,
        "leakage": _leakage(ctx, rows, queries),
        "excluded_distillation_rows": excluded,
        "consistency_with_score_stage": consistency,
        "seed": job.seed,
    }
    storage.write_json_atomic(storage.join(ctx.out_dir, "metrics.json"), out)
    storage.write_json_atomic(storage.join(ctx.out_dir, "pr_curves.json"), curves)
    write_report(job, out, curves, ctx.out_dir, ctx.upstream)
    report = storage.join(job.run_dir, "eval", "report", "report.md")  # where it lands on commit
    ctx.record(
        rows={"corpus": len(ids), "queries": len(q_texts)},
        report=report,
        headline=f"report: {storage.redact(report)}\n" + _headline(out),
    )


def _check_against_score_stage(ctx: StageRun, ids: list[str], influ: np.ndarray | None) -> dict[str, Any]:
    """The eval's own influcoder scores must match what the score stage wrote for the same rows."""
    path = storage.join(ctx.upstream_dir("score"), "scores.parquet")
    if influ is None or not storage.exists(path):
        return {"checked": False}
    t = storage.read_table(path, columns=[ID, "score"])
    stored = dict(zip(t.column(ID).to_pylist(), t.column("score").to_pylist()))
    mine = influ.mean(axis=0)
    diffs = [abs(stored[i] - float(s)) for i, s in zip(ids, mine) if i in stored]
    return {"checked": True, "rows": len(diffs), "max_abs_diff": float(max(diffs)) if diffs else None}


def _ci(value: Any, ci: Any, spec: str) -> str:
    if value is None:
        return "  -  "
    return f"{value:{spec}}" + (f" [{ci[0]:{spec}}, {ci[1]:{spec}}]" if ci else "")


def _headline(out: dict[str, Any]) -> str:
    lines = [f"{'method':<27} {'AUPRC [95% CI]':<22} {'held-out agg. rho [95% CI]':<27} {'ms/sample':>9} {'bytes':>7}"]
    for name, r in out["methods"].items():
        h = r["heldout"]
        lines.append(
            f"{name:<27} {_ci(r.get('auprc'), r.get('auprc_ci'), '.3f'):<22} "
            f"{_ci(h['spearman_aggregated'], h.get('spearman_aggregated_ci'), '+.3f'):<27} "
            f"{r.get('ms_per_sample', float('nan')):>9.3f} {r.get('bytes_per_sample', 0):>7.0f}"
        )
    lines += verdict_text(out.get("verdict", {}))
    influ = out["methods"].get("influcoder") or {}
    if influ.get("blend_weight"):
        lead = blend_lead_text(influ.get("blend_gain"), influ.get("blend_gain_ci"))
        lines.append(
            f"influcoder's scores blend the distilled encoder with the plain one, weight {influ['blend_weight']:.2f} "
            f"for the plain one (chosen on fit's validation split{lead})."
        )
    lines += teacher_notes(out)
    ratio = out["speed"].get("influcoder_vs_gradient_ms_ratio")
    if ratio:
        lines.append(f"influcoder scores a sample {ratio:.0f}x faster than the gradient teacher.")
    excluded = (out.get("excluded_distillation_rows") or {}).get("rows")
    if excluded:
        lines.append(
            f"{excluded} corpus rows that entered distillation were left out of these metrics "
            f"(set `pool` to data outside the corpus to evaluate on every row)."
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- cascade (score.rerank_top)
#
# The teacher re-rank cascade on the same rows and queries. The ranking maths is pipeline/cascade.py,
# the functions the score stage ranks with (one source of truth):
# - AUPRC, AP, precision@n_pos and the PR curve use the aggregate ranking the score stage writes: the
#   influcoder top-K rows by mean score, re-ranked with the teacher's mean cosine over queries
#   (`score.rerank_by`: fused with the encoder's ranks, or the teacher alone).
# - Recall@k and MRR are per query: each query's own influcoder top-K re-ranked with that query's
#   teacher cosine (retrieve-then-rerank per query, the same `rerank_by`), the rest in that query's
#   encoder order. Ranking the aggregate block first for every query would put rows chosen for the
#   average query ahead of the query's own best rows; a per-query user re-ranks that query's candidates.
# - held-out fidelity: the same cascade on the held-out anchors x pool (teacher = ground truth), the
#   same fraction of the pool re-ranked.
# - cost: ms_per_sample = influcoder's + K/N x the teacher's measured ms per row (the aggregate
#   cascade's cost; the per-query variant needs the teacher on the union of the queries' top-K,
#   recorded as `teacher_rows_per_query_union`). Teacher sketches are computed, not stored: the
#   bytes per sample are influcoder's codes.
# - CIs: the cascade's order is held fixed while queries and rows are resampled (re-selecting the
#   block per replicate would need teacher scores for every row); the AUPRC replicates use the same
#   seed and shape as the other methods', so `vs` pairs them.

_AGGREGATE_KEYS = ("auprc", "auprc_ci", "average_precision", "precision@n_pos")


def _cascade_k(ctx: StageRun, n: int) -> int:
    """K for the evaluated rows: a fraction as configured; a count as the same fraction of the rows the
    score stage ranked (the eval rows may be a sample of the corpus)."""
    from pipeline import cascade

    top = ctx.job.score.rerank_top
    scored = ((ctx.upstream.get("score") or {}).get("rows") or {}).get("scored") or n
    if top < 1 or scored == n:
        return cascade.resolve_k(top, n)
    return cascade.resolve_k(min(top, scored) / scored, n) if top < scored else n


def _cascade_teacher(
    ctx: StageRun, rows: pa.Table, queries: pa.Table, need: np.ndarray, center: Optional[np.ndarray]
) -> tuple[np.ndarray, float]:
    """Teacher cosines [Q, N] for the `need` rows (NaN elsewhere and where rejected) when the gradient
    method did not run, of sketches centred by `center`, and the teacher's ms per row (accumulated
    across resumed runs)."""
    from pipeline import cascade

    shard_dir = storage.join(ctx.work_dir, "cascade_shards")
    row_recs = rows.to_pylist()
    sk, info = teacher_sketch_groups(
        ctx.job,
        {"queries": queries.to_pylist(), "rows": [row_recs[i] for i in need]},
        shard_dir,
        stage="eval",
        center=center,
        known=_score_stage_sketches(ctx),
    )
    (_, q_mat, q_ok), (_, r_mat, r_ok) = sk["queries"], sk["rows"]
    teach = np.full((queries.num_rows, rows.num_rows), np.nan)
    if len(need):
        teach[:, need] = cascade.teacher_scores(r_mat, r_ok, q_mat, q_ok)[0]
    return teach, _teacher_ms(ctx, shard_dir, info)


def _cascade_fidelity(agg: np.ndarray, per_q: np.ndarray, gt: np.ndarray, seed: int) -> dict[str, Any]:
    """Aggregated Spearman from the aggregate cascade ranking, per-anchor from the per-query one."""
    out = _fidelity(per_q, gt, seed)
    whole = _fidelity(np.broadcast_to(agg, gt.shape), gt, seed)  # its anchor mean is `agg` itself
    out.update({k: whole[k] for k in ("spearman_aggregated", "spearman_aggregated_ci")})
    return out


def _cascade_method(
    ctx: StageRun,
    rows: pa.Table,
    queries: pa.Table,
    ids: list[str],
    labels: np.ndarray | None,
    per_query: dict[str, np.ndarray],
    heldout_pred: dict[str, np.ndarray],
    heldout_gt: np.ndarray,
    pool_ids: list[str],
    results: dict[str, dict[str, Any]],
    curves: dict[str, Any],
    paired: dict[str, PairedSamples],
    center: Optional[np.ndarray],
) -> None:
    """Evaluate the cascade (see the section comment); fills results/curves/paired["cascade"].
    `center`: the teacher's center (fit.center_teacher) for the rows the teacher still has to score."""
    from pipeline import cascade

    job = ctx.job
    if job.score.rerank_top is None:
        log.info("eval: cascade not evaluated: score.rerank_top is not set")
        return
    t0 = time.perf_counter()
    seed, n = job.seed, len(ids)
    enc = per_query["influcoder"]
    k = _cascade_k(ctx, n)
    need = cascade.rows_needing_teacher(ids, enc.mean(axis=0), enc, k)
    if "gradient" in per_query:  # the teacher already scored every row: reuse it
        g = per_query["gradient"]
        # The gradient method gives rejected rows/queries a zero sketch, i.e. an all-zero column/row.
        teach, _ = cascade.mask_rejected(g, ~(g == 0).all(axis=0), ~(g == 0).all(axis=1))
        teacher_ms = results["gradient"]["ms_per_sample"]
    else:
        teach, teacher_ms = _cascade_teacher(ctx, rows, queries, need, center)
    q_ok = ~np.isnan(teach).all(axis=1)
    if not q_ok.any():
        raise InputDataError(
            f"eval: the teacher rejected every query in {storage.redact(job.score.queries.path)}; "
            f"raise teacher.max_len."
        )
    by = job.score.rerank_by
    agg = cascade.cascade_scores(ids, enc.mean(axis=0), teach[q_ok].mean(axis=0), k, by)
    per_q = cascade.per_query_cascade_scores(ids, enc, teach, k, by)

    res: dict[str, Any] = {}
    app_q, per_query_samples = _application_metrics(per_q, labels, ids, job.eval.recall_k, seed)
    app_a, aggregate_samples = _application_metrics(
        np.broadcast_to(agg, enc.shape), labels, ids, job.eval.recall_k, seed
    )
    res.update({key: v for key, v in app_q.items() if key not in _AGGREGATE_KEYS})
    res.update({key: app_a[key] for key in _AGGREGATE_KEYS if key in app_a})
    if aggregate_samples is not None and per_query_samples is not None:
        # AUPRC ranks the aggregate scores; Recall@k and MRR each query's own re-ranked list
        paired["cascade"] = PairedSamples(
            {**per_query_samples.replicates, "auprc": aggregate_samples.replicates["auprc"]}
        )
        precision, recall, _ = metrics.pr_curve(labels, agg)
        curves["cascade"] = {"precision": precision.round(5).tolist(), "recall": recall.round(5).tolist()}
    if "gradient" in per_query:
        res["corpus_vs_gradient"] = _cascade_fidelity(agg, per_q, per_query["gradient"], seed)
    p = heldout_gt.shape[1]
    k_h = cascade.resolve_k(k / n, p) if k < n else p
    hp = heldout_pred["influcoder"]
    h_agg = cascade.cascade_scores(pool_ids, hp.mean(axis=0), heldout_gt.mean(axis=0), k_h, by)
    h_per_q = cascade.per_query_cascade_scores(pool_ids, hp, heldout_gt, k_h, by)
    res["heldout"] = _cascade_fidelity(h_agg, h_per_q, heldout_gt, seed)
    influ = results["influcoder"]
    res.update(
        {
            "k": k,
            "rerank_by": by,
            "of_rows": n,
            "heldout_k": k_h,
            "teacher_rows_per_query_union": int(len(need)),
            "teacher_ms_per_row": teacher_ms,
            "ms_per_sample": influ["ms_per_sample"] + k / n * teacher_ms,
            "setup_s": influ["setup_s"],
            "bytes_per_sample": influ["bytes_per_sample"],
            "seconds": time.perf_counter() - t0,
            "consistency_with_score_stage": _cascade_consistency(ctx, ids, agg, k),
            "note": f"influcoder's top-K re-ranked with the teacher (rerank_by {by}; aggregate for AUPRC, "
            "per query for Recall@k/MRR)",
        }
    )
    results["cascade"] = res


def _cascade_consistency(ctx: StageRun, ids: list[str], agg: np.ndarray, k: int) -> dict[str, Any]:
    """When eval covers every scored row, its cascade block should be score/scores.parquet's block: both
    score the same stored codes, up to float rounding at the K boundary (and rows missing from the table,
    which eval embeds itself). The order inside the block can still differ: `fused` ranks rows by their
    encoder rank too, and a near-tie that the two computations break differently moves a row."""
    path = storage.join(ctx.upstream_dir("score"), "scores.parquet")
    if not storage.exists(path):
        return {"checked": False}
    t = storage.read_table(path)
    if "reranked" not in t.column_names:
        return {"checked": False, "reason": "the score stage ran without score.rerank_top"}
    if t.num_rows != len(ids):
        return {"checked": False, "reason": "eval rows are a sample of the scored rows"}
    mine = [ids[i] for i in np.argsort(-agg, kind="stable")[:k]]
    theirs = t.filter(t.column("reranked")).sort_by("rank").column(ID).to_pylist()
    return {
        "checked": True,
        "block_overlap": len(set(mine) & set(theirs)) / max(len(theirs), 1),
        "same_order": mine == theirs,
    }
