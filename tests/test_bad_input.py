"""Bad input, generated: corpora mixing good rows with every kind of broken row and file, and job
configs with wrong types, bad values and unknown keys.

The property for data: either a UsageError that names the file (and column) and says how to fix it,
or every row of the files accounted for exactly once: good rows present, bad rows rejected with a
reason (good + rejected == rows in the files; nothing dropped silently).
The property for configs: a ConfigError/UsageError naming the dotted key, never a raw Python
exception, and nothing starts Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipeline import corpus
from pipeline.config import DatasetConfig, describe_fields, load_job
from pipeline.errors import ConfigError, UsageError

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
HUGE = "x" * 200_000  # 200 KB of text: a good row (the teacher truncates it), never a crash

# kind -> (expected reject reason prefix or None for good, which formats can hold it)
ROW_KINDS = {
    "good": (None, "both"),
    "huge": (None, "both"),
    "dup_id": (None, "both"),
    "empty": ("empty_text", "both"),
    "blank": ("empty_text", "both"),
    "null": ("null_value", "both"),
    "null_id": ("null_id", "both"),
    "wrong_type": ("non_string_value", "jsonl"),
    "prompt_wrong_type": ("non_string_value", "jsonl"),
    "missing_key": ("missing_column", "jsonl"),
    "bad_id": ("bad_id", "jsonl"),
    "int_id": (None, "jsonl"),
    "bad_json": ("bad_json", "jsonl"),
    "non_utf8": ("invalid_utf8", "jsonl"),
    "not_object": ("bad_json", "jsonl"),
    "blank_line": ("not_a_row", "jsonl"),
}
FILE_FAULTS = (
    "none",
    "none",
    "none",
    "missing_column",
    "renamed_column",
    "empty_file",
    "truncated",
    "wrong_column_type",
)

rows_st = st.lists(st.sampled_from(sorted(ROW_KINDS)), min_size=0, max_size=12)
file_st = st.tuples(st.sampled_from(["jsonl", "parquet"]), rows_st, st.sampled_from(FILE_FAULTS), st.integers(1, 5))
corpus_st = st.lists(file_st, min_size=1, max_size=4)


def _record(kind: str, uid: str, earlier: list[str]):
    """The JSON object (or raw bytes) for one row of a kind."""
    rec = {"id": uid, "prompt": f"prompt {uid}", "response": f"response {uid}"}
    if kind == "huge":
        rec["response"] = HUGE
    elif kind == "dup_id":
        rec["id"] = earlier[0] if earlier else uid
    elif kind == "empty":
        rec["response"] = ""
    elif kind == "blank":
        rec["response"] = "  \n\t"
    elif kind == "null":
        rec["response"] = None
    elif kind == "null_id":
        rec["id"] = None
    elif kind == "wrong_type":
        rec["response"] = 7
    elif kind == "prompt_wrong_type":
        rec["prompt"] = ["a", "list"]
    elif kind == "missing_key":
        del rec["response"]
    elif kind == "bad_id":
        rec["id"] = 1.5
    elif kind == "int_id":
        rec["id"] = int(uid.split("-")[1]) * 1000 + int(uid.split("-")[2])
    elif kind == "bad_json":
        return b'{"id": "broken", "prompt": '
    elif kind == "non_utf8":
        return b'{"id": "' + uid.encode() + b'", "prompt": "p", "response": "caf\xe9 \xff"}'
    elif kind == "not_object":
        return b"[1, 2, 3]"
    elif kind == "blank_line":
        return b""
    return rec


def _write_corpus(root: Path, spec) -> tuple[list[dict], list[tuple[str, str]]]:
    """Write the files; return the expected rows and the expected file-level errors (file, fault)."""
    expected: list[dict] = []
    errors: list[tuple[str, str]] = []
    good_ids: list[str] = []
    for fi, (fmt, kinds, fault, rg) in enumerate(spec):
        name = f"f{fi:02d}.{fmt}"
        path = root / name
        if fmt == "parquet":
            kinds = [k for k in kinds if ROW_KINDS[k][1] == "both"]
        recs = [(k, _record(k, f"r-{fi}-{i}", good_ids)) for i, k in enumerate(kinds)]
        response_col = "answer" if fault == "renamed_column" else "response"
        if fmt == "jsonl":
            lines = []
            for _, rec in recs:
                if isinstance(rec, dict):
                    if fault == "missing_column":
                        rec = {c: v for c, v in rec.items() if c != "response"}
                    elif fault == "renamed_column" and "response" in rec:
                        rec = {("answer" if c == "response" else c): v for c, v in rec.items()}
                    lines.append(json.dumps(rec).encode())
                else:
                    lines.append(rec)
            path.write_bytes(b"\n".join(lines) + (b"\n" if lines else b"") if fault != "empty_file" else b"")
            if fault == "empty_file":
                continue  # an empty JSONL file holds no rows: not an error
            # The schema check reads the first line that parses as JSON (blank lines and unparseable
            # lines are skipped: they are row-level rejects); it must be an object with the mapped columns.
            first = next(((k, r) for k, r in recs if k not in ("blank_line", "bad_json", "non_utf8")), None)
            if first is not None:
                k, r = first
                if k == "not_object":
                    errors.append((name, "not_objects"))
                    continue
                if fault in ("missing_column", "renamed_column") or k == "missing_key":
                    errors.append((name, "missing_column"))
                    continue
            for row, (k, rec) in enumerate(recs):
                reason = ROW_KINDS[k][0]
                if k == "blank_line":
                    continue
                if (
                    fault in ("missing_column", "renamed_column")
                    and isinstance(rec, dict)
                    and k not in ("null_id", "bad_id", "prompt_wrong_type")
                ):
                    reason = "missing_column"  # the response key is absent: checked after the id and the prompt
                if k == "not_object":
                    reason = "bad_json"
                expected.append(
                    {"file": name, "row": row, "reason": reason, "id": str(rec["id"]) if reason is None else None}
                )
                if reason is None and isinstance(rec, dict):
                    good_ids.append(str(rec["id"]))
        else:
            cols = {
                "id": [r["id"] for _, r in recs],
                "prompt": [r["prompt"] for _, r in recs],
                response_col: [r["response"] for _, r in recs],
            }
            schema = pa.schema(
                [
                    ("id", pa.string()),
                    ("prompt", pa.string()),
                    (response_col, pa.int64() if fault == "wrong_column_type" else pa.string()),
                ]
            )
            if fault == "wrong_column_type":
                cols[response_col] = [len(r["response"] or "") for _, r in recs]
            if fault == "missing_column":
                del cols[response_col]
                schema = schema.remove(schema.get_field_index(response_col))
            pq.write_table(pa.table(cols, schema=schema), path, row_group_size=rg)
            if fault == "truncated":
                data = path.read_bytes()
                path.write_bytes(data[: len(data) // 2])
                errors.append((name, "unreadable"))
                continue
            if fault == "empty_file":
                path.write_bytes(b"")
                errors.append((name, "unreadable"))
                continue
            if fault in ("missing_column", "renamed_column"):
                errors.append((name, "missing_column"))
                continue
            if fault == "wrong_column_type":
                errors.append((name, "wrong_type"))
                continue
            for row, (k, rec) in enumerate(recs):
                reason = ROW_KINDS[k][0]
                expected.append(
                    {"file": name, "row": row, "reason": reason, "id": rec["id"] if reason is None else None}
                )
                if reason is None:
                    good_ids.append(rec["id"])
    return expected, errors


FIX_WORDS = ("Set corpus.", "re-export", "Convert the column", "remove it", "JSON Lines of objects")


@SETTINGS
@given(spec=corpus_st)
def test_generated_corpora_fail_clearly_or_account_for_every_row(spec):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        expected, errors = _write_corpus(root, spec)
        cfg = DatasetConfig(path=str(root), id_column="id")
        try:
            files = corpus.discover(cfg, "corpus")
            table = corpus.read_local(cfg, files)
        except UsageError as e:
            msg = str(e)
            first_bad = sorted(errors)[0] if errors else None
            if first_bad is None:
                # No faulty file: the only legitimate error is "nothing to read".
                assert not expected and "no Parquet" in msg, msg
                return
            name, fault = first_bad
            assert name in msg, msg
            if fault == "missing_column":
                assert "`response` (corpus.response_column) is missing" in msg and "Set corpus.response_column" in msg
            if fault == "wrong_type":
                assert "`response`" in msg and "int64" in msg
            assert any(w in msg for w in FIX_WORDS), msg
            return
        assert not errors, f"expected an error for {errors}"
        good, bad = corpus.split_rejects(table)
        # Conservation: every row is either good or rejected, exactly once.
        assert good.num_rows + bad.num_rows == len(expected)
        got = {}
        for r in good.select(["source", "row", "id"]).to_pylist():
            got[(Path(r["source"]).name, r["row"])] = (None, r["id"])
        for r in bad.to_pylist():
            key = (Path(r["source"]).name, r["row"])
            assert key not in got, f"row {key} is both good and rejected"
            assert r["reason"] and ":" in r["reason"], r
            got[key] = (r["reason"].split(":")[0], None)
        assert len(got) == len(expected)
        for e in expected:
            reason, rid = got[(e["file"], e["row"])]
            assert reason == e["reason"], (e, reason)
            if e["reason"] is None:
                assert rid == e["id"]
        # Huge rows come through whole.
        assert all(len(t) <= len(HUGE) + 100 for t in good.column("response").to_pylist())


def test_duplicate_ids_through_the_sketch_selection(tmp_path, ray_local):
    """The real selection path (`sketch._select`, through Ray Data): later duplicates are rejected
    with reason duplicate_id, bad rows are rejected, and good + rejected == rows read."""
    from pipeline.stages import sketch

    rows = [{"id": f"id{i}", "prompt": "p", "response": f"r{i}"} for i in range(12)]
    rows[5]["id"] = "id1"  # duplicate of an earlier good row
    rows[7]["response"] = ""  # empty
    rows[9]["id"] = None  # null id
    pq.write_table(pa.Table.from_pylist(rows[:6]), tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[6:]) + "{oops\n")
    ds = {"path": str(tmp_path), "id_column": "id"}
    job = load_job(data={"run_dir": str(tmp_path / "run"), "anchors": ds, "corpus": ds})
    files = corpus.discover(job.corpus, "corpus")
    eval_rows, train_rows, rejects, total = sketch._select(job, "pool", job.corpus, files, 2, 7, set())
    assert total == 13
    reasons = sorted(r.split(":")[0] for r in rejects.column("reason").to_pylist())
    assert reasons == ["bad_json", "duplicate_id", "empty_text", "null_id"]
    dup = [r for r in rejects.to_pylist() if r["reason"].startswith("duplicate_id")][0]
    assert dup["id"] == "id1" and dup["row"] == 5 and dup["source"].endswith("a.parquet")
    selected = [r["id"] for r in eval_rows + train_rows]
    assert len(selected) == len(set(selected)) == 9  # 13 rows - 4 rejects, each good id once
    assert len(selected) + rejects.num_rows == total


# --------------------------------------------------------------------------- configs


@pytest.fixture(scope="module")
def base_job(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_config")
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["p", "q"], "response": ["r", "s"]}), d / "c.parquet")
    ds = {"path": str(d), "id_column": "id"}
    return {
        "run_dir": str(d / "run"),
        "anchors": dict(ds),
        "pool": dict(ds),
        "corpus": dict(ds),
        "score": {"queries": dict(ds)},
    }


FIELDS = {key: typ for key, typ, _, _ in describe_fields()}
POSITIVE = [
    "teacher.max_len",
    "teacher.lora_rank",
    "sketch.batch_size",
    "sketch.proj_dim",
    "sketch.rows_per_shard",
    "encoder.max_len",
    "fit.epochs",
    "fit.block_anchors",
    "fit.block_candidates",
    "encode.batch_size",
    "score.top_k",
    "score.batch_rows",
    "fit.lr",
    "fit.tau",
]
NON_NEGATIVE = [
    "sketch.train_anchors",
    "sketch.train_pool",
    "sketch.eval_anchors",
    "sketch.eval_pool",
    "fit.max_failures",
    "fit.weight_decay",
]


def _wrong_values(typ: str):
    bad = [[1, 2], {"a": 1}]
    if "integer" in typ:
        bad += ["12abc", 1.5, True]
    elif "number" in typ:
        bad += ["fast", True]
    elif "true or false" in typ:
        bad += ["yes", 1]
    elif "one of" in typ:
        bad += ["surely-not-allowed", 3]
    elif "a string" in typ:
        bad += [3, True]
    if "or null" not in typ:
        bad.append(None)
    return bad


def _set(data: dict, dotted: str, value) -> dict:
    data = json.loads(json.dumps(data))
    node = data
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return data


def _assert_names_key(exc: Exception, key: str) -> None:
    assert isinstance(exc, ConfigError), type(exc)
    assert f"`{key}`" in str(exc) or f"`{key}" in str(exc), str(exc)


@SETTINGS
@given(data=st.data())
def test_wrong_types_name_the_dotted_key(base_job, data):
    key = data.draw(st.sampled_from(sorted(k for k in FIELDS if not k.startswith("eval.") and FIELDS[k] != "a list")))
    value = data.draw(st.sampled_from(_wrong_values(FIELDS[key])))
    if FIELDS[key].startswith("a number") and isinstance(value, str):
        assume(not value.replace(".", "").isdigit())
    with pytest.raises(UsageError) as e:
        load_job(data=_set(base_job, key, value))
    _assert_names_key(e.value, key)


@SETTINGS
@given(key=st.sampled_from(POSITIVE + NON_NEGATIVE), value=st.integers(-(10**6), 0))
def test_out_of_range_sizes_name_the_dotted_key(base_job, key, value):
    if key in NON_NEGATIVE:
        value = min(value, -1)
    with pytest.raises(UsageError) as e:
        load_job(data=_set(base_job, key, value))
    _assert_names_key(e.value, key)


@SETTINGS
@given(
    section=st.sampled_from(
        ["", "teacher.", "sketch.", "fit.", "encode.", "score.", "corpus.", "ray.", "score.queries."]
    ),
    name=st.from_regex(r"[a-z][a-z_]{2,12}", fullmatch=True),
)
def test_unknown_keys_name_the_dotted_key(base_job, section, name):
    assume(
        section + name not in FIELDS
        and name
        not in {"teacher", "sketch", "fit", "encode", "score", "corpus", "ray", "pool", "anchors", "eval", "queries"}
    )
    with pytest.raises(UsageError) as e:
        load_job(data=_set(base_job, section + name, 1))
    _assert_names_key(e.value, section + name)
    assert "allowed keys here" in str(e.value)


@SETTINGS
@given(
    section=st.sampled_from(["corpus", "anchors", "pool", "score.queries"]),
    tail=st.from_regex(r"[a-z0-9_/]{1,20}", fullmatch=True),
    glob=st.booleans(),
)
def test_nonexistent_paths_fail_in_preflight(base_job, section, tail, glob):
    from pipeline.preflight import preflight

    path = f"/nonexistent-{tail.strip('/') or 'x'}" + ("/*.parquet" if glob else "")
    job = load_job(data=_set(base_job, f"{section}.path", path))
    with pytest.raises(UsageError) as e:
        preflight(job, ["sketch", "encode", "score"])
    assert f"{section}.path" in str(e.value) and "/nonexistent-" in str(e.value)


@SETTINGS
@given(item=st.text(min_size=0, max_size=30))
def test_set_overrides_never_raise_raw_exceptions(base_job, item):
    try:
        load_job(data=base_job, overrides=[item])
    except UsageError:
        pass


def test_bad_configs_from_the_cli_exit_2_without_starting_ray(base_job, tmp_path):
    """A fresh interpreter: config and preflight errors exit with code 2 before Ray is imported."""
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps(_set(base_job, "corpus.path", str(tmp_path / "missing"))))
    code = (
        "import sys\n"
        "from pipeline.cli import main\n"
        f"rcs = [main(['sketch', {str(job)!r}, '--set', 'sketch.batch_size=-1']),\n"
        f"       main(['encode', {str(job)!r}]),\n"
        f"       main(['run', {str(job)!r}, '--set', 'sketch.nope=1']),\n"
        f"       main(['run', {str(tmp_path / 'nope.yaml')!r}])]\n"
        "print(rcs, 'ray' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""}
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[2, 2, 2, 2] False"
    assert "`sketch.batch_size`" in out.stderr and "corpus.path" in out.stderr and "`sketch.nope`" in out.stderr
    assert "Traceback" not in out.stderr
