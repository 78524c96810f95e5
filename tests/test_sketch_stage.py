"""The sketch stage end to end (real Ray Data actors, the tiny random teacher, the fixture corpora):
contract schema, split discipline, equivalence across batch sizes and shard layouts, fidelity
recorded, and the sampler's prefix stability. Batched-equals-single on the real SmolLM2 teacher is
in test_teacher_math.py."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import sampling
from pipeline.artifacts import run_stage
from pipeline.config import load_job


def _sketches(run_dir, role):
    t = pq.read_table(f"{run_dir}/sketch/{role}")
    mat = np.asarray(t.column("sketch").combine_chunks().flatten()).reshape(t.num_rows, -1)
    return t, dict(zip(t.column("id").to_pylist(), mat))


@pytest.fixture(scope="module")
def sketched(tmp_path_factory, fixture_corpora, tiny_teacher_dir, ray_local):
    """One tiny sketch run (module-scoped: the teacher pass is the expensive part)."""
    base = tmp_path_factory.mktemp("sk")
    tox = fixture_corpora
    data = {
        "run_dir": str(base / "a"),
        "seed": 0,
        "anchors": {"path": str(tox / "anchors"), "id_column": "id", "encoder_text_column": "text"},
        "pool": {"path": str(tox / "pool"), "id_column": "id", "encoder_text_column": "text"},
        "corpus": {"path": str(tox / "corpus"), "id_column": "id", "encoder_text_column": "text"},
        "teacher": {"model": tiny_teacher_dir, "max_len": 48},
        "sketch": {
            "batch_size": 4,
            "proj_dim": 512,
            "train_anchors": 6,
            "train_pool": 10,
            "eval_anchors": 3,
            "eval_pool": 5,
            "rows_per_shard": 6,
            "fidelity_samples": 4,
        },
    }
    manifest = run_stage(load_job(data=data), "sketch")
    return data, manifest


@pytest.mark.slow  # a whole stage or job run
def test_contract_schema_and_splits(sketched):
    data, manifest = sketched
    run = data["run_dir"]
    for role, (n_eval, n_train) in {"anchors": (3, 6), "pool": (5, 10)}.items():
        t, by_id = _sketches(run, role)
        assert t.schema.field("id").type == pa.string()
        assert t.schema.field("sketch").type == pa.list_(pa.float32(), 512)
        splits = t.column("split").to_pylist()
        assert splits.count("eval") == n_eval and splits.count("train") == n_train
        assert len(set(t.column("id").to_pylist())) == t.num_rows
        norms = np.linalg.norm(np.stack(list(by_id.values())), axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    m = json.loads(open(f"{run}/sketch/manifest.json").read())
    assert m["rows"] == {"anchors": {"eval": 3, "train": 6}, "pool": {"eval": 5, "train": 10}}
    assert m["seeds"] == {"seed": 0, "split_seed": 42, "proj_seed": 42, "lora_seed": 0}
    assert m["fidelity"]["samples"] == 4 and 0 <= m["fidelity"]["max_abs_err"] < 0.3
    assert m["rejects"]["rows"] == 0


@pytest.mark.slow  # a whole stage or job run
def test_batch_size_and_shard_layout_do_not_change_sketches(sketched, tmp_path):
    data, _ = sketched
    other = json.loads(json.dumps(data))
    other["run_dir"] = str(tmp_path / "b")
    other["sketch"].update({"batch_size": 1, "rows_per_shard": 4})
    run_stage(load_job(data=other), "sketch")
    for role in ("anchors", "pool"):
        _, a = _sketches(data["run_dir"], role)
        _, b = _sketches(other["run_dir"], role)
        assert a.keys() == b.keys()
        cos = [float(a[k] @ b[k]) for k in a]
        assert min(cos) >= 0.9999, (role, min(cos))


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
def test_gpu_request_on_cpu_cluster_fails_fast(sketched, tmp_path):
    from pipeline.errors import ResourceError

    data, _ = sketched
    other = json.loads(json.dumps(data))
    other["run_dir"] = str(tmp_path / "gpu")
    other["sketch"]["use_gpu"] = True
    with pytest.raises(ResourceError, match="no GPU.*sketch.use_gpu=false"):
        run_stage(load_job(data=other), "sketch")
