"""Two Ray nodes that share no disk (issue 11 part 2): the job's inputs and run_dir on a real
S3-compatible server (moto, tests/s3_util.py), each node started with its own HOME (so its own model
cache), temp dir, working directory and TMPDIR, its own credentials in its environment, and a guard in
every Python process that fails any open()/os.makedirs on a URI. A job submitted with `ray job submit`
runs sketch -> fit -> encode -> score on the cluster; its artifacts equal the same job's on an
in-process Ray with local paths.

Both nodes run on this machine, so a bug could still pass a local path from one to the other; what
rules that out here is that every artifact path is a URI and every node-private folder is distinct.
Nothing here calls `ray stop`; the processes this test starts are killed by pid (tests/proc_util.py).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

import cluster_util
import proc_util
import s3_util
from cluster_util import EXCLUDES, PYTHON, RAY, run, small_job
from conftest import REPO
from s3_util import BUCKET

pytestmark = [pytest.mark.timeout(1200), pytest.mark.slow]

STAGES_UP_TO = "score"


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    with s3_util.moto_server(tmp_path_factory.mktemp("moto_mn") / "moto.log") as server:
        yield server


@pytest.fixture()
def private_nodes(s3_server):
    """Head + worker node (CPU=2 each, token auth on), each with its own private folders and the
    object store's credentials in its own environment."""
    tmp = Path(tempfile.mkdtemp(prefix="icmns", dir="/tmp"))  # short: Unix socket paths max 107 chars
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    tag = proc_util.new_tag()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "INFLUCODER_"))}
    base.update(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            proc_util.TAG: tag,
            "RAY_USAGE_STATS_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
    )
    guard = s3_util.guard_dir(tmp / "guard")
    nodes = {}
    for name in ("head", "worker"):
        d = tmp / name
        for sub in ("home", "cwd", "tmp"):
            (d / sub).mkdir(parents=True)
        nodes[name] = {
            "dir": d,
            "env": {
                **base,
                **s3_server["env"],
                "HOME": str(d / "home"),
                "TMPDIR": str(d / "tmp"),
                "PYTHONPATH": str(guard),
                "INFLUCODER_URI_GUARD_LOG": str(d / "guard.log"),
            },
        }
    try:
        started = cluster_util.start_two_nodes(
            *({"env": n["env"], "temp_dir": n["dir"] / "ray", "cwd": n["dir"] / "cwd"} for n in nodes.values())
        )
        # The submitting client: the token, and nothing of the object store.
        client_env = {k: v for k, v in base.items()}
        yield {
            **started,
            "nodes": nodes,
            "client_env": client_env,
            "tmp": tmp,
        }
    finally:
        proc_util.kill_tagged(tag)
        assert proc_util.tagged(tag) == [], "cluster processes survived cleanup"
        shutil.rmtree(tmp, ignore_errors=True)


def _table(path_or_table, sort: list[str], fs=None):
    t = pq.read_table(path_or_table, filesystem=fs) if not hasattr(path_or_table, "num_rows") else path_or_table
    return t.take(pc.sort_indices(t, [(c, "ascending") for c in sort]))


