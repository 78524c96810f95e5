"""A newcomer's mistakes (issue 14): each ends with exit 2 and a message that names the cause (the key,
the column, the file or the flag) and a fix that works, before Ray starts where it can be found then.

Most cases run `pipeline.cli.main([...])` in-process (fast, no Ray); one test replays them in a fresh
interpreter and checks that Ray was never imported. The leak-free default is checked on the exclusion
function and on eval's row reader.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cli import main
from pipeline.config import DatasetConfig, describe_fields, load_job
from pipeline.errors import ConfigError, InputDataError

N_ROWS = 300  # above the default sketch sizes (80 anchors + 192 pool rows besides them)


def _rows(n: int = N_ROWS, label=lambda i: int(i % 5 == 0)) -> list[dict]:
    return [
        {"uid": f"u{i}", "question": f"What is {i} + {i}?", "answer": f"{2 * i}", "is_target": label(i)}
        for i in range(n)
    ]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def own_data(tmp_path) -> dict:
    """The README's own-data setup: a JSONL corpus (uid/question/answer/is_target), used as anchors,
    corpus and queries, with a job file mapping its columns."""
    data = _jsonl(tmp_path / "gsm.jsonl", _rows())
    ds = {"path": str(data), "id_column": "uid", "prompt_column": "question", "response_column": "answer"}
    job = {
        "run_dir": str(tmp_path / "run"),
        "corpus": {**ds, "label_column": "is_target"},
        "anchors": dict(ds),
        "score": {"queries": dict(ds)},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return {"job": str(path), "data": data, "tmp": tmp_path, "cfg": job}


def _run(argv, capsys) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err


# --------------------------------------------------------------------------- 1. model names


@pytest.mark.parametrize(
    "key, value, alias",
    [
        ("teacher.model", "smollm2-135m", "smollm2-135m-instruct"),
        ("encoder.model", "all-minilm-l6", "all-minilm-l6-v2"),
    ],
)
def test_a_mistyped_model_name_is_refused_naming_key_value_and_aliases(own_data, capsys, key, value, alias):
    rc, err = _run(["run", own_data["job"], "--set", f"{key}={value}"], capsys)
    assert rc == 2
    assert f"`{key}`" in err and f"`{value}`" in err and alias in err
    assert f"Did you mean `{alias}`?" in err  # the close match
    assert "Traceback" not in err


def test_the_other_kinds_alias_and_missing_folders_are_refused(own_data, capsys, tmp_path):
    rc, err = _run(["run", own_data["job"], "--set", "teacher.model=all-minilm-l6-v2"], capsys)
    assert rc == 2 and "`teacher.model`" in err and "encoder alias" in err and "smollm2-135m-instruct" in err
    rc, err = _run(["run", own_data["job"], "--set", f"encoder.model={tmp_path}/no-such-model"], capsys)
    assert rc == 2 and "`encoder.model`" in err and "does not exist" in err
    (tmp_path / "empty_model").mkdir()
    rc, err = _run(["run", own_data["job"], "--set", f"teacher.model={tmp_path}/empty_model"], capsys)
    assert rc == 2 and "`teacher.model`" in err and "config.json" in err


def test_a_hub_id_outside_the_local_cache_is_refused_offline(own_data, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, err = _run(["run", own_data["job"], "--set", "teacher.model=no-such-org/no-such-model-xyz"], capsys)
    assert rc == 2 and "no-such-org/no-such-model-xyz" in err and "local Hugging Face cache" in err


# --------------------------------------------------------------------------- 2. too many rejects


def test_too_many_rejects_names_a_real_key_counts_reasons_and_keeps_the_rejects(tmp_path):
    """The score stage's queries are held to encode.max_reject_frac: the message names that key (a real
    one), counts rejects by reason, and the rejects survive the failed stage's deleted output."""
    from pipeline.artifacts import StageRun

    keys = {k for k, *_ in describe_fields()}
    assert "score.max_reject_frac" not in keys and "encode.max_reject_frac" in keys
    job = load_job(data={"run_dir": str(tmp_path / "run"), "corpus": {"path": "c"}, "anchors": {"path": "a"}})
    os.makedirs(job.run_dir)
    out = tmp_path / "run" / ".score.tmp"
    out.mkdir()
    ctx = StageRun(
        job=job,
        stage="score",
        config_hash="h",
        identity="i",
        upstream={},
        out_dir=str(out),
        work_dir=str(tmp_path / "work"),
    )
    reasons = ["empty_text: column `answer` is empty"] * 6 + ["missing_column: the record has no `question` key"] * 3
    rejects = pa.table(
        {
            "source": ["q.jsonl"] * 9,
            "row": list(range(9)),
            "id": [f"q{i}" for i in range(9)],
            "reason": reasons,
        }
    )
    with pytest.raises(InputDataError) as e:
        ctx.write_rejects(rejects, 10, 0.05, "score: queries", limit_key="encode.max_reject_frac")
    msg = str(e.value)
    assert "encode.max_reject_frac" in msg and "score.max_reject_frac" not in msg
    assert "6 empty_text" in msg and "3 missing_column" in msg
    kept = tmp_path / "run" / "score.rejects.parquet"
    assert str(kept) in msg and pq.read_table(kept).num_rows == 9
    assert "--set encode.max_reject_frac=0.9" in msg  # a value that lets these 9 of 10 through
    # Following the advice passes, and the failure's copy goes away.
    ctx.write_rejects(rejects, 10, 0.9, "score: queries", limit_key="encode.max_reject_frac")
    assert not kept.exists()


