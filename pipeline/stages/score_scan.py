"""The score stage's pass over the codes: exact mean/max cosine per row, a top-k per query, sorted runs.

Two places can run it, with the same results (same scores, same ranks, same ties by id):
- **in process** (`scan_in_process`): this process streams the Lance table. Fastest on one machine
  for small and mid-sized tables: no task start-up, Lance's decode threads overlap the matmul.
- **on workers** (`scan_on_workers`): one Ray task per group of Lance fragments (about
  FRAGMENT_ROWS rows each) opens the table version itself, scores its rows, spills sorted runs
  under the stage's work dir (a URI on object storage) and returns only its partial top-k per query
  and the run paths. This process reads no codes: it merges the partial top-k lists and the runs.

Both read the same Lance batches (a fragment's row groups, capped by `score.batch_rows`; a batch
never spans two fragments), and that is what makes them equal bit for bit: a row's float32 cosine
can differ in its last bit with the shape of the GEMM it was computed in, and a one-ulp difference
would reorder ties. The workers' partial top-k lists merge exactly (`codes.TopK`: score, then id).

`choose_scan` picks one (`score.scan`): `auto` scans on workers when the cluster has more than one
node or the table holds at least WORKERS_MIN_ROWS rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.codes import MultiTopK, TopK, exact_scores
from pipeline.codestore import (
    CODE_SCALE,
    FRAGMENT_ROWS,
    codes_from_arrow,
    fragment_rows,
    iter_fragment_batches,
    open_dataset,
)
from pipeline.progress import Progress
from pipeline.ranking import RunSpiller
from pipeline.schema import CODE, ID, SCORE, SCORE_MAX

WORKERS_MIN_ROWS = 2_000_000  # `auto`: below this, on one node, the in-process scan is faster


@dataclass
class ScanResult:
    rows: int = 0
    code_bytes: int = 0
    batches: int = 0
    run_paths: list[str] = field(default_factory=list)
    topk: Optional[list[tuple[np.ndarray, np.ndarray]]] = None  # per query (ids, scores), best first
    where: str = "driver"
    tasks: int = 0


def scan_columns(code_dtype: str) -> list[str]:
    """What a scoring scan reads: ids and codes, plus the per-row scales of int8 codes."""
    return [ID, CODE, CODE_SCALE] if code_dtype == "int8" else [ID, CODE]


def score_batches(
    batches: Iterable[pa.RecordBatch],
    queries: np.ndarray,
    code_dtype: str,
    topk: Optional[MultiTopK],
    sink: Callable[[pa.Table], None],
) -> tuple[int, int, int]:
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


def choose_scan(requested: str, num_rows: int) -> str:
    """`driver` or `workers` for `score.scan` (see the module docstring)."""
    if requested != "auto":
        return requested
    import ray

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return "workers" if nodes > 1 or num_rows >= WORKERS_MIN_ROWS else "driver"


def _score_into_runs(
    batches: Iterable[pa.RecordBatch], queries: np.ndarray, code_dtype: str, top_k: Optional[int], run_dir: str
) -> ScanResult:
    """The pass itself, wherever it runs: scores spilled as sorted runs under `run_dir`, and the
    exact top-k per query (when `top_k` is given)."""
    topk = None if top_k is None else MultiTopK(len(queries), top_k)
    spiller = RunSpiller(run_dir)
    rows, nbytes, nbatches = score_batches(batches, queries, code_dtype, topk, spiller.add)
    spiller.flush()
    return ScanResult(rows, nbytes, nbatches, spiller.paths, None if topk is None else topk.results())


def scan_in_process(
    store, dataset, queries: np.ndarray, code_dtype: str, top_k: Optional[int], batch_rows: int, run_dir: str
) -> ScanResult:
    """Stream the table version `dataset` through this process (see the module docstring)."""
    batches = Progress("score: code rows", dataset.count_rows()).track(
        store.iter_batches(scan_columns(code_dtype), batch_rows, dataset=dataset)
    )
    return _score_into_runs(batches, queries, code_dtype, top_k, run_dir)


def fragment_groups(fragments: list[tuple[int, int]], target_rows: int = FRAGMENT_ROWS) -> list[list[int]]:
    """Consecutive fragment ids grouped into tasks of about `target_rows` rows (a large fragment
    alone; small ones together, so a table of many small fragments does not start a task each)."""
    groups: list[list[int]] = []
    rows = 0
    for fid, n in fragments:
        if not groups or rows + n > target_rows:
            groups.append([])
            rows = 0
        groups[-1].append(fid)
        rows += n
    return groups


def _scan_task(
    dataset_uri: str,
    version: int,
    fragment_ids: list[int],
    queries: np.ndarray,
    code_dtype: str,
    top_k: Optional[int],
    batch_rows: int,
    run_dir: str,
) -> dict[str, Any]:
    """Ray task (one CPU, so one torch thread): score some fragments of the table version, spilling
    sorted runs to `run_dir`; returns the counts, the run paths and the partial top-k."""
    import torch

    torch.set_num_threads(1)
    batches = iter_fragment_batches(
        open_dataset(dataset_uri, version), fragment_ids, scan_columns(code_dtype), batch_rows
    )
    res = _score_into_runs(batches, queries, code_dtype, top_k, run_dir)
    return {
        "rows": res.rows,
        "code_bytes": res.code_bytes,
        "batches": res.batches,
        "run_paths": res.run_paths,
        "topk": None if res.topk is None else [(list(i), s.tolist()) for i, s in res.topk],
    }


def scan_on_workers(
    dataset_uri: str,
    dataset,
    queries: np.ndarray,
    code_dtype: str,
    top_k: Optional[int],
    batch_rows: int,
    run_dir: str,
    task_rows: int = FRAGMENT_ROWS,
) -> ScanResult:
    """Score the table version `dataset` in Ray tasks, one per fragment group of about `task_rows`
    rows (see the module docstring)."""
    import ray

    from pipeline.stages.shared_teacher import actor_failure

    fragments = fragment_rows(dataset)
    groups = fragment_groups(fragments, task_rows)
    # A task asks for one CPU, so its Lance decode pool gets one thread: by default Lance sizes it to
    # every core of the node, and N tasks on a node would then run N x cores threads (measured with
    # bench_scan_scaling.py: one node's rate unchanged, two nodes 1.32x -> 1.43x of one at 2M rows).
    task = ray.remote(_scan_task).options(
        num_cpus=1, max_retries=2, runtime_env={"env_vars": {"LANCE_CPU_THREADS": "1", "LANCE_IO_THREADS": "4"}}
    )
    q_ref = ray.put(np.ascontiguousarray(queries, np.float32))
    pending = {
        task.remote(
            dataset_uri,
            dataset.version,
            g,
            q_ref,
            code_dtype,
            top_k,
            batch_rows,
            storage.join(run_dir, f"task-{i:05d}"),
        ): i
        for i, g in enumerate(groups)
    }
    progress = Progress("score: code rows", sum(n for _, n in fragments))
    done: dict[int, dict[str, Any]] = {}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            done[i] = ray.get(ready[0])
            progress.update(done[i]["rows"])
    except Exception as e:  # noqa: BLE001 - Ray wraps the task's error in its own types
        for ref in pending:
            ray.cancel(ref)
        raise actor_failure("score", e, [], kind="fragment") from e
    progress.close()
    out = ScanResult(where="workers", tasks=len(groups))
    merged = None if top_k is None else [TopK(top_k) for _ in range(len(queries))]
    for i in sorted(done):  # task order: the merge below is exact whatever the order
        r = done[i]
        out.rows += r["rows"]
        out.code_bytes += r["code_bytes"]
        out.batches += r["batches"]
        out.run_paths += r["run_paths"]
        if merged is not None:
            for heap, (ids, scores) in zip(merged, r["topk"]):
                heap.update(np.asarray(ids, dtype=object), np.asarray(scores, np.float32))
    if merged is not None:
        out.topk = [h.result() for h in merged]
    return out
