"""The eval stage: is the encoder as good as the gradients, and how much cheaper?

Every method scores the same corpus rows against the same queries:
- influcoder: the distilled encoder's cosine (the product; cross-checked against score/scores.parquet)
- gradient: the teacher's own sketch cosine (LESS-style upper reference; a backward pass per row)
- untrained_encoder: the same encoder before distillation (the cost-matched control)
- bm25 and random (seeded)
Metrics (pipeline.metrics, scipy/sklearn):
- application, when the corpus has labels: AUPRC of the mean-over-queries score (label 1 = row to
  find), Recall@k and MRR per query (relevant = label-1 rows)
- fidelity to the teacher: per-anchor and aggregated Spearman on the sketch stage's held-out eval
  split (eval anchors x eval pool), and on the corpus against the gradient method's ranking
- costs, measured in this run: setup_s, ms_per_sample after a warm-up, bytes_per_sample.
The report (report.md + plots) is written next to the metrics.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import corpus, metrics, sampling, storage
from pipeline.artifacts import StageRun
from pipeline.baselines import BaselineScores, bm25_scores, random_scores
from pipeline.config import JobConfig
from pipeline.errors import InputDataError
from pipeline.ray_runtime import ensure_ray, plan_actors
from pipeline.schema import ID, LABEL, PROMPT, RESPONSE, ROW, SKETCH, SOURCE, SPLIT, TEXT

log = logging.getLogger("influcoder")


def input_fingerprint(job: JobConfig) -> dict[str, Any]:
    return {"corpus": corpus.files_fingerprint(corpus.discover(job.corpus, "corpus")),
            "queries": corpus.files_fingerprint(corpus.discover(job.score.queries, "score.queries"))}


# --------------------------------------------------------------------------- inputs


def _eval_rows(job: JobConfig) -> pa.Table:
    """Good, de-duplicated corpus rows; a seeded sample of `eval.max_rows` when set."""
    files = corpus.discover(job.corpus, "corpus")
    ds = corpus.read_dataset(job.corpus, files)
    keeper = sampling.SmallestKeys(job.eval.max_rows) if job.eval.max_rows else None
    kept: list[dict] = []
    seen: set[str] = set()
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        good, _ = corpus.split_rejects(batch)
        for row in good.to_pylist():
            if row[ID] in seen:
                continue
            seen.add(row[ID])
            if keeper is not None:
                keeper.offer(sampling.order_key(job.seed, row[ID]), row[ID], row)
            else:
                kept.append(row)
    rows = keeper.sorted_rows() if keeper is not None else sorted(kept, key=lambda r: r[ID])
    return pa.Table.from_pylist(rows)


def _queries(job: JobConfig) -> pa.Table:
    q = job.score.queries
    table = corpus.read_local(q, corpus.discover(q, "score.queries"))
    good, _ = corpus.split_rejects(table)
    if good.num_rows == 0:
        raise InputDataError(f"score.queries: no usable query rows in {storage.redact(q.path)}.")
    return good


def _sketch_split(ctx: StageRun, role: str) -> tuple[list[str], list[str], np.ndarray]:
    t = pq.read_table(storage.local_path(storage.join(ctx.upstream_dir("sketch"), role)))
    t = t.filter(pa.compute.equal(t.column(SPLIT), "eval"))
    ids = t.column(ID).to_pylist()
    mat = np.asarray(t.column(SKETCH).combine_chunks().flatten(), dtype=np.float32).reshape(len(ids), -1)
    return ids, t.column(TEXT).to_pylist(), mat


# --------------------------------------------------------------------------- methods


def _embed_method(model_dir: str, job: JobConfig, pairs: list[tuple[list[str], list[str]]],
                  threads: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], float, int]:
    """Load one encoder and embed every (queries, rows) pair with it.

    Returns the embeddings per pair, ms per row of the first pair's rows (timed after a warm-up,
    model loading excluded), and the embedding dim.
    """
    import torch

    from pipeline.encoder import TextEncoder

    torch.set_num_threads(threads)
    enc = TextEncoder(model_dir, max_len=job.encoder.max_len, trust_remote_code=job.encoder.trust_remote_code)
    prefix = job.encoder.anchor_prefix
    enc.embed(["warm-up"] * 2, batch_size=2)  # first-call kernels and allocations are not per-row cost
    out, ms = [], float("nan")
    for i, (query_texts, row_texts) in enumerate(pairs):
        q = enc.embed([prefix + t for t in query_texts], batch_size=32)
        t0 = time.perf_counter()
        rows = enc.embed(row_texts, batch_size=32)
        if i == 0:
            ms = 1000 * (time.perf_counter() - t0) / max(len(row_texts), 1)
        out.append((q, rows))
    return out, ms, enc.dim


def _gradient_method(ctx: StageRun, rows: pa.Table, queries: pa.Table) -> tuple[np.ndarray, np.ndarray, float]:
    """Teacher sketches of the eval rows and queries (resumable shards in the work dir)."""
    from pipeline.stages.sketch import _sketch_shards

    job = ctx.job
    plan = plan_actors(job.sketch.use_gpu, job.sketch.num_actors, "sketch")
    shard_dir = storage.join(ctx.work_dir, "gradient_shards")
    storage.makedirs(shard_dir)
    per = job.sketch.rows_per_shard
    groups = {"queries": queries, "rows": rows}
    shards = []
    for role, table in groups.items():
        recs = [{ID: r[ID], SPLIT: "eval", SOURCE: r[SOURCE], ROW: r[ROW], TEXT: r[TEXT],
                 PROMPT: r[PROMPT], RESPONSE: r[RESPONSE]} for r in table.to_pylist()]
        shards += [(f"{role}-{i // per:05d}", recs[i:i + per]) for i in range(0, len(recs), per)]
    done = {p.rsplit("/", 1)[-1][: -len(".parquet")] for p in storage.list_files(shard_dir, ".parquet")}
    pending = [s for s in shards if s[0] not in done]
    _, compute_s = _sketch_shards(job, plan, pending, shard_dir)
    mats = {}
    for role in groups:
        parts = [pq.read_table(storage.local_path(storage.join(shard_dir, f"{name}.parquet")))
                 for name, _ in shards if name.startswith(role + "-")]
        t = pa.concat_tables(parts)
        sk = t.column(SKETCH)
        mat = np.zeros((t.num_rows, job.sketch.proj_dim), dtype=np.float32)
        valid = np.asarray(sk.is_valid())
        if valid.any():
            mat[valid] = np.asarray(sk.filter(pa.array(valid)).combine_chunks().flatten()).reshape(-1, job.sketch.proj_dim)
        mats[role] = mat  # rejected rows keep a zero sketch: score 0, never silently dropped
    n_done = sum(len(r) for _, r in pending)
    ms = 1000 * compute_s / n_done if n_done else float("nan")
    return mats["queries"], mats["rows"], ms


# --------------------------------------------------------------------------- metrics


def _application_metrics(per_query: np.ndarray, labels: np.ndarray | None, ids: list[str],
                         recall_k: list[int]) -> dict[str, Any]:
    if labels is None or labels.sum() == 0:
        return {}
    mean_scores = per_query.mean(axis=0)
    relevant = {ids[i] for i in np.flatnonzero(labels == 1)}
    order = np.argsort(-per_query, axis=1, kind="stable")
    ranked = [[ids[j] for j in row] for row in order]
    out = {"auprc": metrics.auprc(labels, mean_scores),
           "average_precision": metrics.average_precision(labels, mean_scores),
           "mrr": metrics.mrr(ranked, [relevant] * len(ranked))}
    for k in recall_k:
        out[f"recall@{k}"] = metrics.recall_at_k(ranked, [relevant] * len(ranked), k)
    n_pos = int(labels.sum())
    top = np.argsort(-mean_scores, kind="stable")[:n_pos]
    out["precision@n_pos"] = float(labels[top].mean())
    return out


def _fidelity(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    mean, std = metrics.spearman_per_anchor(pred, gt)
    return {"spearman_aggregated": metrics.spearman_aggregated(pred, gt), "spearman_per_anchor": mean,
            "spearman_per_anchor_std": std}


def _leakage(ctx: StageRun, rows: pa.Table, queries: pa.Table) -> dict[str, int]:
    """Overlap (ids and normalised texts) between evaluated rows/queries and distillation data."""
    distill_ids, distill_texts = set(), set()
    for role in ("anchors", "pool"):
        t = pq.read_table(storage.local_path(storage.join(ctx.upstream_dir("sketch"), role)), columns=[ID, TEXT])
        distill_ids.update(t.column(ID).to_pylist())
        distill_texts.update(s.strip().lower() for s in t.column(TEXT).to_pylist())
    out = {}
    for name, t in (("corpus", rows), ("queries", queries)):
        out[f"{name}_id_overlap"] = len(distill_ids & set(t.column(ID).to_pylist()))
        out[f"{name}_text_overlap"] = len(distill_texts & {s.strip().lower() for s in t.column(TEXT).to_pylist()})
    return out


# --------------------------------------------------------------------------- stage


def run(ctx: StageRun) -> None:
    from pipeline.models import resolve_encoder
    from pipeline.report import write_report

    job = ctx.job
    ensure_ray(job.ray)
    methods = job.eval.methods
    rows = _eval_rows(job)
    queries = _queries(job)
    ids = rows.column(ID).to_pylist()
    labels = None
    if job.corpus.label_column:
        # Rows without a label count as negatives (label 1 marks the rows to find).
        labels = pa.compute.fill_null(rows.column(LABEL), 0).to_numpy().astype(int)
    row_texts = rows.column(TEXT).to_pylist()
    q_texts = queries.column(TEXT).to_pylist()
    log.info("eval: %d corpus rows (%s positives), %d queries, methods %s", len(ids),
             int(labels.sum()) if labels is not None else "no", len(q_texts), methods)
    threads = max(1, os.cpu_count() or 1)
    fit_dir = storage.join(ctx.upstream_dir("fit"), "encoder")
    a_ids, a_texts, a_sk = _sketch_split(ctx, "anchors")
    p_ids, p_texts, p_sk = _sketch_split(ctx, "pool")
    heldout_gt = a_sk @ p_sk.T  # ground truth: the teacher's cosines on the held-out split

    results: dict[str, dict[str, Any]] = {}
    per_query: dict[str, np.ndarray] = {}
    setup_influcoder = float(ctx.upstream["sketch"].get("seconds", 0)) + float(ctx.upstream["fit"].get("seconds", 0))
    for name, model_dir in (("influcoder", fit_dir), ("untrained_encoder", resolve_encoder(job.encoder.model))):
        if name not in methods:
            continue
        t0 = time.perf_counter()
        ((q, r), (qa, pr)), ms, dim = _embed_method(model_dir, job, [(q_texts, row_texts), (a_texts, p_texts)],
                                                    threads)
        per_query[name] = q @ r.T
        code_bytes = (ctx.upstream.get("encode") or {}).get("bytes_per_row") or dim * 2
        results[name] = {"heldout": _fidelity(qa @ pr.T, heldout_gt), "ms_per_sample": ms,
                         "setup_s": setup_influcoder if name == "influcoder" else 0.0,
                         "bytes_per_sample": float(code_bytes), "seconds": time.perf_counter() - t0}
    if "gradient" in methods:
        t0 = time.perf_counter()
        gq, gr, ms = _gradient_method(ctx, rows, queries)
        per_query["gradient"] = gq @ gr.T
        results["gradient"] = {"heldout": _fidelity(heldout_gt, heldout_gt), "ms_per_sample": ms, "setup_s": 0.0,
                               "bytes_per_sample": float(job.sketch.proj_dim * 4),
                               "seconds": time.perf_counter() - t0,
                               "note": "the teacher itself: held-out fidelity is 1 by construction"}
    baselines: dict[str, BaselineScores] = {}
    if "bm25" in methods:
        baselines["bm25"] = bm25_scores(q_texts, row_texts)
        heldout_bm25 = bm25_scores(a_texts, p_texts).scores
        results["bm25"] = {"heldout": _fidelity(heldout_bm25, heldout_gt)}
    if "random" in methods:
        baselines["random"] = random_scores(len(q_texts), len(row_texts), job.seed)
        results["random"] = {"heldout": _fidelity(random_scores(len(a_ids), len(p_ids), job.seed + 1).scores, heldout_gt)}
    for name, b in baselines.items():
        per_query[name] = b.scores
        results[name].update({"setup_s": b.setup_s, "ms_per_sample": 1000 * b.seconds / max(len(ids), 1),
                              "bytes_per_sample": b.bytes_per_sample})

    curves = {}
    for name, scores in per_query.items():
        res = results[name]
        res.update(_application_metrics(scores, labels, ids, job.eval.recall_k))
        if "gradient" in per_query and name != "gradient":
            res["corpus_vs_gradient"] = _fidelity(scores, per_query["gradient"])
        if labels is not None and labels.sum() > 0:
            precision, recall, _ = metrics.pr_curve(labels, scores.mean(axis=0))
            curves[name] = {"precision": precision.round(5).tolist(), "recall": recall.round(5).tolist()}

    consistency = _check_against_score_stage(ctx, ids, per_query.get("influcoder"))
    if "gradient" in results and "influcoder" in results:
        ms_i, ms_g = results["influcoder"]["ms_per_sample"], results["gradient"]["ms_per_sample"]
        speed = {"influcoder_vs_gradient_ms_ratio": ms_g / ms_i if ms_i else None}
    else:
        speed = {}
    out = {
        "methods": results,
        "speed": speed,
        "rows": len(ids), "positives": int(labels.sum()) if labels is not None else None,
        "queries": len(q_texts), "heldout": {"anchors": len(a_ids), "pool": len(p_ids)},
        "leakage": _leakage(ctx, rows, queries),
        "consistency_with_score_stage": consistency,
        "seed": job.seed,
    }
    storage.write_json_atomic(storage.join(ctx.out_dir, "metrics.json"), out)
    storage.write_json_atomic(storage.join(ctx.out_dir, "pr_curves.json"), curves)
    write_report(job, out, curves, ctx.out_dir, ctx.upstream)
    report = storage.join(job.run_dir, "eval", "report", "report.md")  # where it lands on commit
    ctx.record(rows={"corpus": len(ids), "queries": len(q_texts)}, report=report,
               headline=f"report: {storage.redact(report)}\n" + _headline(out))


def _check_against_score_stage(ctx: StageRun, ids: list[str], influ: np.ndarray | None) -> dict[str, Any]:
    """The eval's own influcoder scores must match what the score stage wrote for the same rows."""
    path = storage.join(ctx.upstream_dir("score"), "scores.parquet")
    if influ is None or not storage.exists(path):
        return {"checked": False}
    t = pq.read_table(storage.local_path(path), columns=[ID, "score"])
    stored = dict(zip(t.column(ID).to_pylist(), t.column("score").to_pylist()))
    mine = influ.mean(axis=0)
    diffs = [abs(stored[i] - float(s)) for i, s in zip(ids, mine) if i in stored]
    return {"checked": True, "rows": len(diffs), "max_abs_diff": float(max(diffs)) if diffs else None}


def _headline(out: dict[str, Any]) -> str:
    lines = ["method              AUPRC   agg-rho(held-out)  ms/sample   bytes/sample"]
    for name, r in out["methods"].items():
        auprc = f"{r['auprc']:.3f}" if "auprc" in r else "  -  "
        lines.append(f"{name:<18} {auprc:>6}   {r['heldout']['spearman_aggregated']:>+8.3f}          "
                     f"{r.get('ms_per_sample', float('nan')):>9.3f}   {r.get('bytes_per_sample', 0):>10.0f}")
    ratio = out["speed"].get("influcoder_vs_gradient_ms_ratio")
    if ratio:
        lines.append(f"influcoder scores a sample {ratio:.0f}x faster than the gradient teacher.")
    return "\n".join(lines)
