"""`influcoder prepare`, `--help`, exit codes and `status`."""

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main


def test_demo_corpora(demo_corpora):
    counts = json.loads((demo_corpora / "PREPARED.json").read_text())["counts"]
    assert counts["bbh"] == 6511 and counts["toxigen"] == 517 and counts["t0"] > 50000
    bbh = pq.read_table(demo_corpora / "bbh").to_pylist()[0]
    assert "\n\nQ: " in bbh["prompt"] and bbh["prompt"].endswith("A:") and bbh["response"].startswith(" ")
    assert "BENCHMARK DATA" not in bbh["prompt"]  # the canary header is stripped
    t0 = pq.read_table(demo_corpora / "t0").column("response").to_pylist()
    assert not any("<|endoftext|>" in r for r in t0[:2000])
    tox = {role: pq.read_table(demo_corpora / "toxicity" / role) for role in ("anchors", "pool", "corpus", "queries")}
    ids = {role: set(t.column("id").to_pylist()) for role, t in tox.items()}
    texts = {role: {s.lower().strip() for s in t.column("text").to_pylist()} for role, t in tox.items()}
    roles = list(tox)
    for i, a in enumerate(roles):
        for b in roles[i + 1:]:
            assert not ids[a] & ids[b] and not texts[a] & texts[b], (a, b)  # leak-free
    labels = tox["corpus"].column("label").to_pylist()
    assert sum(labels) == 48 and len(labels) == 600


def test_generic_prepare_records_rejects(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in [{"k": "1", "t": "a"}, {"k": "1", "t": "b"}, {"k": "2", "t": ""}]))
    rc = main(["prepare", "--input", str(src), "--out", str(tmp_path / "out"), "--id-column", "k", "--text-column", "t"])
    assert rc == 0
    assert pq.read_table(tmp_path / "out" / "part-00000.parquet").column("id").to_pylist() == ["1"]
    reasons = [r.split(":")[0] for r in pq.read_table(tmp_path / "out" / "_rejects.parquet").column("reason").to_pylist()]
    assert sorted(reasons) == ["duplicate_id", "empty_text"]


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("prepare", "run", "sketch", "fit", "encode", "score", "eval", "status"):
        assert cmd in out
    for cmd in ("run", "sketch", "status", "prepare"):
        subprocess.run([sys.executable, "-m", "pipeline.cli", cmd, "--help"], capture_output=True, check=True)


@pytest.mark.parametrize("argv, fragment", [
    (["sketch", "nope.yaml"], "does not exist"),
    (["status", "/nonexistent/run"], "does not exist"),
])
def test_usage_errors_exit_2(argv, fragment, capsys):
    assert main(argv) == 2
    assert fragment in capsys.readouterr().err


def test_config_error_before_any_ray_work(tmp_path, capsys):
    job = tmp_path / "j.yaml"
    job.write_text(f"run_dir: {tmp_path}/run\ncorpus: {{path: {tmp_path}/missing}}\nanchors: {{path: {tmp_path}/missing}}\n")
    assert main(["sketch", str(job), "--set", "sketch.batch_size=0"]) == 2
    assert "`sketch.batch_size`: got 0" in capsys.readouterr().err
    assert main(["sketch", str(job)]) == 2
    err = capsys.readouterr().err
    assert "anchors.path" in err and "does not exist" in err


def test_status(tmp_path, capsys):
    from pipeline import artifacts
    from pipeline.config import load_job

    job = load_job(data={"run_dir": str(tmp_path / "r"), "corpus": {"path": "c"}, "anchors": {"path": "a"}})
    artifacts.run_stage(job, "sketch", runner=lambda ctx: ctx.record(rows={"anchors": 3}))
    assert main(["status", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "sketch  done" in out and "fit     not run" in out
