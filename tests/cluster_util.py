"""Helpers of the two-node cluster test (test_multinode.py: one job on a shared disk, one without):
the tools' paths, the shrunken tiny job, and starting a head + worker pair with `ray start`.

Every process started here carries the caller's proc_util tag in its environment; the caller kills
them by pid (never `ray stop`, which would kill every Ray process on the machine).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

import proc_util
from conftest import REPO

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
PYTHON = str(VENV_BIN / "python")  # absolute: the job's entrypoint must not depend on PATH (pitfall 4)
EXCLUDES = {
    "excludes": [".git", ".venv", "bench/.peer-venv", "runs", "data", "bench/out", ".pytest_cache", "*.egg-info"]
}


def run(cmd: list[str], env: dict, timeout: float, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def small_job(job: dict, run_dir: str, ray_section: dict, data: Optional[dict[str, str]] = None) -> dict:
    """The tiny job, smaller (the cluster, not the models, is under test), reading `data[role]` when given."""
    job = json.loads(json.dumps(job))
    job["run_dir"] = str(run_dir)
    if data:
        for role in ("anchors", "pool", "corpus"):
            job[role]["path"] = data[role]
        job["score"]["queries"]["path"] = data["queries"]
    job["teacher"]["max_len"] = 32
    job["sketch"].update(
        {
            "proj_dim": 256,
            "train_anchors": 2,
            "eval_anchors": 2,
            "train_pool": 4,
            "eval_pool": 2,
            "rows_per_shard": 4,
            "fidelity_samples": 0,
        }
    )
    # Two train anchors, four train pool rows: one block (all anchors, every candidate) per epoch.
    job["fit"] = {"epochs": 2, "block_anchors": 2, "block_candidates": 4, "val_frac": 0.0, "restore_best": False}
    job["ray"] = ray_section
    return job


def start_two_nodes(head: dict, worker: dict) -> dict:
    """`ray start` a head (resource head_node) and a worker (resource worker_node), CPU=2 each, on
    127.0.0.1. Each node dict gives its `env`, `temp_dir` and optionally `cwd`: one temp dir per node,
    since nodes sharing one would share the unpacked working_dir, and the worker node's runtime-env
    agent deletes it (the job driver's cwd!) when its actors exit. Returns the addresses."""
    gcs_port, dash_port = proc_util.free_port(), proc_util.free_port()
    common = ["--num-cpus=2", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
    started = run(
        [
            RAY,
            "start",
            "--head",
            f"--port={gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}",
            f"--ray-client-server-port={proc_util.free_port()}",
            f"--dashboard-agent-listen-port={proc_util.free_port()}",
            "--resources",
            '{"head_node": 1}',
            f"--temp-dir={head['temp_dir']}",
            *common,
        ],
        head["env"],
        timeout=180,
        cwd=head.get("cwd", REPO),
    )
    assert started.returncode == 0, started.stdout + started.stderr
    joined = run(
        [
            RAY,
            "start",
            f"--address=127.0.0.1:{gcs_port}",
            f"--dashboard-agent-listen-port={proc_util.free_port()}",
            "--resources",
            '{"worker_node": 1}',
            f"--temp-dir={worker['temp_dir']}",
            *common,
        ],
        worker["env"],
        timeout=180,
        cwd=worker.get("cwd", REPO),
    )
    assert joined.returncode == 0, joined.stdout + joined.stderr
    return {"gcs": f"127.0.0.1:{gcs_port}", "dashboard": f"http://127.0.0.1:{dash_port}", "dash_port": dash_port}
