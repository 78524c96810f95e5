"""A run_dir on object storage (issue 11), against a real S3-compatible server: moto's standalone
server, started here on 127.0.0.1 (a subprocess, killed by pid afterwards).

- The stage protocol on an object store: files written in place, the manifest last; a stage folder
  without a manifest is half-written, never read as finished, and cleaned by the next run.
- Model folders on a URI are copied once per node into the local cache, keyed by their listing.
- Credentials from the environment never reach a manifest or a log line.
- (slow) The whole tiny job, `influcoder run` in its own process as a user starts it, with run_dir on
  the server: every stage's artifacts equal the same job's with a local run_dir; no open()/os.makedirs
  in any process of the job (the driver and every Ray worker) ever receives a URI; no credential
  value in any manifest, the console or Ray's logs; a half-written stage is ignored and cleaned.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

import proc_util
import s3_util
from s3_util import BUCKET, KEY_ID, SECRET
from pipeline import artifacts, storage
from pipeline.config import load_job


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's S3 server on a free local port with one bucket: {'endpoint', 'env'}."""
    with s3_util.moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


@pytest.fixture()
def s3_env(s3_server, monkeypatch):
    """The standard AWS_* environment chain pointing at the server, for code running in this process."""
    for k, v in s3_server["env"].items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    return s3_server


# --------------------------------------------------------------------------- stage protocol (fast)

BASE = {"corpus": {"path": "c"}, "anchors": {"path": "a"}}


def _job(run_dir: str, *overrides):
    return load_job(data={"run_dir": run_dir, **BASE}, overrides=list(overrides))


def _writer(calls: list, name: str = "out.txt"):
    def run(ctx):
        calls.append(ctx.out_dir)
        storage.write_text_atomic(storage.join(ctx.out_dir, name), "x")
        ctx.record(rows={"n": 1})

    return run


