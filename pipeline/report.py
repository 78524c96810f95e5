"""The eval report: report.md with the comparison table and the run's settings, and PNG plots
(precision-recall curves, held-out Spearman by epoch, quality vs ms/sample on a log scale)."""

from __future__ import annotations

import json
import math
from typing import Any, Optional

from pipeline import storage
from pipeline.config import EVAL_METHODS, JobConfig

# Every eval method, each followed by the variants eval reports beside it.
METHOD_ORDER = [
    m for name in EVAL_METHODS for m in (name, *(["untrained_encoder_prefixed"] if name == "untrained_encoder" else []))
]
COLORS = {
    "influcoder": "tab:blue",
    "cascade": "tab:purple",
    "gradient": "tab:red",
    "untrained_encoder": "tab:gray",
    "untrained_encoder_prefixed": "tab:brown",
    "bm25": "tab:green",
    "random": "black",
}


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines (cells as given; `|` inside a cell is the caller's to escape)."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(row) + " |" for row in rows
    ]


def _fmt(v: Any, spec: str = ".3f", ci: Any = None) -> str:
    """A number, with its 95 % CI in brackets when there is one."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, spec) + (f" [{format(ci[0], spec)}, {format(ci[1], spec)}]" if ci else "")


def _state(ci: Optional[list[float]], better: str, worse: str) -> str:
    """How a paired difference reads: it counts only when its 95 % CI excludes 0."""
    return better if ci and ci[0] > 0 else worse if ci and ci[1] < 0 else "level (within the noise)"


def _fidelity_state(aggregated_ci: Optional[list[float]], per_anchor_ci: Optional[list[float]]) -> str:
    """Both fidelity readings in words; one phrase when they agree."""
    agg = _state(aggregated_ci, "more faithful", "less faithful")
    per_anchor = _state(per_anchor_ci, "more faithful", "less faithful")
    return agg if agg == per_anchor else f"{agg} on the aggregated ranking, {per_anchor} per anchor"


def verdict(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Which method finds the label-1 rows best (AUPRC), how influcoder stands against the plain
    starting encoder and the best cheap method, and whether it is more faithful to the teacher than
    the plain encoder on the held-out split: a difference counts only when its paired 95 % CI
    excludes 0."""
    out: dict[str, Any] = {}
    vs = results.get("influcoder", {}).get("vs", {})
    plain = vs.get("untrained_encoder", {}).get("heldout")
    if plain:  # fidelity first: distillation's own promise, measurable without labels
        ci = plain["spearman_aggregated_diff_ci"]
        out["fidelity_vs_plain_encoder"] = {
            "method": "untrained_encoder",
            "spearman_aggregated_diff": plain["spearman_aggregated_diff"],
            "spearman_aggregated_diff_ci": ci,
            "spearman_per_anchor_diff": plain["spearman_per_anchor_diff"],
            "spearman_per_anchor_diff_ci": plain["spearman_per_anchor_diff_ci"],
            "influcoder_is": _fidelity_state(ci, plain["spearman_per_anchor_diff_ci"]),
        }
    scored = {n: r for n, r in results.items() if r.get("auprc") is not None}
    if not scored:
        return out
    best = max(scored, key=lambda n: scored[n]["auprc"])
    out["best_auprc"] = best
    cheap = [n for n in scored if n not in ("influcoder", "gradient", "cascade", "random")]
    for label, other in (
        ("vs_plain_encoder", "untrained_encoder"),
        ("vs_best_cheap", max(cheap, key=lambda n: scored[n]["auprc"]) if cheap else None),
    ):
        if other and "auprc_diff" in vs.get(other, {}):
            diff, ci = vs[other]["auprc_diff"], vs[other]["auprc_diff_ci"]
            out[label] = {
                "method": other,
                "auprc_diff": diff,
                "auprc_diff_ci": ci,
                "influcoder_is": _state(ci, "better", "worse"),
                # Recall@k and MRR, paired on the same resampled queries (eval's `vs`).
                "per_query": {
                    key[: -len("_diff")]: {
                        "diff": value,
                        "diff_ci": vs[other].get(key + "_ci"),
                        "influcoder_is": _state(vs[other].get(key + "_ci"), "better", "worse"),
                    }
                    for key, value in vs[other].items()
                    if key.endswith("_diff") and key != "auprc_diff"
                },
            }
    return out


