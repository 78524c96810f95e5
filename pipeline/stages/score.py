"""The score stage: every corpus code against the queries, exactly, in bounded memory.

1. Queries (`score.queries`, small) are read in-process, get `encoder.anchor_prefix`, and are
   embedded in float32 by the same `CodeEncoder` actors as the corpus (same fitted encoder).
2. The driver streams the Lance table (pinned at the version the encode stage recorded) in Arrow
   batches (a Lance row group: 8,192 rows after encode's compaction, capped by `score.batch_rows`),
   decoded ahead by Lance's threads: per row the mean and max cosine over queries
   (codes.exact_scores), per query an exact streaming top-k (codes.MultiTopK) from the same matmul.
3. Scores are spilled as sorted runs and merged into global ranks (ranking.py), streamed into
   `scores.parquet` (one file, written row group by row group, whatever N), together with the
   curation selection `selected_ids.parquet`.

`score.ann` swaps step 2's top-k for the vector index (nprobes + refine_factor); without an
index (small or int8 tables) it falls back to exact top-k and says so in the manifest.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from typing import Any, Callable, Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import corpus, storage
from pipeline.codes import MultiTopK, exact_scores, ranking_order
from pipeline.codestore import CODE_SCALE, CodeStore, codes_from_arrow
from pipeline.config import JobConfig
from pipeline.errors import ConfigError, InputDataError
from pipeline.ranking import RunSpiller, merge_runs
from pipeline.schema import CODE, ID, QUERY_ID, RANK, SCORE, SCORE_MAX, SCORES, TOPK
from pipeline.stages.encode import encode_stream, fit_encoder_dir, split_output

log = logging.getLogger("influcoder")

SELECTED = pa.schema([pa.field(ID, pa.string()), pa.field(SCORE, pa.float32()), pa.field(RANK, pa.int64()),
                      pa.field("action", pa.string())])
ANN_QUERY_BATCH = 256


def input_fingerprint(job: JobConfig) -> dict[str, Any]:
    if job.score.queries is None:
        return {}
    return {"queries": corpus.files_fingerprint(corpus.discover(job.score.queries, "score.queries"))}


def _writer(path: str, schema: pa.Schema) -> pq.ParquetWriter:
    fs, p = storage.filesystem(path)
    return pq.ParquetWriter(p, schema, filesystem=fs)


def embed_queries(ctx, job: JobConfig, model_dir: str) -> tuple[np.ndarray, list[str]]:
    """float32 unit-norm query embeddings and their ids; bad query rows go to score/rejects.parquet."""
    import ray.data

    files = corpus.discover(job.score.queries, "score.queries")
    table = corpus.read_local(job.score.queries, files)
    out = list(encode_stream(job, ray.data.from_arrow(table), model_dir, "float32",
                             text_prefix=job.encoder.anchor_prefix, stage_key="encode"))
    good, rejects = split_output(pa.concat_tables(out)) if out else (None, None)
    if rejects is not None:
        ctx.write_rejects(rejects, table.num_rows, job.encode.max_reject_frac, "score: queries")
    if good is None or good.num_rows == 0:
        raise InputDataError("score.queries: no usable query rows (all empty or rejected); see score/rejects.parquet.")
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
    enc = ctx.upstream["encode"]
    store = CodeStore(job.lancedb_uri, job.encode.table)
    spec = store.check_spec()
    if spec.encoder_fingerprint != enc.get("encoder_fingerprint"):
        raise InputDataError(
            f"LanceDB table `{job.encode.table}` holds codes of encoder {spec.encoder_fingerprint}, but the "
            f"finished encode stage recorded {enc.get('encoder_fingerprint')}; rerun `influcoder encode JOB.yaml`."
        )
    model_dir = fit_encoder_dir(job)
    queries, query_ids = embed_queries(ctx, job, model_dir)
    if queries.shape[1] != spec.dim:
        raise InputDataError(f"queries embed to dim {queries.shape[1]}, codes have dim {spec.dim}.")

    version = (enc.get("lancedb") or {}).get("version") or store.version
    dataset = store.dataset().checkout_version(version)  # the snapshot the encode manifest describes
    n_total = dataset.count_rows()
    use_ann = cfg.ann and store.has_vector_index()
    topk = None if use_ann else MultiTopK(len(query_ids), cfg.top_k)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="influcoder-score-") as tmp:
        spiller = RunSpiller(tmp)
        batches = store.iter_batches(scan_columns(spec.code_dtype), cfg.batch_rows, dataset=dataset)
        scored, bytes_read, num_batches = score_batches(batches, queries, spec.code_dtype, topk, spiller.add)
        score_s = time.perf_counter() - t0  # the scan; sorting and merging the runs is rank_s
        spiller.flush()
        selection = _write_ranked(ctx, cfg, spiller.paths, scored)
    rank_s = time.perf_counter() - t0 - score_s

    t1 = time.perf_counter()
    topk_table = _ann_topk(store, queries, query_ids, cfg) if use_ann else _exact_topk(topk, query_ids)
    with _writer(storage.join(ctx.out_dir, "topk.parquet"), TOPK) as w:
        w.write_table(topk_table)
    topk_s = time.perf_counter() - t1  # exact top-k was taken during the scan; this is the write
    if scored != n_total:
        log.warning("score: scanned %d rows but the table version has %d", scored, n_total)
    ctx.record(
        rows={"scored": scored, "queries": len(query_ids), "topk": topk_table.num_rows},
        lancedb={"table": job.encode.table, "version": version, "code_dtype": spec.code_dtype,
                 "encoder_fingerprint": spec.encoder_fingerprint},
        topk={"k": cfg.top_k, "method": "ann" if use_ann else "exact",
              **({"ann_requested_without_index": True} if cfg.ann and not use_ann else {}),
              **({"nprobes": cfg.nprobes, "refine_factor": cfg.refine_factor} if use_ann else {})},
        selection=selection,
        timing={"score_s": round(score_s, 3), "rank_s": round(rank_s, 3), "topk_s": round(topk_s, 3),
                "rows_per_s": round(scored / score_s, 1) if score_s > 0 else None,
                "code_bytes_read": int(bytes_read), "scan_batches": num_batches,
                "gb_per_s": round(bytes_read / score_s / 1e9, 3) if score_s > 0 else None},
    )


def scan_columns(code_dtype: str) -> list[str]:
    """What a scoring scan reads: ids and codes, plus the per-row scales of int8 codes."""
    return [ID, CODE, CODE_SCALE] if code_dtype == "int8" else [ID, CODE]


def score_batches(batches: Iterable[pa.RecordBatch], queries: np.ndarray, code_dtype: str,
                  topk: Optional[MultiTopK], sink: Callable[[pa.Table], None]) -> tuple[int, int, int]:
    """Score a stream of (id, code[, code_scale]) batches (`scan_columns`) against the queries.

    Per batch, `sink` gets a table (id, score = mean cosine over queries, score_max) and `topk`
    (when given) sees every [rows, Q] block of the score matrix. Returns (rows, code bytes, batches).
    """
    rows = nbytes = num_batches = 0
    for batch in batches:
        ids = batch.column(0)
        codes = codes_from_arrow(batch.column(1), code_dtype)
        scales = batch.column(2).to_numpy() if code_dtype == "int8" else None
        # Arrow ids go to the top-k as is: only its few candidate rows become Python strings.
        on_block = None if topk is None else (lambda off, s: topk.update(ids.slice(off, s.shape[0]), s))
        mean, mx = exact_scores(queries, codes, scales, on_block=on_block)
        sink(pa.table({ID: ids, SCORE: pa.array(mean), SCORE_MAX: pa.array(mx)}))
        rows += batch.num_rows
        nbytes += codes.nbytes + (scales.nbytes if scales is not None else 0)
        num_batches += 1
    return rows, nbytes, num_batches


def _write_ranked(ctx, cfg, run_paths: list[str], n: int) -> dict[str, Any]:
    """Stream the merged ranking into scores.parquet and the curation selection into selected_ids.parquet."""
    select = cfg.select_top_frac is not None or cfg.select_threshold is not None
    top_n = math.ceil(cfg.select_top_frac * n) if cfg.select_top_frac is not None else None
    scores_w = _writer(storage.join(ctx.out_dir, "scores.parquet"), SCORES)
    sel_w = _writer(storage.join(ctx.out_dir, "selected_ids.parquet"), SELECTED) if select else None
    selected = 0
    try:
        for chunk in merge_runs(run_paths):
            chunk = chunk.select(SCORES.names).cast(SCORES)
            scores_w.write_table(chunk)
            if sel_w is None:
                continue
            # Both criteria given: a row must meet both (top fraction AND score >= threshold).
            mask = pa.array(np.ones(chunk.num_rows, bool))
            if top_n is not None:
                mask = pc.and_(mask, pc.less_equal(chunk.column(RANK), top_n))
            if cfg.select_threshold is not None:
                mask = pc.and_(mask, pc.greater_equal(chunk.column(SCORE), cfg.select_threshold))
            sel = chunk.filter(mask)
            if sel.num_rows:
                sel_w.write_table(pa.table({ID: sel.column(ID), SCORE: sel.column(SCORE), RANK: sel.column(RANK),
                                            "action": pa.array([cfg.select_action] * sel.num_rows)}, schema=SELECTED))
                selected += sel.num_rows
    finally:
        scores_w.close()
        if sel_w is not None:
            sel_w.close()
    if not select:
        return {"rows": 0, "reason": "neither score.select_top_frac nor score.select_threshold is set"}
    return {"rows": selected, "action": cfg.select_action, "top_frac": cfg.select_top_frac,
            "threshold": cfg.select_threshold}


def _exact_topk(topk: MultiTopK, query_ids: list[str]) -> pa.Table:
    qid, ids, scores, ranks = [], [], [], []
    for q, (top_ids, top_scores) in zip(query_ids, topk.results()):
        qid += [q] * len(top_ids)
        ids += list(top_ids)
        scores.append(top_scores)
        ranks.append(np.arange(1, len(top_ids) + 1))
    return pa.table({QUERY_ID: qid, ID: pa.array(ids, pa.string()),
                     SCORE: pa.array(np.concatenate(scores) if scores else [], pa.float32()),
                     RANK: pa.array(np.concatenate(ranks) if ranks else [], pa.int64())}, schema=TOPK)


def _ann_topk(store: CodeStore, queries: np.ndarray, query_ids: list[str], cfg) -> pa.Table:
    parts = []
    for start in range(0, len(query_ids), ANN_QUERY_BATCH):
        res = store.search(queries[start:start + ANN_QUERY_BATCH], cfg.top_k, exact=False,
                           nprobes=cfg.nprobes, refine_factor=cfg.refine_factor)
        qi = res.column("query_index").to_numpy() + start
        ids = res.column(ID).to_numpy(zero_copy_only=False)
        sc = res.column("score").to_numpy()
        for q in np.unique(qi):
            m = qi == q
            order = ranking_order(ids[m], sc[m])  # ties by id, as in exact top-k
            parts.append(pa.table({QUERY_ID: [query_ids[q]] * int(m.sum()), ID: pa.array(ids[m][order], pa.string()),
                                   SCORE: pa.array(sc[m][order], pa.float32()),
                                   RANK: pa.array(np.arange(1, int(m.sum()) + 1), pa.int64())}, schema=TOPK))
    return pa.concat_tables(parts) if parts else TOPK.empty_table()
