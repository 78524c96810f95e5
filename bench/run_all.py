"""`make bench`: run every benchmark in turn (they print their figures and write bench/out/*.json).

Benchmarks measure the machine's own limits in the same run (matmul GFLOP/s, memcpy GB/s), so
their ratios are comparable across machines; run them on a quiet machine, one at a time.
The fit-quality benchmark reuses the demo's sketches (`make demo` first), or sketches itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    py = sys.executable
    runs = [
        [py, "bench/bench_sketch.py", "--quick"],
        # Our encoder path (fp32 and encode.dtype=auto) vs SentenceTransformer.encode, same T0 rows.
        [py, "bench/bench_encode_vs_st.py", "--rows", "2000"],
        # The issue-4 scale run: 1,000,000 rows (and 100,000 for the cost-per-row ratio). About 75 min
        # on a 2-core CPU; BENCH_SCALE=100000 (make bench BENCH_SCALE=100000) for a shorter pass.
        [
            py,
            "bench/bench_encode_score.py",
            "--scale",
            os.environ.get("BENCH_SCALE", "1000000"),
            "--encoder-max-len",
            "16",
            "--encode-rows",
            "4000",
            "--max-len",
            "16",
        ],
    ]
    # Issue 11: the write path at 100k and 1M rows (BENCH_WRITE_SIZES=100000,1000000,10000000 for the
    # 10M run: ~8 GB of scratch), and the worker scan on one vs two local Ray nodes.
    runs.append([py, "bench/bench_code_writes.py", "--sizes", os.environ.get("BENCH_WRITE_SIZES", "100000,1000000")])
    runs.append([py, "bench/bench_scan_scaling.py"])
    demo = ROOT / "runs" / "demo" / "sketch" / "manifest.json"
    fit = [py, "bench/bench_fit_quality.py", "--sizes", "16,32,56"]
    runs.append(fit + (["--run-dir", "runs/demo"] if demo.exists() else ["--job", "jobs/demo.yaml"]))
    failed = 0
    for cmd in runs:
        print("\n$ " + " ".join(cmd[1:]), flush=True)
        failed += subprocess.call(cmd, cwd=ROOT) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