def test_stage_on_object_store_is_finished_only_with_its_manifest(s3_env, tmp_path):
    ep, prefix = s3_env["endpoint"], "protocol"
    job = _job(f"s3://{BUCKET}/{prefix}")
    calls: list = []
    m = artifacts.run_stage(job, "sketch", runner=_writer(calls))
    # Written in place (no rename on object stores), the manifest beside the files.
    assert calls == [f"s3://{BUCKET}/{prefix}/sketch"]
    assert s3_util.keys(ep, f"{prefix}/sketch") == ["manifest.json", "out.txt"]
    assert json.loads(s3_util.read(ep, f"{prefix}/sketch/manifest.json"))["identity"] == m["identity"]
    assert not [k for k in s3_util.keys(ep, prefix) if ".tmp-" in k]
    artifacts.run_stage(job, "sketch", runner=_writer(calls))  # finished: skipped
    assert len(calls) == 1

    # A failed run deletes what it wrote; the work dir (what a rerun resumes from) stays.
    def boom(ctx):
        storage.write_text_atomic(storage.join(ctx.work_dir, "shard-0.done"), "")
        storage.write_text_atomic(storage.join(ctx.out_dir, "half.txt"), "x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        artifacts.run_stage(_job(job.run_dir, "sketch.proj_dim=128"), "sketch", overwrite=True, runner=boom)
    assert s3_util.keys(ep, f"{prefix}/sketch") == []  # the old finished output went first: it was being replaced
    assert any(k.endswith("shard-0.done") for k in s3_util.keys(ep, f"{prefix}/.work"))

    # A killed run (no cleanup at all): files, no manifest. Never finished for anyone reading it...
    fs = s3_util.client(ep)
    for name in ("out.txt", "stray.parquet"):
        with fs.open_output_stream(f"{BUCKET}/{prefix}/sketch/{name}") as f:
            f.write(b"half")
    assert artifacts.read_manifest(job, "sketch") is None
    assert {r["stage"]: r["state"] for r in artifacts.status(job.run_dir)}["sketch"] != "done"
    with pytest.raises(Exception, match="needs the finished `sketch` stage"):
        artifacts.run_stage(job, "fit", runner=lambda ctx: None)
    # ... and cleaned by the next run, which writes the stage anew.
    m2 = artifacts.run_stage(job, "sketch", runner=_writer(calls))
    assert s3_util.keys(ep, f"{prefix}/sketch") == ["manifest.json", "out.txt"]
    assert s3_util.read(ep, f"{prefix}/sketch/out.txt") == b"x"
    assert m2["identity"] == m["identity"]

    # A result-changing config with --overwrite: the previous files do not survive into the new output.
    artifacts.run_stage(
        _job(job.run_dir, "sketch.proj_dim=256"), "sketch", overwrite=True, runner=_writer(calls, "b.txt")
    )
    assert s3_util.keys(ep, f"{prefix}/sketch") == ["b.txt", "manifest.json"]

    # Leftovers of an older influcoder's temporary folders are removed by the stage's next run.
    with fs.open_output_stream(f"{BUCKET}/{prefix}/.fit.tmp-0badc0de/x.txt") as f:
        f.write(b"old")
    artifacts.run_stage(job, "sketch", overwrite=True, runner=_writer(calls))
    artifacts.run_stage(job, "fit", runner=lambda ctx: None)
    assert not [k for k in s3_util.keys(ep, prefix) if ".tmp-" in k]


def test_local_runs_keep_the_atomic_rename(tmp_path):
    """A local run_dir still writes into a temporary folder renamed into place."""
    calls: list = []
    artifacts.run_stage(_job(str(tmp_path / "run")), "sketch", runner=_writer(calls))
    assert os.path.basename(calls[0]).startswith(".sketch.tmp-")
    assert sorted(os.listdir(tmp_path / "run" / "sketch")) == ["manifest.json", "out.txt"]


def test_uri_paths_never_reach_local_file_calls():
    with pytest.raises(ValueError, match="local-only file access on s3://b/x"):
        storage.local_path("s3://b/x")
    assert storage.local_path("file:///tmp/x") == "/tmp/x"


def test_lance_gets_plain_http_only_for_a_plain_http_endpoint(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert storage.lance_storage_options("s3://b/db") == {"allow_http": "true"}
    assert storage.lance_storage_options("/tmp/db") == {}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://s3.example.com")
    assert storage.lance_storage_options("s3://b/db") == {}


def test_credentials_from_the_environment_are_redacted(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    text = storage.redact(f"signing with {KEY_ID}/{SECRET} for s3://bucket/run")
    assert SECRET not in text and KEY_ID not in text and "s3://bucket/run" in text
    obj = storage.redact_obj({"error": [f"bad key {SECRET}"]})
    assert SECRET not in json.dumps(obj)


def test_remote_model_folder_is_copied_once_per_change(s3_env, tmp_path, monkeypatch):
    from pipeline import models

    monkeypatch.setenv("INFLUCODER_CACHE", str(tmp_path / "cache"))
    fs = s3_util.client(s3_env["endpoint"])
    uri = f"s3://{BUCKET}/models/enc"
    for name, body in (("config.json", b'{"hidden_size": 4}'), ("sub/tok.json", b"{}")):
        with fs.open_output_stream(f"{BUCKET}/models/enc/{name}") as f:
            f.write(body)
    copies = []
    real = storage.download_dir
    monkeypatch.setattr(storage, "download_dir", lambda src, dst: (copies.append(src), real(src, dst)))
    first = models.local_model_dir(uri)
    assert Path(first, "config.json").read_bytes() == b'{"hidden_size": 4}'
    assert Path(first, "sub", "tok.json").exists()
    assert Path(first).is_relative_to(tmp_path / "cache")
    assert models.local_model_dir(uri) == first and len(copies) == 1  # cached
    time.sleep(1.1)  # a rewrite must change the listing (modification times have 1 s resolution)
    with fs.open_output_stream(f"{BUCKET}/models/enc/config.json") as f:
        f.write(b'{"hidden_size": 8}')
    second = models.local_model_dir(uri)
    assert second != first and Path(second, "config.json").read_bytes() == b'{"hidden_size": 8}'
    assert len(copies) == 2
    assert models.local_model_dir(str(tmp_path)) == str(tmp_path)  # local folders are used in place


# --------------------------------------------------------------------------- the whole job (slow)


def test_the_uri_guard_fires(tmp_path):
    """The guard the whole-job tests rely on records and refuses a URI handed to open()/os.makedirs
    (also as the local path `.../s3:/...` that os.path.abspath makes of one), and nothing else."""
    guard = s3_util.guard_dir(tmp_path / "guard")
    log = tmp_path / "guard.log"
    script = (
        "import os\n"
        "for f in (lambda: os.makedirs('s3://b/x'), lambda: open(os.path.abspath('gs://b/y'), 'w')):\n"
        "    try:\n        f()\n    except OSError as e:\n        print(e)\n"
        f"open({str(tmp_path / 'plain.txt')!r}, 'w').close()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(guard), "INFLUCODER_URI_GUARD_LOG": str(log)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("URI guard") == 2 and (tmp_path / "plain.txt").exists()
    assert log.read_text().count(s3_util.VIOLATION + " ") == 2


def _run_job(job: dict, tmp: Path, env_extra: dict, name: str) -> dict:
    """`influcoder run JOB` in its own process (its own Ray, the URI guard in every process), as a
    user starts it (proc_util.run_as_a_user, no AWS_* variable of this process passed on):
    {'rc', 'out', 'ray_logs', 'guard'}."""
    guard_dir = s3_util.guard_dir(tmp / "guard")
    guard_log = tmp / f"{name}.guard.log"
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    pythonpath = os.pathsep.join([str(guard_dir), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    run = proc_util.run_as_a_user(
        path,
        timeout=1200,
        drop_env=("AWS_",),
        env_extra={
            "PYTHONPATH": pythonpath,
            "INFLUCODER_URI_GUARD_LOG": str(guard_log),
            "INFLUCODER_CACHE": str(tmp / f"{name}.cache"),
            "RAY_raylet_start_wait_time_s": "120",  # a busy CI machine: the default 60 s has run out
            **env_extra,
        },
    )
    return {
        "rc": run["rc"],
        "out": run["stdout"] + run["stderr"],
        "ray_logs": run["session_logs"],
        "guard": guard_log.read_text() if guard_log.exists() else "",
    }


@pytest.fixture(scope="module")
def two_runs(s3_server, tmp_path_factory, tiny_run):
    """The same tiny job twice: run_dir local (the reference: conftest's shared `tiny_run`, every stage
    with the cascade, a centred teacher and every eval method), and run_dir on the S3 server
    (`influcoder run` in its own process, as a user starts it)."""
    shared, _ = tiny_run
    tmp = tmp_path_factory.mktemp("objstore_job")

    def job(run_dir: str) -> dict:
        return {**json.loads(json.dumps(shared)), "run_dir": run_dir}

    s3_run = f"s3://{BUCKET}/job/run"
    remote = _run_job(job(s3_run), tmp, s3_server["env"], "s3")
    assert remote["rc"] == 0, remote["out"][-6000:] + remote["guard"][-4000:]
    return {"tmp": tmp, "local_dir": Path(shared["run_dir"]), "s3_run": s3_run, "s3": remote, "job": job}


def _table(source, sort: list[str]) -> pa.Table:
    t = source if isinstance(source, pa.Table) else pq.read_table(source)
    return t.take(pc.sort_indices(t, [(c, "ascending") for c in sort]))


def _s3_table(endpoint: str, key: str, sort: list[str]) -> pa.Table:
    return _table(pq.read_table(f"{BUCKET}/{key}", filesystem=s3_util.client(endpoint)), sort)


def _close(a: pa.Table, b: pa.Table, atol: float) -> None:
    assert a.column_names == b.column_names and a.num_rows == b.num_rows
    for name in a.column_names:
        x, y = a.column(name).combine_chunks(), b.column(name).combine_chunks()
        if pa.types.is_floating(x.type):
            # nulls (the cascade's teacher_score outside its block) become NaN, equal only to NaN
            np.testing.assert_allclose(
                x.to_numpy(zero_copy_only=False), y.to_numpy(zero_copy_only=False), atol=atol, err_msg=name
            )
        elif pa.types.is_fixed_size_list(x.type) or pa.types.is_list(x.type):
            xs = np.stack([np.asarray(v, np.float64) for v in x.to_pylist()])
            ys = np.stack([np.asarray(v, np.float64) for v in y.to_pylist()])
            np.testing.assert_allclose(xs, ys, atol=atol, err_msg=name)
        else:
            assert x.to_pylist() == y.to_pylist(), name


@pytest.mark.slow  # two whole-job runs in their own processes
@pytest.mark.timeout(2400)
def test_whole_job_on_s3_equals_the_local_run(two_runs, s3_server):
    ep, local = s3_server["endpoint"], two_runs["local_dir"]
    prefix = two_runs["s3_run"][len(f"s3://{BUCKET}/") :]
    keys = s3_util.keys(ep, prefix)
    stages = ("sketch", "fit", "encode", "score", "filter", "eval")
    for stage in stages:
        assert f"{stage}/manifest.json" in keys, keys
        remote_m = json.loads(s3_util.read(ep, f"{prefix}/{stage}/manifest.json"))
        local_m = json.loads((local / stage / "manifest.json").read_text())
        assert remote_m.get("rows") == local_m.get("rows"), stage
    # Every artifact the local run wrote exists on the store (the LanceDB table aside: it is compared
    # by content below), with no temporary folder left and no local folder named `s3:` anywhere.
    local_files = sorted(
        str(p.relative_to(local)) for p in local.rglob("*") if p.is_file() and "lancedb" not in p.parts
    )
    local_files = [f for f in local_files if not f.startswith((".locks", ".work"))]
    assert local_files and set(local_files) <= set(keys), sorted(set(local_files) - set(keys))
    assert not [k for k in keys if ".tmp-" in k or k.startswith(".work/")]
    assert not list(Path.cwd().glob("s3:*")) and not list(two_runs["tmp"].rglob("s3:"))
    assert any(k.startswith("lancedb/codes.lance/") for k in keys)

    # sketch: the teacher's sketches (ids, splits, sketch vectors)
    for role in ("anchors", "pool"):
        _close(
            _s3_table(ep, f"{prefix}/sketch/{role}/part-00000.parquet", ["id"]),
            _table(local / "sketch" / role / "part-00000.parquet", ["id"]),
            1e-5,
        )
    # fit: the exported encoder's weights and the held-out metrics
    from safetensors.numpy import load as load_safetensors

    remote_w = load_safetensors(s3_util.read(ep, f"{prefix}/fit/encoder/model.safetensors"))
    local_w = load_safetensors((local / "fit" / "encoder" / "model.safetensors").read_bytes())
    assert remote_w.keys() == local_w.keys()
    for k in local_w:
        np.testing.assert_allclose(remote_w[k], local_w[k], atol=1e-5, err_msg=k)
    rf = json.loads(s3_util.read(ep, f"{prefix}/fit/metrics.json"))
    lf = json.loads((local / "fit" / "metrics.json").read_text())
    assert rf["exported"]["spearman_aggregated"] == pytest.approx(lf["exported"]["spearman_aggregated"], abs=1e-4)
    # encode: the LanceDB codes table, read back from the store by its own client
    import lance

    opts = {
        "endpoint": ep,
        "allow_http": "true",
        "access_key_id": KEY_ID,
        "secret_access_key": SECRET,
        "region": "us-east-1",
    }
    cols = ["id", "code", "source", "row", "code_scale"]
    remote_codes = lance.dataset(f"s3://{BUCKET}/{prefix}/lancedb/codes.lance", storage_options=opts).to_table(
        columns=cols
    )
    local_codes = lance.dataset(str(local / "lancedb" / "codes.lance")).to_table(columns=cols)
    _close(_table(remote_codes, ["id"]), _table(local_codes, ["id"]), 1e-3)
    # score: the global ranking and the top-k, same ranks and ids, scores within float tolerance
    for name, sort in (("scores.parquet", ["rank"]), ("topk.parquet", ["query_id", "rank"])):
        r = _s3_table(ep, f"{prefix}/score/{name}", sort)
        loc = _table(local / "score" / name, sort)
        _close(r, loc, 1e-4)
    # filter: the curated corpus, row for row
    r = pq.read_table(f"{BUCKET}/{prefix}/filter/corpus", filesystem=s3_util.client(ep))
    loc = pq.read_table(local / "filter" / "corpus")
    assert 0 < r.num_rows < 46
    _close(_table(r, ["id"]), _table(loc, ["id"]), 1e-6)
    # eval: every method's quality figures, and the report with its plots
    rm = json.loads(s3_util.read(ep, f"{prefix}/eval/metrics.json"))["methods"]
    lm = json.loads((local / "eval" / "metrics.json").read_text())["methods"]
    assert rm.keys() == lm.keys()
    for method in lm:
        for key in ("auprc", "mrr", "recall@5"):
            assert rm[method][key] == pytest.approx(lm[method][key], abs=1e-4), (method, key)
        r_rho, l_rho = rm[method]["heldout"]["spearman_aggregated"], lm[method]["heldout"]["spearman_aggregated"]
        assert r_rho == pytest.approx(l_rho, abs=1e-4), method
    assert {"eval/report/report.md", "eval/report/pr_curves.png"} <= set(keys)
    assert s3_util.read(ep, f"{prefix}/eval/report/pr_curves.png").startswith(b"\x89PNG")


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_no_uri_reaches_open_or_makedirs(two_runs):
    run = two_runs["s3"]
    loaded = [line for line in run["guard"].splitlines() if line.startswith("loaded in pid")]
    # The guard ran in the driver and in Ray's worker processes, and never fired.
    assert len(loaded) >= 3, run["guard"][:2000]
    assert "URI guard" not in run["out"]
    assert s3_util.VIOLATION not in run["guard"], run["guard"][:6000]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_no_credential_in_manifests_or_logs(two_runs, s3_server):
    ep = s3_server["endpoint"]
    prefix = two_runs["s3_run"][len(f"s3://{BUCKET}/") :]
    texts = {k: s3_util.read(ep, f"{prefix}/{k}") for k in s3_util.keys(ep, prefix) if k.endswith((".json", ".md"))}
    assert any(k.endswith("manifest.json") for k in texts)
    run = two_runs["s3"]
    texts.update({"console": run["out"].encode(), "ray logs": run["ray_logs"].encode()})
    for where, text in texts.items():
        for secret in (SECRET, KEY_ID):
            assert secret.encode() not in text, f"{secret[:6]}... leaked into {where}"
    # ... though the run did use them (the endpoint is recorded as nothing but the run_dir's URI).
    assert "s3://" in run["out"]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_half_written_stage_on_s3_is_ignored_then_cleaned(two_runs, s3_server, monkeypatch):
    """A filter run killed while writing (filter: the last stage, no actors, nothing downstream; the
    same half-written rule holds for every stage, artifacts.run_stage)."""
    ep, fs = s3_server["endpoint"], s3_util.client(s3_server["endpoint"])
    prefix = two_runs["s3_run"][len(f"s3://{BUCKET}/") :]
    corpus_keys = [k for k in s3_util.keys(ep, f"{prefix}/filter") if k.startswith("corpus/")]
    before = {k: _s3_table(ep, f"{prefix}/filter/{k}", ["id"]) for k in corpus_keys}
    assert before, "the filter stage wrote no corpus file"
    # Its files (and a stray one) without a manifest.
    fs.delete_file(f"{BUCKET}/{prefix}/filter/manifest.json")
    with fs.open_output_stream(f"{BUCKET}/{prefix}/filter/stray.parquet") as f:
        f.write(b"half-written")
    for k, v in s3_server["env"].items():
        monkeypatch.setenv(k, v)
    states = {r["stage"]: r["state"] for r in artifacts.status(two_runs["s3_run"])}
    assert states["filter"] != "done" and states["score"] == "done"

    rerun = _run_job(two_runs["job"](two_runs["s3_run"]), two_runs["tmp"], s3_server["env"], "s3_rerun")
    assert rerun["rc"] == 0, rerun["out"][-6000:]
    assert "removing a half-written" in rerun["out"]
    for stage in ("sketch", "fit", "encode", "score", "eval"):  # filter's identity did not change
        assert f"{stage}: already finished" in rerun["out"], stage
    keys = s3_util.keys(ep, f"{prefix}/filter")
    assert "manifest.json" in keys and "stray.parquet" not in keys
    assert sorted(k for k in keys if k.startswith("corpus/")) == sorted(corpus_keys)
    for k, table in before.items():
        assert _s3_table(ep, f"{prefix}/filter/{k}", ["id"]).equals(table), k
