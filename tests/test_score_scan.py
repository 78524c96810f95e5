"""The score pass on workers equals the pass in the driver (issue 11, part 4): a real Lance table of
several fragments, real Ray tasks, ties broken by id, float16 and int8 codes."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.codes import dequantize, quantize
from pipeline.codestore import CodeSpec, CodeStore, code_array, write_code_fragments
from pipeline.ranking import merge_runs
from pipeline.stages.score_scan import fragment_groups, scan_in_process, scan_on_workers

DIM, QUERIES, K = 16, 5, 7


def _table(tmp_path, code_dtype: str, fragments: int = 5, rows: int = 60) -> CodeStore:
    """A codes table of `fragments` committed fragments; every 10th row repeats an earlier code
    under another id, so scores tie and only the id decides their order."""
    rng = np.random.default_rng(0)
    spec = CodeSpec("test-encoder", DIM, code_dtype)
    store = CodeStore(str(tmp_path / "lancedb"), "codes")
    store.prepare(spec)
    emb = rng.standard_normal((fragments * rows, DIM)).astype(np.float32)
    emb[::10] = emb[1::10][: len(emb[::10])]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    q = quantize(emb, code_dtype)
    ids = [f"row-{i:04d}" for i in rng.permutation(len(emb))]
    for f in range(fragments):
        sl = slice(f * rows, (f + 1) * rows)
        n = rows
        t = pa.table(
            {
                "id": ids[sl],
                "code": code_array(q.codes[sl]),
                "source": [f"file-{f}"] * n,
                "row": np.arange(n),
                "encoder_fingerprint": [spec.encoder_fingerprint] * n,
                "code_dtype": [code_dtype] * n,
                "code_scale": q.scales[sl].astype(np.float32),
                "encoded_utc": ["2026-11-28T00:00:00Z"] * n,
            }
        )
        store.commit_fragments(write_code_fragments(store.dataset_uri, t, spec))
    return store


def test_fragment_groups_cover_every_fragment_once_in_order():
    frags = [(0, 100), (1, 30), (2, 30), (3, 200), (4, 10)]
    assert fragment_groups(frags, target_rows=64) == [[0], [1, 2], [3], [4]]
    assert sum(fragment_groups(frags, target_rows=10**9), []) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("code_dtype", ["float16", "int8"])
def test_workers_scan_equals_driver_scan(tmp_path, ray_local, code_dtype):
    store = _table(tmp_path, code_dtype)
    dataset = store.dataset()
    assert len(dataset.get_fragments()) == 5
    queries = np.random.default_rng(1).standard_normal((QUERIES, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    local = scan_in_process(store, dataset, queries, code_dtype, K, 64, str(tmp_path / "driver-runs"))
    # ~2 fragments per task. Batches are the same Lance row groups as in the driver: a row's float32
    # cosine may differ in its last bit with the GEMM's shape, so equal batches make equal scores.
    remote = scan_on_workers(
        store.dataset_uri, dataset, queries, code_dtype, K, 64, str(tmp_path / "worker-runs"), task_rows=120
    )
    assert remote.where == "workers" and remote.tasks == 3 and len(remote.run_paths) == 3
    assert remote.rows == local.rows == 300 and remote.code_bytes == local.code_bytes

    ranked_local = pa.concat_tables(list(merge_runs(local.run_paths)))
    ranked_remote = pa.concat_tables(list(merge_runs(remote.run_paths)))
    assert ranked_remote.equals(ranked_local)  # same scores, same ranks, same order of ties
    scores = ranked_local.column("score").to_numpy()
    assert len(np.unique(scores)) < len(scores)  # the fixture really has ties
    for (ids_l, sc_l), (ids_r, sc_r) in zip(local.topk, remote.topk):
        assert list(ids_r) == list(ids_l) and np.array_equal(sc_r, sc_l)


@pytest.mark.parametrize("code_dtype", ["float16", "int8"])
def test_codes_of_reads_the_wanted_rows_dequantised(tmp_path, code_dtype):
    """Eval reads influcoder's codes by id: exactly the wanted rows the table holds, across fragments and
    batches, de-quantised as the scan de-quantises them; ids the table lacks are left out."""
    store = _table(tmp_path, code_dtype)
    everything = store.dataset().to_table(columns=["id", "code", "code_scale"])
    by_id = {
        i: dequantize(np.asarray(c, dtype=np.int8 if code_dtype == "int8" else np.float16)[None], np.array([s]))[0]
        for i, c, s in zip(*(everything.column(k).to_pylist() for k in ("id", "code", "code_scale")))
    }
    wanted = ["row-0299", "row-0000", "absent", "row-0150", "row-0042"]
    found, codes = store.codes_of(wanted, batch_rows=7)  # batches smaller than a fragment
    assert sorted(found) == sorted(set(wanted) - {"absent"}) and codes.dtype == np.float32
    for i, code in zip(found, codes):
        np.testing.assert_array_equal(code, by_id[i])
        assert abs(np.linalg.norm(code) - 1) < 1e-2  # unit rows (de-quantised int8 too)
    assert store.codes_of([])[1].shape == (0, DIM)


def test_encoded_codes_is_the_recorded_snapshot_of_the_recorded_encoder(tmp_path):
    """What score ranks and eval reads: the table version the encode manifest records (rows committed
    later are not in it), and a clear error when the table holds another encoder's codes."""
    from types import SimpleNamespace

    from pipeline.errors import InputDataError
    from pipeline.stages.shared_encode import encoded_codes

    store = _table(tmp_path, "float16", fragments=2)
    job = SimpleNamespace(lancedb_uri=str(tmp_path / "lancedb"), encode=SimpleNamespace(table="codes"))
    recorded = {"encoder_fingerprint": "test-encoder", "lancedb": {"version": store.version}}
    spec = store.check_spec()
    extra = store.dataset().to_table().slice(0, 5)
    store.commit_fragments(write_code_fragments(store.dataset_uri, extra, spec))  # a later commit
    _, got_spec, snapshot = encoded_codes(job, recorded)
    assert got_spec == spec and snapshot.count_rows() == 120 and store.count_rows() == 125
    with pytest.raises(InputDataError, match="holds codes of encoder test-encoder.*rerun `influcoder encode"):
        encoded_codes(job, {**recorded, "encoder_fingerprint": "another-encoder"})
