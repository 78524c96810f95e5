"""Benchmark: the encode stage's write path at scale, and where the score pass runs (issue 11).

    python bench/bench_code_writes.py                          # 100k and 1M rows
    python bench/bench_code_writes.py --sizes 100000,10000000  # the issue's 10M run (~8 GB of codes)

Precomputed codes stand in for the encoder (a fixed block of random unit float16 codes, repeated
under distinct ids): the encoder's cost does not depend on the table size, the write path's should
not either. Each size runs the stage's own pieces on a fresh table: Ray Data tasks shape batches
like the encoder actors' output, `encode.write_fragment_batch` writes them as Lance fragments where
they are, and this process commits each wave (`encode.WAVE_ROWS` rows) with one
`CodeStore.commit_fragments`, as the stage does. Printed per size, side by side:
- seconds per 1M rows, and the ratio to the smallest size (target <= 1.1x from 100k to 10M);
- this process's CPU-seconds and the bytes it received, per 1M rows (what the driver still does);
- the old path for comparison (the driver receiving every code and upserting 8,192-row batches
  with LanceDB's `merge_insert`, as encode did before), at sizes up to `--old-max`.
Then the score pass over the largest table, in the driver and on workers (`score.scan`), 16
queries, top-10: rows/s of each (one machine must not get slower).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from pipeline import corpus  # noqa: E402
from pipeline.codestore import CODE_SCALE, CodeSpec, CodeStore, code_array  # noqa: E402
from pipeline.schema import CODE, ID, ROW, SOURCE  # noqa: E402
from pipeline.stages import encode  # noqa: E402
from pipeline.stages.shared_encode import TRUNCATED  # noqa: E402

DIM = 384
BLOCK = 8192  # rows per generated batch (what one encoder actor call returns, roughly)
SPEC = CodeSpec("bench-precomputed-codes", DIM, "float16")


def code_block(seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((BLOCK, DIM)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def encoder_output(batch: dict, codes: np.ndarray) -> pa.Table:
    """Ray Data task: rows `id` of a range dataset -> the encoder actors' output schema."""
    start = np.asarray(batch["id"])
    n = len(start)
    reps = codes[np.arange(n) % BLOCK]
    return pa.table(
        {
            ID: pa.array([f"row-{i:09d}" for i in start]),
            CODE: code_array(reps),
            CODE_SCALE: pa.array(np.ones(n, np.float32)),
            SOURCE: pa.array([f"file-{int(i) // 1_000_000:04d}.parquet" for i in start]),
            ROW: pa.array(start.astype(np.int64)),
            TRUNCATED: pa.array(np.zeros(n, bool)),
            corpus.REJECT_REASON: pa.nulls(n, pa.string()),
        }
    )


def new_store(root: str) -> CodeStore:
    store = CodeStore(os.path.join(root, "lancedb"), "codes")
    store.prepare(SPEC)
    return store