# --------------------------------------------------------------------------- 3, 4. every mapped column


@pytest.mark.parametrize(
    "key, wrong, right",
    [
        ("corpus.label_column", "is_targt", "is_target"),
        ("corpus.id_column", "uuid", "uid"),
        ("corpus.encoder_text_column", "questoin", "question"),
        ("anchors.id_column", "uuid", "uid"),
    ],
)
def test_a_misspelled_jsonl_column_stops_before_ray(own_data, capsys, key, wrong, right):
    rc, err = _run(["run", own_data["job"], "--set", f"{key}={wrong}"], capsys)
    assert rc == 2
    assert f"`{wrong}`" in err and f"({key})" in err and str(own_data["data"]) in err
    assert f"Did you mean `{right}`?" in err and "'uid'" in err  # the columns that exist


def test_a_misspelled_parquet_label_column_names_the_columns(own_data, capsys):
    corpus = own_data["tmp"] / "corpus.parquet"
    pq.write_table(pa.Table.from_pylist(_rows()), corpus)
    rc, err = _run(
        ["run", own_data["job"], "--set", f"corpus.path={corpus}", "--set", "corpus.label_column=label"], capsys
    )
    assert rc == 2 and "`label` (corpus.label_column)" in err and "corpus.parquet" in err and "is_target" in err


def test_string_labels_in_jsonl_are_refused_with_the_mapping(own_data, capsys):
    data = _jsonl(own_data["tmp"] / "strings.jsonl", _rows(label=lambda i: "yes" if i % 5 == 0 else "no"))
    rc, err = _run(["run", own_data["job"], "--set", f"corpus.path={data}"], capsys)
    assert rc == 2 and "corpus.label_column" in err and "'yes'" in err and "--positive-label" in err


