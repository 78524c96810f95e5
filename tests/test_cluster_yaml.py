"""cluster.yaml is valid for the installed Ray's launcher, keeps the dashboard private, keeps token
auth on, and declares GPUs on the GPU worker type. Every jobs/*.yaml validates."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess

import pytest
import yaml

from conftest import REPO

CLUSTER = REPO / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


@pytest.fixture(scope="module")
def schema_validator():
    import jsonschema
    import ray

    path = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
    with open(path) as f:
        schema = json.load(f)
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_schema_of_installed_ray(cluster, schema_validator):
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in schema_validator.iter_errors(cluster)]
    assert errors == []


def test_schema_catches_typos(cluster, schema_validator):
    """The validator is not vacuous: a typo and a node type without resources are errors."""
    bad = copy.deepcopy(cluster)
    bad["max_worker"] = 3
    del bad["available_node_types"]["gpu_worker"]["resources"]
    assert len(list(schema_validator.iter_errors(bad))) == 2


def test_ray_prepare_and_validate(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(cluster))
    validate_config(cfg)  # raises on an invalid config
    assert cfg["head_node_type"] in cfg["available_node_types"]


def _start_commands(cluster: dict, key: str) -> list[list[str]]:
    out = []
    for cmd in cluster[key]:
        for part in re.split(r"[;&|]+", cmd):
            words = shlex.split(part)
            if len(words) >= 2 and words[0].endswith("ray") and words[1] == "start":
                out.append(words)
    return out


def test_dashboard_private_and_token_auth(cluster):
    (head,) = _start_commands(cluster, "head_start_ray_commands")
    assert "--head" in head
    assert "--dashboard-host=127.0.0.1" in head
    assert not any(w.startswith("--dashboard-host=") and w != "--dashboard-host=127.0.0.1" for w in head)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        joined = " ".join(cluster[key])
        assert "RAY_AUTH_MODE=token" in joined, key
        assert "RAY_AUTH_MODE=disabled" not in joined
    assert _start_commands(cluster, "worker_start_ray_commands"), "workers must start Ray"
    # The token reaches every node through file_mounts (the launcher does not copy it by itself).
    assert "~/.ray/auth_token" in cluster["file_mounts"]


def test_node_types(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu = [t for name, t in types.items() if name != cluster["head_node_type"]]
    assert gpu and all(t["resources"].get("GPU", 0) >= 1 for t in gpu)
    for t in gpu:
        assert 0 <= t["min_workers"] < t["max_workers"] <= cluster["max_workers"]


def test_setup_installs_the_package(cluster):
    setup = " ".join(cluster["setup_commands"])
    assert "make install" in setup or "pip install -c constraints.txt -e ." in setup


def test_every_job_file_validates():
    from pipeline.config import load_job

    jobs = sorted((REPO / "jobs").glob("*.yaml"))
    assert len(jobs) >= 3  # demo + the realistic configs
    for path in jobs:
        job = load_job(path)
        assert job.run_dir, path


def test_realistic_jobs_use_object_storage_and_big_models():
    from pipeline import storage
    from pipeline.config import load_job

    for name in ("qwen3-0.6b_s3.yaml", "qwen3-4b_gcs.yaml"):
        job = load_job(REPO / "jobs" / name)
        assert storage.is_uri(job.run_dir) and storage.is_uri(job.corpus.path), name
        assert job.teacher.model.startswith("Qwen/Qwen3-")
        assert job.sketch.proj_dim == 65536
        assert job.ray.address == "auto"


def test_submit_script_prints_the_command(tmp_path):
    """`--dry-run` prints the exact `ray job submit` line: absolute venv python, excludes, the job."""
    out = subprocess.run(
        ["bash", str(REPO / "jobs" / "submit.sh"), "--dry-run", "jobs/qwen3-4b_gcs.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "RAY_ADDRESS": "http://127.0.0.1:8265"},
    )
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip().splitlines()[-1]
    words = shlex.split(line)
    assert words[:3] == ["ray", "job", "submit"]
    assert words[words.index("--address") + 1] == "http://127.0.0.1:8265"
    env = json.loads(words[words.index("--runtime-env-json") + 1])
    assert {".venv", "runs", "data", ".git"} <= set(env["excludes"])
    entry = words[words.index("--") + 1 :]
    assert os.path.isabs(entry[0]) and entry[0].endswith("/python")
    assert entry[1:] == ["-m", "pipeline.cli", "run", "jobs/qwen3-4b_gcs.yaml"]
