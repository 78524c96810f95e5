"""The whole job end to end on the fixture corpora (tiny random teacher and encoder, real Ray and
LanceDB), run by `influcoder run` in its own process as a user starts it (conftest's shared
`tiny_run`): the console, every stage's contract artifacts, the eval report with every method and
metrics that agree with the score stage's output, `status`, and a rerun that skips every finished
stage."""

import argparse
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import TINY_RUN_CONSOLE, copy_run
from pipeline import cli, metrics as metrics_mod


def _jsonl(path) -> list[dict]:
    """The rows of a fixture corpus folder (JSON Lines files)."""
    return [json.loads(line) for f in sorted(os.listdir(path)) for line in open(os.path.join(path, f))]


def _rows(path) -> int:
    return len(_jsonl(path))


def _labels(path) -> dict[str, int]:
    return {r["id"]: r["label"] for r in _jsonl(path)}


def test_fixture_corpora_are_leak_free(fixture_corpora):
    """What the end-to-end eval's leakage audit relies on: no id, text or near-duplicate of an
    evaluated row (corpus, queries) is in the distillation data (anchors, pool)."""
    from pipeline import neardup

    rows = {role: _jsonl(fixture_corpora / role) for role in ("anchors", "pool", "corpus", "queries")}
    distill = rows["anchors"] + rows["pool"]
    for role in ("corpus", "queries"):
        assert not {r["id"] for r in rows[role]} & {r["id"] for r in distill}, role
        assert not {r["text"].strip().lower() for r in rows[role]} & {r["text"].strip().lower() for r in distill}
        assert neardup.count_near_duplicates([r["text"] for r in rows[role]], [r["text"] for r in distill]) == 0
    labels = [r["label"] for r in rows["corpus"]]
    assert 0 < sum(labels) < len(labels)  # both classes: AUPRC and recall are defined


def _run(path, capsys):
    args = argparse.Namespace(job=str(path), overrides=[], overwrite=False)
    assert cli._run_stages(args, list(cli.STAGES)) == 0
    return capsys.readouterr().out


# What a user must not see without -v: library and Ray internals, our own deprecations, tracebacks.
CONSOLE_NOISE = (
    "Traceback",
    "Warning:",  # FutureWarning, RayDeprecationWarning, UserWarning ...
    " DEBUG ",
    "logging_progress",
    "Running Dataset",
    "Execution plan",
    "PlacementGroupCleaner",
    "Failed to query Ray Train",
    "Loading weights",
    "TrainingReport",
    "Token authentication is enabled",
)


