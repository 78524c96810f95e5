"""Shared fixtures. Everything is offline and CPU-only; nothing is downloaded.

- `ray_local`: one in-process Ray for the whole session (2 CPUs, no dashboard), like CI's machine.
- `fixture_corpora`: the committed toxicity task under tests/fixtures/toxicity (anchors, pool,
  corpus, queries; ~100 real rows, rebuilt by tests/fixtures/make_corpus.py).
- `tiny_teacher_dir` / `tiny_encoder_dir`: random tiny Llama / BERT folders with the real
  tokenizers (tests/tiny_models.py), built once per session.
- `tiny_job`: a whole job on the fixture corpora with the tiny teacher and encoder.
- `tiny_run`: that job (the cascade on) run once through every stage by `influcoder run` in its own
  process, as a user starts it, shared read-only by the tests that inspect a finished run or its
  console (test_e2e.py); a test that changes a run works on a `copy_run` of it (one tiny job per
  session instead of one per test module).
- `shared_data` and `demo_corpora` (`influcoder prepare --data` on all of ../shared/data): only for
  tests of prepare itself and real-model tests, which are marked `slow`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Ray Train's controller polls its workers every 2 s (a missed poll is tolerated for minutes), so a
# sub-second tiny fit waited up to two polls to be seen finished. Every Ray process, in-process or
# started by a test's subprocess, inherits this from the test session's environment.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


def pytest_collection_modifyitems(config, items):
    """GPU tests run where CUDA exists and are skipped (with the reason) elsewhere; in a pytest-xdist
    worker (`make test`) the modules holding `slow` tests are queued first (see `xdist_unit`)."""
    if hasattr(config, "workerinput"):
        _slow_units_first(items)
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


# `make test` runs two pytest-xdist workers. A work unit is a whole module (its module-scoped
# fixtures are built once), and the modules that use one of these costly session fixtures (a whole
# tiny job; a prepare of all of ../shared/data) form one unit, so that the fixture is built once.
# (xdist's own `--dist loadgroup` marks do not group anything under pytest 9: it renames
# `item._nodeid`, which pytest 9 no longer reads.)
SHARED_UNITS = {
    "tiny_run": (
        "test_e2e.py",
        "test_show_api.py",
        "test_cascade.py",
        "test_filter.py",
        "test_reruns.py",
        "test_object_storage.py",
    ),
    "demo_corpora": ("test_neardup_prepare.py", "test_prepare_cli.py"),
}


def xdist_unit(nodeid: str) -> str:
    module = nodeid.split("::")[0]
    return next((unit for unit, files in SHARED_UNITS.items() if Path(module).name in files), module)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: ignored where it is not installed
def pytest_xdist_make_scheduler(config, log):
    """With `--dist loadscope`: units per `xdist_unit`, queued in collection order (`_slow_units_first`)."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_unit(nodeid)

    config.option.loadscopereorder = False  # keep the order `_slow_units_first` chose
    return ModuleUnits(config, log)


def _slow_units_first(items) -> None:
    """Units holding `slow` tests first, so the short ones fill in at the end and neither worker is
    left alone with a long test; and every user of a SHARED_UNITS fixture is listed there."""
    for item in items:
        for unit, files in SHARED_UNITS.items():
            if unit in item.fixturenames and Path(item.nodeid.split("::")[0]).name not in files:
                raise pytest.UsageError(
                    f"{item.nodeid} uses the `{unit}` fixture: add its file to SHARED_UNITS[{unit!r}] in "
                    "tests/conftest.py, so that the fixture is built once under pytest-xdist."
                )
    slow = {xdist_unit(item.nodeid) for item in items if "slow" in item.keywords}
    items.sort(key=lambda item: xdist_unit(item.nodeid) not in slow)  # stable: file order otherwise


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


def tiny_run_data(run_dir, tox: Path, teacher: str, encoder: str) -> dict:
    """The job of `tiny_run`: `tiny_job_data` with one fit epoch on centred teacher sketches
    (fit.center_teacher), the cascade (score.rerank_top), a selection for filter, and every eval method
    (their default list, which includes the cascade) on every corpus row (through the seeded sampler:
    max_rows is set, so the tests know the eval rows)."""
    job = tiny_job_data(run_dir, tox, teacher, encoder)
    job["fit"].update(epochs=1, center_teacher=True)
    job["score"].update(rerank_top=0.25, select_top_frac=0.2)
    corpus_rows = sum(len(f.read_text().splitlines()) for f in (tox / "corpus").iterdir())
    job["eval"] = {"recall_k": [5], "max_rows": corpus_rows}
    return job


TINY_RUN_CONSOLE = "console.json"  # beside the shared run_dir: what `influcoder run` printed


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, fixture_corpora, tiny_teacher_dir, tiny_encoder_dir) -> tuple[dict, dict]:
    """`(job, out)`: the `tiny_run_data` job run once through every stage by `influcoder run JOB` in
    its own process, as a user starts it (its own Ray; proc_util.run_as_a_user), and `out` read back
    as `pipeline.run` returns it: `{stage: {"path", "manifest", "seconds", "skipped"}}`. What the run
    printed and Ray's session logs are in `console.json` beside the run_dir (test_e2e.py reads
    them). Read-only: a test that runs a stage again or writes into the run works on
    `copy_run(job, its tmp_path)`."""
    import yaml

    import proc_util
    from pipeline.artifacts import read_manifest
    from pipeline.config import STAGES, load_job

    base = tmp_path_factory.mktemp("tiny_run")
    job = tiny_run_data(base / "run", fixture_corpora, tiny_teacher_dir, tiny_encoder_dir)
    (base / "job.yaml").write_text(yaml.safe_dump(job))
    result = proc_util.run_as_a_user(base / "job.yaml")
    (base / TINY_RUN_CONSOLE).write_text(json.dumps(result))
    assert result["rc"] == 0, result["stderr"][-6000:]
    loaded = load_job(data=job)
    out = {}
    for stage in STAGES:
        manifest = read_manifest(loaded, stage)
        assert manifest is not None, stage
        out[stage] = {
            "path": f"{job['run_dir']}/{stage}",
            "manifest": manifest,
            "seconds": manifest.get("seconds"),
            "skipped": False,
        }
    return job, out


def copy_run(job: dict, dest: Path) -> dict:
    """A private copy of a finished run_dir, and the job pointed at it: the shared run stays untouched."""
    import shutil

    shutil.copytree(job["run_dir"], dest)
    return {**json.loads(json.dumps(job)), "run_dir": str(dest)}


@pytest.fixture()
def tiny_job(tmp_path, fixture_corpora, tiny_teacher_dir, tiny_encoder_dir) -> dict:
    """A whole job on the fixture corpora: tiny random teacher and encoder, real Ray and LanceDB."""
    return tiny_job_data(tmp_path / "run", fixture_corpora, tiny_teacher_dir, tiny_encoder_dir)