def test_a_json_document_is_not_taken_for_json_lines(own_data, capsys):
    doc = own_data["tmp"] / "array.json"
    doc.write_text(json.dumps(_rows(), indent=2))
    rc, err = _run(["run", own_data["job"], "--set", f"anchors.path={doc}"], capsys)
    assert rc == 2 and "array.json" in err and "not JSON Lines" in err and "jq -c" in err


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_sketch_sizes_above_the_row_count_stop_before_ray(own_data, capsys, fmt):
    small = own_data["tmp"] / f"anchors.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(_rows(50)), small)
    else:
        _jsonl(small, _rows(50))
    rc, err = _run(["run", own_data["job"], "--set", f"anchors.path={small}"], capsys)
    assert rc == 2
    assert "anchors.path" in err and "80 anchor rows" in err and "has 50 rows" in err
    assert "sketch.eval_anchors" in err and "sketch.train_anchors" in err
    # The advice fits: with the suggested sizes, the check passes.
    sets = [w for w in err.split() if w.startswith("sketch.")][-2:]
    from pipeline.preflight import check_split_sizes
    from pipeline.corpus import discover

    job = load_job(own_data["job"], [f"anchors.path={small}", *[s.rstrip(",") for s in sets]])
    check_split_sizes(job, {"anchors": discover(job.anchors, "anchors"), "corpus": discover(job.corpus, "corpus")})


def test_the_pool_counts_only_rows_left_after_the_anchors(own_data, capsys):
    """Anchors and pool read the same file (`pool` unset, anchors = corpus): 250 rows hold 80 anchors but
    not 192 more pool rows."""
    data = _jsonl(own_data["tmp"] / "d250.jsonl", _rows(250))
    rc, err = _run(["run", own_data["job"], "--set", f"anchors.path={data}", "--set", f"corpus.path={data}"], capsys)
    assert rc == 2 and "corpus.path" in err and "192 pool rows" in err and "anchors are taken out" in err


def test_a_record_without_the_id_key_is_a_missing_column_reject(tmp_path):
    from pipeline import corpus

    rows = _rows(3)
    del rows[2]["uid"]
    cfg = DatasetConfig(path=str(_jsonl(tmp_path / "d.jsonl", rows)), id_column="uid", text_column="question")
    table = corpus.read_local(cfg, corpus.discover(cfg, "corpus"))
    _, rejects = corpus.split_rejects(table)
    (reason,) = rejects.column("reason").to_pylist()
    assert reason.startswith("missing_column") and "`uid`" in reason


# --------------------------------------------------------------------------- 7. conflicting columns


def test_text_column_beside_prompt_and_response_is_refused(own_data, capsys):
    with pytest.raises(ConfigError) as e:
        load_job(own_data["job"], ["anchors.text_column=question"])
    msg = str(e.value)
    assert "`anchors.text_column`" in msg and "prompt_column" in msg and "response_column" in msg
    assert "Drop text_column" in msg
    rc, err = _run(["run", own_data["job"], "--set", "anchors.text_column=question"], capsys)
    assert rc == 2 and "anchors.text_column" in err
    DatasetConfig(path="x", text_column="t")  # alone (the defaults beside it) it is fine


# --------------------------------------------------------------------------- 6. prepare


def _prepare(tmp_path, src: Path, *flags: str, capsys) -> tuple[int, str, str]:
    rc = main(["prepare", "--input", str(src), "--out", str(tmp_path / "out"), *flags])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


MAP = ["--id-column", "uid", "--prompt-column", "question", "--response-column", "answer"]


def test_prepare_refuses_an_empty_input(tmp_path, capsys):
    rc, _, err = _prepare(tmp_path, _jsonl(tmp_path / "e.jsonl", []), capsys=capsys)
    assert rc == 2 and "e.jsonl" in err and "no rows" in err
    assert not (tmp_path / "out").exists()


def test_prepare_refuses_when_every_row_is_rejected_and_says_why(tmp_path, capsys):
    rows = [{"uid": f"u{i}", "question": "q", "answer": ""} for i in range(4)]
    rc, _, err = _prepare(tmp_path, _jsonl(tmp_path / "r.jsonl", rows), *MAP, capsys=capsys)
    assert rc == 2 and "4 empty_text" in err and not (tmp_path / "out").exists()


def test_prepare_refuses_all_null_labels(tmp_path, capsys):
    rows = [{**r, "is_target": None} for r in _rows(5)]
    rc, _, err = _prepare(
        tmp_path, _jsonl(tmp_path / "n.jsonl", rows), *MAP, "--label-column", "is_target", capsys=capsys
    )
    assert rc == 2 and "--label-column `is_target`" in err and "null label" in err


