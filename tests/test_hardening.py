"""Issue 13 (hardening): actor failures name the stage and shard, eval's gradient method refuses an
unbounded corpus, a contract-only sketch artifact fits, eval counts the rows the teacher rejected,
datasets are discovered once per run, and one source of truth per concept (no Ray: fakes stand in
for the actor pool where noted)."""

from __future__ import annotations

import ast
import inspect

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO
from pipeline import corpus
from pipeline.artifacts import StageRun
from pipeline.config import load_job
from pipeline.errors import ConfigError, InputDataError, StageError, UsageError
from pipeline.schema import ID, PROMPT, RESPONSE, ROW, SKETCH, SOURCE, SPLIT, TEXT

DIM = 4


def _job(tmp_path, **sections):
    data = {"run_dir": str(tmp_path / "run"), "corpus": {"path": "x"}, "anchors": {"path": "x"}, **sections}
    return load_job(data=data)


def _write_rows(folder, prefix: str, n: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"{prefix}{i:03d}" for i in range(n)]
    pq.write_table(
        pa.table({"id": ids, "prompt": [f"question {i}" for i in ids], "response": [f"answer {i}" for i in ids]}),
        folder / "part-0.parquet",
    )
    return str(folder)


def _ctx(tmp_path, job) -> StageRun:
    return StageRun(
        job=job,
        stage="eval",
        config_hash="h",
        identity="i",
        upstream={},
        out_dir=str(tmp_path / "out"),
        work_dir=str(tmp_path / "work"),
    )


# --------------------------------------------------------------------------- actor failures


class _Boom:
    dtype_name = "float32"

    def sketch(self, *a, **k):
        raise ValueError("tokenizer exploded")


def test_sketch_actor_failure_names_the_stage_and_the_shard():
    from pipeline.stages.shared_teacher import SHARD, SketchActor, actor_failure

    actor = object.__new__(SketchActor)  # the model load is not what is under test
    actor.sketcher, actor.batch_size, actor.token_budget, actor.proj_dim = _Boom(), 2, None, DIM
    batch = pa.table({SHARD: ["pool-00003"], ID: ["a"], PROMPT: ["p"], RESPONSE: ["r"]})
    with pytest.raises(RuntimeError) as raised:
        actor(batch)
    # Ray hands the driver the actor's error as text inside its own exception.
    wrapped = Exception(f"ray.exceptions.RayTaskError(RuntimeError): Traceback ...\n{raised.value}")
    err = actor_failure("sketch", wrapped, ["pool-00003", "pool-00004"])
    assert isinstance(err, StageError)
    assert str(err).startswith("sketch:") and "pool-00003" in str(err) and "tokenizer exploded" in str(err)
    assert "pool-00004" not in str(err)  # the shard that failed, not every pending one


def test_encode_actor_failure_is_a_stage_error_naming_the_file(tmp_path, monkeypatch):
    from pipeline.ray_runtime import ActorPlan
    from pipeline.stages import shared_encode
    from pipeline.stages.shared_teacher import failure_marker

    monkeypatch.setattr(
        "pipeline.ray_runtime.plan_actors", lambda *a, **k: ActorPlan(1, 1.0, 0.0, 1)
    )  # encode_stream imports it at call time
    monkeypatch.setattr(ActorPlan, "map_batches_kwargs", lambda self: {})

    class FailingDataset:
        def map_batches(self, *a, **k):
            return self

        def iter_batches(self, **k):
            raise Exception(f"RayTaskError: {failure_marker('file', ['data/shard-7.parquet'])} OSError: bad read")
            yield  # a generator, like Ray Data's

    with pytest.raises(StageError, match=r"^score: .*data/shard-7\.parquet.*bad read"):
        list(shared_encode.encode_stream(_job(tmp_path), FailingDataset(), "m", "float16", stage="score"))


# --------------------------------------------------------------------------- eval.max_rows