def test_two_nodes_without_shared_disk_match_in_process(
    private_nodes, s3_server, fixture_corpora, tiny_teacher_dir, tiny_encoder_dir, tmp_path, ray_local
):
    from conftest import tiny_job_data

    c, ep = private_nodes, s3_server["endpoint"]
    env = c["client_env"]
    proc_util.wait_for(
        lambda: "/4.0 CPU" in run([RAY, "status", f"--address={c['gcs']}"], env, timeout=60).stdout,
        90,
        interval=2,
        what="both nodes in `ray status`",
    )
    tiny = tiny_job_data("unused", fixture_corpora, tiny_teacher_dir, tiny_encoder_dir)
    roles = ("anchors", "pool", "corpus", "queries")
    remote_data = {r: s3_util.upload(ep, fixture_corpora / r, f"mn/data/{r}") + "/" for r in roles}
    run_uri = f"s3://{BUCKET}/mn/cluster_run"
    cluster_job = tmp_path / "cluster.yaml"
    cluster_job.write_text(yaml.safe_dump(small_job(tiny, run_uri, {"address": "auto"}, remote_data)))
    submit = [
        RAY,
        "job",
        "submit",
        "--address",
        c["dashboard"],
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps(EXCLUDES),
        "--",
        PYTHON,
        "-m",
        "pipeline.cli",
        "run",
        str(cluster_job),
        "--to",
        STAGES_UP_TO,
    ]
    job = run(submit, env, timeout=900)
    out = job.stdout + job.stderr
    assert job.returncode == 0 and "succeeded" in out, out[-6000:]
    for stage in ("sketch", "fit", "encode", "score"):
        assert f"{stage}: done" in out, stage

    # No process on either node handed a URI to open()/os.makedirs; both nodes ran our code.
    for name, node in c["nodes"].items():
        log = (node["dir"] / "guard.log").read_text() if (node["dir"] / "guard.log").exists() else ""
        assert "loaded in pid" in log, name
        assert s3_util.VIOLATION not in log, log[:6000]
    # Whichever node an encoder actor ran on fetched the fitted encoder from the store into its own cache.
    copies = [p for n in c["nodes"].values() for p in (n["dir"] / "home").glob(".cache/influcoder/remote/*")]
    assert copies, "no node copied the fitted encoder from the object store"
    # Nothing was written under a local folder named after the URI.
    assert not [p for p in c["tmp"].rglob("s3:")]

    # The same job on an in-process Ray (the test session's), with local paths.
    import pipeline

    local_run = tmp_path / "local_run"
    local_data = {r: str(fixture_corpora / r) for r in roles}
    pipeline.run(
        small_job(tiny, str(local_run), {"num_cpus": 2}, local_data), stages=["sketch", "fit", "encode", STAGES_UP_TO]
    )

    fs = s3_util.client(ep)
    prefix = f"{BUCKET}/mn/cluster_run"
    for stage in ("sketch", "fit", "encode", "score"):
        m_cluster = json.loads(s3_util.read(ep, f"mn/cluster_run/{stage}/manifest.json"))
        m_local = json.loads((local_run / stage / "manifest.json").read_text())
        # (The config hashes differ by design: the inputs are read from other paths.)
        assert m_cluster.get("rows") == m_local.get("rows"), stage
    # Two nodes: the score pass ran as Ray tasks spilling their runs to the bucket (score.scan auto);
    # one node, a small table: in the driver. The same scores either way (checked below).
    score_cluster = json.loads(s3_util.read(ep, "mn/cluster_run/score/manifest.json"))
    assert score_cluster["scan"]["where"] == "workers" and score_cluster["scan"]["tasks"] >= 1
    assert json.loads((local_run / "score" / "manifest.json").read_text())["scan"]["where"] == "driver"
    for role in ("anchors", "pool"):
        a = _table(f"{prefix}/sketch/{role}", ["id"], fs)
        b = _table(str(local_run / "sketch" / role), ["id"])
        assert a.column("id").to_pylist() == b.column("id").to_pylist() and a.num_rows > 0
        assert a.column("split").to_pylist() == b.column("split").to_pylist()
        va = np.asarray(a.column("sketch").combine_chunks().flatten()).reshape(a.num_rows, -1)
        vb = np.asarray(b.column("sketch").combine_chunks().flatten()).reshape(b.num_rows, -1)
        np.testing.assert_allclose(va, vb, atol=2e-5)
    from safetensors.numpy import load as load_safetensors

    wa = load_safetensors(s3_util.read(ep, "mn/cluster_run/fit/encoder/model.safetensors"))
    wb = load_safetensors((local_run / "fit" / "encoder" / "model.safetensors").read_bytes())
    assert wa.keys() == wb.keys()
    for k in wb:
        np.testing.assert_allclose(wa[k], wb[k], atol=1e-4, err_msg=k)
    # The scores: same ranking, scores within float tolerance.
    sa = _table(f"{prefix}/score/scores.parquet", ["rank"], fs)
    sb = _table(str(local_run / "score" / "scores.parquet"), ["rank"])
    assert sa.column("id").to_pylist() == sb.column("id").to_pylist() and sa.num_rows > 0
    np.testing.assert_allclose(sa.column("score").to_numpy(), sb.column("score").to_numpy(), atol=1e-4)