def verdict_text(verdict: dict[str, Any]) -> list[str]:
    """The verdict in words (headline and report share it)."""
    lines = []
    if verdict.get("best_auprc"):
        lines.append(f"Best AUPRC: {verdict['best_auprc']}.")
    for key in ("vs_plain_encoder", "vs_best_cheap"):
        v = verdict.get(key)
        if v and not (key == "vs_best_cheap" and v["method"] == verdict.get("vs_plain_encoder", {}).get("method")):
            lines.append(
                f"influcoder vs {v['method']}: AUPRC {v['auprc_diff']:+.3f}{_ci_text(v['auprc_diff_ci'])} "
                f"(95 % CI): influcoder is {v['influcoder_is']}."
            )
            per_query = v.get("per_query") or {}
            if per_query:
                shown = {("MRR" if name == "mrr" else name): d for name, d in per_query.items()}
                figures = ", ".join(f"{name} {d['diff']:+.3f}{_ci_text(d['diff_ci'])}" for name, d in shown.items())
                by_state: dict[str, list[str]] = {}  # the metrics that read the same, in order
                for name, d in shown.items():
                    by_state.setdefault(d["influcoder_is"], []).append(name)
                state = (
                    next(iter(by_state))
                    if len(by_state) == 1
                    else ", ".join(f"{st} on {' and '.join(names)}" for st, names in by_state.items())
                )
                lines.append(f"  per query: {figures} (95 % CI): influcoder is {state}.")
    f = verdict.get("fidelity_vs_plain_encoder")
    if f:
        lines.append(
            f"Fidelity to the teacher vs {f['method']} (held-out, paired): aggregated rho "
            f"{f['spearman_aggregated_diff']:+.3f}{_ci_text(f['spearman_aggregated_diff_ci'])}, per-anchor "
            f"{f['spearman_per_anchor_diff']:+.3f}{_ci_text(f['spearman_per_anchor_diff_ci'])} (95 % CI): "
            f"influcoder is {f['influcoder_is']}."
        )
    return lines


def _ci_text(ci: Optional[list[float]]) -> str:
    return f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""


def draw_spearman_by_epoch(ax, fit_metrics: dict[str, Any]) -> None:
    """Spearman vs the teacher by epoch (epoch 0 = the starting encoder) from fit/metrics.json:
    held-out (solid) and validation (dotted) when measured every epoch, else the starting encoder's
    held-out level as a dashed line; the exported encoder's held-out figure as a star."""
    epochs = fit_metrics["epochs"]
    untrained = fit_metrics["untrained"]
    xs = [0] + [e["epoch"] for e in epochs]
    for key, label, color in (("spearman_aggregated", "aggregated", "C0"), ("spearman_per_anchor", "per-anchor", "C1")):
        for prefix, style, split in (("", "-", "held-out"), ("val_", ":", "validation")):
            if prefix + key not in untrained:
                continue
            if all(prefix + key in e for e in epochs):
                ys = [untrained[prefix + key]] + [e[prefix + key] for e in epochs]
                ax.plot(xs, ys, marker="o", linestyle=style, color=color, label=f"{label} ({split})")
            elif not prefix:  # held-out measured only for the export (fit.heldout_every_epoch=false)
                ax.axhline(untrained[key], color=color, linestyle="--", label=f"{label} (held-out, start)")
    exported = fit_metrics.get("exported")
    if exported:
        ax.scatter(
            [fit_metrics["selected_epoch"]],
            [exported["spearman_aggregated"]],
            marker="*",
            s=150,
            color="black",
            zorder=5,
            label="exported (aggregated, held-out)",
        )
    ax.set(xlabel="epoch (0 = starting encoder)", ylabel="Spearman vs gradient ground truth")
    ax.legend(fontsize=8)


