"""Held-out quality of the distilled encoder against the plain starting encoder: train sizes x seeds x recipes.

Takes a finished sketch stage (real teacher sketches, e.g. the offline SmolLM2 teacher of
`jobs/demo.yaml`) and, for each train size n, each seed and each recipe, fits the encoder on the
first n train anchors x `pool_ratio * n` train pool rows (by id; fit carves its validation split
from these) while keeping the eval split unchanged, so every run is scored on the same held-out
ground truth. A recipe is a named set of `fit.*` overrides: `classic` is today's defaults (dropout
as the model has it, every train row fitted, the last epoch exported), `validated` chooses the
exported encoder on a validation split (epoch 0 and weight interpolations included), and the others
switch one change on or off. Prints, per (size, recipe): the held-out aggregated and per-anchor
Spearman of the exported encoder as mean and 95 % t-interval over seeds, beside the plain starting
encoder's; writes every run to `bench/out/fit_quality_<run dir name>.json` (one file per source run,
so two benches on different tasks do not overwrite each other; `--out` names another).

    # reuse a run dir whose sketch stage is finished
    .venv/bin/python bench/bench_fit_quality.py --run-dir runs/demo --sizes 64,24,40 --seeds 0,1,2 \
        --fit-set fit.heldout_every_epoch=false
    # or sketch first through the CLI (sized for the largest n), then bench
    .venv/bin/python bench/bench_fit_quality.py --job jobs/demo.yaml --sizes 24,40,64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

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
            sizes = [f"sketch.train_anchors={max_anchors}", f"sketch.train_pool={int(max_anchors * args.pool_ratio)}"]
            cmd = [
                str(ROOT / ".venv" / "bin" / "influcoder"),
                "sketch",
                args.job,
                *[x for s in [*args.set, *sizes] for x in ("--set", s)],
            ]
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
                raise SystemExit(
                    f"the source sketch has {train.num_rows} train {side}, {n} requested; "
                    f"sketch more rows or bench smaller sizes."
                )
            train = train.take(pc.sort_indices(train, sort_keys=[(ID, "ascending")])).slice(0, n)
            out = pa.concat_tables([table.filter(pc.equal(table[SPLIT], "eval")), train])
            os.makedirs(os.path.join(ctx.out_dir, side))
            pq.write_table(out, os.path.join(ctx.out_dir, side, "part-00000.parquet"))
        ctx.record(rows={"train_anchors": n_anchors, "train_pool": n_pool}, source=str(src))

    return run


# Every recipe starts from the library's defaults for the keys recipes vary, whatever the job file that
# made the sketch run sets (the demo jobs set a blend and a centred teacher), so `classic` is classic.
RECIPE_BASE: list[str] = [
    "fit.dropout=null",
    "fit.val_frac=0",
    "fit.restore_best=false",
    "fit.blend=[]",
    "fit.center_teacher=false",
]

RECIPES: dict[str, list[str]] = {
    # Today's defaults: dropout as the model has it, every train row fitted, the last epoch exported.
    "classic": [],
    # Chosen on a validation split: the best epoch, the starting encoder or a weight interpolation.
    "validated": ["fit.dropout=0", "fit.val_frac=0.25", "fit.restore_best=true"],
    "validated_no_interpolation": ["fit.dropout=0", "fit.val_frac=0.25", "fit.restore_best=true", "fit.interpolate=[]"],
    "no_dropout": ["fit.dropout=0"],
    # The last epoch, blended in score space with the starting encoder at a weight chosen on validation.
    "blend": ["fit.val_frac=0.25", "fit.blend=[0.1,0.2,0.3,0.4,0.5,0.6]"],
    # Targets from centred teacher sketches (fit.center_teacher): the held-out truth is centred too, so
    # its fidelity columns measure agreement with that teacher, not with the raw one of the rows above.
    "center": ["fit.center_teacher=true"],
    "center_blend": ["fit.center_teacher=true", "fit.val_frac=0.25", "fit.blend=[0.1,0.2,0.3,0.4,0.5,0.6]"],
}


def by_size_and_recipe(results: list[dict], sizes: list[int], recipes: list[str]):
    """(train size, recipe, that cell's runs over seeds), in the order asked, cells without runs skipped."""
    for n in sizes:
        for recipe in recipes:
            rs = [r for r in results if r["train_anchors"] == n and r["recipe"] == recipe]
            if rs:
                yield n, recipe, rs


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and 95 % t half-width over seeds (0 for a single seed)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return float(x.mean()), 0.0
    return float(x.mean()), float(stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size))


