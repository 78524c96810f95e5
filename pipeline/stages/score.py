"""The score stage: every corpus code against the queries, exactly, in bounded memory.

1. Queries (`score.queries`, small) are read in-process, get `encoder.anchor_prefix`, and are
   embedded by the same `CodeEncoder` as the corpus (same fitted encoder; in this process up to
   `shared_encode.IN_PROCESS_MAX_ROWS` queries, else on its actors), in the compute precision the
   encode stage recorded for the codes (`precision.dtype`: float32 or bfloat16).
2. One pass over the Lance table (pinned at the version the encode stage recorded), in this
   process or in Ray tasks per fragment group (`score.scan`; score_scan.py): per row the mean and
   max cosine over queries (codes.exact_scores), per query an exact streaming top-k
   (codes.MultiTopK) from the same matmul, scores spilled as sorted runs.
3. The runs are merged into global ranks (ranking.py), streamed into `scores.parquet` (one file,
   written row group by row group, whatever N), together with the curation selection
   `selected_ids.parquet`; the workers' partial top-k lists are merged exactly.

`score.ann` swaps step 2's top-k for the vector index (nprobes + refine_factor); without an
index (small or int8 tables) it falls back to exact top-k and says so in the manifest.

Cascade (`score.rerank_top`): while the merged ranking streams out, its first K rows (the
encoder's top-K by mean score, what curation selects from) are held back; their prompt/response
are re-read from the corpus input (LanceDB holds ids and codes only), the teacher sketches them and
the queries (the sketch stage's actors via `shared_teacher.teacher_sketch_groups`, in resumable
shards under the work dir) and they are re-ordered with the teacher's mean cosine: by default fused
with the encoder's ranks, or by the teacher alone (`score.rerank_by`; pipeline/cascade.py, shared
with eval). The per-query `topk.parquet` stays the encoder's.

Fidelity gate: the manifest's `fidelity_gate` says whether the exported encoder's held-out
aggregated Spearman (fit/metrics.json) beats the plain starting encoder's; a failing gate is
logged as a warning (the run still completes: the user decides).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import cascade, corpus, storage
from pipeline.codes import ranking_order
from pipeline.codestore import CodeStore, codes_from_arrow
from pipeline.config import JobConfig
from pipeline.distill import center_sketches
from pipeline.errors import ConfigError, InputDataError
from pipeline.ranking import merge_runs, rows_for_fraction
from pipeline.schema import (
    CODE,
    ID,
    PROMPT,
    QUERY_ID,
    RANK,
    RERANKED,
    RESPONSE,
    ROW,
    SCORE,
    SCORE_MAX,
    SCORES,
    SCORES_CASCADE,
    SOURCE,
    TEACHER_SCORE,
    TEXT,
    TOPK,
)
from pipeline.stages.shared_encode import encode_small, encoded_codes, fit_encoder_path, split_output
from pipeline.stages.score_scan import choose_scan, scan_in_process, scan_on_workers
from pipeline.stages.shared_teacher import (
    KNOWN_SKETCHES_FILE,
    read_teacher_center,
    teacher_sketch_groups,
    write_known_sketches,
)

log = logging.getLogger("influcoder.score")

SELECTED = pa.schema(
    [
        pa.field(ID, pa.string()),
        pa.field(SCORE, pa.float32()),
        pa.field(RANK, pa.int64()),
        pa.field("action", pa.string()),
    ]
)
ANN_QUERY_BATCH = 256


def input_fingerprint(job: JobConfig) -> dict[str, Any]:
    if job.score.queries is None:
        return {}
    out = {"queries": corpus.files_fingerprint(corpus.discover(job.score.queries, "score.queries"))}
    if job.score.rerank_top is not None:  # the cascade re-reads corpus rows for the teacher
        out["corpus"] = corpus.files_fingerprint(corpus.discover(job.corpus, "corpus"))
    return out


def _writer(path: str, schema: pa.Schema) -> pq.ParquetWriter:
    fs, p = storage.filesystem(path)
    return pq.ParquetWriter(p, schema, filesystem=fs)


def embed_queries(ctx, job: JobConfig, model_dir: str, compute_dtype: str = "float32") -> tuple[np.ndarray, list[str]]:
    """float32 unit-norm query embeddings (computed in `compute_dtype`) and their ids; bad query rows
    go to score/rejects.parquet."""
    files = corpus.discover(job.score.queries, "score.queries")
    table = corpus.read_local(job.score.queries, files)
    out = encode_small(
        job,
        table,
        model_dir,
        "float32",
        text_prefix=job.encoder.anchor_prefix,
        stage="score",
        compute_dtype=compute_dtype,
    )
    good, rejects = split_output(out) if out.num_rows else (None, None)
    if rejects is not None:
        # The score stage has no reject limit of its own: its queries are held to the encode stage's.
        ctx.write_rejects(
            rejects, table.num_rows, job.encode.max_reject_frac, "score: queries", limit_key="encode.max_reject_frac"
        )
    if good is None or good.num_rows == 0:
        by_reason = (ctx.manifest.get("rejects") or {}).get("by_reason") or {}
        raise InputDataError(
            f"score.queries: no usable query rows in {storage.redact(job.score.queries.path)} "
            f"(rejected by reason: {by_reason or 'none; the files hold no rows'})."
        )
    # Ray Data does not keep row order: order queries by id so query_index -> id is deterministic.
    good = good.take(pc.sort_indices(good, [(ID, "ascending")]))
    return codes_from_arrow(good.column(CODE), "float32"), good.column(ID).to_pylist()


def run(ctx) -> None:
    job: JobConfig = ctx.job
    cfg = job.score
    if cfg.queries is None:
        raise ConfigError("the score stage needs `score.queries.path` (the queries to score the corpus against).")
    from pipeline.ray_runtime import ensure_ray

    ensure_ray(job.ray)  # before LanceDB starts its runtime threads: Ray forks helper processes
    gate = fidelity_gate(storage.join(ctx.upstream_dir("fit"), "metrics.json"))
    enc = ctx.upstream["encode"]
    store, spec, dataset = encoded_codes(job, enc)  # the snapshot the encode manifest describes
    model_dir = fit_encoder_path(job)  # the query-encoding actors open their node's copy
    # Queries in the codes' precision (a mismatch would skew scores silently); older encode
    # manifests without the record were made in float32.
    query_dtype = (enc.get("precision") or {}).get("dtype") or "float32"
    queries, query_ids = embed_queries(ctx, job, model_dir, query_dtype)
    if queries.shape[1] != spec.dim:
        raise InputDataError(f"queries embed to dim {queries.shape[1]}, codes have dim {spec.dim}.")

    n_total = dataset.count_rows()
    use_ann = cfg.ann and store.has_vector_index()
    top_k = None if use_ann else cfg.top_k
    where = choose_scan(cfg.scan, n_total)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="influcoder-score-") as tmp:
        if where == "workers":
            # Runs go where every node can write and this process can read: the stage's work dir.
            runs_dir = storage.join(ctx.work_dir, "runs")
            storage.delete_dir(runs_dir)  # a crashed attempt's runs
            scan = scan_on_workers(
                store.dataset_uri, dataset, queries, spec.code_dtype, top_k, cfg.batch_rows, runs_dir
            )
        else:
            scan = scan_in_process(store, dataset, queries, spec.code_dtype, top_k, cfg.batch_rows, tmp)
        scored = scan.rows
        score_s = time.perf_counter() - t0  # the scan; sorting and merging the runs is rank_s
        chunks, schema, cascade_rec = merge_runs(scan.run_paths), SCORES, None
        if cfg.rerank_top is not None:
            chunks, cascade_rec = _cascade(ctx, chunks, scored, query_ids)
            schema = SCORES_CASCADE
        selection = _write_ranked(ctx, cfg, chunks, scored, schema)
    teacher_s = cascade_rec["teacher_s"] if cascade_rec else 0.0
    rank_s = time.perf_counter() - t0 - score_s - teacher_s

    t1 = time.perf_counter()
    topk_table = _ann_topk(store, queries, query_ids, cfg) if use_ann else _exact_topk(scan.topk, query_ids)
    with _writer(storage.join(ctx.out_dir, "topk.parquet"), TOPK) as w:
        w.write_table(topk_table)
    topk_s = time.perf_counter() - t1  # exact top-k was taken during the scan; this is the write
    if scored != n_total:
        log.warning("score: scanned %d rows but the table version has %d", scored, n_total)
    ctx.record(
        rows={"scored": scored, "queries": len(query_ids), "topk": topk_table.num_rows},
        lancedb={
            "table": job.encode.table,
            "version": dataset.version,
            "code_dtype": spec.code_dtype,
            "encoder_fingerprint": spec.encoder_fingerprint,
        },
        topk={
            "k": cfg.top_k,
            "method": "ann" if use_ann else "exact",
            **({"ann_requested_without_index": True} if cfg.ann and not use_ann else {}),
            **({"nprobes": cfg.nprobes, "refine_factor": cfg.refine_factor} if use_ann else {}),
        },
        selection=selection,
        scan={"where": scan.where, "requested": cfg.scan, "tasks": scan.tasks, "runs": len(scan.run_paths)},
        fidelity_gate=gate,
        query_precision=query_dtype,
        **({"cascade": cascade_rec} if cascade_rec else {}),
        timing={
            "score_s": round(score_s, 3),
            "rank_s": round(rank_s, 3),
            "topk_s": round(topk_s, 3),
            "rows_per_s": round(scored / score_s, 1) if score_s > 0 else None,
            "code_bytes_read": int(scan.code_bytes),
            "scan_batches": scan.batches,
            "gb_per_s": round(scan.code_bytes / score_s / 1e9, 3) if score_s > 0 else None,
        },
    )


def _write_ranked(ctx, cfg, chunks: Iterable[pa.Table], n: int, schema: pa.Schema = SCORES) -> dict[str, Any]:
    """Stream the ranked chunks (rank order) into scores.parquet and the curation selection into
    selected_ids.parquet; the selection reads `rank`, so it follows the cascade's ranks when it ran."""
    select = cfg.select_top_frac is not None or cfg.select_threshold is not None
    top_n = rows_for_fraction(cfg.select_top_frac, n) if cfg.select_top_frac is not None else None
    scores_w = _writer(storage.join(ctx.out_dir, "scores.parquet"), schema)
    sel_w = _writer(storage.join(ctx.out_dir, "selected_ids.parquet"), SELECTED) if select else None
    selected = 0
    try:
        for chunk in chunks:
            chunk = chunk.select(schema.names).cast(schema)
            scores_w.write_table(chunk)
            if sel_w is None:
                continue
            # Both criteria given: a row must meet both (top fraction AND score >= threshold).
            mask = pa.array(np.ones(chunk.num_rows, bool))
            if top_n is not None:
                mask = pc.and_(mask, pc.less_equal(chunk.column(RANK), top_n))
            if cfg.select_threshold is not None:
                # `score` is the encoder's cosine also under the cascade (the teacher's is on another scale).
                mask = pc.and_(mask, pc.greater_equal(chunk.column(SCORE), cfg.select_threshold))
            sel = chunk.filter(mask)
            if sel.num_rows:
                sel_w.write_table(
                    pa.table(
                        {
                            ID: sel.column(ID),
                            SCORE: sel.column(SCORE),
                            RANK: sel.column(RANK),
                            "action": pa.array([cfg.select_action] * sel.num_rows),
                        },
                        schema=SELECTED,
                    )
                )
                selected += sel.num_rows
    finally:
        scores_w.close()
        if sel_w is not None:
            sel_w.close()
    if not select:
        return {"rows": 0, "reason": "neither score.select_top_frac nor score.select_threshold is set"}
    return {
        "rows": selected,
        "action": cfg.select_action,
        "top_frac": cfg.select_top_frac,
        "threshold": cfg.select_threshold,
    }


