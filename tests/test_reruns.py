"""Reruns do only what changed (issue 14 items 5 and 10, issue 13 defects).

- A changed key reruns only the stages it affects; `--overwrite` never recomputes a stage whose config,
  upstream artifacts and inputs are unchanged; the log says truly why a stage recomputes.
- The refusal (config changed, no --overwrite) names the dotted job keys and the exact command.
- `status` takes a job file or a run dir, refuses anything else (exit 2) and marks stale stages.
- A different `sketch.rows_per_shard` on resume keeps one row per id.
- The sketch identity follows the teacher's weights; `fit.num_workers` is part of fit's config hash.

The policy tests swap each stage's `run` for a counter (real stage graph, real input fingerprints,
no Ray); the rest run the tiny job (tiny random models, real Ray and LanceDB).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shlex
import shutil

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import copy_run
from pipeline import artifacts, cli
from pipeline.config import STAGE_UPSTREAM, STAGES, load_job, stage_config_hash
from pipeline.errors import ArtifactMismatchError


def _downstream(stage: str) -> set[str]:
    """`stage` and every stage that reads it, directly or not (from the stage graph, not a list)."""
    out = {stage}
    for s in STAGES:  # STAGES is in dependency order
        if set(STAGE_UPSTREAM[s]) & out:
            out.add(s)
    return out


def _wrap_stages(monkeypatch, wrap):
    """Every registered stage's `run` replaced by `wrap(stage_name, real_run)`; identity, fingerprints
    and the skip/overwrite policy stay the real ones."""
    import pipeline.stages as registry

    real = registry.stage

    def wrapped(name):
        s = real(name)
        return dataclasses.replace(s, run=wrap(name, s.run))

    monkeypatch.setattr(registry, "stage", wrapped)


@pytest.fixture()
def fake_stages(monkeypatch):
    """Each stage's `run` replaced by a counter (no Ray, no models)."""
    calls: list[str] = []
    _wrap_stages(monkeypatch, lambda name, run: lambda ctx: calls.append(ctx.stage))
    return calls


@pytest.fixture()
def job_file(tmp_path, fixture_corpora):
    """A job on the fixture corpora (models are never loaded: the stages are fakes)."""
    tox = fixture_corpora
    data = {
        "run_dir": str(tmp_path / "run"),
        "anchors": {"path": str(tox / "anchors"), "id_column": "id"},
        "corpus": {"path": str(tox / "corpus"), "id_column": "id", "label_column": "label"},
        "score": {"queries": {"path": str(tox / "queries"), "id_column": "id"}},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run_all(path, *overrides, overwrite=False):
    job = load_job(path, list(overrides))
    for stage in STAGES:
        artifacts.run_stage(job, stage, overwrite=overwrite)
    return job


# --------------------------------------------------------------------------- the policy


def test_overwrite_recomputes_only_what_changed(job_file, fake_stages, caplog):
    _run_all(job_file)
    assert fake_stages == list(STAGES)

    fake_stages.clear()
    with caplog.at_level(logging.INFO, logger="influcoder"):
        _run_all(job_file, overwrite=True)  # nothing changed: --overwrite recomputes nothing
    assert fake_stages == []
    assert "recomputing" not in caplog.text

    # One key: its stage and what reads it rerun, nothing upstream of it.
    fake_stages.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="influcoder"):
        _run_all(job_file, "fit.epochs=3", overwrite=True)
    assert set(fake_stages) == _downstream("fit") and "sketch" not in fake_stages
    assert "fit: recomputing: config changed (fit.epochs: 8 -> 3) (--overwrite)" in caplog.text
    for s in _downstream("fit") - {"fit"}:  # the log line is true: their upstream changed, not inputs
        line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{s}: recomputing"))
        assert "recomputed since it ran" in line and "config changed" not in line, line
    assert "upstream artifacts or inputs" not in caplog.text

    # A key that only eval reads: eval alone.
    fake_stages.clear()
    _run_all(job_file, "fit.epochs=3", "eval.recall_k=[3]", overwrite=True)
    assert fake_stages == ["eval"]

    # Execution-only keys change nothing.
    fake_stages.clear()
    _run_all(job_file, "fit.epochs=3", "eval.recall_k=[3]", "sketch.batch_size=2", "encode.batch_size=8")
    assert fake_stages == []


