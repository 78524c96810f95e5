"""The filter stage on real Ray, LanceDB and the tiny models: the filtered corpus is exactly the input
rows minus the selected ones (or only them), same columns, schema metadata and file layout; rejected
rows are counted and kept or left out per filter.keep_rejected; a new shard filters only itself; a
Hugging Face `save_to_disk` folder works as the corpus and the output loads back with `datasets` with
the same features.

Sketch and fit run once per session (conftest's `tiny_run`; the pool is its own dataset, so corpus
changes never touch them); each test copies them into its own run_dir and runs encode, score and
filter there."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import tiny_job_data, tiny_run_data
from pipeline import api
from pipeline.errors import ArtifactMismatchError, InputDataError

DOWNSTREAM = ["encode", "score", "filter"]


def _job(run_dir: Path, corpus: dict, tox: Path, teacher: str, encoder: str) -> dict:
    job = tiny_job_data(run_dir, tox, teacher, encoder)
    job["corpus"] = corpus
    job["fit"] = tiny_run_data(run_dir, tox, teacher, encoder)["fit"]  # fit as the shared tiny run's
    job["score"]["select_top_frac"] = 0.25
    return job


def _fixture_rows(tox: Path) -> list[dict]:
    return [json.loads(line) for line in open(tox / "corpus" / "part-00000.jsonl")]


@pytest.fixture(scope="module")
def trained(tiny_run, fixture_corpora, tiny_teacher_dir, tiny_encoder_dir) -> dict:
    """A run_dir with sketch and fit done (conftest's shared `tiny_run`: the same sketch and fit
    settings as `_job`, whose corpus changes never reach them), and the job's other settings."""
    shared, _ = tiny_run
    assert {k: shared[k] for k in ("sketch", "fit")} == {
        k: _job(Path(shared["run_dir"]), {}, fixture_corpora, tiny_teacher_dir, tiny_encoder_dir)[k]
        for k in ("sketch", "fit")
    }
    return {
        "run": Path(shared["run_dir"]),
        "tox": fixture_corpora,
        "teacher": tiny_teacher_dir,
        "encoder": tiny_encoder_dir,
    }


def _new_run(trained: dict, tmp_path: Path, corpus: dict) -> dict:
    run = tmp_path / "run"
    for stage in ("sketch", "fit"):
        shutil.copytree(trained["run"] / stage, run / stage)
    return _job(run, corpus, trained["tox"], trained["teacher"], trained["encoder"])


def _mixed_corpus(root: Path, rows: list[dict]) -> Path:
    """Two Parquet shards in sub-folders (extra columns, custom schema metadata, two row groups in one)
    and a JSONL shard holding one empty-text row and one line that is not JSON."""
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "c").mkdir()
    meta = {b"origin": b"influcoder-test"}
    t0 = pa.Table.from_pylist(rows[:20]).replace_schema_metadata(meta)
    pq.write_table(t0, root / "a" / "part-0.parquet", row_group_size=8)
    pq.write_table(pa.Table.from_pylist(rows[20:38]).replace_schema_metadata(meta), root / "b" / "part-1.parquet")
    with open(root / "c" / "extra.jsonl", "w") as f:
        for r in rows[38:]:
            f.write(json.dumps(r) + "\n")
        f.write(json.dumps({**rows[0], "id": "empty-row", "text": "   ", "response": ""}) + "\n")
        f.write("this line is not json\n")
    return root


def _selected(run: str) -> set[str]:
    return set(pq.read_table(f"{run}/score/selected_ids.parquet").column("id").to_pylist())


@pytest.mark.slow  # a whole stage or job run
def test_filter_drops_exactly_the_selected_rows(trained, tmp_path):
    rows = _fixture_rows(trained["tox"])
    root = _mixed_corpus(tmp_path / "corpus", rows)
    job = _new_run(trained, tmp_path, {"path": str(root), "id_column": "id", "encoder_text_column": "text"})
    out = api.run(job, stages=DOWNSTREAM)
    run = job["run_dir"]
    selected = _selected(run)
    assert 0 < len(selected) < len(rows)
    fdir = Path(out["filter"]["path"]) / "corpus"
    written = sorted(str(p.relative_to(fdir)) for p in fdir.rglob("*.parquet"))
    assert written == ["a/part-0.parquet", "b/part-1.parquet", "c/extra.parquet"]  # one per input, same path
    for rel in ("a/part-0.parquet", "b/part-1.parquet"):
        src, dst = pq.read_table(root / rel), pq.read_table(fdir / rel)
        assert dst.schema.equals(src.schema, check_metadata=True)  # every column, types and metadata
        want = src.filter(pc.invert(pc.is_in(src.column("id"), value_set=pa.array(sorted(selected)))))
        assert dst.equals(want)  # the same rows in the same order, minus the selected ones
    extra = pq.read_table(fdir / "c" / "extra.parquet").to_pylist()
    assert [r["id"] for r in extra] == [r["id"] for r in rows[38:] if r["id"] not in selected]
    assert extra[0] == next(r for r in rows[38:] if r["id"] not in selected)  # every JSON key, same values

    m = out["filter"]["manifest"]
    per = {p["output"]: p for p in m["per_file"]}
    assert per["c/extra.parquet"]["rejected"] == 2 and m["rejects"]["rows"] == 2  # empty text + bad JSON
    assert m["rejects"]["by_reason"] == {"empty_text": 1, "bad_json": 1}
    assert m["selection"]["action"] == "drop" and m["selection"]["matched_rows"] == len(selected)
    assert m["rows"] == {"in": len(rows) + 2, "dropped": len(selected) + 2, "kept": len(rows) - len(selected)}
    for p in m["per_file"]:
        assert p["rows_in"] == p["kept"] + p["dropped"] and p["filtered_this_run"]
        assert p["kept"] == pq.read_metadata(fdir / p["output"]).num_rows

    # select_action keep + keep_rejected: only the selected rows, plus the rejected row that has columns.
    out = api.run(
        job, stages=DOWNSTREAM, overrides=["score.select_action=keep", "filter.keep_rejected=true"], overwrite=True
    )
    assert _selected(run) == selected  # same scores, same selection, other action
    kept_ids = set()
    for p in fdir.rglob("*.parquet"):
        kept_ids |= set(pq.read_table(p).column("id").to_pylist())
    assert kept_ids == selected | {"empty-row"}
    m = out["filter"]["manifest"]
    assert m["selection"]["action"] == "keep" and m["rejects"]["kept"] is True
    assert m["counts"]["unwritable"] == 1  # the non-JSON line has no columns to keep
    assert m["files"]["filtered_this_run"] == 3  # another action: nothing carried over