def _exact_topk(results: list[tuple[np.ndarray, np.ndarray]], query_ids: list[str]) -> pa.Table:
    qid, ids, scores, ranks = [], [], [], []
    for q, (top_ids, top_scores) in zip(query_ids, results):
        qid += [q] * len(top_ids)
        ids += list(top_ids)
        scores.append(top_scores)
        ranks.append(np.arange(1, len(top_ids) + 1))
    return pa.table(
        {
            QUERY_ID: qid,
            ID: pa.array(ids, pa.string()),
            SCORE: pa.array(np.concatenate(scores) if scores else [], pa.float32()),
            RANK: pa.array(np.concatenate(ranks) if ranks else [], pa.int64()),
        },
        schema=TOPK,
    )


def _ann_topk(store: CodeStore, queries: np.ndarray, query_ids: list[str], cfg) -> pa.Table:
    parts = []
    for start in range(0, len(query_ids), ANN_QUERY_BATCH):
        res = store.search(
            queries[start : start + ANN_QUERY_BATCH],
            cfg.top_k,
            exact=False,
            nprobes=cfg.nprobes,
            refine_factor=cfg.refine_factor,
        )
        qi = res.column("query_index").to_numpy() + start
        ids = res.column(ID).to_numpy(zero_copy_only=False)
        sc = res.column("score").to_numpy()
        for q in np.unique(qi):
            m = qi == q
            order = ranking_order(ids[m], sc[m])  # ties by id, as in exact top-k
            parts.append(
                pa.table(
                    {
                        QUERY_ID: [query_ids[q]] * int(m.sum()),
                        ID: pa.array(ids[m][order], pa.string()),
                        SCORE: pa.array(sc[m][order], pa.float32()),
                        RANK: pa.array(np.arange(1, int(m.sum()) + 1), pa.int64()),
                    },
                    schema=TOPK,
                )
            )
    return pa.concat_tables(parts) if parts else TOPK.empty_table()


