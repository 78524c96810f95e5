"""Held-out quality of the distilled encoder vs the untrained one, at several train sizes.

Takes a finished sketch stage (real teacher sketches, e.g. the offline SmolLM2 teacher of
`jobs/demo.yaml`) and, for each train size n, fits the encoder on the first n train anchors x
`pool_ratio * n` train pool rows (by id) while keeping the eval split unchanged, so every size is
scored on the same held-out ground truth. Prints, per size: split sizes, held-out aggregated and
per-anchor Spearman of the untrained encoder and of the exported (last) epoch, the best epoch,
and timings. Writes `bench/out/fit_quality.json`.

    # reuse a run dir whose sketch stage is finished
    .venv/bin/python bench/bench_fit_quality.py --run-dir runs/demo --sizes 16,32,56
    # or sketch first through the CLI (sized for the largest n), then bench
    .venv/bin/python bench/bench_fit_quality.py --job jobs/demo.yaml --sizes 16,32,56
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipeline import artifacts  # noqa: E402
from pipeline.config import load_job  # noqa: E402
from pipeline.schema import ID, SPLIT  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def ensure_sketch(args: argparse.Namespace, max_anchors: int) -> Path:
    """The run dir holding a finished sketch stage; runs `influcoder sketch` for --job if needed."""
    if args.run_dir:
        run_dir = Path(args.run_dir)
    else:
        job = load_job(args.job, args.set)
        run_dir = Path(job.run_dir)
        if not (run_dir / "sketch" / "manifest.json").exists():
            sizes = [f"sketch.train_anchors={max_anchors}",
                     f"sketch.train_pool={int(max_anchors * args.pool_ratio)}"]
            cmd = [str(ROOT / ".venv" / "bin" / "influcoder"), "sketch", args.job,
                   *[x for s in [*args.set, *sizes] for x in ("--set", s)]]
            print("running:", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, cwd=ROOT)
    if not (run_dir / "sketch" / "manifest.json").exists():
        sys.exit(f"{run_dir}/sketch has no manifest.json: run the sketch stage first (or pass --job).")
    return run_dir


def subset_runner(src: Path, n_anchors: int, n_pool: int):
    """A sketch 'stage' that copies the source artifact keeping n train rows per side (first by id)."""
    def run(ctx) -> None:
        for side, n in (("anchors", n_anchors), ("pool", n_pool)):
            table = pa.concat_tables([pq.read_table(p) for p in sorted((src / side).glob("*.parquet"))])
            train = table.filter(pc.equal(table[SPLIT], "train"))
            if train.num_rows < n:
                raise SystemExit(f"the source sketch has {train.num_rows} train {side}, {n} requested; "
                                 f"sketch more rows or bench smaller sizes.")
            train = train.take(pc.sort_indices(train, sort_keys=[(ID, "ascending")])).slice(0, n)
            out = pa.concat_tables([table.filter(pc.equal(table[SPLIT], "eval")), train])
            os.makedirs(os.path.join(ctx.out_dir, side))
            pq.write_table(out, os.path.join(ctx.out_dir, side, "part-00000.parquet"))
        ctx.record(rows={"train_anchors": n_anchors, "train_pool": n_pool}, source=str(src))
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-dir", help="run dir with a finished sketch stage")
    src.add_argument("--job", help="job YAML; its sketch stage is run through the CLI when missing")
    ap.add_argument("--set", action="append", default=[], help="job override for --job (k=v)")
    ap.add_argument("--sizes", default="16,32,56", help="train anchor counts (at least 3 for a curve)")
    ap.add_argument("--pool-ratio", type=float, default=2.0, help="train pool rows per train anchor (1:2)")
    ap.add_argument("--epochs", type=int, default=None, help="override fit.epochs")
    ap.add_argument("--fit-set", action="append", default=[], help="extra fit overrides, e.g. fit.lr=2e-5")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "fit_quality.json"))
    args = ap.parse_args()

    sizes = sorted(int(s) for s in args.sizes.split(","))
    src_run = ensure_sketch(args, max(sizes))
    config = json.loads((src_run / "sketch" / "manifest.json").read_text())["config"]
    bench_root = src_run / "bench_fit"
    results = []
    for n in sizes:
        n_pool = int(n * args.pool_ratio)
        overrides = [f"run_dir={bench_root / f'n{n}'}", f"sketch.train_anchors={n}",
                     f"sketch.train_pool={n_pool}", *args.fit_set]
        if args.epochs:
            overrides.append(f"fit.epochs={args.epochs}")
        job = load_job(data=config, overrides=overrides)
        artifacts.run_stage(job, "sketch", overwrite=True, runner=subset_runner(src_run / "sketch", n, n_pool))
        t0 = time.perf_counter()
        artifacts.run_stage(job, "fit", overwrite=True)
        wall = time.perf_counter() - t0
        m = json.loads((Path(job.run_dir) / "fit" / "metrics.json").read_text())
        last = m["epochs"][-1]
        best = max(m["epochs"], key=lambda e: e["spearman_aggregated"])
        results.append({"train_anchors": n, "train_pool": n_pool, "splits": m["splits"],
                        "untrained": m["untrained"], "last_epoch": last, "best_epoch_by_aggregated": best,
                        "timings": m["timings"], "stage_wall_s": round(wall, 1), "truncated": m["truncated"],
                        "workers": m["workers"]})
        print(f"n={n}: agg {m['untrained']['spearman_aggregated']:+.3f} -> {last['spearman_aggregated']:+.3f}, "
              f"per-anchor {m['untrained']['spearman_per_anchor']:+.3f} -> {last['spearman_per_anchor']:+.3f} "
              f"({wall:.0f} s)", flush=True)

    print(f"\nsource sketch: {src_run}/sketch   eval split: {results[0]['splits']['eval_anchors']} anchors x "
          f"{results[0]['splits']['eval_pool']} pool   encoder: {config['encoder']['model']}")
    print(f"{'train a x p':>12} {'agg untr.':>9} {'agg last':>9} {'PA untr.':>9} {'PA last':>9} "
          f"{'best agg (ep)':>14} {'train s':>8} {'stage s':>8}")
    for r in results:
        u, last, best = r["untrained"], r["last_epoch"], r["best_epoch_by_aggregated"]
        print(f"{r['train_anchors']:>5} x {r['train_pool']:<5} {u['spearman_aggregated']:>+9.3f} "
              f"{last['spearman_aggregated']:>+9.3f} {u['spearman_per_anchor']:>+9.3f} "
              f"{last['spearman_per_anchor']:>+9.3f} {best['spearman_aggregated']:>+9.3f} ({best['epoch']:>2})"
              f" {r['timings']['train_s']:>8.1f} {r['stage_wall_s']:>8.1f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"source_run_dir": str(src_run), "results": results}, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