@pytest.mark.slow  # a whole stage or job run
def test_whole_job_end_to_end(tiny_run, capsys, tmp_path, ray_local):
    """conftest's shared `tiny_run`: the whole job (cascade on) run by `influcoder run` in its own
    process, as a user starts it."""
    job, _ = tiny_run
    run = job["run_dir"]
    console = json.loads((Path(run).parent / TINY_RUN_CONSOLE).read_text())
    out, err = console["stdout"], console["stderr"]
    # Ray Train's placement-group cleaner polls the State API every second; it fails (and logs a
    # warning each time, in its own log file) when no dashboard serves that API.
    assert "Failed to query Ray Train Controller actor state" not in console["session_logs"]
    assert "PlacementGroupCleanerMonitor" not in console["session_logs"]  # its monitor thread did not crash
    # A console a person can read: one screen for a tiny job (the cascade on: its teacher pass, its
    # line and its report row), no third-party noise. Progress lines in flight (at most one per 10 s
    # of a stage: more on a busy machine) do not count; each stage's final progress line does. Nor does
    # eval's line saying it embeds the held-out split itself, printed where encode chose another
    # precision than fit's float32 (bf16 on a host that has it natively).
    lines = (out + err).splitlines()
    in_flight = [line for line in lines if "influcoder.progress" in line and " left" in line]
    own_heldout_pass = [line for line in lines if "eval: embedding the held-out split" in line]
    assert len(lines) - len(in_flight) - len(own_heldout_pass) <= 64, out + err
    noise = [line for line in (out + err).splitlines() if any(n in line for n in CONSOLE_NOISE)]
    assert noise == [], "\n".join(noise)
    assert "stage    state" in out and "ran" in out
    assert "fit: epoch 1/1" in err  # fit's epochs reach the driver's console
    assert "teacher gradients" in err and "encode: corpus rows" in err  # progress lines
    for stage in cli.STAGES:
        assert os.path.exists(f"{run}/{stage}/manifest.json"), stage
    assert "report: " in out and "influcoder scores a sample" in out  # headline printed
    # ... saying how the cascade ordered its block and that the teacher is centred (the shared run's settings).
    assert "re-ordered by fusing the encoder's and the teacher's ranks (score.rerank_by)" in out
    assert "The teacher's cosines are of centred sketches (fit.center_teacher)" in out
    # Contract artifacts.
    scores = pq.read_table(f"{run}/score/scores.parquet")
    assert scores.column_names[:4] == ["id", "score", "score_max", "rank"]
    assert sorted(scores.column("rank").to_pylist()) == list(range(1, scores.num_rows + 1))
    topk = pq.read_table(f"{run}/score/topk.parquet")
    assert topk.column_names[:4] == ["query_id", "id", "score", "rank"]
    assert os.path.exists(f"{run}/fit/encoder/model.safetensors") and os.path.exists(f"{run}/fit/curves.png")
    fit = json.load(open(f"{run}/fit/metrics.json"))
    assert "untrained" in fit and [e["epoch"] for e in fit["epochs"]] == [1]
    metrics = json.load(open(f"{run}/eval/metrics.json"))
    assert set(metrics["methods"]) == {"influcoder", "gradient", "untrained_encoder", "bm25", "random", "cascade"}
    labels = _labels(job["corpus"]["path"])
    n_queries = _rows(job["score"]["queries"]["path"])
    assert metrics["rows"] == len(labels) and metrics["queries"] == n_queries
    assert 0 < metrics["positives"] == sum(labels.values()) < len(labels)
    for name, m in metrics["methods"].items():
        for key in ("auprc", "recall@5", "mrr", "setup_s", "ms_per_sample", "bytes_per_sample"):
            assert key in m, (name, key)
        assert m["ms_per_sample"] > 0, name
        assert (m["bytes_per_sample"] > 0) == (name != "random"), name  # random stores nothing per row
    # The eval scores influcoder with the codes the score stage ranks: its AUPRC is the AUPRC of the score
    # stage's ranking of the same rows, and a fresh pass over the timed sample agrees with the stored codes.
    ids = scores.column("id").to_pylist()
    want = metrics_mod.auprc([labels[i] for i in ids], scores.column("score").to_numpy())
    influ = metrics["methods"]["influcoder"]
    assert influ["auprc"] == pytest.approx(want, abs=1e-6)
    timed = min(len(labels), 128)
    assert all(
        m["timed_rows"] == timed for n, m in metrics["methods"].items() if n in ("influcoder", "untrained_encoder")
    )
    assert influ["stored_codes"]["rows"] == len(labels) and influ["stored_codes"]["embedded_here"] == 0
    assert influ["stored_codes"]["checked"] == timed and influ["stored_codes"]["min_cosine"] > 0.999
    assert 0 < influ["stored_codes"]["max_abs_diff"] < 1e-3  # float16 rounding, nothing more
    # influcoder's held-out fidelity is computed from the scores fit measured its export by
    # (fit/heldout_scores.parquet), so eval's figures are fit's; the plain encoder embeds its own. (Where
    # encode chose bf16, as it may on a GPU host, eval embeds in bf16 and cannot take fit's float32 scores.)
    fit_compute = pq.read_schema(f"{run}/fit/heldout_scores.parquet").metadata[b"influcoder.compute"].decode()
    assert influ["heldout_scores"] == ("fit" if fit_compute == f"{influ['precision']} on cpu" else "embedded")
    assert metrics["methods"]["untrained_encoder"]["heldout_scores"] == "embedded"
    for key in ("spearman_aggregated", "spearman_aggregated_ci", "spearman_per_anchor"):
        tol = 1e-9 if influ["heldout_scores"] == "fit" else 0.05  # bf16 against float32 scores: near
        assert influ["heldout"][key] == pytest.approx(fit["exported"][key], abs=tol), key
    # The gradient method is the teacher itself: its held-out ranking is the ground truth.
    assert metrics["methods"]["gradient"]["heldout"]["spearman_aggregated"] == pytest.approx(1.0)
    assert metrics["leakage"] == {k: 0 for k in metrics["leakage"]}
    assert metrics["consistency_with_score_stage"]["rows"] == len(labels)
    assert metrics["consistency_with_score_stage"]["max_abs_diff"] < 1e-5  # the same codes and queries
    for f in ("report.md", "pr_curves.png", "spearman_by_epoch.png", "quality_vs_cost.png"):
        assert os.path.getsize(f"{run}/eval/report/{f}") > 0, f
    # status, and a rerun that skips every stage (on a copy: the shared run stays as it is).
    assert cli.main(["status", run]) == 0
    assert all(line.split()[1] == "done" for line in capsys.readouterr().out.splitlines()[1:])
    copy = copy_run(job, tmp_path / "run")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(copy))
    before = {s: json.load(open(f"{copy['run_dir']}/{s}/manifest.json"))["finished_utc"] for s in cli.STAGES}
    rerun = _run(path, capsys)
    assert all(
        line.split()[1] == "skipped" for line in rerun.splitlines() if line.split()[:1] in ([s] for s in cli.STAGES)
    )
    after = {s: json.load(open(f"{copy['run_dir']}/{s}/manifest.json"))["finished_utc"] for s in cli.STAGES}
    assert before == after
