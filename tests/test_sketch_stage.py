"""The sketch stage end to end (real Ray Data actors, the tiny random teacher, the fixture corpora):
contract schema, split discipline, fidelity recorded, and on both precisions (float32, bf16) the
same sketches whatever the shards, batches, token budget and actor count, the precision recorded in
the manifest and the precision gate failing the stage (naming rows and the fix) on a miss; plus the
sampler's prefix stability. The four stage runs are built once (`stage_runs`). The teacher's fast
paths themselves are in test_teacher_fast.py, batched-equals-single on the real SmolLM2 in
test_teacher_math.py."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import sampling
from pipeline.artifacts import run_stage
from pipeline.config import load_job
from pipeline.errors import StageError

PRECISIONS = ["float32", "bfloat16"]


def _sketches(run_dir, role):
    t = pq.read_table(f"{run_dir}/sketch/{role}")
    mat = np.asarray(t.column("sketch").combine_chunks().flatten()).reshape(t.num_rows, -1)
    return t, dict(zip(t.column("id").to_pylist(), mat))


# --------------------------------------------------------------------------- both precisions


def _stage_sketches(run_dir: str) -> dict[str, np.ndarray]:
    """Every sketch of a run by `role/id`."""
    out = {}
    for role in ("anchors", "pool"):
        out.update({f"{role}/{i}": v for i, v in _sketches(run_dir, role)[1].items()})
    return out


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory, fixture_corpora, tiny_teacher_dir, ray_local) -> dict[str, tuple[dict, dict]]:
    """The sketch stage in both precisions, plus each with other shards, batches and actors."""
    base = tmp_path_factory.mktemp("fast_sketch")
    tox = fixture_corpora
    runs = {}
    for dtype in PRECISIONS:
        for layout, sketch in {
            "a": {"batch_size": 64, "token_budget": 512, "rows_per_shard": 8, "num_actors": 1},
            "b": {"batch_size": 1, "rows_per_shard": 5, "num_actors": 2},
        }.items():
            data = {
                "run_dir": str(base / f"{dtype}-{layout}"),
                "seed": 0,
                "anchors": {"path": str(tox / "anchors"), "id_column": "id", "encoder_text_column": "text"},
                "pool": {"path": str(tox / "pool"), "id_column": "id", "encoder_text_column": "text"},
                "corpus": {"path": str(tox / "corpus"), "id_column": "id", "encoder_text_column": "text"},
                "teacher": {"model": tiny_teacher_dir, "max_len": 48, "dtype": dtype},
                "sketch": {
                    "proj_dim": 1024,
                    "train_anchors": 6,
                    "train_pool": 8,
                    "eval_anchors": 2,
                    "eval_pool": 4,
                    "fidelity_samples": 4,
                    **sketch,
                },
                "ray": {"num_cpus": 2},
            }
            runs[f"{dtype}-{layout}"] = (data, run_stage(load_job(data=data), "sketch"))
    return runs


@pytest.mark.slow  # a whole stage or job run
@pytest.mark.parametrize("dtype", PRECISIONS)
def test_stage_is_invariant_to_shards_batches_and_workers(stage_runs, dtype: str) -> None:
    a = _stage_sketches(stage_runs[f"{dtype}-a"][0]["run_dir"])
    b = _stage_sketches(stage_runs[f"{dtype}-b"][0]["run_dir"])
    assert a.keys() == b.keys() and len(a) == 20
    cos = [float(a[k] @ b[k]) for k in a]
    assert min(cos) >= 0.9999, min(cos)


@pytest.mark.slow  # a whole stage or job run
@pytest.mark.parametrize("dtype", PRECISIONS)
def test_stage_records_precision_and_passes_the_gate(stage_runs, dtype: str) -> None:
    data, _ = stage_runs[f"{dtype}-a"]
    m = json.loads(open(f"{data['run_dir']}/sketch/manifest.json").read())
    prec = m["precision"]
    assert prec["requested"] == dtype and prec["compute"] == [dtype] and prec["accumulate"] == "float32"
    assert prec["token_budget"] == 512
    gate = prec["gate"]
    assert gate["rows"] == 4 and gate["passed"] and gate["min"] >= 0.999 and len(gate["cosines"]) == 4
    assert m["fidelity"]["precision_gate"] == gate


@pytest.mark.slow  # a whole stage or job run
def test_stage_fails_when_the_gate_misses(stage_runs, tmp_path) -> None:
    """bf16 never reproduces fp32 exactly, so a pass mark of 1.0 must fail, naming rows and the fix."""
    data = json.loads(json.dumps(stage_runs["bfloat16-a"][0]))
    data["run_dir"] = str(tmp_path / "strict")
    data["sketch"]["fidelity_min_cos"] = 1.0
    with pytest.raises(StageError, match=r"precision gate failed.*teacher\.dtype=float32") as err:
        run_stage(load_job(data=data), "sketch")
    assert "bfloat16" in str(err.value) and "fidelity_min_cos=1.0" in str(err.value)


@pytest.mark.slow  # a whole stage or job run
def test_contract_schema_and_splits(stage_runs):
    data, manifest = stage_runs["float32-a"]
    run = data["run_dir"]
    for role, (n_eval, n_train) in {"anchors": (2, 6), "pool": (4, 8)}.items():
        t, by_id = _sketches(run, role)
        assert t.schema.field("id").type == pa.string()
        assert t.schema.field("sketch").type == pa.list_(pa.float32(), 1024)
        splits = t.column("split").to_pylist()
        assert splits.count("eval") == n_eval and splits.count("train") == n_train
        assert len(set(t.column("id").to_pylist())) == t.num_rows
        norms = np.linalg.norm(np.stack(list(by_id.values())), axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    m = json.loads(open(f"{run}/sketch/manifest.json").read())
    assert m["rows"] == {"anchors": {"eval": 2, "train": 6}, "pool": {"eval": 4, "train": 8}}
    assert m["seeds"] == {"seed": 0, "split_seed": 42, "proj_seed": 42, "lora_seed": 0}
    assert m["fidelity"]["samples"] == 4 and 0 <= m["fidelity"]["max_abs_err"] < 0.3
    assert m["rejects"]["rows"] == 0


def test_eval_split_is_prefix_stable_and_order_free():
    rows = [{"id": f"r{i}"} for i in range(200)]
    small = sampling.select(rows, seed=42, n=20)
    big = sampling.select(list(reversed(rows)), seed=42, n=60)
    ev_small, _ = sampling.split_rows(small, 10, 10)
    ev_big, tr_big = sampling.split_rows(big, 10, 50)
    assert [r["id"] for r in ev_small] == [r["id"] for r in ev_big]  # train size does not move eval
    assert not {r["id"] for r in ev_big} & {r["id"] for r in tr_big}
    assert [r["id"] for r in sampling.select(rows, seed=7, n=10)] != [r["id"] for r in ev_small]
    # Adding rows keeps every old row's relative order: a new row enters only with a smaller key.
    more = sampling.select(rows + [{"id": f"new{i}"} for i in range(50)], seed=42, n=20)
    old_in_more = [r["id"] for r in more if not r["id"].startswith("new")]
    assert old_in_more == [r["id"] for r in small][: len(old_in_more)]


@pytest.mark.slow  # a whole stage or job run
def test_gpu_request_on_cpu_cluster_fails_fast(stage_runs, tmp_path):
    from pipeline.errors import ResourceError

    data, _ = stage_runs["float32-a"]
    other = json.loads(json.dumps(data))
    other["run_dir"] = str(tmp_path / "gpu")
    other["sketch"]["use_gpu"] = True
    with pytest.raises(ResourceError, match="no GPU.*sketch.use_gpu=false"):
        run_stage(load_job(data=other), "sketch")