# --------------------------------------------------------------------------- fidelity gate


def fidelity_gate(fit_metrics_path: str) -> dict[str, Any]:
    """Does the exported encoder's held-out aggregated Spearman beat the plain starting encoder's?

    Reads fit/metrics.json: `exported` (the encoder that was exported) against `untrained`; older
    artifacts without `exported` use the selected epoch's entry of `epochs` (epoch 0 = untrained).
    `passed` is None when the figures are missing (e.g. a fit stage that wrote no metrics).
    """
    if not storage.exists(fit_metrics_path):
        log.info("score: no %s; fidelity gate not checked", storage.redact(fit_metrics_path))
        return {"passed": None, "reason": "fit/metrics.json not found"}
    m = storage.read_json(fit_metrics_path)
    untrained = (m.get("untrained") or {}).get("spearman_aggregated")
    source = "exported"
    exported = (m.get("exported") or {}).get("spearman_aggregated")
    if exported is None:
        sel = m.get("selected_epoch")
        entry = (
            m.get("untrained") if sel == 0 else next((e for e in m.get("epochs") or [] if e.get("epoch") == sel), None)
        )
        exported = (entry or {}).get("spearman_aggregated")
        source = f"epochs[epoch={sel}]"
    ok = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (exported, untrained))
    if not ok:
        log.warning(
            "score: fit/metrics.json has no finite held-out spearman_aggregated for the exported (%r) "
            "or the untrained (%r) encoder; fidelity gate not checked",
            exported,
            untrained,
        )
        return {
            "passed": None,
            "exported": exported,
            "untrained": untrained,
            "source": source,
            "reason": "missing or non-finite spearman_aggregated in fit/metrics.json",
        }
    # "Clears" is strict: an exported encoder only as faithful as where it started adds nothing.
    passed = bool(exported > untrained)
    if not passed:
        log.warning(
            "score: FIDELITY GATE: the fitted encoder's held-out aggregated Spearman %+.3f does not clear "
            "the plain starting encoder's %+.3f (fit/metrics.json); its ranking is likely no more faithful "
            "to the teacher than the encoder before distillation. Consider score.rerank_top or refitting.",
            exported,
            untrained,
        )
    return {"passed": passed, "exported": float(exported), "untrained": float(untrained), "source": source}


