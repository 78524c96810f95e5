"""The Python entry point (`pipeline.run`), the evidence per query in the report, and
`influcoder show RUN_DIR [--query ID] [--k N]`: the whole tiny job (tiny teacher and encoder, real Ray
and LanceDB, the cascade on) runs once (conftest's `tiny_run`, shared with other modules); `show`
reads its run_dir."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest


import pipeline
from pipeline import cli, evidence
from pipeline.config import STAGES
from pipeline.errors import ArtifactMissingError, ConfigError


@pytest.fixture(scope="module")
def finished(tiny_run):
    """(job, its stages as `pipeline.run(job)` returns them): conftest's shared tiny run, cascade on."""
    return tiny_run


def _rows(path) -> dict[str, dict]:
    rows = [json.loads(line) for line in open(path / "part-00000.jsonl")]
    return {r["id"]: r for r in rows}


@pytest.mark.slow  # a whole stage or job run
def test_python_entry_point_on_a_finished_run(finished, fixture_corpora):
    """`pipeline.run(job)` on the finished shared run (its fresh-run path runs in test_object_storage.py
    and test_multinode.py): every stage skipped, with the manifests on disk."""
    job, out = finished
    corpus = _rows(fixture_corpora / "corpus")
    f = out["filter"]["manifest"]
    assert f["rows"]["in"] == len(corpus) and f["rows"]["dropped"] == out["score"]["manifest"]["selection"]["rows"]
    again = pipeline.run(job)
    assert list(again) == list(STAGES)
    for stage, r in again.items():
        assert r["skipped"] and r["manifest"]["stage"] == stage and r["path"] == f"{job['run_dir']}/{stage}"
        assert os.path.exists(f"{r['path']}/manifest.json")
    assert {s: r["manifest"]["finished_utc"] for s, r in again.items()} == {
        s: r["manifest"]["finished_utc"] for s, r in out.items()
    }
    # The report's evidence section: the first query's top hits with their text, label and teacher score.
    report = open(f"{job['run_dir']}/eval/report/report.md").read()
    topk = pq.read_table(f"{job['run_dir']}/score/topk.parquet")
    q0 = topk.column("query_id")[0].as_py()
    first = [r for r in topk.to_pylist() if r["query_id"] == q0 and r["rank"] == 1][0]
    # The notes on the teacher's side: the shared run has the fused cascade and a centred teacher.
    assert "re-ordered by fusing the encoder's and the teacher's ranks" in report and "centred sketches" in report
    section = report[report.index("## Evidence per query") :]
    assert f"### Query `{q0}`" in section and "| rank | score | label | teacher | id | text |" in section
    assert f"`{first['id']}`" in section and evidence.snippet(corpus[first["id"]]["text"], 40)[:30] in section


@pytest.mark.slow  # a whole stage or job run
def test_show_prints_the_top_hits_of_a_query(finished, fixture_corpora, capsys):
    job, _ = finished
    run = job["run_dir"]
    topk = pq.read_table(f"{run}/score/topk.parquet").to_pylist()
    q = topk[-1]["query_id"]  # the last query: not just the first one works
    want = [r["id"] for r in sorted((r for r in topk if r["query_id"] == q), key=lambda r: r["rank"])][:3]
    assert cli.main(["show", run, "--query", q, "--k", "3"]) == 0
    text = capsys.readouterr().out
    assert all(len(line) <= 80 for line in text.splitlines()), text
    lines = text.splitlines()
    hit_lines = [i for i, line in enumerate(lines) if re.match(r"^ {2,6}\d+  ", line)]  # snippets: 8 spaces
    assert [lines[i].split()[-1] for i in hit_lines] == want  # rank order, the ids of topk.parquet
    corpus = _rows(fixture_corpora / "corpus")
    words = " ".join(corpus[want[0]]["text"].split()).split()[:4]
    assert " ".join(words) in " ".join(lines[hit_lines[0] + 1 : hit_lines[1]])  # the snippet of hit 1
    assert "teacher" in text and "label" in text and f"query {q}" in text
    # Without --query: every query (up to 10), 5 hits each by default.
    assert cli.main(["show", run]) == 0
    text = capsys.readouterr().out
    assert sum(line.startswith("query ") for line in text.splitlines()) == len({r["query_id"] for r in topk})


@pytest.mark.slow  # a whole stage or job run
def test_show_errors_exit_2(finished, tmp_path, capsys):
    job, _ = finished
    assert cli.main(["show", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    partial = tmp_path / "partial"
    (partial / "sketch").mkdir(parents=True)
    (partial / "sketch" / "manifest.json").write_text("{}")
    assert cli.main(["show", str(partial)]) == 2
    err = capsys.readouterr().err
    assert "topk.parquet" in err and "influcoder score JOB.yaml" in err and str(partial) in err
    assert cli.main(["show", job["run_dir"], "--query", "no-such-query"]) == 2
    assert "no-such-query" in capsys.readouterr().err


@pytest.mark.slow  # a whole stage or job run
def test_entry_point_raises_instead_of_exiting(finished, tmp_path):
    job, _ = finished
    with pytest.raises(ConfigError, match="unknown stage"):
        pipeline.run(job, stages=["score", "nope"])
    with pytest.raises(ConfigError, match="filter.keep_rejected"):
        pipeline.run(job, overrides=["filter.keep_rejected=maybe"])
    fresh = {**job, "run_dir": str(tmp_path / "fresh")}
    with pytest.raises(ArtifactMissingError, match="encode"):
        pipeline.run(fresh, stages="filter")  # its upstream has not run there


def test_import_pipeline_does_not_import_ray():
    code = "import sys, pipeline; pipeline.run; assert 'ray' not in sys.modules and 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_terminal_evidence_fits_80_columns():
    topk = pa.table(
        {
            "query_id": ["q" * 90, "q" * 90],
            "id": ["row-" + "x" * 100, "b"],
            "score": pa.array([0.9, 0.5], pa.float32()),
            "rank": [1, 2],
        }
    )
    rows = {"b": {"text": "word " * 200, "label": 1}}
    ev = evidence.build(topk, rows, {"q" * 90: "a | query\nover lines " * 20}, ["q" * 90], k=2, has_labels=True)
    text = evidence.to_text(ev)
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert "(text not available)" in text and "word word" in text
    md = "\n".join(evidence.to_markdown(ev))
    assert "a \\| query over lines" in md  # pipes escaped, newlines collapsed: one table row per hit
    assert [h.rank for h in ev.queries[0].hits] == [1, 2] and ev.queries[0].hits[1].label == 1
