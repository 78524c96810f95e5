"""Stage runner: atomic output, manifest, skip on rerun, refusal on changed config, resume dir."""

import os

import pytest

from pipeline import artifacts
from pipeline.config import load_job
from pipeline.errors import ArtifactMismatchError, ArtifactMissingError

BASE = {"corpus": {"path": "c"}, "anchors": {"path": "a"}}


def _job(tmp_path, *overrides):
    return load_job(data={"run_dir": str(tmp_path / "run"), **BASE}, overrides=list(overrides))


def _writer(calls):
    def run(ctx):
        calls.append(ctx.work_dir)
        with open(os.path.join(ctx.out_dir, "out.txt"), "w") as f:
            f.write("x")
        ctx.record(rows={"n": 1})

    return run


def test_manifest_skip_and_overwrite(tmp_path):
    calls = []
    job = _job(tmp_path)
    m = artifacts.run_stage(job, "sketch", runner=_writer(calls))
    assert (tmp_path / "run" / "sketch" / "out.txt").exists()
    for key in ("config", "config_hash", "versions", "started_utc", "finished_utc", "rows", "upstream", "identity"):
        assert key in m
    assert not [p for p in os.listdir(tmp_path / "run") if p.startswith(".sketch.tmp")]
    # Same config: skipped. Execution-only change: still skipped.
    artifacts.run_stage(job, "sketch", runner=_writer(calls))
    artifacts.run_stage(_job(tmp_path, "sketch.batch_size=1"), "sketch", runner=_writer(calls))
    assert len(calls) == 1
    # A result-changing config is refused unless --overwrite.
    changed = _job(tmp_path, "sketch.proj_dim=256")
    with pytest.raises(ArtifactMismatchError, match=r"(?s)sketch\.proj_dim: 8192 -> 256.*--overwrite"):
        artifacts.run_stage(changed, "sketch", runner=_writer(calls))
    m2 = artifacts.run_stage(changed, "sketch", overwrite=True, runner=_writer(calls))
    assert m2["config_hash"] != m["config_hash"] and len(calls) == 2
    # --overwrite with an unchanged config and inputs recomputes nothing (tests/test_reruns.py has more).
    artifacts.run_stage(changed, "sketch", overwrite=True, runner=_writer(calls))
    assert len(calls) == 2


def test_failed_stage_leaves_no_output_but_keeps_work(tmp_path):
    job = _job(tmp_path)

    def boom(ctx):
        open(os.path.join(ctx.work_dir, "shard-0.done"), "w").close()
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        artifacts.run_stage(job, "sketch", runner=boom)
    run = tmp_path / "run"
    assert not (run / "sketch").exists()
    assert not [p for p in os.listdir(run) if p.startswith(".sketch.tmp")]
    work = list((run / ".work").iterdir())
    assert len(work) == 1 and (work[0] / "shard-0.done").exists()
    assert [r["state"] for r in artifacts.status(str(run))][0].startswith("partial")
    seen = []
    artifacts.run_stage(job, "sketch", runner=lambda ctx: seen.append(os.listdir(ctx.work_dir)))
    assert seen == [["shard-0.done"]]  # the rerun sees the finished shard
    assert not (run / ".work" / work[0].name).exists()  # cleaned after success


def test_upstream_required_and_changes_propagate(tmp_path):
    job = _job(tmp_path)
    with pytest.raises(ArtifactMissingError, match="`sketch`.*influcoder sketch"):
        artifacts.run_stage(job, "fit", runner=lambda ctx: None)
    artifacts.run_stage(job, "sketch", runner=lambda ctx: None)
    calls = []
    artifacts.run_stage(job, "fit", runner=lambda ctx: calls.append(1))
    artifacts.run_stage(job, "fit", runner=lambda ctx: calls.append(1))
    assert calls == [1]
    # A new sketch (overwritten with another config) makes fit recompute without --overwrite.
    artifacts.run_stage(_job(tmp_path, "sketch.proj_dim=128"), "sketch", overwrite=True, runner=lambda ctx: None)
    artifacts.run_stage(_job(tmp_path, "sketch.proj_dim=128"), "fit", runner=lambda ctx: calls.append(2))
    assert calls == [1, 2]


def test_secrets_are_redacted_from_manifests(tmp_path):
    job = load_job(
        data={
            "run_dir": str(tmp_path / "run"),
            "anchors": {"path": "a"},
            "corpus": {"path": "s3://AKIAXXX:supersecret@bucket/c?token=abc"},
        }
    )
    m = artifacts.run_stage(job, "sketch", runner=lambda ctx: None)
    text = (tmp_path / "run" / "sketch" / "manifest.json").read_text()
    assert "supersecret" not in text and "token=abc" not in text
    assert m["config"]["corpus"]["path"].startswith("s3://***@bucket")


def test_killed_run_leftovers_are_removed(tmp_path):
    job = _job(tmp_path)
    leftover = tmp_path / "run" / ".sketch.tmp-deadbeef"
    leftover.mkdir(parents=True)
    (leftover / "half.parquet").write_text("x")
    artifacts.run_stage(job, "sketch", runner=lambda ctx: None)
    assert not leftover.exists()