def _gain_text(exported: dict, key: str) -> str:
    """The exported encoder's paired held-out gain over the starting encoder, with its bootstrap CI."""
    d = exported.get("vs_untrained") or {}
    ci = d.get(key + "_diff_ci")
    return f"{d[key + '_diff']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "-"


def _beyond_noise(rs: list[dict], key: str) -> str:
    """Seeds whose paired bootstrap CI of the gain over the starting encoder excludes 0 (above / below)."""
    cis = [(r.get("vs_untrained") or {}).get(key + "_diff_ci") for r in rs]
    return f"{sum(1 for c in cis if c and c[0] > 0)}/{sum(1 for c in cis if c and c[1] < 0)}"


def interpolation_curve(job, weights: list[float]) -> dict[str, dict[str, float]]:
    """Held-out Spearman of (1 - w) * start + w * exported for each w, from a finished fit of `job`:
    how much of the starting encoder's knowledge a fixed weight-space mix would keep (WiSE-FT). The
    fit's own weights are w = 1 only when the fit exported its last epoch (the classic recipe)."""
    import torch

    from pipeline.encoder import TextEncoder
    from pipeline.metrics import fidelity_difference, spearman_with_ci
    from pipeline.models import resolve_encoder
    from pipeline.stages.fit import _load_mix
    from pipeline.stages.fit_data import load_fit_data
    from pipeline.stages.fit_worker import encoder_scores

    run = Path(job.run_dir)
    data = load_fit_data(str(run / "sketch"), job.encoder.anchor_prefix)
    tuned_enc = TextEncoder(str(run / "fit" / "encoder"), max_len=job.encoder.max_len)
    enc = TextEncoder(resolve_encoder(job.encoder.model), max_len=job.encoder.max_len)
    start = {k: v.detach().clone() for k, v in enc.model.state_dict().items()}
    tuned = {k: v.detach().clone() for k, v in tuned_enc.model.state_dict().items()}
    out, preds = {}, {}
    with torch.inference_mode():
        for w in sorted({0.0, *weights, 1.0}):
            _load_mix(enc, start, tuned, w)
            preds[w] = encoder_scores(enc, data.eval_anchors, data.eval_pool, 64)
            r = spearman_with_ci(preds[w], data.ground_truth, seed=job.seed)
            d = fidelity_difference(preds[w], preds[0.0], data.ground_truth, seed=job.seed)
            out[f"{w:g}"] = {
                "spearman_aggregated": r["spearman_aggregated"],
                "spearman_per_anchor": r["spearman_per_anchor"],
                **d,
            }
    return out


def cached_curve(job, weights: str) -> dict:
    """`interpolation_curve`, kept beside the fit (bench_interpolation.json) so that a rerun with
    --reuse does not embed the held-out split again; recomputed when the fit is newer."""
    cache = Path(job.run_dir) / "bench_interpolation.json"
    fit_mtime = (Path(job.run_dir) / "fit" / "metrics.json").stat().st_mtime
    if cache.exists() and cache.stat().st_mtime >= fit_mtime:
        saved = json.loads(cache.read_text())
        if saved.get("weights") == weights:
            return saved["curve"]
    curve = interpolation_curve(job, [float(w) for w in weights.split(",")])
    cache.write_text(json.dumps({"weights": weights, "curve": curve}))
    return curve