def test_prepare_string_labels_need_a_positive_value(tmp_path, capsys):
    src = _jsonl(tmp_path / "s.jsonl", _rows(20, label=lambda i: "yes" if i % 4 == 0 else "no"))
    rc, _, err = _prepare(tmp_path, src, *MAP, "--label-column", "is_target", capsys=capsys)
    assert rc == 2 and "'yes' (5)" in err and "'no' (15)" in err and "--positive-label yes" in err
    rc, out, _ = _prepare(tmp_path, src, *MAP, "--label-column", "is_target", "--positive-label", "yes", capsys=capsys)
    assert rc == 0
    labels = pq.read_table(tmp_path / "out").column("label").to_pylist()
    assert sorted(labels) == [0] * 15 + [1] * 5


def test_prepare_maps_boolean_like_strings(tmp_path, capsys):
    src = _jsonl(tmp_path / "b.jsonl", _rows(6, label=lambda i: ["true", "False", "1", "0", True, 0][i]))
    rc, _, _ = _prepare(tmp_path, src, *MAP, "--label-column", "is_target", capsys=capsys)
    assert rc == 0
    assert pq.read_table(tmp_path / "out").sort_by("id").column("label").to_pylist() == [1, 0, 1, 0, 1, 0]


@pytest.mark.parametrize(
    "flag, wrong, right", [("--label-column", "is_targt", "is_target"), ("--id-column", "uuid", "uid")]
)
def test_prepare_names_its_flags_and_the_columns_that_exist(tmp_path, capsys, flag, wrong, right):
    src = _jsonl(tmp_path / "g.jsonl", _rows(10))
    argv = [a if a != "uid" or flag != "--id-column" else wrong for a in MAP]
    if flag == "--label-column":
        argv += [flag, wrong]
    rc, _, err = _prepare(tmp_path, src, *argv, capsys=capsys)
    assert rc == 2 and flag in err and f"`{wrong}`" in err and f"`{right}`" in err and "'answer'" in err
    assert "input." not in err


def test_prepare_refuses_conflicting_flags(tmp_path, capsys):
    src = _jsonl(tmp_path / "g.jsonl", _rows(10))
    rc, _, err = _prepare(tmp_path, src, "--text-column", "question", "--response-column", "answer", capsys=capsys)
    assert rc == 2 and "--text-column question" in err and "--response-column answer" in err


def test_prepare_reports_its_rejects_and_the_job_keys_that_read_its_output(tmp_path, capsys):
    rows = _rows(12)
    rows[3]["answer"] = ""
    rows[5]["uid"] = rows[4]["uid"]
    del rows[7]["uid"]
    rc, out, _ = _prepare(
        tmp_path, _jsonl(tmp_path / "g.jsonl", rows), *MAP, "--label-column", "is_target", capsys=capsys
    )
    assert rc == 0
    rejects = tmp_path / "out" / "_rejects.parquet"
    assert "3 rows rejected" in out and str(rejects) in out and pq.read_table(rejects).num_rows == 3
    for reason in ("empty_text", "duplicate_id", "missing_column"):
        assert f"'{reason}': 1" in out
    # The printed snippet is valid job YAML that reads the output with its labels.
    snippet = yaml.safe_load(out[out.index("corpus:") :])["corpus"]
    assert snippet["label_column"] == "label"
    from pipeline import corpus

    cfg = DatasetConfig(**snippet)
    table = corpus.read_local(cfg, corpus.discover(cfg, "corpus"))
    good, bad = corpus.split_rejects(table)
    assert good.num_rows == 9 and bad.num_rows == 0 and sum(good.column("label").to_pylist()) == 2


# --------------------------------------------------------------------------- before Ray


