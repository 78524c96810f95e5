"""Security invariants: no remote code unless the job asks, no unpickling of artifacts, secrets in
URIs never reach manifests or logs, the dashboard stays on loopback, no credentials in the repo's
job files or cluster config."""

from __future__ import annotations

import ast
import json
import logging
import re

import pytest

from conftest import REPO
from pipeline import storage

PIPELINE = REPO / "pipeline"
SOURCES = sorted(PIPELINE.rglob("*.py"))

# Files allowed to call torch.load, always with weights_only=True: the fit stage reads back its own
# transient training checkpoints (optimizer/scheduler state written by the same job in run_dir/.work).
TORCH_LOAD_ALLOWED = {"pipeline/stages/fit_worker.py"}


def _calls(tree: ast.AST):
    """(call node, dotted function name, enclosing function name)."""
    out = []

    def visit(node, func):
        for child in ast.iter_child_nodes(node):
            f = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            if isinstance(child, ast.Call):
                out.append((child, _dotted(child.func), f))
            visit(child, f)

    visit(tree, None)
    return out


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


@pytest.fixture(scope="module")
def parsed():
    return {str(p.relative_to(REPO)): ast.parse(p.read_text(), filename=str(p)) for p in SOURCES}


def test_sources_found(parsed):
    assert "pipeline/cli.py" in parsed and len(parsed) > 10


def test_no_literal_trust_remote_code_true(parsed):
    """trust_remote_code reaches transformers only from the job config (teacher/encoder sections)."""
    offenders = []
    for path, tree in parsed.items():
        for call, name, _ in _calls(tree):
            for kw in call.keywords:
                if kw.arg == "trust_remote_code" and isinstance(kw.value, ast.Constant) and kw.value.value:
                    offenders.append(f"{path}:{call.lineno} {name}")
    assert offenders == []


@pytest.fixture()
def remote_code_model(tmp_path):
    """A local model folder whose config asks for its own Python code (auto_map); that code, if it
    ever ran, would leave a marker file."""
    marker = tmp_path / "remote_code_ran"
    model = tmp_path / "model"
    model.mkdir()
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    for name in ("configuration_evil.py", "modeling_evil.py", "tokenization_evil.py"):
        (model / name).write_text(code)
    auto_map = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModel": "modeling_evil.EvilModel",
        "AutoModelForCausalLM": "modeling_evil.EvilModel",
    }
    (model / "config.json").write_text(json.dumps({"model_type": "evil-remote-code", "auto_map": auto_map}))
    (model / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}})
    )
    return model, marker


def test_models_with_remote_code_are_refused_by_default(remote_code_model):
    """With the job's defaults, the teacher and the encoder refuse a checkpoint that ships code,
    and none of that code runs."""
    from pipeline.config import EncoderConfig, TeacherConfig
    from pipeline.encoder import TextEncoder
    from pipeline.teacher import TeacherSketcher

    model, marker = remote_code_model
    teacher_cfg = TeacherConfig(model=str(model), max_len=32)
    with pytest.raises(Exception, match="trust_remote_code"):
        TeacherSketcher(teacher_cfg, proj_dim=16, proj_seed=0, lora_seed=0)
    with pytest.raises(Exception, match="trust_remote_code"):
        TextEncoder(str(model), max_len=32, trust_remote_code=EncoderConfig().trust_remote_code)
    assert not marker.exists(), "the checkpoint's code was executed"


def test_no_unpickling_of_artifacts(parsed):
    found = []
    for path, tree in parsed.items():
        for call, name, func in _calls(tree):
            short = name.rsplit(".", 1)[-1]
            if name in (
                "pickle.load",
                "pickle.loads",
                "cloudpickle.load",
                "cloudpickle.loads",
                "joblib.load",
                "dill.load",
                "dill.loads",
                "pd.read_pickle",
                "pandas.read_pickle",
            ):
                found.append(f"{path}:{call.lineno} {name}")
            if name == "torch.load" or short == "load" and name.startswith("torch"):
                kws = {kw.arg: kw.value for kw in call.keywords}
                safe = isinstance(kws.get("weights_only"), ast.Constant) and kws["weights_only"].value is True
                if not safe:
                    found.append(f"{path}:{call.lineno} torch.load without weights_only=True")
                elif path not in TORCH_LOAD_ALLOWED:
                    found.append(f"{path}:{call.lineno} torch.load outside the allowed places ({func})")
            if name in ("np.load", "numpy.load"):
                kws = {kw.arg: kw.value for kw in call.keywords}
                if isinstance(kws.get("allow_pickle"), ast.Constant) and kws["allow_pickle"].value:
                    found.append(f"{path}:{call.lineno} np.load(allow_pickle=True)")
    assert found == []


