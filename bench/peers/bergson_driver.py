"""Drive Bergson's per-sample gradient collection on pre-tokenised rows; run by bench/bench_sketch.py.

Runs under the bench-only peer interpreter (bench/.peer-venv, bench/peers/install_bergson.sh), never
the project's: it imports nothing from ``pipeline``. Input: a JSONL file of ``{"input_ids", "labels"}``
rows, tokenised by our teacher (same truncation to max_len, labels -100 on the prompt), so both sides
see the same tokens. It follows ``bergson build``'s worker (``bergson.build.build_worker``) minus the
dataset loading and the process launcher: ``setup_model_and_peft`` (fresh LoRA from
``peft_init_kwargs``), ``create_processor``, ``allocate_batches`` (its token-budget packer),
``collect_gradients`` (hooks, projection, the on-disk index). Only ``collect_gradients`` is timed;
the model load and adapter attach are reported separately. Writes a JSON result and the collected
gradients (``.npy``, one row per input row, in input order) for the caller's agreement check.

``--width`` is the output width to match (ours: the CountSketch's d). ``global`` projects every
module's gradient into one vector of that width; ``per_module`` (Bergson's default) projects each
module's gradient to p x p with p = floor(sqrt(width / modules)), the widest total not above it.
``--adapter`` loads LoRA weights saved by the caller (ours), so both sides differentiate the same
adapter and their gradients can be compared through their projections.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")


def load_adapter(model, path: str) -> None:
    """Copy the caller's LoRA weights in by parameter name; every LoRA parameter must be covered."""
    import torch
    from safetensors.torch import load_file  # tensors only: no pickle crosses the process boundary

    state = load_file(path)
    own = {n: p for n, p in model.named_parameters() if "lora_" in n}
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        sys.exit(f"{path}: adapter names differ from bergson's model: missing {missing[:3]}, extra {extra[:3]}")
    with torch.no_grad():
        for name, param in own.items():
            if param.shape != state[name].shape:
                sys.exit(f"{path}: {name} has shape {tuple(state[name].shape)}, bergson's {tuple(param.shape)}")
            param.copy_(state[name])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="local HF model folder (the resolved teacher)")
    ap.add_argument("--rows", required=True, help="JSONL of {input_ids, labels}")
    ap.add_argument("--out", required=True, help="result JSON")
    ap.add_argument("--grads-out", default=None, help="write the gradients here (.npy, input order)")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--width", type=int, default=8192, help="output width to match (see the module doc)")
    ap.add_argument("--projection-target", choices=["global", "per_module"], default="global")
    ap.add_argument("--token-batch-size", type=int, default=2048)
    ap.add_argument("--max-batch-size", type=int, default=None)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--seed", type=int, default=0, help="torch seed set before the adapter is attached")
    ap.add_argument(
        "--adapter", default=None, help="safetensors file of {param name: tensor}: the LoRA weights to load"
    )
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)  # before any work, as our teacher does

    import bergson
    import numpy as np
    from bergson.collection import collect_gradients
    from bergson.config.config import DistributedConfig, IndexConfig, PreprocessConfig
    from bergson.data import allocate_batches, load_gradients
    from bergson.utils.worker_utils import create_processor, setup_model_and_peft
    from datasets import Dataset

    rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line.strip()]
    if not rows:
        sys.exit(f"{args.rows}: no rows")
    lengths = [len(r["input_ids"]) for r in rows]
    work = Path(tempfile.mkdtemp(prefix="bergson-peer-"))
    try:
        alpha = int(args.lora_alpha) if float(args.lora_alpha).is_integer() else args.lora_alpha
        cfg = IndexConfig(
            run_path=str(work / "index"),
            model=args.model,
            precision=args.precision,
            # Ours: LoraConfig(r, lora_alpha, dropout 0, bias none, target_modules="all-linear").
            peft_init_kwargs=f"r={args.lora_r},lora_alpha={alpha},lora_dropout=0.0,bias=none,target_modules=all-linear",
            projection_dim=args.width,  # per_module: set below, once the module count is known
            projection_target=args.projection_target,
            projection_seed=args.seed,
            token_batch_size=args.token_batch_size,
            max_batch_size=args.max_batch_size,
            loss_reduction="mean",  # ours: mean over the response tokens (HF's loss)
            distributed=DistributedConfig(nproc_per_node=1),
        )
        preprocess = PreprocessConfig()  # unit_normalize False: the raw projections are stored
        cfg.partial_run_path.mkdir(parents=True, exist_ok=True)

        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        model, target_modules = setup_model_and_peft(cfg)
        model.eval()
        if args.adapter:
            load_adapter(model, args.adapter)
        n_modules = len(target_modules or ())
        if args.projection_target == "per_module":
            cfg.projection_dim = max(1, math.isqrt(args.width // max(n_modules, 1)))
        processor = create_processor(model, cfg, target_modules)
        load_s = time.perf_counter() - t0

        data = Dataset.from_dict(
            {"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows], "length": lengths}
        )
        batches = allocate_batches(lengths, cfg.token_batch_size, max_batch_size=cfg.max_batch_size)
        padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)

        t1, c1 = time.perf_counter(), time.process_time()
        collect_gradients(
            model,
            data,
            processor,
            cfg,
            batches=batches,
            target_modules=target_modules,
            attention_cfgs={},
            preprocess_cfg=preprocess,
        )
        collect_s, collect_cpu = time.perf_counter() - t1, time.process_time() - c1

        grads = np.asarray(load_gradients(cfg.partial_run_path), dtype=np.float32)
        if grads.shape[0] != len(rows):
            sys.exit(f"bergson wrote {grads.shape[0]} gradient rows for {len(rows)} input rows")
        if args.grads_out:
            np.save(args.grads_out, grads)
        lora_params = sum(model.get_submodule(n).weight.numel() for n in target_modules or ())
        result = {
            "bergson": bergson.__version__,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "rows": len(rows),
            "tokens": sum(lengths),
            "padded_tokens": padded,
            "batches": len(batches),
            "load_s": load_s,
            "collect_s": collect_s,
            "collect_cpu_s": collect_cpu,
            "grad_dim": int(grads.shape[1]),
            "lora_modules": n_modules,
            "lora_params": lora_params,
            "config": {
                "precision": args.precision,
                "lora": f"r={args.lora_r}, alpha={alpha}, dropout 0, all-linear, "
                + ("weights copied from ours" if args.adapter else f"fresh, seed {args.seed}"),
                "projection_target": cfg.projection_target,
                "projection_dim": cfg.projection_dim,
                "projection_type": cfg.projection_type,
                "projection_scale": cfg.projection_scale,
                "loss_reduction": cfg.loss_reduction,
                "unit_normalize": preprocess.unit_normalize,
                "token_batch_size": cfg.token_batch_size,
                "max_batch_size": cfg.max_batch_size,
            },
        }
        Path(args.out).write_text(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