def test_gradient_eval_refuses_an_unbounded_large_corpus(tmp_path, monkeypatch):
    from pipeline.stages import eval as eval_stage

    monkeypatch.setattr(eval_stage, "GRADIENT_MAX_ROWS", 5)
    path = _write_rows(tmp_path / "corpus", "c", 8)
    job = _job(tmp_path, corpus={"path": path, "id_column": "id"})
    with pytest.raises(ConfigError, match=r"eval\.max_rows") as raised:
        eval_stage._eval_rows(job)  # refused from the Parquet footers, before reading the rows
    assert isinstance(raised.value, UsageError)  # the CLI's exit 2
    # Set explicitly (even above the bound), or without the gradient method, it runs.
    explicit = _job(tmp_path, corpus={"path": path, "id_column": "id"}, eval={"max_rows": 7})
    assert eval_stage._eval_rows(explicit).num_rows == 7
    cheap = _job(tmp_path, corpus={"path": path, "id_column": "id"}, eval={"methods": ["influcoder", "bm25"]})
    assert eval_stage._eval_rows(cheap).num_rows == 8


# --------------------------------------------------------------------------- the sketch contract


def _contract_side(folder, ids: list[str], splits: list[str], rng) -> None:
    from pipeline.schema import sketch_schema

    folder.mkdir(parents=True)
    sk = rng.standard_normal((len(ids), DIM)).astype(np.float32)
    sk /= np.linalg.norm(sk, axis=1, keepdims=True)
    table = pa.table(
        {ID: ids, SPLIT: splits, SKETCH: pa.FixedSizeListArray.from_arrays(pa.array(sk.ravel()), DIM)}
    ).cast(sketch_schema(DIM))
    pq.write_table(table, folder / "part-00000.parquet")


def test_a_contract_only_sketch_artifact_fits(tmp_path):
    """id, split and sketch (all CONTRACT.md names) are enough: fit looks the texts up in the inputs."""
    from pipeline.schema import sketch_artifact_schema, sketch_schema
    from pipeline.stages.fit_data import load_fit_data, texts_from_inputs

    assert sketch_artifact_schema(DIM).names[:3] == sketch_schema(DIM).names  # the stage writes the contract
    rng = np.random.default_rng(0)
    anchors = _write_rows(tmp_path / "anchors", "a", 6)
    pool = _write_rows(tmp_path / "pool", "p", 10)
    sketch_dir = tmp_path / "sketch"
    _contract_side(sketch_dir / "anchors", [f"a{i:03d}" for i in range(6)], ["train"] * 4 + ["eval"] * 2, rng)
    _contract_side(sketch_dir / "pool", [f"p{i:03d}" for i in range(10)], ["train"] * 6 + ["eval"] * 4, rng)
    job = load_job(
        data={
            "run_dir": str(tmp_path / "run"),
            "corpus": {"path": pool, "id_column": "id"},
            "anchors": {"path": anchors, "id_column": "id"},
            "pool": {"path": pool, "id_column": "id"},
        }
    )
    with pytest.raises(InputDataError, match="text"):
        load_fit_data(str(sketch_dir), "", 0.0, 0)  # no inputs to look in: a clear error, not a KeyError
    data = load_fit_data(str(sketch_dir), "", 0.0, 0, texts_from_inputs(job))
    assert data.sizes() == {"train_anchors": 4, "train_pool": 6, "eval_anchors": 2, "eval_pool": 4}
    assert data.train_pool.ids[0] == "p000" and data.train_pool.texts[0] == "question p000\nanswer p000"


# --------------------------------------------------------------------------- teacher rejects in eval


def test_eval_gradient_counts_the_rows_the_teacher_rejected(tmp_path, monkeypatch):
    from pipeline.stages import eval as eval_stage
    from pipeline.stages import shared_teacher

    rejected = {"row-02", "row-05", "q-01"}

    def fake_shards(job, plan, pending, shard_dir, **_):
        for name, rows in pending:
            ok = np.array([r[ID] not in rejected for r in rows])
            sk = np.ones((len(rows), DIM), np.float32) / 2
            arr = pa.FixedSizeListArray.from_arrays(pa.array(sk.ravel()), DIM, mask=pa.array(~ok))
            pq.write_table(pa.table({ID: [r[ID] for r in rows], SKETCH: arr}), f"{shard_dir}/{name}.parquet")
        return 0, 1.0

    monkeypatch.setattr(shared_teacher, "sketch_shards", fake_shards)
    monkeypatch.setattr(shared_teacher, "plan_actors", lambda *a, **k: None)

    def canonical(prefix, n):
        ids = [f"{prefix}-{i:02d}" for i in range(n)]
        return pa.table({ID: ids, SOURCE: ["f"] * n, ROW: list(range(n)), TEXT: ids, PROMPT: ids, RESPONSE: ids})

    job = _job(tmp_path, sketch={"proj_dim": DIM, "rows_per_shard": 4})
    q, r, record = eval_stage._gradient_method(_ctx(tmp_path, job), canonical("row", 9), canonical("q", 3), None)
    assert record["teacher_rejected_rows"] == 2 and record["teacher_rejected_queries"] == 1
    assert (r[[2, 5]] == 0).all() and (r[[0, 1, 3]] != 0).all() and (q[1] == 0).all()


