"""The whole job end to end on tiny real data (real SmolLM2 teacher, real MiniLM encoder, real Ray and
LanceDB): every stage's contract artifacts, the eval report with all five methods, the printed
summary, `status`, and a rerun that skips every finished stage."""

import argparse
import json
import os

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import cli


@pytest.fixture()
def e2e_job(tiny_job, tmp_path):
    job = json.loads(json.dumps(tiny_job))
    job["fit"] = {"epochs": 1}
    job["eval"] = {"max_rows": 40, "recall_k": [5]}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path, job


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
    for name, m in metrics["methods"].items():
        for key in ("auprc", "recall@5", "mrr", "setup_s", "ms_per_sample", "bytes_per_sample"):
            assert key in m, (name, key)
        assert 0.0 <= m["auprc"] <= 1.0
    assert metrics["rows"] == 40 and metrics["queries"] == 16
    assert metrics["methods"]["gradient"]["ms_per_sample"] > metrics["methods"]["influcoder"]["ms_per_sample"]
    assert metrics["leakage"] == {k: 0 for k in metrics["leakage"]}
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
