"""A real two-node Ray cluster on this machine (`ray start --head` + `ray start --address`), token
auth on, a job submitted with `ray job submit --working-dir`: it must produce the same artifacts as
the same job on an in-process Ray, through the sketch (Ray Data actors) and the fit (Ray Train's
TorchTrainer, placed by the cluster's scheduler on either node).

The README's "Running on a Ray cluster" steps are these commands. Nothing here calls `ray stop`
(it would kill every Ray process on the machine); the processes this test starts are killed by pid
(tests/proc_util.py). The job runs on the fixture corpora with the tiny random teacher and encoder
(`tiny_job`): the cluster, not the models, is under test. It starts Ray clusters: marked `slow`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

import proc_util
from cluster_util import EXCLUDES, PYTHON, RAY, run, small_job
import cluster_util
from conftest import REPO

pytestmark = [pytest.mark.timeout(480), pytest.mark.slow]


def _sketches(run_dir: Path, role: str) -> dict[str, tuple[str, np.ndarray]]:
    t = pq.read_table(run_dir / "sketch" / role)
    vecs = np.asarray(t.column("sketch").combine_chunks().flatten()).reshape(t.num_rows, -1)
    return {i: (s, v) for i, s, v in zip(t.column("id").to_pylist(), t.column("split").to_pylist(), vecs)}


@pytest.fixture()
def two_node_cluster():
    """Head (CPU=2, resource head_node) + worker (CPU=2, resource worker_node), token auth on.

    The token is a fresh one in the cluster's temp dir (RAY_AUTH_TOKEN_PATH), so the test neither
    needs nor touches ~/.ray/auth_token.
    """
    tmp = Path(tempfile.mkdtemp(prefix="icmn", dir="/tmp"))  # short: Unix socket paths max 107 chars
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    tag = proc_util.new_tag()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            proc_util.TAG: tag,
            "RAY_USAGE_STATS_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
    )
    try:
        nodes = cluster_util.start_two_nodes(
            {"env": env, "temp_dir": tmp / "ray"}, {"env": env, "temp_dir": tmp / "ray_worker"}
        )
        yield {
            "env": env,
            **nodes,
            "tmp": tmp,
            "tag": tag,
        }
    finally:
        proc_util.kill_tagged(tag)
        assert proc_util.tagged(tag) == [], "cluster processes survived cleanup"
        shutil.rmtree(tmp, ignore_errors=True)


def test_two_node_cluster_job_matches_in_process(two_node_cluster, tiny_job, tmp_path, ray_local):
    c = two_node_cluster
    env = c["env"]

    # Both nodes joined: 4 CPUs, and each node's own custom resource.
    def both_nodes():  # the autoscaler's status report lags the join by a few seconds
        out = run([RAY, "status", f"--address={c['gcs']}"], env, timeout=60).stdout
        return all(s in out for s in ("/4.0 CPU", "/1.0 head_node", "/1.0 worker_node")) and out

    proc_util.wait_for(both_nodes, 90, interval=2, what="both nodes in `ray status`")

    # The dashboard listens on loopback only.
    import psutil

    listeners = [
        cn.laddr
        for cn in psutil.net_connections("tcp")
        if cn.status == psutil.CONN_LISTEN and cn.laddr.port == c["dash_port"]
    ]
    assert listeners and all(a.ip == "127.0.0.1" for a in listeners)

    # Token auth is on: a client without the token is refused.
    no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    refused = run([RAY, "job", "list", "--address", c["dashboard"]], no_token, timeout=60)
    assert refused.returncode != 0 and "authentication" in (refused.stdout + refused.stderr).lower()

    cluster_job = tmp_path / "cluster.yaml"
    cluster_job.write_text(yaml.safe_dump(small_job(tiny_job, tmp_path / "cluster_run", {"address": "auto"})))
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
        "fit",
    ]
    job = run(submit, env, timeout=360)
    out = job.stdout + job.stderr
    assert job.returncode == 0 and "succeeded" in out, out[-6000:]
    assert "sketch: done" in out and "fit: done" in out
    # The upload held the code, not the venv, the data or old runs.
    pkgs = list((c["tmp"] / "ray").glob("session_*/runtime_resources/working_dir_files/*/"))
    assert pkgs, "no working_dir package found"
    uploaded = {p.name for p in pkgs[0].iterdir()}
    assert "pipeline" in uploaded and not uploaded & {".venv", "runs", "data", ".git"}

    # The same job on an in-process Ray (the test session's).
    import pipeline

    pipeline.run(small_job(tiny_job, tmp_path / "local_run", {"num_cpus": 2}), stages=["sketch", "fit"])

    m_cluster = json.loads((tmp_path / "cluster_run" / "sketch" / "manifest.json").read_text())
    m_local = json.loads((tmp_path / "local_run" / "sketch" / "manifest.json").read_text())
    assert m_cluster["config_hash"] == m_local["config_hash"]
    assert m_cluster["identity"] == m_local["identity"]
    assert m_cluster["rows"] == m_local["rows"]
    assert m_cluster["resources"]["cpus_per_actor"] <= 2  # an actor fits on one 2-CPU node
    for role in ("anchors", "pool"):
        a, b = _sketches(tmp_path / "cluster_run", role), _sketches(tmp_path / "local_run", role)
        assert sorted(a) == sorted(b) and len(a) > 0
        for rid in a:
            assert a[rid][0] == b[rid][0]
            np.testing.assert_allclose(a[rid][1], b[rid][1], atol=2e-5)

    # The fit stage: Ray Train ran on the cluster and exported an encoder that matches the local one.
    fits = {
        name: json.loads((tmp_path / name / "fit" / "metrics.json").read_text())
        for name in ("cluster_run", "local_run")
    }
    for m in fits.values():
        assert [e["epoch"] for e in m["epochs"]] == [1, 2] and m["resumed_from_epochs"] == []
        # Same worker shape on both: the cluster has 4 CPUs, but a worker must fit on one 2-CPU node.
        assert m["workers"] == {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 2}
    f_cluster = json.loads((tmp_path / "cluster_run" / "fit" / "manifest.json").read_text())
    f_local = json.loads((tmp_path / "local_run" / "fit" / "manifest.json").read_text())
    assert f_cluster["config_hash"] == f_local["config_hash"]
    # Training is seeded (weights, block order, candidates, dropout per epoch and rank) and runs as
    # one worker with the same torch thread count on the same CPU whichever node Ray Train places it
    # on, from sketches that agree to 2e-5: the exported encoders embed texts alike. (Observed:
    # bit-identical; the tolerance only absorbs sketch-level float noise.)
    from pipeline.encoder import TextEncoder

    texts = ["Natalia sold clips to 48 of her friends.", "Q: Is the sentence plausible?\nA: no", "hello"]
    z = {
        name: TextEncoder(str(tmp_path / name / "fit" / "encoder"), max_len=64).embed(texts)
        for name in ("cluster_run", "local_run")
    }
    dim = json.loads((Path(tiny_job["encoder"]["model"]) / "config.json").read_text())["hidden_size"]
    assert z["cluster_run"].shape == (3, dim) and np.isfinite(z["cluster_run"]).all()
    np.testing.assert_allclose(z["cluster_run"], z["local_run"], atol=1e-4)
    for key in ("loss", "spearman_per_anchor", "spearman_aggregated"):
        assert [e[key] for e in fits["cluster_run"]["epochs"]] == pytest.approx(
            [e[key] for e in fits["local_run"]["epochs"]], abs=1e-4
        ), key
