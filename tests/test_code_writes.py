"""The encode stage's write path: workers write Lance fragments, the driver commits one Append per
wave (issue 11, part 3). Local Ray, a real LanceDB table, the tiny random encoder."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import artifacts
from pipeline.codestore import CodeStore
from pipeline.config import load_job
from pipeline.errors import InputDataError
from tests.test_encode_score import fake_upstream, make_job, table_rows


def _data_files(job) -> int:
    return len(list((Path(job.lancedb_uri) / f"{job.encode.table}.lance" / "data").glob("*.lance")))


@pytest.mark.slow  # whole stage runs
@pytest.mark.timeout(400)
def test_crash_between_fragment_write_and_commit_leaves_no_rows(tmp_path, tiny_encoder_dir, ray_local, monkeypatch):
    data = make_job(tmp_path, tiny_encoder_dir, shards=3, rows_per_shard=20)
    job = load_job(data=data)
    fake_upstream(job)

    def crash(self, fragments):
        assert fragments, "the workers wrote no fragment before the commit"
        raise RuntimeError("driver died before the commit")

    monkeypatch.setattr(CodeStore, "commit_fragments", crash)
    with pytest.raises(Exception, match="driver died before the commit"):
        artifacts.run_stage(job, "encode")
    written = _data_files(job)
    assert written > 0  # the workers' files are there...
    assert CodeStore(job.lancedb_uri, job.encode.table).count_rows() == 0  # ...and belong to no version
    monkeypatch.undo()

    m = artifacts.run_stage(job, "encode")
    assert m["rows"] == {"encoded": 59, "in_table": 59, "rejected": 1}
    ids = table_rows(job).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 59
    # Big fragments, not one per encoder batch (32 rows): one per wave here (the whole corpus).
    assert len(CodeStore(job.lancedb_uri, job.encode.table).dataset().get_fragments()) == 1


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_an_id_in_two_files_fails_naming_both(tmp_path, tiny_encoder_dir, ray_local):
    data = make_job(tmp_path, tiny_encoder_dir, shards=2, rows_per_shard=10)
    corpus = Path(data["corpus"]["path"])
    # An explicit id column; one row of part 1 reuses an id of part 0.
    for i, f in enumerate(sorted(corpus.glob("*.parquet"))):
        t = pq.read_table(f)
        ids = [f"r{i}-{j}" for j in range(t.num_rows)]
        if i == 1:
            ids[4] = "r0-2"
        pq.write_table(t.append_column("uid", [ids]), f)
    data["corpus"]["id_column"] = "uid"
    job = load_job(data=data)
    fake_upstream(job)
    with pytest.raises(InputDataError) as raised:
        artifacts.run_stage(job, "encode")
    text = str(raised.value)
    assert "'r0-2'" in text and "part-00000.parquet" in text and "part-00001.parquet" in text