def test_a_new_method_version_recomputes_the_stage_and_what_reads_it(job_file, fake_stages, monkeypatch, caplog):
    """A stage whose code now computes something else (its `method_version` raised) reruns, with what reads
    it, and needs no --overwrite; version 0 adds nothing to the fingerprint, so introducing it does not."""
    import pipeline.stages as registry

    _run_all(job_file)
    job = load_job(job_file)
    assert "method_version" not in artifacts.input_fingerprint(job, "fit")
    assert artifacts.input_fingerprint(job, "eval")["method_version"] == registry.stage("eval").method_version >= 1

    real = registry.stage
    monkeypatch.setattr(
        registry,
        "stage",
        lambda name: dataclasses.replace(real(name), method_version=1) if name == "fit" else real(name),
    )
    fake_stages.clear()
    with caplog.at_level(logging.INFO, logger="influcoder"):
        _run_all(job_file)
    assert set(fake_stages) == _downstream("fit")
    assert "fit: recomputing: inputs changed (method_version)" in caplog.text
    fake_stages.clear()
    _run_all(job_file)  # the new version is now the finished one
    assert fake_stages == []


def test_changed_input_file_reruns_without_overwrite_and_says_so(
    tmp_path, job_file, fixture_corpora, fake_stages, caplog
):
    corpus = tmp_path / "corpus"
    shutil.copytree(load_job(job_file).corpus.path, corpus)
    keys = [f"corpus.path={corpus}", f"pool.path={fixture_corpora / 'pool'}"]  # the pool is not the corpus
    _run_all(job_file, *keys)
    fake_stages.clear()
    with open(next(corpus.iterdir()), "a") as f:
        f.write(json.dumps({"id": "new-row", "text": "one more row", "label": 0}) + "\n")
    with caplog.at_level(logging.INFO, logger="influcoder"):
        _run_all(job_file, *keys)
    assert "encode" in fake_stages and "sketch" not in fake_stages and "fit" not in fake_stages
    assert re.search(r"encode: recomputing: inputs changed \(.*corpus_digest", caplog.text)