# --------------------------------------------------------------------------- discovery once per run


def test_datasets_are_listed_once_per_run(tmp_path, monkeypatch):
    """preflight, the stage's input fingerprint and the stage run share one listing per dataset."""
    from pipeline import artifacts, preflight, stages
    from pipeline.stages import sketch

    anchors = _write_rows(tmp_path / "anchors", "a", 3)
    pool = _write_rows(tmp_path / "pool", "p", 3)
    job = _job(
        tmp_path,
        anchors={"path": anchors, "id_column": "id"},
        corpus={"path": pool, "id_column": "id"},
        sketch={"eval_anchors": 1, "train_anchors": 2, "eval_pool": 1, "train_pool": 2},
    )
    listed: list[str] = []
    real_list = corpus._list
    monkeypatch.setattr(corpus, "_list", lambda cfg, what: listed.append(cfg.path) or real_list(cfg, what))

    def fake_run(ctx):
        corpus.discover(ctx.job.anchors, "anchors")  # what the real run does first
        corpus.discover(ctx.job.pool_dataset, "corpus")

    monkeypatch.setattr(stages, "stage", lambda name: stages.Stage(fake_run, sketch.input_fingerprint))
    with corpus.discovery_scope():
        preflight.preflight(job, ["sketch"])
        artifacts.run_stage(job, "sketch")
    assert sorted(listed) == sorted([anchors, pool])
    listed.clear()
    artifacts.run_stage(job, "sketch", overwrite=True)  # run_stage alone opens its own scope
    assert len(listed) <= 2
    listed.clear()
    corpus.discover(job.anchors, "anchors")
    corpus.discover(job.anchors, "anchors")
    assert listed == [anchors, anchors]  # outside a scope nothing is cached (files may change)


# --------------------------------------------------------------------------- one source of truth


def test_one_resource_planner_for_actors_and_training_workers(monkeypatch):
    from pipeline import ray_runtime
    from pipeline.errors import ResourceError

    monkeypatch.setattr(ray_runtime, "cluster_cpus_gpus", lambda: (8.0, 0.0))
    monkeypatch.setattr(ray_runtime, "largest_node_cpus", lambda: 8.0)
    fit_plan = ray_runtime.plan_actors(None, None, "fit", training=True)
    assert (fit_plan.num_actors, fit_plan.num_cpus, fit_plan.use_gpu) == (1, 8.0, False)  # no read CPU held back
    assert ray_runtime.plan_actors(None, 2, "fit", training=True).num_cpus == 4.0
    assert ray_runtime.plan_actors(None, None, "sketch").num_cpus <= 7.0  # one CPU left to Ray Data's reads
    with pytest.raises(ResourceError, match=r"fit\.num_workers"):
        ray_runtime.plan_actors(None, 9, "fit", training=True)
    with pytest.raises(ResourceError, match=r"fit\.use_gpu"):
        ray_runtime.plan_actors(True, None, "fit", training=True)


def test_test_hooks_left_the_fit_stage():
    from pipeline.stages import fit, fit_worker

    assert "fail_once" not in inspect.getsource(fit) + inspect.getsource(fit_worker)
    assert list(inspect.signature(fit.run).parameters) == ["ctx"]


