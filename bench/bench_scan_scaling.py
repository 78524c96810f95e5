"""Benchmark: the score pass on workers, one Ray node with 1 CPU vs two nodes with 1 CPU each (issue 11).

    python bench/bench_scan_scaling.py                 # 2,000,000 rows of float16 codes, 16 queries
    python bench/bench_scan_scaling.py --rows 5000000

Builds a codes table with the encode stage's write path (precomputed codes, as in
bench_code_writes.py), then `ray start`s a head node with one CPU on 127.0.0.1 (token auth on, a
fresh token), measures `score_scan.scan_on_workers` (the `score.scan: workers` pass: one task per
fragment group, runs spilled, partial top-k merged) from a client driver, adds a second node with one
CPU, and measures again. Prints rows/s of both and the ratio (target >= 1.7x). Encode is not scaled
here: an encode pool keeps one CPU for Ray Data's reads, so a 1-CPU node runs no encoder actor.
Both nodes share this machine's cores and disk (and its page cache): the ratio is an upper bound
for what two real machines would see on the same storage only where a node's CPU is the limit.
The processes started here are killed by pid at the end (never `ray stop`).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
VENV_BIN = Path(sys.executable).parent
TAG = "INFLUCODER_BENCH_SCALING"
QUERIES, TOP_K = 16, 10


def measure(address: str, table_root: str, repeats: int) -> dict:
    """In a fresh client process: the best of `repeats` worker scans of the table."""
    import ray

    from pipeline.codestore import CodeStore
    from pipeline.stages.score_scan import scan_on_workers

    ray.init(address=address, log_to_driver=False)
    store = CodeStore(os.path.join(table_root, "lancedb"), "codes")
    ds = store.dataset()
    q = np.random.default_rng(1).standard_normal((QUERIES, store.stored_spec().dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    best = None
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(dir=table_root) as runs:
            t0 = time.perf_counter()
            res = scan_on_workers(store.dataset_uri, ds, q, "float16", TOP_K, 65536, runs)
            s = time.perf_counter() - t0
        best = s if best is None else min(best, s)
    cpus = ray.cluster_resources().get("CPU", 0)
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return {
        "rows": res.rows,
        "s": best,
        "rows_per_s": res.rows / best,
        "tasks": res.tasks,
        "cpus": cpus,
        "nodes": nodes,
    }


def ray_start(args: list[str], env: dict, temp_dir: str) -> None:
    out = subprocess.run(
        [
            str(VENV_BIN / "ray"),
            "start",
            "--num-cpus=1",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={temp_dir}",
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if out.returncode != 0:
        raise SystemExit(f"ray start failed: {out.stdout[-2000:]}{out.stderr[-2000:]}")


def kill_tagged(tag: str) -> None:
    procs = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(TAG) == tag:
                procs.append(p)
        except (psutil.Error, OSError):
            continue
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dir", default=None, help="scratch dir (needs ~800 MB per 1M rows)")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "scan_scaling.json"))
    ap.add_argument("--measure", nargs=2, metavar=("ADDRESS", "TABLE_ROOT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, args.repeats)))
        return

    scratch = tempfile.mkdtemp(dir=args.dir, prefix="bench-scan-scaling-")
    table_root = os.path.join(scratch, "table")
    # 1. The table, written by the encode stage's write path on an in-process Ray (then stopped).
    build = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.path[:0] = [sys.argv[3], sys.argv[4]]\n"
            "from bench_code_writes import code_block, write_path\n"
            "from pipeline.config import RayConfig\nfrom pipeline.ray_runtime import ensure_ray\n"
            "ensure_ray(RayConfig(include_dashboard=False))\n"
            "print(write_path(sys.argv[1], int(sys.argv[2]), code_block()))",
            table_root,
            str(args.rows),
            str(REPO),
            str(REPO / "bench"),
        ],
        capture_output=True,
        text=True,
        # Ray's workers unpickle bench_code_writes' functions by module: they must find it too.
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "bench")])},
    )
    if build.returncode != 0:
        raise SystemExit(build.stderr[-3000:])
    print(f"table: {args.rows:,} rows of 384-dim float16 codes under {table_root}", flush=True)

    tag = secrets.token_hex(8)
    token = Path(scratch) / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), TAG: tag, "PYTHONPATH": str(REPO)})
    port = 6390 + os.getpid() % 500
    ray_tmp = tempfile.mkdtemp(prefix="icss", dir="/tmp")  # short: Unix socket paths max 107 bytes
    results = {}
    try:
        ray_start(["--head", f"--port={port}", "--include-dashboard=false"], env, os.path.join(ray_tmp, "h"))
        for label in ("1 node x 1 CPU", "2 nodes x 1 CPU"):
            if label.startswith("2"):
                ray_start([f"--address=127.0.0.1:{port}"], env, os.path.join(ray_tmp, "w"))
                time.sleep(2)
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--repeats",
                    str(args.repeats),
                    "--measure",
                    f"127.0.0.1:{port}",
                    table_root,
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=1800,
            )
            if out.returncode != 0:
                raise SystemExit(out.stderr[-3000:])
            results[label] = json.loads(out.stdout.strip().splitlines()[-1])
            r = results[label]
            print(
                f"{label}: {r['rows_per_s']:>12,.0f} rows/s ({r['s']:.1f} s, {r['tasks']} tasks, "
                f"{r['nodes']} node(s), {r['cpus']:g} CPU)",
                flush=True,
            )
    finally:
        kill_tagged(tag)
    ratio = results["2 nodes x 1 CPU"]["rows_per_s"] / results["1 node x 1 CPU"]["rows_per_s"]
    print(f"two nodes / one node: {ratio:.2f}x (target >= 1.7x)")
    results["ratio"] = ratio
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    import shutil

    shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(ray_tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