@pytest.mark.slow  # a whole stage or job run
def test_a_new_shard_filters_only_itself(trained, tmp_path):
    rows = _fixture_rows(trained["tox"])
    root = tmp_path / "corpus"
    root.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:20]), root / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[20:36]), root / "part-1.parquet")
    job = _new_run(trained, tmp_path, {"path": str(root), "id_column": "id", "encoder_text_column": "text"})
    run = job["run_dir"]
    # A threshold (not a top fraction): adding rows leaves the old rows' selection as it was.
    del job["score"]["select_top_frac"]
    api.run(job, stages=["encode", "score"])
    scores = sorted(pq.read_table(f"{run}/score/scores.parquet").column("score").to_pylist())
    i = len(scores) * 3 // 4  # midway between two scores: float noise in a rescore cannot flip a row
    job["score"]["select_threshold"] = (scores[i] + scores[i + 1]) / 2
    first = api.run(job, stages=["score", "filter"], overwrite=True)["filter"]["manifest"]
    assert first["files"] == {"corpus": 2, "filtered_this_run": 2, "carried_over": 0}
    inode = {n: os.stat(f"{run}/filter/corpus/{n}").st_ino for n in ("part-0.parquet", "part-1.parquet")}
    before = {n: pq.read_table(f"{run}/filter/corpus/{n}") for n in inode}

    pq.write_table(pa.Table.from_pylist(rows[36:]), root / "part-2.parquet")
    with pytest.raises(InputDataError, match="changed since the encode stage"):
        api.run(job, stages=["filter"])  # a shard the encoder never saw has no scores: refuse
    out = api.run(job, stages=DOWNSTREAM)  # same config: no --overwrite needed, encode is incremental
    m = out["filter"]["manifest"]
    assert m["files"] == {"corpus": 3, "filtered_this_run": 1, "carried_over": 2}
    assert {p["output"]: p["filtered_this_run"] for p in m["per_file"]} == {
        "part-0.parquet": False,
        "part-1.parquet": False,
        "part-2.parquet": True,
    }
    for n, t in before.items():  # untouched: the very same files, carried over by a hard link
        assert os.stat(f"{run}/filter/corpus/{n}").st_ino == inode[n]
        assert pq.read_table(f"{run}/filter/corpus/{n}").equals(t)
    selected = _selected(run)
    new = pq.read_table(f"{run}/filter/corpus/part-2.parquet").column("id").to_pylist()
    assert new == [r["id"] for r in rows[36:] if r["id"] not in selected]
    assert m["rows"]["kept"] == len(rows) - len(selected)
    # A rerun with nothing new is skipped outright.
    assert api.run(job, stages=DOWNSTREAM)["filter"]["manifest"]["finished_utc"] == m["finished_utc"]
    # A changed filter config is refused without overwrite (as for every stage).
    with pytest.raises(ArtifactMismatchError):
        api.run(job, stages=["filter"], overrides=["filter.compression=snappy"])


@pytest.mark.slow  # a whole stage or job run
def test_hf_dataset_in_and_out(trained, tmp_path):
    import datasets  # a dev extra (pyproject): tests only, the pipeline never imports it

    rows = _fixture_rows(trained["tox"])
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["benign", "toxic"]),
            "source": datasets.Value("string"),
        }
    )
    keep = [{k: r[k] for k in features} for r in rows]
    ds = datasets.Dataset.from_list(keep, features=features)
    saved = tmp_path / "hf_corpus"
    ds.save_to_disk(str(saved), num_shards=2)  # data-0000{0,1}-of-00002.arrow + state.json + dataset_info.json
    job = _new_run(
        trained, tmp_path, {"path": str(saved), "id_column": "id", "text_column": "text", "label_column": "label"}
    )
    out = api.run(job, stages=DOWNSTREAM)
    assert out["encode"]["manifest"]["rows"]["in_table"] == len(rows)  # every row read, no metadata as rows
    fdir = Path(out["filter"]["path"]) / "corpus"
    assert sorted(p.name for p in fdir.rglob("*.parquet")) == [
        "data-00000-of-00002.parquet",
        "data-00001-of-00002.parquet",
    ]
    selected = _selected(job["run_dir"])
    back = datasets.load_dataset(
        "parquet", data_files=str(fdir / "*.parquet"), split="train", cache_dir=str(tmp_path / "hf_cache")
    )
    assert back.features == features  # ClassLabel names survive through the Parquet schema metadata
    assert back["id"] == [r["id"] for r in keep if r["id"] not in selected]
    assert back[0] == next(r for r in keep if r["id"] not in selected)
    assert pq.read_table(fdir).num_rows == len(back)  # the folder reads whole: no manifest or ledger in it
