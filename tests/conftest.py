"""Shared fixtures. Everything is offline and CPU-only; nothing is downloaded.

- `ray_local`: one in-process Ray for the whole session (2 CPUs, no dashboard), like CI's machine.
- `fixture_corpora`: the committed toxicity task under tests/fixtures/toxicity (anchors, pool,
  corpus, queries; ~100 real rows, rebuilt by tests/fixtures/make_corpus.py).
- `tiny_teacher_dir` / `tiny_encoder_dir`: random tiny Llama / BERT folders with the real
  tokenizers (tests/tiny_models.py), built once per session.
- `tiny_job`: a whole job on the fixture corpora with the tiny teacher and encoder.
- `shared_data` and `demo_corpora` (`influcoder prepare --data` on all of ../shared/data): only for
  tests of prepare itself and real-model tests, which are marked `slow`.
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
FIXTURES = REPO / "tests" / "fixtures"


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
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={
                "env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
            },
        )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    # The session's Ray stays up until the interpreter exits; stopping it here would break
    # later fixtures in other modules that expect it.


@pytest.fixture(scope="session")
def fixture_corpora() -> Path:
    return FIXTURES / "toxicity"


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, request) -> str:
    from tiny_models import build_tiny_teacher

    try:
        cache = request.config.cache.mkdir("smollm2-tokenizer")  # survives sessions: see teacher_tokenizer
    except AttributeError:  # the cache plugin is off (-p no:cacheprovider)
        cache = None
    return str(build_tiny_teacher(tmp_path_factory.mktemp("tiny_teacher"), tokenizer_cache=cache))


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> str:
    from tiny_models import build_tiny_encoder

    return str(build_tiny_encoder(tmp_path_factory.mktemp("tiny_encoder")))


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
        pq.write_table(
            pa.Table.from_pylist(rows[i : i + rows_per_file]), out / f"part-{i // rows_per_file:05d}.parquet"
        )
    return out


def tiny_job_data(run_dir, tox: Path, teacher: str, encoder: str) -> dict:
    """A whole job on the fixture corpora (`tox`) with the tiny teacher and encoder: the one definition
    that module-scoped fixtures (which cannot take `tiny_job`) adapt with their own changes."""
    return {
        "run_dir": str(run_dir),
        "seed": 0,
        "anchors": {"path": str(tox / "anchors"), "id_column": "id", "encoder_text_column": "text"},
        "pool": {"path": str(tox / "pool"), "id_column": "id", "encoder_text_column": "text"},
        "corpus": {
            "path": str(tox / "corpus"),
            "id_column": "id",
            "encoder_text_column": "text",
            "label_column": "label",
        },
        "teacher": {"model": teacher, "max_len": 48},
        "sketch": {
            "batch_size": 4,
            "proj_dim": 1024,
            "train_anchors": 8,
            "train_pool": 16,
            "eval_anchors": 4,
            "eval_pool": 8,
            "rows_per_shard": 8,
            "fidelity_samples": 4,
        },
        "encoder": {"model": encoder, "max_len": 64},
        # Blocks well inside the train split (fit holds part of the train pool out for validation).
        "fit": {"epochs": 2, "block_anchors": 4, "block_candidates": 8},
        "score": {
            "queries": {"path": str(tox / "queries"), "id_column": "id", "encoder_text_column": "text"},
            "top_k": 5,
        },
        "ray": {"num_cpus": 2},
    }


@pytest.fixture()
def tiny_job(tmp_path, fixture_corpora, tiny_teacher_dir, tiny_encoder_dir) -> dict:
    """A whole job on the fixture corpora: tiny random teacher and encoder, real Ray and LanceDB."""
    return tiny_job_data(tmp_path / "run", fixture_corpora, tiny_teacher_dir, tiny_encoder_dir)
