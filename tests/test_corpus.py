"""Corpus reading: formats, ids, column mapping, bad files and bad rows (never dropped silently)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import corpus
from pipeline.config import DatasetConfig
from pipeline.errors import InputDataError


def _read(cfg):
    files = corpus.discover(cfg, "corpus")
    return corpus.read_local(cfg, files)


def test_parquet_dir_with_row_groups_and_derived_ids(tmp_path):
    rows = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(25)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet", row_group_size=10)
    pq.write_table(pa.Table.from_pylist(rows[:3]), tmp_path / "y.parquet")
    cfg = DatasetConfig(path=str(tmp_path), prompt_column="q", response_column="a")
    t = _read(cfg)
    assert t.num_rows == 28
    ids = t.column("id").to_pylist()
    assert ids[:2] == ["x.parquet#0", "x.parquet#1"] and "y.parquet#2" in ids
    assert len(set(ids)) == 28  # duplicate texts (x and y share rows) stay distinct rows
    r = t.slice(12, 1).to_pylist()[0]
    assert r["row"] == 12 and r["prompt"] == "question 12" and r["text"] == "question 12\nanswer 12"


def test_glob_hive_partitions_and_text_column(tmp_path):
    for part in ("a", "b"):
        d = tmp_path / f"lang={part}"
        d.mkdir()
        pq.write_table(pa.table({"body": [f"{part}-1", f"{part}-2"]}), d / "p.parquet")
    cfg = DatasetConfig(path=str(tmp_path / "lang=*" / "*.parquet"), text_column="body", encoder_text_column="lang")
    t = _read(cfg)
    assert t.num_rows == 4
    assert set(t.column("text").to_pylist()) == {"a", "b"}  # hive partition values are columns
    assert set(t.column("prompt").to_pylist()) == {""}


def test_bad_rows_are_rejected_with_reasons(tmp_path):
    lines = [
        json.dumps({"p": "x", "r": "ok", "lab": 1}).encode(),
        b"",
        json.dumps({"p": "x", "r": ""}).encode(),
        b"{broken",
        json.dumps({"p": "x", "r": 7}).encode(),
        b"\xff\xfe",
        json.dumps({"p": "x", "r": "fine", "lab": "yes"}).encode(),
        json.dumps({"p": None, "r": "no prompt"}).encode(),
    ]
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    cfg = DatasetConfig(path=str(tmp_path / "d.jsonl"), prompt_column="p", response_column="r", label_column="lab")
    good, bad = corpus.split_rejects(_read(cfg))
    assert good.column("response").to_pylist() == ["ok", "no prompt"]
    reasons = {r["row"]: r["reason"].split(":")[0] for r in bad.to_pylist()}
    assert reasons == {2: "empty_text", 3: "bad_json", 4: "non_string_value", 5: "invalid_utf8", 6: "bad_label"}
    assert all(r["source"].endswith("d.jsonl") for r in bad.to_pylist())


@pytest.mark.parametrize(
    "mapping, fragment",
    [
        ({"response_column": "missing"}, "column `missing` (corpus.response_column) is missing"),
        ({"response_column": "n"}, "has type int64; expected a string column"),
        ({"response_column": "t", "label_column": "t"}, "expected an integer or boolean column"),
    ],
)
def test_schema_errors_name_file_and_column(tmp_path, mapping, fragment):
    pq.write_table(pa.table({"t": ["a"], "n": [1]}), tmp_path / "f.parquet")
    with pytest.raises(InputDataError) as e:
        corpus.discover(DatasetConfig(path=str(tmp_path), prompt_column=None, **mapping), "corpus")
    assert fragment in str(e.value) and "f.parquet" in str(e.value)


def test_unreadable_and_missing_inputs(tmp_path):
    pq.write_table(pa.table({"t": ["a"] * 100}), tmp_path / "f.parquet")
    data = (tmp_path / "f.parquet").read_bytes()
    (tmp_path / "f.parquet").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(InputDataError, match="cannot read Parquet file .*f.parquet.*truncated"):
        corpus.discover(DatasetConfig(path=str(tmp_path), text_column="t"), "corpus")
    with pytest.raises(InputDataError, match="does not exist"):
        corpus.discover(DatasetConfig(path=str(tmp_path / "nope"), text_column="t"), "corpus")
    with pytest.raises(InputDataError, match="matches no file"):
        corpus.discover(DatasetConfig(path=str(tmp_path / "*.jsonl"), text_column="t"), "corpus")


def test_empty_files_hold_no_rows(tmp_path):
    (tmp_path / "e.jsonl").write_bytes(b"")
    pq.write_table(pa.table({"t": pa.array([], pa.string())}), tmp_path / "e.parquet")
    (tmp_path / "f.jsonl").write_text(json.dumps({"t": "one"}) + "\n")
    t = _read(DatasetConfig(path=str(tmp_path), text_column="t"))
    assert t.column("text").to_pylist() == ["one"]


def test_ray_stream_matches_local_read(tmp_path, ray_local):
    rows = [{"q": f"q{i}", "a": f"a{i}"} for i in range(300)]
    for k in range(3):
        pq.write_table(
            pa.Table.from_pylist(rows[k * 100 : (k + 1) * 100]), tmp_path / f"s{k}.parquet", row_group_size=30
        )
    cfg = DatasetConfig(path=str(tmp_path), prompt_column="q", response_column="a")
    files = corpus.discover(cfg, "corpus")
    streamed = pa.concat_tables(list(corpus.read_dataset(cfg, files).iter_batches(batch_format="pyarrow")))
    local = corpus.read_local(cfg, files)
    assert sorted(streamed.column("id").to_pylist()) == sorted(local.column("id").to_pylist())
    assert streamed.num_rows == 300