def _plots(
    out_dir: str, metrics: dict[str, Any], curves: dict[str, Any], fit_metrics: dict[str, Any] | None
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    if curves:
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        for name in [m for m in METHOD_ORDER if m in curves]:
            c = curves[name]
            auprc = metrics["methods"][name].get("auprc")
            ax.plot(c["recall"], c["precision"], label=f"{name} (AUPRC {_fmt(auprc)})", color=COLORS.get(name))
        if metrics.get("positives") and metrics.get("rows"):
            ax.axhline(metrics["positives"] / metrics["rows"], ls=":", color="black", lw=0.8, label="base rate")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title("Finding the label-1 rows (mean score over queries)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        _savefig(fig, storage.join(out_dir, "pr_curves.png"))
        plt.close(fig)
        made.append("pr_curves.png")
    if (fit_metrics or {}).get("epochs"):
        fig, ax = plt.subplots(figsize=(5.5, 4.0))
        draw_spearman_by_epoch(ax, fit_metrics)
        fig.tight_layout()
        _savefig(fig, storage.join(out_dir, "spearman_by_epoch.png"))
        plt.close(fig)
        made.append("spearman_by_epoch.png")
    points = [(n, r) for n, r in metrics["methods"].items() if r.get("ms_per_sample")]
    if points:
        fig, ax = plt.subplots(figsize=(5.5, 4.0))
        quality_key = "auprc" if all("auprc" in r for _, r in points) else None
        for name, r in points:
            y = r[quality_key] if quality_key else r["heldout"]["spearman_aggregated"]
            ax.scatter(max(r["ms_per_sample"], 1e-4), y, color=COLORS.get(name), s=50)
            ax.annotate(name, (max(r["ms_per_sample"], 1e-4), y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("milliseconds per scored sample (log)")
        ax.set_ylabel("AUPRC" if quality_key else "aggregated Spearman (held-out)")
        ax.set_title("Quality vs cost")
        fig.tight_layout()
        _savefig(fig, storage.join(out_dir, "quality_vs_cost.png"))
        plt.close(fig)
        made.append("quality_vs_cost.png")
    return made


def _savefig(fig, path: str) -> None:
    """A PNG at `path`, local or on an object store."""
    fs, p = storage.filesystem(path)
    with fs.open_output_stream(p) as f:
        fig.savefig(f, format="png", dpi=120)


def teacher_notes(metrics: dict[str, Any]) -> list[str]:
    """What the teacher side of eval's metrics means (headline and report share it): how the cascade
    ordered its block, and whether the teacher's cosines are of centred sketches."""
    lines = []
    cascade = metrics["methods"].get("cascade")
    if cascade:
        fused = cascade.get("rerank_by", "teacher") == "fused"  # metrics from before rerank_by: the teacher alone
        how = "fusing the encoder's and the teacher's ranks" if fused else "the teacher's score"
        lines.append(
            f"cascade: influcoder's top {cascade['k']} of {cascade['of_rows']} rows re-scored by the teacher and "
            f"re-ordered by {how} (score.rerank_by)."
        )
    if metrics.get("teacher_centered"):
        lines.append(
            "The teacher's cosines are of centred sketches (fit.center_teacher): the gradient method, the cascade "
            "and every held-out rho are against that teacher, not the raw one."
        )
    return lines


def blend_lead_text(gain: Optional[float], ci: Optional[list[float]]) -> str:
    """How far a chosen blend led the distilled encoder alone on fit's validation split, and whether that
    lead is beyond the noise (headline and report share it); "" when fit did not record it."""
    if gain is None:
        return ""
    lo, hi = ci or (float("nan"), float("nan"))
    return (
        f", where its fidelity led the distilled encoder alone's by {gain:+.3f} [{lo:+.3f}, {hi:+.3f}], "
        f"{'beyond' if lo > 0 else 'within'} the noise"
    )


def export_text(fit_metrics: dict[str, Any]) -> str:
    """What `influcoder` scores with: the fit's export, as fit/metrics.json records it."""
    sel = fit_metrics.get("selected_epoch")
    text = f"`influcoder` scores with the fit's export: epoch {sel} ({'the starting encoder' if sel == 0 else 'distilled'})"
    w = fit_metrics.get("interpolation_weight", 1.0)
    if w not in (None, 1.0):
        text += f", weight-interpolated {w:.2f} of the way from the starting encoder"
    b = fit_metrics.get("blend_weight") or 0.0
    if b:
        chosen = next((c for c in fit_metrics.get("candidates") or [] if c.get("blend") == b), {})
        text += (
            f"; its scores blend the distilled encoder's cosine with the plain starting encoder's at weight "
            f"{b:.2f} for the plain one, chosen on the validation split{blend_lead_text(chosen.get('gain'), chosen.get('gain_ci'))} "
            "(codes of twice the width, two forward passes per row)"
        )
    return text + "."


def write_report(
    job: JobConfig,
    metrics: dict[str, Any],
    curves: dict[str, Any],
    eval_out_dir: str,
    upstream: dict[str, dict[str, Any]],
) -> str:
    out_dir = storage.join(eval_out_dir, "report")  # local or a URI run_dir's (written through pyarrow)
    storage.makedirs(out_dir)
    fit_path = storage.join(job.run_dir, "fit", "metrics.json")
    fit_metrics = storage.read_json(fit_path) if storage.exists(fit_path) else None
    plots = _plots(out_dir, metrics, curves, fit_metrics)
    recall_keys = [f"recall@{k}" for k in job.eval.recall_k]
    lines = ["# influcoder evaluation report", ""]
    lines += [
        f"Corpus `{storage.redact(job.corpus.path)}`: {metrics['rows']} rows"
        + (f", {metrics['positives']} with label 1 (the rows to find)" if metrics.get("positives") is not None else "")
        + f"; {metrics['queries']} queries from `{storage.redact(job.score.queries.path)}`.",
        "",
    ]
    header = ["method", "AUPRC", *recall_keys, "MRR", "held-out agg. ρ", "held-out per-anchor ρ"]
    header += ["corpus agg. ρ vs gradient", "setup s", "ms/sample", "bytes/sample"]
    table = []
    for name in [m for m in METHOD_ORDER if m in metrics["methods"]]:
        r = metrics["methods"][name]
        h = r["heldout"]
        cg = (r.get("corpus_vs_gradient") or {}).get("spearman_aggregated", 1.0 if name == "gradient" else None)
        table.append(
            [name, _fmt(r.get("auprc"), ci=r.get("auprc_ci"))]
            + [_fmt(r.get(k), ci=r.get(k + "_ci")) for k in recall_keys]
            + [
                _fmt(r.get("mrr"), ci=r.get("mrr_ci")),
                _fmt(h["spearman_aggregated"], "+.3f", h.get("spearman_aggregated_ci")),
                _fmt(h["spearman_per_anchor"], "+.3f", h.get("spearman_per_anchor_ci")),
                _fmt(cg, "+.3f"),
                _fmt(r.get("setup_s"), ".1f"),
                _fmt(r.get("ms_per_sample"), ".3f"),
                _fmt(r.get("bytes_per_sample"), ".0f"),
            ]
        )
    lines += ["## Comparison", "", *markdown_table(header, table)]
    ratio = metrics.get("speed", {}).get("influcoder_vs_gradient_ms_ratio")
    lines += [
        "",
        "Numbers in brackets are 95 % bootstrap confidence intervals (AUPRC: queries and rows resampled; "
        "Recall@k, MRR: queries; held-out ρ: anchors and pool rows).",
        "",
    ]
    # One paragraph: the headline's indented sub-lines ("  per query: ...") become sentences of it.
    sentences = [line.strip() for line in verdict_text(metrics.get("verdict", {}))]
    lines += ["**Verdict.** " + " ".join(t[:1].upper() + t[1:] for t in sentences), ""]
    lines += [export_text(fit_metrics), ""] if fit_metrics else [""]
    notes = teacher_notes(metrics)
    lines += [" ".join(notes), ""] if notes else []
    if ratio:
        lines += [
            f"Per scored sample, influcoder is **{ratio:.0f}×** faster than the gradient teacher on this machine "
            f"(ms/sample measured after a warm-up, model loading excluded; influcoder's one-time setup is the "
            f"sketch + fit stages).",
            "",
        ]
    lines += [
        "How to read it: AUPRC, Recall@k and MRR measure the application (finding the label-1 rows); "
        "ρ measures fidelity to the gradient teacher (Spearman of rankings). `held-out` uses the sketch "
        "stage's eval anchors × eval pool, which distillation never saw; `corpus … vs gradient` ranks the "
        "evaluated corpus against the teacher's own ranking. `gradient` is the expensive reference.",
        "",
    ]
    leak = metrics.get("leakage", {})
    from pipeline.neardup import SHINGLE_CHARS, THRESHOLD

    lines += [
        "## Leakage audit",
        "",
        "Overlap between the evaluated rows/queries and the distillation data "
        "(ids / normalised texts / `near_dup`: rows with a near-duplicate, Jaccard ≥ "
        f"{THRESHOLD} on character {SHINGLE_CHARS}-grams): " + ", ".join(f"{k} {v}" for k, v in leak.items()),
        "",
    ]
    stored = (metrics.get("methods", {}).get("influcoder") or {}).get("stored_codes") or {}
    if stored:
        lines += [
            f"influcoder is scored with the codes `encode` stored ({stored['rows']} rows"
            + (f", {stored['embedded_here']} missing from the table embedded here" if stored["embedded_here"] else "")
            + (
                f"); against a fresh pass of the encoder over {stored['checked']} of them: min cosine "
                f"{_fmt(stored['min_cosine'], '.6f')}, max |diff| {_fmt(stored['max_abs_diff'], '.2e')}."
                if stored.get("checked")
                else ")."
            ),
            "",
        ]
    cons = metrics.get("consistency_with_score_stage", {})
    if cons.get("checked"):
        lines += [
            f"influcoder's scores here match `score/scores.parquet` on {cons['rows']} rows "
            f"(max |diff| {_fmt(cons['max_abs_diff'], '.2e')}).",
            "",
        ]
    for png in plots:
        lines += [f"![{png}]({png})", ""]
    from pipeline import evidence

    # Why rows were flagged: each query's top hits with their text (what `influcoder show` prints).
    lines += evidence.to_markdown(evidence.for_job(job))
    lines += [
        "## Settings",
        "",
        "```json",
        json.dumps(
            {
                "teacher": {
                    "model": job.teacher.model,
                    "max_len": job.teacher.max_len,
                    "lora_rank": job.teacher.lora_rank,
                    "proj_dim": job.sketch.proj_dim,
                },
                "sketch_split": {
                    k: getattr(job.sketch, k) for k in ("train_anchors", "train_pool", "eval_anchors", "eval_pool")
                },
                "encoder": {"model": job.encoder.model, "max_len": job.encoder.max_len},
                "fit": {"epochs": job.fit.epochs, "lr": job.fit.lr, "alpha": job.fit.alpha, "tau": job.fit.tau},
                "seed": job.seed,
                "stage_seconds": {s: m.get("seconds") for s, m in upstream.items()},
            },
            indent=2,
        ),
        "```",
        "",
    ]
    storage.write_text_atomic(storage.join(out_dir, "report.md"), "\n".join(lines))
    return out_dir