def test_refusal_names_dotted_keys_and_the_command(job_file, fake_stages, capsys):
    _run_all(job_file)
    fake_stages.clear()
    argv = ["run", str(job_file), "--set", "fit.epochs=3", "--set", "score.top_k=7", "--set", "sketch.batch_size=2"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert fake_stages == []
    assert "fit.epochs: 8 -> 3" in err and "score.top_k: 100 -> 7" in err
    assert "sketch.batch_size" not in err.split("To recompute")[0]  # execution-only: not a change
    want = f"influcoder run {job_file} --from fit --set fit.epochs=3 --set score.top_k=7 --set sketch.batch_size=2"
    assert want + " --overwrite" in err
    # The offered command does what it says: fit and what reads it rerun; sketch is kept.
    command = next(line.strip() for line in err.splitlines() if line.strip().startswith("influcoder run"))
    args = cli.build_parser().parse_args(shlex.split(command)[1:])
    assert args.from_stage == "fit" and args.overwrite
    job = load_job(args.job, args.overrides)
    for stage in STAGES[STAGES.index(args.from_stage) :]:
        artifacts.run_stage(job, stage, overwrite=args.overwrite)
    assert set(fake_stages) == _downstream("fit")

    # A single-stage command gets its own command back; internal names never leak.
    assert cli.main(["score", str(job_file), "--set", "score.top_k=9"]) == 2
    err = capsys.readouterr().err
    assert "score.top_k: 7 -> 9" in err and f"influcoder score {job_file} --set score.top_k=9 --overwrite" in err


def test_refusal_maps_internal_names_to_job_keys(tmp_path, job_file, fixture_corpora, fake_stages):
    job = _run_all(job_file)
    elsewhere = tmp_path / "pool"
    shutil.copytree(job.corpus.path, elsewhere)
    # The pool defaults to the corpus: the key the user changed is corpus.path.
    with pytest.raises(ArtifactMismatchError) as e:
        artifacts.run_stage(load_job(job_file, [f"corpus.path={elsewhere}"]), "sketch")
    assert f"corpus.path: {job.corpus.path} -> {elsewhere}" in str(e.value) and "pool_dataset" not in str(e.value)
    with pytest.raises(ArtifactMismatchError) as e:
        artifacts.run_stage(load_job(job_file, [f"pool.path={elsewhere}"]), "sketch")
    assert f"pool.path: {job.corpus.path} -> {elsewhere}" in str(e.value) and "pool_dataset" not in str(e.value)


# --------------------------------------------------------------------------- status


def test_status_refuses_a_path_that_is_neither(tmp_path, capsys):
    assert cli.main(["status", "."]) == 2  # the repository: no stage ever ran here
    assert "neither a job file nor a run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["status", str(tmp_path / "empty")]) == 2
    assert "neither" in capsys.readouterr().err
    notes = tmp_path / "notes.yaml"
    notes.write_text("- just\n- a list\n")
    assert cli.main(["status", str(notes)]) == 2
    assert "neither a job file" in capsys.readouterr().err
    assert cli.main(["status", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_status_of_a_job_marks_stale_stages(job_file, fake_stages, capsys):
    assert cli.main(["status", str(job_file)]) == 0  # a job that never ran: every stage "not run"
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]] == ["not"] * len(STAGES)

    _run_all(job_file)
    assert cli.main(["status", str(job_file)]) == 0
    out = capsys.readouterr().out
    assert [line.split()[1] for line in out.splitlines()[1:]] == ["done"] * len(STAGES)

    assert cli.main(["status", str(job_file), "--set", "fit.epochs=3", "--json"]) == 0
    rows = {r["stage"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["fit"]["state"] == "stale" and rows["fit"]["changed"]["config"] == ["fit.epochs: 8 -> 3"]
    for s in _downstream("fit") - {"fit"}:
        assert rows[s]["state"] == "stale", s
    for s in set(STAGES) - _downstream("fit"):
        assert rows[s]["state"] == "done", s
    assert cli.main(["status", str(job_file), "--set", "fit.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "fit     stale  (config changed (fit.epochs: 8 -> 3))" in out
    assert f"influcoder run {job_file} --from fit --set fit.epochs=3 --overwrite" in out

    # After a re-encode, what reads the codes is stale, by run dir alone and by job.
    artifacts.run_stage(load_job(job_file, ["encode.code_dtype=int8"]), "encode", overwrite=True)
    run_dir = load_job(job_file).run_dir
    for argv in (["status", run_dir], ["status", str(job_file), "--set", "encode.code_dtype=int8"]):
        assert cli.main([*argv, "--json"]) == 0
        rows = {r["stage"]: r for r in json.loads(capsys.readouterr().out)}
        assert {s for s, r in rows.items() if r["state"] == "stale"} == _downstream("encode") - {"encode"}, argv
        assert rows["score"]["changed"]["upstream"] == ["encode"]
    assert cli.main(["status", run_dir, "--set", "fit.epochs=3"]) == 2  # --set needs the job
    assert "applies to a job file" in capsys.readouterr().err


# --------------------------------------------------------------------------- identity


def _weights_folder(path):
    import torch
    from safetensors.torch import save_file

    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    # > 1 MiB, so a byte past the first MiB is past what a head-only fingerprint reads.
    save_file({"w": torch.arange(400_000, dtype=torch.float32)}, str(path / "model.safetensors"))
    return path


def test_teacher_weights_are_part_of_the_sketch_identity(tmp_path, fixture_corpora, monkeypatch):
    monkeypatch.setenv("INFLUCODER_CACHE", str(tmp_path / "cache"))
    teacher = _weights_folder(tmp_path / "teacher")
    tox = fixture_corpora
    job = load_job(
        data={
            "run_dir": str(tmp_path / "run"),
            "anchors": {"path": str(tox / "anchors"), "id_column": "id"},
            "corpus": {"path": str(tox / "corpus"), "id_column": "id"},
            "teacher": {"model": str(teacher)},
        }
    )

    def identity():
        return artifacts.stage_identity(job, "sketch", {}, artifacts.input_fingerprint(job, "sketch"))

    before, config_hash = identity(), stage_config_hash(job, "sketch")
    assert identity() == before  # deterministic
    weights = teacher / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:  # one byte near the end: same size, same head
        f.seek(size - 3)
        byte = f.read(1)
        f.seek(size - 3)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert weights.stat().st_size == size
    assert identity() != before and stage_config_hash(job, "sketch") == config_hash
    manifest = {"identity": before, "config_hash": config_hash, "inputs": {}, "upstream": {}}
    manifest["inputs"] = json.loads(json.dumps(artifacts.input_fingerprint(job, "sketch")))
    with open(weights, "r+b") as f:  # back to the original bytes: back to the original identity
        f.seek(size - 3)
        f.write(byte)
    assert identity() == before
    assert artifacts.changes_since(job, "sketch", manifest, {}, artifacts.input_fingerprint(job, "sketch")).inputs == [
        "teacher_weights"
    ]


def test_model_fingerprint_follows_content_not_copies(tmp_path, monkeypatch):
    from pipeline.models import model_fingerprint

    monkeypatch.setenv("INFLUCODER_CACHE", str(tmp_path / "cache"))
    a = _weights_folder(tmp_path / "a")
    old = 1_000_000_000
    for f in a.iterdir():  # old files: their digests are cached
        os.utime(f, (old, old))
    fp = model_fingerprint(str(a))
    assert os.listdir(tmp_path / "cache" / "digests")
    b = tmp_path / "b"
    shutil.copytree(a, b, copy_function=shutil.copyfile)  # new mtimes, same bytes
    assert model_fingerprint(str(b)) == fp
    with open(a / "model.safetensors", "r+b") as f:
        f.seek(2_000_000)
        f.write(b"\x01")
    os.utime(a / "model.safetensors", (old + 5, old + 5))  # an edit moves the mtime: the cache misses
    assert model_fingerprint(str(a)) != fp


def test_num_workers_is_part_of_fit_config_hash(tmp_path):
    base = {"run_dir": str(tmp_path), "corpus": {"path": "c"}, "anchors": {"path": "a"}}
    one, two = (
        load_job(data=base, overrides=["fit.num_workers=1"]),
        load_job(data=base, overrides=["fit.num_workers=2"]),
    )
    assert stage_config_hash(one, "fit") != stage_config_hash(two, "fit")
    for stage in set(STAGES) - {"fit"}:
        assert stage_config_hash(one, stage) == stage_config_hash(two, stage), stage
    gpu = load_job(data=base, overrides=["fit.num_workers=1", "fit.use_gpu=false"])
    assert stage_config_hash(gpu, "fit") == stage_config_hash(one, "fit")  # where it runs: neutral


# --------------------------------------------------------------------------- shard layout (tiny job)


@pytest.mark.slow  # a whole stage or job run
def test_resume_with_another_rows_per_shard_keeps_one_row_per_id(tiny_job, monkeypatch, ray_local):
    from pipeline.stages import sketch

    real = sketch.sketch_shards
    calls = []

    def crash_after_first_shard(job, plan, pending, shard_dir, **kw):
        calls.append([name for name, _ in pending])
        if len(calls) == 1:  # the first run: one shard finishes, then the driver dies
            real(job, plan, pending[:1], shard_dir, **kw)
            raise KeyboardInterrupt("killed")
        return real(job, plan, pending, shard_dir, **kw)

    monkeypatch.setattr(sketch, "sketch_shards", crash_after_first_shard)
    data = json.loads(json.dumps(tiny_job))
    data["sketch"]["rows_per_shard"] = 8
    with pytest.raises(KeyboardInterrupt):
        artifacts.run_stage(load_job(data=data), "sketch")
    data["sketch"]["rows_per_shard"] = 3  # execution-only: the same identity, the same work dir
    job = load_job(data=data)
    m = artifacts.run_stage(job, "sketch")
    assert calls[0][0] not in calls[1]  # the 8-row shard of the old layout is not taken for a 3-row one
    cfg = job.sketch
    for role, n in (("anchors", cfg.eval_anchors + cfg.train_anchors), ("pool", cfg.eval_pool + cfg.train_pool)):
        ids = pq.read_table(os.path.join(job.run_dir, "sketch", role)).column("id").to_pylist()
        assert len(ids) == len(set(ids)) == n, role
        assert sum(m["rows"][role].values()) == n


# --------------------------------------------------------------------------- the tiny job end to end


@pytest.mark.slow  # a whole stage or job run
def test_tiny_job_reruns_only_the_changed_stage(tiny_run, tmp_path, monkeypatch, capsys, ray_local):
    """On a copy of conftest's shared finished `tiny_run` (every stage done, the cascade on)."""
    job = copy_run(tiny_run[0], tmp_path / "run")
    job["eval"]["methods"] = ["influcoder", "bm25", "random"]  # eval reruns below: no teacher pass needed
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    ran: list[str] = []

    def counted(name, run):
        def go(ctx):
            ran.append(ctx.stage)
            return run(ctx)

        return go

    _wrap_stages(monkeypatch, counted)

    # The eval methods changed: eval alone reruns (a changed config needs --overwrite; --overwrite
    # with nothing else changed recomputes nothing).
    args = argparse.Namespace(job=str(path), overrides=[], overwrite=True)
    assert cli._run_stages(args, list(STAGES)) == 0
    assert ran == ["eval"]
    ran.clear()
    assert cli._run_stages(argparse.Namespace(job=str(path), overrides=[], overwrite=True), list(STAGES)) == 0
    assert ran == []
    capsys.readouterr()

    assert cli.main(["run", str(path), "--set", "eval.recall_k=[3]"]) == 2
    err = capsys.readouterr().err
    assert "eval.recall_k: [5] -> [3]" in err
    command = next(line.strip() for line in err.splitlines() if line.strip().startswith("influcoder run"))
    assert command == f"influcoder run {path} --from eval --set 'eval.recall_k=[3]' --overwrite"
    assert cli.main(shlex.split(command)[1:]) == 0
    assert ran == ["eval"]
    assert json.load(open(f"{job['run_dir']}/eval/metrics.json"))["methods"]["bm25"].get("recall@3") is not None

    # A re-encode: score and what reads it are stale until they rerun (no --overwrite needed).
    ran.clear()
    overrides = ["--set", "eval.recall_k=[3]", "--set", "encode.code_dtype=int8"]
    assert cli.main(["run", str(path), *overrides, "--from", "encode", "--to", "encode", "--overwrite"]) == 0
    assert ran == ["encode"]
    capsys.readouterr()
    assert cli.main(["status", str(path), *overrides]) == 0
    states = {
        line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[1:] if line.startswith("  ")
    }
    assert {s for s, st in states.items() if st == "stale"} == _downstream("encode") - {"encode"}
    ran.clear()
    assert cli.main(["run", str(path), *overrides]) == 0
    assert set(ran) == _downstream("encode") - {"encode"}