# --------------------------------------------------------------------------- cascade


def _cascade(
    ctx, chunks: Iterator[pa.Table], n: int, query_ids: list[str]
) -> tuple[Iterator[pa.Table], dict[str, Any]]:
    """Hold back the first K rows of the ranked stream, re-rank them with the teacher, and return the
    stream with the re-ranked block first (rows past K pass through unchanged) plus the manifest record."""
    job: JobConfig = ctx.job
    k = cascade.resolve_k(job.score.rerank_top, n)
    if k == 0:  # an empty table: nothing to re-rank
        return (_not_reranked(c) for c in chunks), {
            "rerank_top": job.score.rerank_top,
            "rerank_by": job.score.rerank_by,
            "k": 0,
            "rows": 0,
            "of_rows": n,
            "teacher_s": 0.0,
        }
    held: list[pa.Table] = []
    got = 0
    rest_head: Optional[pa.Table] = None
    for chunk in chunks:  # merge_runs pauses between chunks: the rest is merged after the teacher
        need = k - got
        if chunk.num_rows <= need:
            held.append(chunk)
            got += chunk.num_rows
        else:
            held.append(chunk.slice(0, need))
            rest_head = chunk.slice(need)
            got = k
        if got >= k:
            break
    block = pa.concat_tables(held) if held else SCORES.empty_table()
    block_ids = block.column(ID).to_pylist()

    t0 = time.perf_counter()
    rows = _corpus_records(job, block_ids)
    missing = [i for i in block_ids if i not in rows]
    if missing:
        raise InputDataError(
            f"score.rerank_top: {len(missing)} of the {k} rows to re-rank are not in the corpus input "
            f"{storage.redact(job.corpus.path)} (first: {missing[:3]}); the corpus changed since the encode stage. "
            f"Rerun `influcoder encode JOB.yaml` (or `influcoder run JOB.yaml`)."
        )
    queries = _query_records(job, query_ids)
    shard_dir = storage.join(ctx.work_dir, "cascade_shards")
    center = read_teacher_center(job)
    groups = {"queries": queries, "rows": [rows[i] for i in block_ids]}
    sk, info = teacher_sketch_groups(job, groups, shard_dir, stage="score")
    # Kept raw for eval, which runs the same teacher on the same rows and queries (centring follows).
    kept = write_known_sketches(job, sk, groups, storage.join(ctx.out_dir, KNOWN_SKETCHES_FILE))
    (_, q_mat, q_ok), (_, r_mat, r_ok) = sk["queries"], sk["rows"]
    q_mat, r_mat = center_sketches(q_mat, center), center_sketches(r_mat, center)
    if not q_ok.any():
        raise InputDataError(
            f"score.rerank_top: the teacher rejected every query in {storage.redact(job.score.queries.path)} "
            f"(no response tokens within teacher.max_len={job.teacher.max_len}); raise teacher.max_len."
        )
    _, teacher_mean = cascade.teacher_scores(r_mat, r_ok, q_mat, q_ok)
    perm = cascade.rerank(block_ids, teacher_mean, job.score.rerank_by)
    teacher_s = time.perf_counter() - t0

    t = teacher_mean[perm]
    reranked = pa.table(
        {
            ID: block.column(ID).take(pa.array(perm)),
            SCORE: block.column(SCORE).take(pa.array(perm)),
            SCORE_MAX: block.column(SCORE_MAX).take(pa.array(perm)),
            RANK: pa.array(np.arange(1, len(perm) + 1), pa.int64()),
            TEACHER_SCORE: pa.array(t.astype(np.float32), pa.float32(), mask=np.isnan(t)),
            RERANKED: pa.array(np.ones(len(perm), bool)),
        }
    )

    def stream() -> Iterator[pa.Table]:
        yield reranked
        if rest_head is not None:
            yield _not_reranked(rest_head)
        for chunk in chunks:  # the same merge, resumed where the block ended
            yield _not_reranked(chunk)

    moved = int(np.sum(perm != np.arange(len(perm))))
    record = {
        "rerank_top": job.score.rerank_top,
        "rerank_by": job.score.rerank_by,
        "k": k,
        "rows": len(block_ids),
        "of_rows": n,
        "teacher_rejected_rows": int((~r_ok).sum()),
        "teacher_queries": int(q_ok.sum()),
        "teacher_rejected_queries": int((~q_ok).sum()),
        "rows_moved": moved,
        "teacher_centered": center is not None,  # fit.center_teacher: cosines of centred sketches
        "teacher_sketches_kept": kept,  # score/teacher_sketches.parquet, for eval
        "teacher_s": round(teacher_s, 3),
        "teacher_compute_s": round(info["compute_s"], 3),
        "teacher_ms_per_row": round(1000 * info["compute_s"] / info["computed_rows"], 3)
        if info["computed_rows"]
        else None,
        "shards": {"total": info["shards"], "resumed": info["resumed_shards"]},
    }
    log.info(
        "score: cascade re-ranked the top %d of %d rows with the teacher in %.1f s (%d moved, %d rejected "
        "by the teacher)",
        k,
        n,
        teacher_s,
        moved,
        record["teacher_rejected_rows"],
    )
    return stream(), record