def application_metrics(app_job, model_dirs: dict[str, str]) -> dict[str, dict[str, float]]:
    """AUPRC (95 % bootstrap CI), Recall@10 and MRR of each encoder folder on `app_job`'s labelled
    corpus and queries (what eval measures), and its AUPRC's paired difference from the plain
    starting encoder's ("plain", as its users run it: plain texts). Blended exports load as blends."""
    import pyarrow.compute as pcmp

    from pipeline.encoder import TextEncoder
    from pipeline.metrics import paired_difference
    from pipeline.models import resolve_encoder
    from pipeline.schema import LABEL, TEXT
    from pipeline.stages import eval as ev
    from pipeline.textview import table_views

    rows, queries = ev._eval_rows(app_job), ev._queries(app_job)
    labels = pcmp.fill_null(rows.column(LABEL).cast(pa.int64()), 0).to_numpy().astype(int)
    ids = rows.column(ID).to_pylist()
    dirs = {"plain": resolve_encoder(app_job.encoder.model), **model_dirs}  # plain first: the others pair with it
    out, reps = {}, {}
    for name, model_dir in dirs.items():
        enc = TextEncoder(model_dir, app_job.encoder.max_len, dtype="auto")
        if name == "plain":
            q, r = queries.column(TEXT).to_pylist(), rows.column(TEXT).to_pylist()
        else:
            q, r = table_views(queries, app_job.encoder.anchor_prefix), table_views(rows)
        scores = enc.embed(q, batch_size=32) @ enc.embed(r, batch_size=32).T
        m, reps[name] = ev._application_metrics(scores, labels, ids, [10], app_job.seed)
        out[name] = {k: m[k] for k in ("auprc", "auprc_ci", "recall@10", "mrr")}
        if name != "plain":
            out[name]["auprc_vs_plain"] = m["auprc"] - out["plain"]["auprc"]
            out[name]["auprc_vs_plain_ci"] = paired_difference(reps[name], reps["plain"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-dir", help="run dir with a finished sketch stage")
    src.add_argument("--job", help="job YAML; its sketch stage is run through the CLI when missing")
    ap.add_argument("--set", action="append", default=[], help="job override for --job (k=v)")
    ap.add_argument("--sizes", default="24,40,64", help="train anchor counts (at least 3 for a curve)")
    ap.add_argument("--seeds", default="0,1,2", help="job seeds (fit order, candidate draws, validation split)")
    ap.add_argument("--recipes", default="classic,validated", help=f"comma-separated, from {sorted(RECIPES)}")
    ap.add_argument("--pool-ratio", type=float, default=4.0, help="train pool rows per train anchor")
    ap.add_argument("--epochs", type=int, default=None, help="override fit.epochs")
    ap.add_argument("--fit-set", action="append", default=[], help="extra fit overrides, e.g. fit.lr=2e-5")
    ap.add_argument("--out", default=None, help="default: bench/out/fit_quality_<run dir name>.json")
    ap.add_argument(
        "--interpolate",
        default="",
        help="also measure fixed weight-space mixes of the starting and exported encoders, e.g. 0.25,0.5,0.75",
    )
    ap.add_argument(
        "--application",
        default="",
        help="a job YAML with a labelled corpus and queries (e.g. jobs/demo.yaml): also measure each "
        "export's AUPRC, Recall@10 and MRR there, beside the plain starting encoder's",
    )
    ap.add_argument("--reuse", action="store_true", help="keep a (size, recipe, seed) fit that already finished")
    ap.add_argument(
        "--finished-only",
        action="store_true",
        help="with --reuse: tabulate the fits that already finished and run no new one (a partial grid)",
    )
    args = ap.parse_args()

    sizes = [int(s) for s in args.sizes.split(",")]  # in the order given (the most telling first)
    seeds = [int(s) for s in args.seeds.split(",")]
    recipes = args.recipes.split(",")
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        sys.exit(f"unknown recipe(s) {unknown}; choose from {sorted(RECIPES)}")
    src_run = ensure_sketch(args, max(sizes))
    args.out = args.out or str(ROOT / "bench" / "out" / f"fit_quality_{src_run.resolve().name}.json")
    config = json.loads((src_run / "sketch" / "manifest.json").read_text())["config"]
    bench_root = src_run / "bench_fit"
    results = []
    for n in sizes:
        n_pool = int(n * args.pool_ratio)
        for recipe in recipes:
            for seed in seeds:
                overrides = [
                    f"run_dir={bench_root / f'n{n}-{recipe}-s{seed}'}",
                    f"seed={seed}",
                    f"sketch.train_anchors={n}",
                    f"sketch.train_pool={n_pool}",
                    *RECIPE_BASE,
                    *RECIPES[recipe],
                    *args.fit_set,
                ]
                if args.epochs:
                    overrides.append(f"fit.epochs={args.epochs}")
                job = load_job(data=config, overrides=overrides)
                done = Path(job.run_dir) / "fit" / "metrics.json"
                if args.finished_only and not done.exists():
                    continue
                t0 = time.perf_counter()
                if not (args.reuse and done.exists()):
                    runner = subset_runner(src_run / "sketch", n, n_pool)
                    artifacts.run_stage(job, "sketch", overwrite=True, runner=runner)
                    artifacts.run_stage(job, "fit", overwrite=True)
                wall = time.perf_counter() - t0
                m = json.loads(done.read_text())
                if "vs_untrained" not in m["exported"]:  # a fit from before the paired figures: add them
                    curve = interpolation_curve(job, [])
                    m["exported"]["vs_untrained"] = {k: v for k, v in curve["1"].items() if "diff" in k}
                curve = cached_curve(job, args.interpolate) if args.interpolate else None
                exported = m["exported"]
                results.append(
                    {
                        "train_anchors": n,
                        "train_pool": n_pool,
                        "recipe": recipe,
                        "seed": seed,
                        "splits": m["splits"],
                        "untrained": m["untrained"],
                        "exported": exported,
                        "vs_untrained": exported.get("vs_untrained"),
                        "selected_epoch": m["selected_epoch"],
                        "interpolation_weight": m.get("interpolation_weight"),
                        "blend_weight": m.get("blend_weight", 0.0),
                        "run_dir": str(job.run_dir),
                        "last_epoch": m["epochs"][-1],
                        "timings": m["timings"],
                        "stage_wall_s": round(wall, 1),
                        "interpolation_heldout": curve,
                    }
                )
                print(
                    f"n={n} {recipe} seed {seed}: agg {m['untrained']['spearman_aggregated']:+.3f} -> "
                    f"{exported['spearman_aggregated']:+.3f}, per-anchor {m['untrained']['spearman_per_anchor']:+.3f}"
                    f" -> {exported['spearman_per_anchor']:+.3f} (epoch {m['selected_epoch']}, "
                    f"w {m.get('interpolation_weight')}, blend {m.get('blend_weight', 0.0)}, {wall:.0f} s); paired gain agg "
                    f"{_gain_text(exported, 'spearman_aggregated')}, per-anchor {_gain_text(exported, 'spearman_per_anchor')}",
                    flush=True,
                )

    print(
        f"\nsource sketch: {src_run}/sketch   eval split: {results[0]['splits']['eval_anchors']} anchors x "
        f"{results[0]['splits']['eval_pool']} pool   encoder: {config['encoder']['model']}   seeds {seeds}"
    )
    print("held-out Spearman, mean ± 95 % t-interval over seeds (start = the plain starting encoder)")
    print(
        f"{'anchors x pool':>14} {'recipe':<17} {'agg start':>9} {'agg exported':>16} {'PA start':>9} "
        f"{'PA exported':>16} {'epochs chosen':>14} {'blends chosen':>16} {'seeds >/< start':>16}"
    )
    for n, recipe, rs in by_size_and_recipe(results, sizes, recipes):
        agg = t_interval([r["exported"]["spearman_aggregated"] for r in rs])
        pa_ = t_interval([r["exported"]["spearman_per_anchor"] for r in rs])
        print(
            f"{n:>5} x {rs[0]['train_pool']:<6} {recipe:<17} {rs[0]['untrained']['spearman_aggregated']:>+9.3f} "
            f"{agg[0]:>+8.3f} ± {agg[1]:.3f} {rs[0]['untrained']['spearman_per_anchor']:>+9.3f} "
            f"{pa_[0]:>+8.3f} ± {pa_[1]:.3f} {str([r['selected_epoch'] for r in rs]):>14} "
            f"{str([r.get('blend_weight', 0.0) for r in rs]):>16} "
            f"{_beyond_noise(rs, 'spearman_aggregated') + ' agg, ' + _beyond_noise(rs, 'spearman_per_anchor') + ' PA':>16}"
        )
    if args.interpolate:
        ws = sorted(results[0]["interpolation_heldout"], key=float)
        print("\nfixed weight-space mixes (1 - w) * start + w * exported, held-out aggregated / per-anchor Spearman,")
        print("mean ± 95 % t-interval over seeds (w = 0: the starting encoder, w = 1: the exported one)")
        print(f"{'anchors x pool':>14} {'recipe':<17} " + " ".join(f"{'w=' + w:>21}" for w in ws))
        for n, recipe, rs in by_size_and_recipe(results, sizes, recipes):
            cells = []
            for w in ws:
                a = t_interval([r["interpolation_heldout"][w]["spearman_aggregated"] for r in rs])
                p_ = t_interval([r["interpolation_heldout"][w]["spearman_per_anchor"] for r in rs])
                cells.append(f"{a[0]:+.3f}±{a[1]:.3f}/{p_[0]:+.3f}")
            print(f"{n:>5} x {rs[0]['train_pool']:<6} {recipe:<17} " + " ".join(f"{c:>21}" for c in cells))
    if args.application:
        app_job = load_job(args.application)
        app = application_metrics(app_job, {r["run_dir"]: str(Path(r["run_dir"]) / "fit" / "encoder") for r in results})
        for r in results:
            r["application"] = app[r["run_dir"]]
        plain = app["plain"]
        print(
            f"\napplication: {args.application} (labelled corpus and queries; AUPRC with its 95 % bootstrap CI and "
            f"its paired difference from the plain encoder's, mean ± 95 % t-interval over seeds for the means)"
        )
        print(
            f"  plain starting encoder: AUPRC {plain['auprc']:.3f} [{plain['auprc_ci'][0]:.3f}, "
            f"{plain['auprc_ci'][1]:.3f}], Recall@10 {plain['recall@10']:.3f}, MRR {plain['mrr']:.3f}"
        )
        for n, recipe, rs in by_size_and_recipe(results, sizes, recipes):
            au = t_interval([r["application"]["auprc"] for r in rs])
            per_seed = ", ".join(
                f"{a['auprc']:.3f} ({a['auprc_vs_plain']:+.3f} [{a['auprc_vs_plain_ci'][0]:+.3f}, "
                f"{a['auprc_vs_plain_ci'][1]:+.3f}])"
                for a in (r["application"] for r in rs)
            )
            rec = t_interval([r["application"]["recall@10"] for r in rs])
            mrr = t_interval([r["application"]["mrr"] for r in rs])
            print(
                f"  {n:>3} {recipe:<10} AUPRC {au[0]:.3f} ± {au[1]:.3f}  Recall@10 {rec[0]:.3f}  MRR {mrr[0]:.3f}  "
                f"per seed (vs plain): {per_seed}"
            )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {
                "source_run_dir": str(src_run),
                "seeds": seeds,
                "recipes": {r: RECIPES[r] for r in recipes},
                "results": results,
            },
            f,
            indent=2,
        )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