def write_path(root: str, n: int, codes: np.ndarray) -> dict:
    """The stage's write path for n rows: worker-written fragments, one commit per wave."""
    import ray.data

    store = new_store(root)
    cpu0, t0 = time.process_time(), time.perf_counter()
    received = commits = fragments = 0
    for start in range(0, n, encode.WAVE_ROWS):
        rows = min(encode.WAVE_ROWS, n - start)
        ds = (
            ray.data.range(rows, override_num_blocks=max(1, rows // BLOCK))
            .map_batches(lambda b, s=start: {"id": b["id"] + s}, batch_size=None)
            .map_batches(encoder_output, fn_kwargs={"codes": codes}, batch_size=BLOCK, batch_format="numpy")
            .map_batches(
                encode.write_fragment_batch,
                fn_kwargs={"dataset_uri": store.dataset_uri, "spec_json": SPEC.to_json(), "stamp": "bench"},
                batch_size=encode.FRAGMENT_ROWS,
                batch_format="pyarrow",
                num_cpus=encode.WRITER_CPUS,
            )
        )
        wave: list[str] = []
        for summary in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            received += summary.nbytes
            for r in summary.to_pylist():
                wave += json.loads(r["fragments"])
        store.commit_fragments(wave)
        commits, fragments = commits + 1, fragments + len(wave)
    store.optimize()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert store.count_rows() == n, (store.count_rows(), n)
    return {
        **_costs(n, wall, cpu, received),
        "commits": commits,
        "fragments": len(store.dataset().get_fragments()),
        "written_fragments": fragments,
    }


def _costs(n: int, wall: float, cpu: float, received: int) -> dict:
    return {
        "rows": n,
        "s": wall,
        "s_per_1m": wall / n * 1e6,
        "driver_cpu_s_per_1m": cpu / n * 1e6,
        "driver_bytes_per_1m": received / n * 1e6,
    }


def old_path(root: str, n: int, codes: np.ndarray) -> dict:
    """Before: every code reaches the driver, which upserts 8,192-row batches with merge_insert
    (with the id BTree the stage built from 100k rows)."""
    from lancedb.index import BTree

    store = new_store(root)
    cpu0, t0 = time.process_time(), time.perf_counter()
    received = 0
    for start in range(0, n, BLOCK):
        rows = encoder_output({"id": np.arange(start, min(n, start + BLOCK))}, codes)
        received += rows.nbytes
        out = rows.select([ID, CODE, SOURCE, ROW]).append_column(
            "encoder_fingerprint", pa.array([SPEC.encoder_fingerprint] * rows.num_rows)
        )
        out = out.append_column("code_dtype", pa.array(["float16"] * rows.num_rows))
        out = out.append_column(CODE_SCALE, rows.column(CODE_SCALE))
        out = out.append_column("encoded_utc", pa.array(["bench"] * rows.num_rows))
        tbl = store.table
        out = out.select(tbl.schema.names).cast(tbl.schema)
        tbl.merge_insert(ID).when_matched_update_all().when_not_matched_insert_all().execute(out)
        if start + BLOCK >= 100_000 and not any(ID in ix.columns for ix in tbl.list_indices()):
            tbl.create_index(ID, config=BTree())
    return _costs(n, time.perf_counter() - t0, time.process_time() - cpu0, received)


def scan_placement(root: str, queries: int = 16) -> dict:
    """The score pass over the table at `root`, in the driver and on workers."""
    from pipeline.stages.score_scan import scan_in_process, scan_on_workers

    store = CodeStore(os.path.join(root, "lancedb"), "codes")
    ds = store.dataset()
    q = np.random.default_rng(1).standard_normal((queries, DIM)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    out = {}
    for where in ("driver", "workers"):
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            t0 = time.perf_counter()
            if where == "driver":
                res = scan_in_process(store, ds, q, "float16", 10, 65536, tmp)
            else:
                res = scan_on_workers(store.dataset_uri, ds, q, "float16", 10, 65536, tmp)
            s = time.perf_counter() - t0
        out[where] = {"rows": res.rows, "s": s, "rows_per_s": res.rows / s, "tasks": res.tasks}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100000,1000000", help="table sizes in rows (smallest first)")
    ap.add_argument("--old-max", type=int, default=1_000_000, help="largest size for the old merge_insert path")
    ap.add_argument("--dir", default=None, help="scratch dir (default: a temp dir; needs ~800 MB per 1M rows)")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "code_writes.json"))
    args = ap.parse_args()

    from pipeline.config import RayConfig
    from pipeline.ray_runtime import ensure_ray

    ensure_ray(RayConfig(include_dashboard=False))
    sizes = [int(s) for s in args.sizes.split(",")]
    codes = code_block()
    results: dict = {"machine": f"{os.cpu_count()} CPUs", "dim": DIM, "code_dtype": "float16", "new": [], "old": []}
    scratch = tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-code-writes-")
    for n in sizes:
        root = os.path.join(scratch.name, f"new-{n}")
        r = write_path(root, n, codes)
        results["new"].append(r)
        print(
            f"workers write: {n:>11,} rows {r['s']:8.1f} s  {r['s_per_1m']:7.1f} s/1M rows  driver "
            f"{r['driver_cpu_s_per_1m']:6.2f} CPU-s/1M, {r['driver_bytes_per_1m'] / 1e3:8.1f} KB/1M received, "
            f"{r['fragments']} fragments",
            flush=True,
        )
        if n != sizes[-1]:
            import shutil

            shutil.rmtree(root)
        if n <= args.old_max:
            old_root = os.path.join(scratch.name, f"old-{n}")
            o = old_path(old_root, n, codes)
            results["old"].append(o)
            print(
                f"driver merge_insert (before): {n:>11,} rows {o['s']:8.1f} s  {o['s_per_1m']:7.1f} s/1M rows  "
                f"driver {o['driver_cpu_s_per_1m']:6.2f} CPU-s/1M, {o['driver_bytes_per_1m'] / 1e6:8.1f} MB/1M "
                "received",
                flush=True,
            )
            import shutil

            shutil.rmtree(old_root)
    base = results["new"][0]["s_per_1m"]
    # The smallest size pays the pipeline's fixed start-up (~5-8 s here) on few rows, which flatters
    # the ratio; the marginal cost between consecutive sizes shows whether rows get dearer as the
    # table grows (what merge_insert did).
    print("\ncost per row vs the smallest size (target <= 1.1x at 10M vs 100k), and marginal cost:")
    prev = None
    for r in results["new"]:
        r["cost_ratio"] = r["s_per_1m"] / base
        if prev is not None:
            r["marginal_s_per_1m"] = (r["s"] - prev["s"]) / (r["rows"] - prev["rows"]) * 1e6
        marginal = f", marginal {r['marginal_s_per_1m']:.1f} s/1M rows" if prev is not None else ""
        print(f"  {r['rows']:>11,} rows: {r['cost_ratio']:.2f}x{marginal}")
        prev = r
    results["scan"] = scan_placement(os.path.join(scratch.name, f"new-{sizes[-1]}"))
    print(f"\nscore pass over {sizes[-1]:,} rows, 16 queries, top-10 (score.scan):")
    for where, r in results["scan"].items():
        print(f"  {where:<8} {r['rows_per_s']:>12,.0f} rows/s  ({r['s']:.1f} s, {r['tasks']} tasks)")
    d, w = results["scan"]["driver"]["rows_per_s"], results["scan"]["workers"]["rows_per_s"]
    print(f"  workers / driver: {w / d:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    scratch.cleanup()


if __name__ == "__main__":
    main()