@pytest.mark.parametrize(
    "uri, secret",
    [
        ("s3://AKIAEXAMPLE:wJalrXUtnFEMI@my-bucket/data/part-0.parquet", "wJalrXUtnFEMI"),
        ("gs://bucket/runs/x?token=ya29.secret-token&x=1", "ya29.secret-token"),
        ("https://user:hunter2@host.example/corpus.jsonl", "hunter2"),
        ("s3://bucket/x?X-Amz-Signature=deadbeef", "deadbeef"),
        ("abfs://container/x?sig=abc123sig", "abc123sig"),
    ],
)
def test_redact(uri, secret):
    red = storage.redact(f"reading {uri} now")
    assert secret not in red and "***" in red
    assert storage.redact_obj({"a": [uri]})["a"][0] == storage.redact(uri)


def test_manifest_and_logs_never_hold_uri_secrets(tmp_path, caplog):
    from pipeline.artifacts import run_stage
    from pipeline.config import load_job

    secret = "Zm9vYmFyc2VjcmV0"
    uri = f"s3://AKIAEXAMPLE:{secret}@bucket/corpus/"
    job = load_job(data={"run_dir": str(tmp_path / "run"), "anchors": {"path": uri}, "corpus": {"path": uri}})

    def runner(ctx):
        logging.getLogger("influcoder").info("reading %s", storage.redact(ctx.job.corpus.path))
        ctx.record(inputs_seen=[uri], note=f"read from {uri}")

    with caplog.at_level(logging.DEBUG):
        manifest = run_stage(job, "sketch", runner=runner)
    text = (tmp_path / "run" / "sketch" / "manifest.json").read_text()
    assert secret not in text and secret not in json.dumps(manifest)
    assert "s3://***@bucket/corpus/" in text
    assert all(secret not in r.getMessage() for r in caplog.records)


DASHBOARD_SCRIPT = """
import sys
import ray
from pipeline.config import RayConfig
from pipeline.ray_runtime import ensure_ray

ensure_ray(RayConfig(num_cpus=1, include_dashboard=True))
print(ray._private.worker.get_dashboard_url(), flush=True)
sys.stdin.read()  # hold Ray up until the test has looked at the sockets
ray.shutdown()
"""


@pytest.mark.slow
def test_dashboard_listens_on_loopback_only():
    """`ray.include_dashboard: true` starts a dashboard that accepts connections on 127.0.0.1 only."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    import psutil

    import proc_util

    tag = proc_util.new_tag()
    tmp = tempfile.mkdtemp(prefix="icdb", dir="/tmp")  # short: Ray's Unix socket paths max 107 chars
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({proc_util.TAG: tag, "RAY_TMPDIR": tmp, "RAY_USAGE_STATS_ENABLED": "0"})
    proc = subprocess.Popen(
        [sys.executable, "-c", DASHBOARD_SCRIPT],
        cwd=REPO,
        env=env,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = proc.stdout.readline().strip()
        assert url, "ensure_ray did not start a dashboard"
        port = int(url.rsplit(":", 1)[1])

        def listeners():
            return [
                c.laddr
                for c in psutil.net_connections("tcp")
                if c.status == psutil.CONN_LISTEN and c.laddr.port == port
            ]

        found = proc_util.wait_for(listeners, 60, interval=0.5, what=f"the dashboard listening on port {port}")
        assert url.startswith("127.0.0.1:") and all(a.ip == "127.0.0.1" for a in found), (url, found)
        proc.stdin.close()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc_util.kill_tagged(tag)
        shutil.rmtree(tmp, ignore_errors=True)


def test_no_credentials_in_repo_configs():
    files = [*sorted((REPO / "jobs").glob("*.yaml")), REPO / "cluster.yaml", REPO / "jobs" / "submit.sh"]
    for p in files:
        text = p.read_text()
        assert storage.redact(text) == text, f"{p} holds credentials in a URI"
        assert not re.search(r"(?i)(aws_secret_access_key|AKIA[0-9A-Z]{16}|BEGIN [A-Z ]*PRIVATE KEY)", text), p
        assert not re.search(r"\b[0-9a-f]{64}\b", text), f"{p} seems to hold a Ray auth token"