def _not_reranked(chunk: pa.Table) -> pa.Table:
    return chunk.append_column(TEACHER_SCORE, pa.nulls(chunk.num_rows, pa.float32())).append_column(
        RERANKED, pa.array(np.zeros(chunk.num_rows, bool))
    )


def _corpus_records(job: JobConfig, ids: list[str]) -> dict[str, dict[str, Any]]:
    """Canonical rows (id, source, row, text, prompt, response) of the given ids, read from the corpus
    input. The filter runs inside the Ray read tasks, so only the wanted rows reach the driver. A
    duplicated id resolves to its first occurrence in file order, as the sketch stage does."""
    wanted = pa.array(sorted(set(ids)), pa.string())
    cols = [ID, SOURCE, ROW, TEXT, PROMPT, RESPONSE]

    def keep(batch: pa.Table) -> pa.Table:
        good, _ = corpus.split_rejects(batch)
        return good.filter(pc.is_in(good.column(ID), value_set=wanted)).select(cols)

    ds = corpus.read_dataset(job.corpus, corpus.discover(job.corpus, "corpus"))
    ds = ds.map_batches(keep, batch_format="pyarrow", batch_size=None, num_cpus=0.5)
    found: dict[str, dict[str, Any]] = {}
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for r in batch.to_pylist():
            prev = found.get(r[ID])
            if prev is None or (r[SOURCE], r[ROW]) < (prev[SOURCE], prev[ROW]):
                found[r[ID]] = r
    return found


def _query_records(job: JobConfig, query_ids: list[str]) -> list[dict[str, Any]]:
    """The queries the encoder scored (same ids, same order), with the teacher's prompt/response."""
    table = corpus.read_local(job.score.queries, corpus.discover(job.score.queries, "score.queries"))
    good, _ = corpus.split_rejects(table)
    by_id: dict[str, dict[str, Any]] = {}
    for r in good.to_pylist():
        by_id.setdefault(r[ID], r)
    return [by_id[q] for q in query_ids]
