"""The whole job end to end on the fixture corpora (tiny random teacher and encoder, real Ray and
LanceDB): every stage's contract artifacts, the eval report with all five methods and metrics that
agree with the score stage's output, the printed summary, `status`, and a rerun that skips every
finished stage."""

import argparse
import json
import os

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import cli, metrics as metrics_mod


@pytest.fixture()
def e2e_job(tiny_job, tmp_path):
    job = json.loads(json.dumps(tiny_job))
    job["fit"]["epochs"] = 1
    # Every corpus row (through the seeded sampler: max_rows is set), so the test knows the eval rows.
    job["eval"] = {"max_rows": _rows(job["corpus"]["path"]), "recall_k": [5]}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path, job


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


def test_whole_job_end_to_end(e2e_job, capsys, ray_local):
    path, job = e2e_job
    run = job["run_dir"]
    out = _run(path, capsys)
    for stage in cli.STAGES:
        assert os.path.exists(f"{run}/{stage}/manifest.json"), stage
    assert "report: " in out and "influcoder scores a sample" in out  # headline printed
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
    assert set(metrics["methods"]) == {"influcoder", "gradient", "untrained_encoder", "bm25", "random"}
    labels = _labels(job["corpus"]["path"])
    n_queries = _rows(job["score"]["queries"]["path"])
    assert metrics["rows"] == len(labels) and metrics["queries"] == n_queries
    assert 0 < metrics["positives"] == sum(labels.values()) < len(labels)
    for name, m in metrics["methods"].items():
        for key in ("auprc", "recall@5", "mrr", "setup_s", "ms_per_sample", "bytes_per_sample"):
            assert key in m, (name, key)
        assert m["ms_per_sample"] > 0, name
        assert (m["bytes_per_sample"] > 0) == (name != "random"), name  # random stores nothing per row
    # The eval's AUPRC of influcoder is the AUPRC of the score stage's ranking of the same rows (up to
    # the float16 codes the score stage ranks by: near-tied rows may swap).
    ids = scores.column("id").to_pylist()
    want = metrics_mod.auprc([labels[i] for i in ids], scores.column("score").to_numpy())
    assert metrics["methods"]["influcoder"]["auprc"] == pytest.approx(want, abs=0.01)
    # The gradient method is the teacher itself: its held-out ranking is the ground truth.
    assert metrics["methods"]["gradient"]["heldout"]["spearman_aggregated"] == pytest.approx(1.0)
    assert metrics["leakage"] == {k: 0 for k in metrics["leakage"]}
    assert metrics["consistency_with_score_stage"]["rows"] == len(labels)
    assert metrics["consistency_with_score_stage"]["max_abs_diff"] < 1e-3
    for f in ("report.md", "pr_curves.png", "spearman_by_epoch.png", "quality_vs_cost.png"):
        assert os.path.getsize(f"{run}/eval/report/{f}") > 0, f
    # status, and a rerun that skips every stage.
    assert cli.main(["status", run]) == 0
    assert all(line.split()[1] == "done" for line in capsys.readouterr().out.splitlines()[1:])
    before = {s: json.load(open(f"{run}/{s}/manifest.json"))["finished_utc"] for s in cli.STAGES}
    _run(path, capsys)
    after = {s: json.load(open(f"{run}/{s}/manifest.json"))["finished_utc"] for s in cli.STAGES}
    assert before == after
