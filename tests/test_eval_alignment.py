"""Eval's gradient method aligns the teacher's sketches with rows by id, never by file position.

Ray Data batches can span shard blocks, so the rows of a shard file come back in any order; the
stand-in sketcher below writes every shard in reverse order with each row's sketch keyed to its id.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.artifacts import StageRun
from pipeline.config import load_job
from pipeline.schema import ID, PROMPT, RESPONSE, ROW, SKETCH, SOURCE, TEXT

DIM = 8


def _sketch_of(row_id: str) -> np.ndarray:
    v = np.random.default_rng(abs(hash(row_id)) % (1 << 32)).normal(size=DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def _fake_shards(job, plan, pending, shard_dir, **_):
    for name, rows in pending:
        rows = rows[::-1]  # the file order is not the input order
        sk = np.stack([_sketch_of(r[ID]) for r in rows])
        table = pa.table(
            {ID: [r[ID] for r in rows], SKETCH: pa.FixedSizeListArray.from_arrays(pa.array(sk.ravel()), DIM)}
        )
        pq.write_table(table, storage.local_path(storage.join(shard_dir, f"{name}.parquet")))
    return 0, 1.0


def _canonical(prefix: str, n: int) -> pa.Table:
    ids = [f"{prefix}-{i:02d}" for i in range(n)]
    return pa.table({ID: ids, SOURCE: ["f"] * n, ROW: list(range(n)), TEXT: ids, PROMPT: [""] * n, RESPONSE: ids})


def test_teacher_sketches_follow_the_row_ids(tmp_path, monkeypatch):
    from pipeline.stages import eval as eval_stage
    from pipeline.stages import shared_teacher

    monkeypatch.setattr(shared_teacher, "sketch_shards", _fake_shards)
    monkeypatch.setattr(shared_teacher, "plan_actors", lambda *a, **k: None)
    job = load_job(
        data={
            "run_dir": str(tmp_path),
            "corpus": {"path": "x"},
            "anchors": {"path": "x"},
            "sketch": {"proj_dim": DIM, "rows_per_shard": 5},
        }
    )
    ctx = StageRun(
        job=job,
        stage="eval",
        config_hash="h",
        identity="i",
        upstream={},
        out_dir=str(tmp_path / "out"),
        work_dir=str(tmp_path / "work"),
    )
    rows, queries = _canonical("row", 12), _canonical("q", 3)
    q_mat, r_mat, record = eval_stage._gradient_method(ctx, rows, queries, None)
    ms = record["ms_per_sample"]
    for table, mat in ((rows, r_mat), (queries, q_mat)):
        want = np.stack([_sketch_of(i) for i in table.column(ID).to_pylist()])
        np.testing.assert_array_equal(mat, want)
    assert np.isfinite(ms)
