"""Encoder throughput against sentence-transformers, side by side on the same real rows.

    python bench/bench_encode_vs_st.py --rows 2000                # ~5-8 min on a 2-core CPU
    python bench/bench_encode_vs_st.py --rows 1000 --texts demo   # mixed lengths (needs data/demo)

One process, one encoder (the demo's fitted encoder when runs/demo/fit/encoder exists, else the
plain offline all-MiniLM-L6-v2), max_len 128, the same real rows for every method: T0 rows
("prompt\\ncompletion", as plain texts: sentence-transformers takes no pair views; nearly all reach
max_len, so no method has padding to save) or, with `--texts demo`, the demo corpus (ToxiGen
statements among T0/GSM8K rows, mixed lengths):

* ``ours fp32``   ``TextEncoder.embed`` in float32: tokenised once, length-sorted, token-budget batches.
* ``ours auto``   the same with ``encode.dtype=auto`` (bf16 autocast where the CPU has native bf16).
* ``ST default``  ``SentenceTransformer.encode`` with its defaults (float32, batch 32).
* ``ST bf16``     (only where the CPU has native bf16) the same model cast to bf16, and ``ST bf16 autocast``
  (fp32 weights under ``torch.autocast("cpu", bfloat16)``), the best settings sentence-transformers
  offers on this CPU without extra packages.
* ``ST onnx`` / ``ST openvino``: sentence-transformers' own backends, run only when their packages
  (optimum + onnxruntime / openvino) import; otherwise the output says they did not run and why.

The rows are cut into chunks and every method runs on each chunk in turn (rotating the order), so
load from other processes on a shared machine falls on all methods alike; the CPU time per method is
printed next to the wall time. FLOPs are 2 * P * T (P = weights in the transformer's matmuls,
T = real tokens after truncation; attention-score products are not counted, so the fraction
understates). The fraction of peak divides by the matmul rate measured in this run (2048^2, best of
the start and the end), in float32 and in bf16. "min cos" is each method's worst row against
``ours fp32``. Writes bench/out/encode_vs_st.json. No peer figure is ever filled in by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.config import EncodeConfig  # noqa: E402
from pipeline.encoder import TextEncoder  # noqa: E402
from pipeline.hardware import native_bf16  # noqa: E402
from pipeline.models import resolve_encoder  # noqa: E402

from common import matmul_peaks, read_jsonl  # noqa: E402  (bench/ is the script's directory)

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DATA", ROOT.parent / "shared" / "data"))
TARGET_VS_ST, TARGET_BF16_PEAK = 1.5, 0.40  # issue 12


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: %.2f, %.2f, %.2f" % os.getloadavg()


def t0_texts(n: int) -> list[str]:
    """The first n T0 rows as the encoder sees a prompt/response row in plain-text form."""
    rows = read_jsonl(DATA / "t0" / "t0_train_50k.jsonl", n)
    if len(rows) < n:
        raise SystemExit(f"{DATA}/t0/t0_train_50k.jsonl has {len(rows)} rows, fewer than --rows {n}")
    return [f"{r['prompt']}\n{r['completion']}" for r in rows]


def demo_texts(n: int) -> list[str]:
    """The demo corpus's texts (ToxiGen statements among T0/GSM8K rows: mixed lengths, most under
    max_len), as `make demo` prepared them under data/demo; repeated in order up to n rows."""
    import pyarrow.parquet as pq

    files = sorted((ROOT / "data" / "demo" / "toxicity" / "corpus").glob("*.parquet"))
    if not files:
        raise SystemExit("--texts demo needs data/demo (run `make demo` or `influcoder prepare` first)")
    texts = [t for f in files for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]
    return (texts * (n // len(texts) + 1))[:n]


def matmul_params(model: torch.nn.Module) -> int:
    """Weights of the Linear layers of the transformer stack (the pooler runs once per row, not per token)."""
    stack = getattr(model, "encoder", model)
    return sum(m.weight.numel() for m in stack.modules() if isinstance(m, torch.nn.Linear))


def st_methods(
    model_dir: str, max_len: int, bf16_native: bool
) -> tuple[dict[str, tuple[str, Callable]], dict[str, str]]:
    """sentence-transformers settings that can run here, and why the others cannot. Without native
    bf16 (e.g. an AVX2-only CPU) PyTorch emulates bf16 matmuls far slower than float32, so no user
    would pick ST's bf16 settings there: they are reported as not run, with the measured rates."""
    from sentence_transformers import SentenceTransformer

    def load(**kw):
        st = SentenceTransformer(model_dir, device="cpu", **kw)
        st.max_seq_length = max_len
        return st

    def run(st, autocast: bool = False):
        def f(texts):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = st.encode(texts, convert_to_tensor=True, normalize_embeddings=True)
            return out.float().numpy()

        return f

    methods = {"ST default": ("float32", run(load()))}
    skipped = {}
    if bf16_native:
        methods["ST bf16"] = ("bfloat16", run(load().bfloat16()))
        methods["ST bf16 autocast"] = ("bfloat16", run(load(), autocast=True))
    else:
        why = "this CPU has no native bf16 (PyTorch emulates it; see the matmul rates above)"
        skipped["ST bf16"] = skipped["ST bf16 autocast"] = why
    for backend in ("onnx", "openvino"):
        try:
            methods[f"ST {backend}"] = ("float32", run(load(backend=backend)))
        except Exception as e:  # noqa: BLE001 - any failure to load is reported, never filled in
            skipped[f"ST {backend}"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    skipped["ST float16"] = "this CPU has no native float16 matmul (PyTorch emulates it)"
    return methods, skipped


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument(
        "--texts",
        choices=("t0", "demo"),
        default="t0",
        help="t0: T0 rows, nearly all cut at max_len (no padding to save); demo: the demo corpus, mixed lengths",
    )
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=250, help="rows per interleaved chunk")
    ap.add_argument("--batch-size", type=int, default=EncodeConfig.batch_size, help="encode.batch_size for our path")
    ap.add_argument("--token-budget", type=int, default=EncodeConfig.token_budget, help="encode.token_budget (ours)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--out", default=None, help="default: bench/out/encode_vs_st.json (t0), encode_vs_st_demo.json (demo)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = uptime()
    print(f"uptime before: {load_start}", flush=True)
    bf16_native = native_bf16(torch.device("cpu"))
    peak = matmul_peaks(bf16_native)

    fitted = ROOT / "runs" / "demo" / "fit" / "encoder"
    model_dir = str(fitted) if (fitted / "config.json").exists() else resolve_encoder("all-minilm-l6-v2")
    texts = t0_texts(args.rows) if args.texts == "t0" else demo_texts(args.rows)
    suffix = "" if args.texts == "t0" else f"_{args.texts}"
    args.out = args.out or str(ROOT / "bench" / "out" / f"encode_vs_st{suffix}.json")
    fp32 = TextEncoder(model_dir, args.max_len, dtype="float32")
    auto = TextEncoder(model_dir, args.max_len, dtype="auto")
    if fp32.plain_model is not None:  # a blended export (fit.blend): SentenceTransformer loads one half
        print("the export is blended (two transformers); both sides run its distilled half alone", flush=True)
        fp32.drop_blend()
        auto.drop_blend()
    tokens = int(sum(len(ids) for ids in fp32.features(texts)[0]["input_ids"]))
    params = matmul_params(fp32.model)

    def ours(enc):
        return lambda t: enc.embed(t, args.batch_size, token_budget=args.token_budget)

    methods = {"ours fp32": ("float32", ours(fp32)), f"ours auto ({auto.precision})": (auto.precision, ours(auto))}
    st, skipped = st_methods(model_dir, args.max_len, bf16_native)
    methods.update(st)
    for _, fn in methods.values():  # warm-up: first-call kernels and allocations are not per-row cost
        fn(texts[:32])

    wall = dict.fromkeys(methods, 0.0)
    cpu = dict.fromkeys(methods, 0.0)
    emb: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    names = list(methods)
    for c, start in enumerate(range(0, len(texts), args.chunk)):
        chunk = texts[start : start + args.chunk]
        for k in range(len(names)):
            m = names[(c + k) % len(names)]  # rotate who goes first
            t0, c0 = time.perf_counter(), time.process_time()
            emb[m].append(methods[m][1](chunk))
            wall[m] += time.perf_counter() - t0
            cpu[m] += time.process_time() - c0
    end = matmul_peaks(bf16_native)
    peak = {k: max(v, end[k]) for k, v in peak.items()}  # best of start and end
    load_end = uptime()

    ref = np.concatenate(emb["ours fp32"])
    flops = 2.0 * params * tokens
    results = []
    for m, (prec, _) in methods.items():
        e = np.concatenate(emb[m])
        gflops = flops / wall[m] / 1e9
        results.append(
            {
                "method": m,
                "precision": prec,
                "s": wall[m],
                "cpu_s": cpu[m],
                "rows_per_s": len(texts) / wall[m],
                "gflops": gflops,
                "frac_fp32_peak": gflops / peak["float32"],
                "frac_bf16_peak": gflops / peak["bfloat16"],
                "frac_own_peak": gflops / peak[prec],  # of the peak of the precision it ran in
                "min_cos_vs_ours_fp32": float((e * ref).sum(1).min()),
            }
        )
    by = {r["method"]: r for r in results}
    st_default = by["ST default"]["rows_per_s"]
    st_best_name = max((r for r in results if r["method"].startswith("ST")), key=lambda r: r["rows_per_s"])["method"]
    st_best = by[st_best_name]["rows_per_s"]
    ours_auto = next(r for r in results if r["method"].startswith("ours auto"))

    print(
        f"\nencoder {model_dir} (max_len {args.max_len}), {len(texts)} {args.texts} rows, {tokens} real tokens "
        f"({tokens / len(texts):.1f}/row), {params / 1e6:.2f} M matmul weights; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"native bf16: {bf16_native}"
    )
    print(
        f"matmul 2048^2: fp32 {peak['float32']:.1f} GFLOP/s, bf16 {peak['bfloat16']:.1f} GFLOP/s "
        f"({'' if bf16_native else 'bf16 emulated, measured at 512^2; '}best of start/end)"
    )
    print(f"uptime before: {load_start}\nuptime after:  {load_end}")
    print("shared CPU: other processes ran during the measurement; methods are interleaved per chunk.\n")
    head = f"{'method':<26}{'prec':>9}{'s':>8}{'cpu s':>8}{'rows/s':>8}{'x ST def':>9}{'x ST best':>10}"
    print(head + f"{'GFLOP/s':>9}{'fp32 pk':>9}{'bf16 pk':>9}{'min cos':>10}")
    for r in results:
        print(
            f"{r['method']:<26}{r['precision']:>9}{r['s']:>8.1f}{r['cpu_s']:>8.1f}{r['rows_per_s']:>8.1f}"
            f"{r['rows_per_s'] / st_default:>9.2f}{r['rows_per_s'] / st_best:>10.2f}{r['gflops']:>9.1f}"
            f"{r['frac_fp32_peak']:>9.1%}{r['frac_bf16_peak']:>9.1%}{r['min_cos_vs_ours_fp32']:>10.6f}"
        )
    for m, why in skipped.items():
        print(f"{m:<26} did not run: {why}")
    ratio = ours_auto["rows_per_s"] / st_best
    print(
        f"\nours auto vs the best ST setting ({st_best_name}): {ratio:.2f}x rows/s "
        f"(target >= {TARGET_VS_ST}x: {'met' if ratio >= TARGET_VS_ST else 'MISSED'}); "
        f"vs ST default {ours_auto['rows_per_s'] / st_default:.2f}x"
    )
    # The target is set against the bf16 peak, where bf16 is native; elsewhere `auto` runs float32,
    # and the fraction of the float32 peak is the figure that says how close to the machine it runs.
    frac = ours_auto["frac_own_peak"]
    print(
        f"ours auto: {frac:.1%} of the {ours_auto['precision']} matmul peak "
        f"(target >= {TARGET_BF16_PEAK:.0%}: {'met' if frac >= TARGET_BF16_PEAK else 'MISSED'})"
    )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model_dir": model_dir,
                "rows": len(texts),
                "texts": args.texts,
                "max_len": args.max_len,
                "real_tokens": tokens,
                "matmul_params": params,
                "threads": torch.get_num_threads(),
                "native_bf16": bf16_native,
                "matmul_gflops": peak,
                "uptime_before": load_start,
                "uptime_after": load_end,
                "results": results,
                "skipped": skipped,
                "st_best": st_best_name,
                "ours_auto_vs_st_best": ratio,
                "ours_auto_frac_bf16_peak": ours_auto["frac_bf16_peak"],
                "ours_auto_frac_own_peak": frac,
                "ours_auto_precision": ours_auto["precision"],
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