def test_every_logger_is_under_influcoder():
    """One hierarchy: `-v`, handlers and levels set on `influcoder` reach every module's messages.
    (Module loggers only: the CLI and the Ray setup also tune third-party loggers by their names.)"""
    offenders = []
    for path in (REPO / "pipeline").rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                if getattr(node.value.func, "attr", None) != "getLogger":
                    continue
                arg = node.value.args[0] if node.value.args else None
                name = arg.value if isinstance(arg, ast.Constant) else None
                if not (isinstance(name, str) and (name == "influcoder" or name.startswith("influcoder."))):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def test_stages_import_no_other_stage_private_names():
    """Stage modules share actors through shared_* modules, never another stage's `_private` helper."""
    stage_names = {"sketch", "fit", "encode", "score", "eval", "filter"}
    found = []
    for path in (REPO / "pipeline" / "stages").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline.stages."):
                other = node.module.rsplit(".", 1)[-1]
                if other in stage_names and other != path.stem:
                    found += [f"{path.name}: {other}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert found == []


def test_one_definition_each():
    """utc_now, spearman and native_bf16 are defined once in the package."""
    defs: dict[str, list[str]] = {}
    for path in (REPO / "pipeline").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.col_offset == 0:
                defs.setdefault(node.name, []).append(path.name)
    for name in (
        "utc_now",
        "spearman",
        "native_bf16",
        "plan_actors",
        "split_by_reason",
        "teacher_sketch_groups",
        "sketch_matrix",
        "split_in_id_order",
    ):
        assert len(defs.get(name, [])) == 1, (name, defs.get(name))
    assert "_spearman" not in defs and "plan_workers" not in defs and "_sketch_shards" not in defs
    assert "_sketch_matrix" not in defs


def test_sketch_matrix_reads_nulls_chunks_and_slices_in_place():
    """The one reader of sketch columns: a null (rejected) row is a zero row and False in the mask,
    chunks and sliced arrays keep their rows in order, and an empty column keeps its width."""
    from pipeline.schema import sketch_matrix, split_in_id_order

    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    typ = pa.list_(pa.float32(), 3)
    chunks = pa.chunked_array(
        [pa.array([rows[0].tolist(), None], typ), pa.array([rows[2].tolist(), rows[3].tolist()], typ)]
    )
    mat, ok = sketch_matrix(chunks)
    assert ok.tolist() == [True, False, True, True]
    assert np.array_equal(mat, np.stack([rows[0], np.zeros(3), rows[2], rows[3]]))
    sliced = pa.array([r.tolist() for r in rows], typ).slice(1, 2)  # an offset into the values buffer
    assert np.array_equal(sketch_matrix(sliced)[0], rows[1:3])
    empty, ok = sketch_matrix(pa.array([], typ))
    assert empty.shape == (0, 3) and ok.shape == (0,)
    assert sketch_matrix(chunks, 3)[0].dtype == np.float32
    table = pa.table({ID: ["b", "a", "c"], SPLIT: ["eval", "eval", "train"], SKETCH: pa.array(rows[:3].tolist(), typ)})
    got = split_in_id_order(table, "eval")
    assert got.column(ID).to_pylist() == ["a", "b"]
    assert np.array_equal(sketch_matrix(got.column(SKETCH))[0], rows[[1, 0]])


def test_the_method_list_is_one_constant():
    from pipeline import report
    from pipeline.config import EVAL_METHODS, EvalConfig

    assert tuple(EvalConfig().methods) == EVAL_METHODS
    assert [m for m in report.METHOD_ORDER if m in EVAL_METHODS] == list(EVAL_METHODS)
    with pytest.raises(UsageError, match="methods"):
        EvalConfig(methods=["influcoder", "nope"])


def test_text_overlap_has_one_definition():
    """fit's train/eval text check and eval's leakage audit treat case and punctuation alike."""
    from pipeline.neardup import normalise
    from pipeline.stages.fit import _eval_texts_seen_in_train
    from pipeline.stages.fit_data import FitData, SplitRows

    def rows(texts):
        return SplitRows([str(i) for i in range(len(texts))], texts, texts, np.zeros((len(texts), 1), np.float32))

    data = FitData(
        rows(["Hello, World"]),
        rows(["x"]),
        rows(["hello world!"]),
        rows(["y", "z"]),
        np.zeros((1, 1)),
        np.zeros((1, 2)),
    )
    assert normalise("Hello, World") == normalise("hello world!")
    assert _eval_texts_seen_in_train(data) == 1