def test_every_case_exits_2_in_a_fresh_interpreter_without_importing_ray(own_data, tmp_path):
    doc = tmp_path / "doc.json"
    doc.write_text(json.dumps(_rows(), indent=2))
    job = own_data["job"]
    cases = [
        ["run", job, "--set", "teacher.model=smollm2-135m"],
        ["run", job, "--set", "corpus.label_column=is_targt"],
        ["run", job, "--set", "corpus.id_column=uuid"],
        ["run", job, "--set", "anchors.text_column=question"],
        ["run", job, "--set", f"anchors.path={doc}"],
        ["prepare", "--input", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")],
    ]
    (tmp_path / "none.jsonl").write_text("")
    code = (
        "import sys\nfrom pipeline.cli import main\n"
        f"rcs = [main(a) for a in {cases!r}]\n"
        "print(rcs, 'ray' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RAY_ADDRESS": "", "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == f"{[2] * len(cases)} False"
    assert "Traceback" not in out.stderr


# --------------------------------------------------------------------------- 8. leak-free default


def test_same_location_normalises_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = DatasetConfig(path="data/x")
    assert a.same_location(DatasetConfig(path="./data/x/"))
    assert a.same_location(DatasetConfig(path=f"file://{tmp_path}/data/x"))
    assert a.same_location(DatasetConfig(path=str(tmp_path / "data" / "y" / ".." / "x")))
    assert not a.same_location(DatasetConfig(path="data/y"))
    assert DatasetConfig(path="s3://b/x/").same_location(DatasetConfig(path="s3://b//x"))


def test_distillation_rows_of_the_default_pool_are_excluded(tmp_path, monkeypatch):
    from pipeline.stages.eval import distillation_exclusion

    monkeypatch.chdir(tmp_path)
    sketch_ids = {"anchors": {"a1", "a2"}, "pool": {"c1", "c2", "c3"}}
    base = {"run_dir": "run", "corpus": {"path": "data/corpus"}, "anchors": {"path": "data/anchors"}}
    # No pool: the pool is the corpus, spelled differently or not.
    job = load_job(data=base)
    assert distillation_exclusion(job, sketch_ids) == {"pool": {"c1", "c2", "c3"}}
    job = load_job(data={**base, "pool": {"path": "./data/corpus/"}})
    assert distillation_exclusion(job, sketch_ids) == {"pool": {"c1", "c2", "c3"}}
    # Anchors drawn from the corpus are distillation rows too.
    job = load_job(data={**base, "anchors": {"path": "data/corpus"}})
    assert distillation_exclusion(job, sketch_ids) == {"anchors": {"a1", "a2"}, "pool": {"c1", "c2", "c3"}}
    # A pool of its own: nothing is excluded (ids of other files may coincide by name, not by row).
    job = load_job(data={**base, "pool": {"path": "data/pool"}})
    assert distillation_exclusion(job, sketch_ids) == {}


def test_eval_rows_leave_out_the_excluded_ids_before_sampling(tmp_path, ray_local):
    """eval's reader: excluded ids never reach the metrics, are counted, and a `max_rows` sample keeps
    its size (drawn after the exclusion)."""
    from pipeline.stages.eval import _eval_rows

    rows = [{"id": f"r{i:02d}", "prompt": "", "response": f"row {i}", "label": i % 2} for i in range(30)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    ds = {"path": str(tmp_path / "c.parquet"), "id_column": "id", "label_column": "label"}
    exclude = {f"r{i:02d}" for i in range(0, 30, 3)}
    job = load_job(data={"run_dir": str(tmp_path / "run"), "corpus": ds, "anchors": ds, "eval": {"methods": ["bm25"]}})
    excluded: list[str] = []
    table = _eval_rows(job, exclude, excluded)
    assert set(table.column("id").to_pylist()) == {r["id"] for r in rows} - exclude
    assert sorted(excluded) == sorted(exclude)
    job = load_job(
        data={
            "run_dir": str(tmp_path / "run"),
            "corpus": ds,
            "anchors": ds,
            "eval": {"methods": ["bm25"], "max_rows": 15},
        }
    )
    table = _eval_rows(job, exclude, [])
    assert table.num_rows == 15 and not set(table.column("id").to_pylist()) & exclude
