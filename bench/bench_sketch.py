"""Teacher sketch throughput: float32 vs bf16, token-budget batches vs one-at-a-time, side by side.

One process, one teacher (the offline SmolLM2-135M, LoRA r=8 all-linear, max_len 128 by default),
the same real rows (T0 prompt/completion + GSM8K question/answer from ``--data``) for every method:

* ``fp32 token-budget``  ``TeacherSketcher.sketch`` in float32, rows packed to ``--token-budget``.
* ``fp32 one-at-a-time`` the same engine at batch size 1.
* ``bf16 token-budget`` / ``bf16 one-at-a-time``: bf16 autocast forward/backward, fp32 head, loss,
  per-sample gradients and sketch (what ``teacher.dtype=auto`` picks on native-bf16 hardware).
* ``--with-reference`` adds the authors' bs-1 method (HF loss + autograd.grad + flatten +
  CountSketch, fp32).

FLOPs are 4·P·T (P = base-model parameters, the tied embedding counted once as the LM-head matmul;
T = real tokens). The fraction of peak divides by the matmul rate of the method's precision, both
measured in this run (2048² matmuls, best of the start and end). Every method's sketches are
compared with the fp32 one-at-a-time sketches (min per-row cosine: the stage's precision gate
quantity, pass mark 0.999).

Peer: Bergson (per-sample gradient collection) is run only when ``--bergson-python`` names an
interpreter that imports it (installed into a bench-only target dir, never a project dependency);
otherwise the output says it did not run and why. No peer figure is ever filled in by hand.
Writes ``bench/out/sketch.json``. ``--quick`` uses fewer rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.config import SketchConfig, TeacherConfig  # noqa: E402
from pipeline.gradients import reference_per_sample_grads  # noqa: E402
from pipeline.sketching import l2_normalize  # noqa: E402
from pipeline.teacher import TeacherSketcher, native_bf16, token_budget_batches  # noqa: E402

from common import matmul_gflops, read_jsonl  # noqa: E402  (bench/ is the script's directory)

ROOT = Path(__file__).resolve().parents[1]


def load_samples(data_dir: Path, n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Half T0 (long passages, short answers), half GSM8K (short questions, long answers)."""
    rng = random.Random(seed)
    t0 = rng.sample(read_jsonl(data_dir / "t0" / "t0_train_50k.jsonl", 5000), n - n // 2)
    gsm = rng.sample(read_jsonl(data_dir / "gsm8k" / "train.jsonl", 2000), n // 2)
    prompts = [r["prompt"] for r in t0] + [f"Question: {r['question']}\nAnswer:" for r in gsm]
    responses = [" " + r["completion"].strip() for r in t0] + [" " + r["answer"] for r in gsm]
    return prompts, responses


def authors_reference(teacher: TeacherSketcher, prompts: list[str], responses: list[str]) -> np.ndarray:
    """The authors' method, fp32: bs 1, HF loss, full flattened gradient, then the CountSketch."""
    accepted, _ = teacher.examples(prompts, responses)
    out = []
    for i in sorted(accepted):
        ex = accepted[i]
        grad = reference_per_sample_grads(teacher.model, [(ex.input_ids, ex.labels)], teacher.device)
        out.append(l2_normalize(teacher.sketcher.project(grad))[0].numpy())
    return np.stack(out)


def bergson_status(python: str | None) -> str:
    """Why the peer did or did not run (this bench never runs it without a working interpreter)."""
    if not python:
        return (
            "not run: no --bergson-python given (Bergson must be installed into a bench-only "
            "environment or target dir, never the project's); no peer figure is reported"
        )
    import subprocess

    probe = subprocess.run(
        [
            python,
            "-c",
            "import bergson, sys; print(bergson.__version__ if hasattr(bergson, '__version__') else 'unknown')",
        ],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return f"not run: `{python} -c 'import bergson'` failed: {probe.stderr.strip().splitlines()[-1:]}"
    return (
        f"not run: bergson {probe.stdout.strip()} imports, but this bench has no tested driver for it "
        f"yet; no peer figure is reported"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rows (a few minutes on 2 cores)")
    ap.add_argument("--samples", type=int, default=None, help="override the row count")
    ap.add_argument("--token-budget", type=int, default=SketchConfig.token_budget)
    ap.add_argument("--max-rows", type=int, default=SketchConfig.batch_size, help="rows cap per batch")
    ap.add_argument("--reps", type=int, default=1, help="repetitions per group and method; the fastest counts")
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--proj-dim", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--with-reference", action="store_true", help="also time the authors' bs-1 method (fp32)")
    ap.add_argument("--bergson-python", default=None, help="interpreter with bergson installed (peer run)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "sketch.json"))
    args = ap.parse_args()
    n = args.samples or (12 if args.quick else 32)
    if args.threads:
        torch.set_num_threads(args.threads)

    load_start = os.getloadavg()[0]  # other jobs on the machine distort every number below
    peak = {"float32": matmul_gflops(torch.float32), "bfloat16": matmul_gflops(torch.bfloat16)}
    prompts, responses = load_samples(Path(args.data), n)
    t_load = time.perf_counter()
    teacher = TeacherSketcher(
        TeacherConfig(model="smollm2-135m-instruct", max_len=args.max_len, lora_rank=8, dtype="float32"),
        proj_dim=args.proj_dim,
        proj_seed=42,
        lora_seed=0,
    )
    setup_s = time.perf_counter() - t_load
    accepted, rejects = teacher.examples(prompts, responses)
    keys = sorted(accepted)
    tokens = sum(len(accepted[i].input_ids) for i in keys)
    base_params = sum(p.numel() for name, p in teacher.model.named_parameters() if "lora_" not in name)
    flops = 4.0 * base_params * tokens

    def run(
        dtype: torch.dtype | None, batch_size: int, budget: int | None
    ) -> Callable[[list[str], list[str]], np.ndarray]:
        def fn(p: list[str], r: list[str]) -> np.ndarray:
            teacher.autocast_dtype = dtype  # same weights and adapter; only the compute precision changes
            return teacher.sketch(p, r, batch_size=batch_size, token_budget=budget).sketches

        return fn

    methods: dict[str, tuple[str, Callable]] = {
        "fp32 token-budget": ("float32", run(None, args.max_rows, args.token_budget)),
        "fp32 one-at-a-time": ("float32", run(None, 1, None)),
        "bf16 token-budget": ("bfloat16", run(torch.bfloat16, args.max_rows, args.token_budget)),
        "bf16 one-at-a-time": ("bfloat16", run(torch.bfloat16, 1, None)),
    }
    if args.with_reference:
        methods["authors' bs-1 reference (fp32)"] = ("float32", lambda p, r: authors_reference(teacher, p, r))

    # Warm-up (first-call kernels and allocator, METHOD.md 4.10) for every method on two short rows.
    for _, fn in methods.values():
        fn([""] * 2, [" warm up", " warm up again"])

    # Interleaved measurement: the machine is shared and its load swings within minutes, so each
    # method runs on each group of rows in turn instead of in one block per method. Groups are
    # windows of the length-sorted rows, as a shard's rows are in the stage.
    order = sorted(keys, key=lambda i: (-len(accepted[i].input_ids), i))
    group_rows = max(8, len(order) // 2)
    groups = [order[s : s + group_rows] for s in range(0, len(order), group_rows)]
    wall = dict.fromkeys(methods, 0.0)
    cpu = dict.fromkeys(methods, 0.0)
    sketches: dict[str, dict[int, np.ndarray]] = {m: {} for m in methods}
    for group in groups:
        gp, gr = [prompts[i] for i in group], [responses[i] for i in group]
        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.reps):
            for method, (_, fn) in methods.items():
                t0, c0 = time.perf_counter(), time.process_time()
                out = fn(gp, gr)
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                sketches[method].update(zip(group, out))
                if method not in best or dt < best[method][0]:  # contention only ever adds time
                    best[method] = (dt, dc)
        for method in methods:
            wall[method] += best[method][0]
            cpu[method] += best[method][1]
    peak = {k: max(v, matmul_gflops(getattr(torch, k))) for k, v in peak.items()}  # best of start and end

    baseline = sketches["fp32 one-at-a-time"]
    rows = []
    for method, (prec, _) in methods.items():
        s = wall[method]
        agree = min(float(sketches[method][i] @ baseline[i]) for i in keys)
        rows.append(
            {
                "method": method,
                "precision": prec,
                "seconds": s,
                "cpu_s": cpu[method],
                "rows_per_s": len(keys) / s,
                "tokens_per_s": tokens / s,
                "gflops": flops / s / 1e9,
                "frac_of_peak": flops / s / 1e9 / peak[prec],
                "min_cos_vs_fp32_bs1": agree,
            }
        )
    by = {r["method"]: r for r in rows}
    ratios = {
        "fp32: token-budget / one-at-a-time": by["fp32 token-budget"]["tokens_per_s"]
        / by["fp32 one-at-a-time"]["tokens_per_s"],
        "bf16: token-budget / one-at-a-time": by["bf16 token-budget"]["tokens_per_s"]
        / by["bf16 one-at-a-time"]["tokens_per_s"],
        "token-budget: bf16 / fp32": by["bf16 token-budget"]["tokens_per_s"] / by["fp32 token-budget"]["tokens_per_s"],
        "bf16 token-budget / fp32 one-at-a-time": by["bf16 token-budget"]["tokens_per_s"]
        / by["fp32 one-at-a-time"]["tokens_per_s"],
    }
    padded = sum(
        len(b) * len(accepted[keys[b[0]]].input_ids)
        for b in token_budget_batches([len(accepted[i].input_ids) for i in keys], args.token_budget, args.max_rows)
    )
    peer = bergson_status(args.bergson_python)
    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, native bf16: {native_bf16(torch.device('cpu'))}, "
        f"load avg {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end"
    )
    print(f"matmul 2048^2: fp32 {peak['float32']:.1f} GFLOP/s, bf16 {peak['bfloat16']:.1f} GFLOP/s (best of start/end)")
    print(
        f"teacher: SmolLM2-135M, {teacher.num_params:,} LoRA params, {base_params:,} base params, "
        f"max_len {args.max_len}, d={args.proj_dim}, token budget {args.token_budget} (<= {args.max_rows} rows); "
        f"setup {setup_s:.1f} s; logits={teacher.engine.logits_mode}"
    )
    print(
        f"rows: {len(keys)} ({len(rejects)} rejected), {tokens} real tokens ({tokens / max(len(keys), 1):.0f}/row), "
        f"{padded} padded tokens in token-budget batches ({padded / tokens - 1:.1%} padding); peak RSS {peak_rss_gb:.1f} GiB"
    )
    print(f"{'method':<32}{'s':>8}{'cpu s':>8}{'rows/s':>8}{'tokens/s':>10}{'GFLOP/s':>9}{'of peak':>9}{'min cos':>10}")
    for r in rows:
        print(
            f"{r['method']:<32}{r['seconds']:>8.2f}{r['cpu_s']:>8.1f}{r['rows_per_s']:>8.2f}{r['tokens_per_s']:>10.0f}"
            f"{r['gflops']:>9.1f}{r['frac_of_peak']:>9.1%}{r['min_cos_vs_fp32_bs1']:>10.6f}"
        )
    print("(of peak: against the matmul rate of the method's own precision; min cos: per row vs fp32 one-at-a-time)")
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    print(f"peer Bergson: {peer}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": {
                    "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(),
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "native_bf16": native_bf16(torch.device("cpu")),
                    "load_avg_1m_start": load_start,
                    "load_avg_1m_end": os.getloadavg()[0],
                },
                "matmul_gflops": peak,
                "teacher": teacher.fingerprint()
                | {"base_params": base_params, "logits_mode": teacher.engine.logits_mode},
                "rows": len(keys),
                "rejects": rejects,
                "tokens": tokens,
                "padded_tokens": padded,
                "token_budget": args.token_budget,
                "max_rows": args.max_rows,
                "setup_s": setup_s,
                "flops_per_run": flops,
                "peak_rss_gb": peak_rss_gb,
                "methods": rows,
                "reps": args.reps,
                "ratios": ratios,
                "peer_bergson": peer,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
