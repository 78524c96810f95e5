"""Helpers shared by the benchmark scripts (timing, the machine's matmul peak, reading the shared datasets)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable


def best_of(fn: Callable[[], object], reps: int = 3) -> float:
    """Seconds of the fastest of `reps` runs of fn (neighbours on a shared VM make single runs noisy)."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def read_jsonl(path: Path, limit: int) -> list[dict]:
    """The first `limit` records of a JSONL file."""
    rows = []
    with open(path) as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) >= limit:
                break
    return rows


def matmul_gflops(dtype, n: int = 2048, reps: int = 5) -> float:
    """This machine's matmul rate in `dtype` (a torch dtype): GFLOP/s of the best of `reps` n x n
    products, the peak a benchmark's FLOP rate is divided by (take the best of its start and end)."""
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up
    return 2 * n**3 / best_of(lambda: a @ b, reps) / 1e9


def matmul_peaks(bf16_native: bool) -> dict[str, float]:
    """{"float32", "bfloat16"}: this machine's matmul rates (`matmul_gflops`). Where bf16 is only
    emulated (~1 GFLOP/s on an AVX2 CPU) a 512^2 product measures it in a second instead of minutes."""
    import torch

    bf16 = matmul_gflops(torch.bfloat16) if bf16_native else matmul_gflops(torch.bfloat16, n=512, reps=2)
    return {"float32": matmul_gflops(torch.float32), "bfloat16": bf16}
