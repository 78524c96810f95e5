"""Encode + score stages end to end: local Ray, real LanceDB in tmp dirs, the tiny random encoder
(tests/tiny_models.py; the stages' logic does not depend on what the encoder learned).

The fit stage is not run: its output (the exported encoder folder) is produced by a stand-in
runner through `artifacts.run_stage`, so manifests and identities are the real ones. The corpus is
generated (seeded word salad in GSM8K's question/answer columns): any number of distinct rows.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import artifacts
from pipeline.codes import dequantize
from pipeline.codestore import CODE_SCALE, CodeStore, Ledger, codes_from_arrow
from pipeline.config import load_job

REPO = Path(__file__).resolve().parents[1]
MAX_LEN = 64


WORDS = (
    "apple river stone cloud number vote season paper garden signal winter market theory clip friend "
    "April May sold half many altogether train station minute hour price dollar school teacher book "
    "page chapter runner mile lake boat fish bird tree forest road bridge city village"
).split()


def qa_rows(split: str, start: int, n: int) -> list[dict]:
    """Rows `start..start+n` of a generated question/answer dataset; row i is the same in every call."""
    out = []
    for i in range(start, start + n):
        rng = np.random.default_rng([0 if split == "train" else 1, i])
        words = rng.choice(WORDS, size=int(rng.integers(8, 40)))
        cut = int(rng.integers(3, len(words) - 2))
        out.append(
            {
                "question": f"{split} {i}: " + " ".join(words[:cut]) + "?",
                "answer": " ".join(words[cut:]) + f". The answer is {int(rng.integers(0, 1000))}.",
            }
        )
    return out


def write_shard(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def make_job(tmp: Path, encoder_dir: str, shards: int, rows_per_shard: int, **encode) -> dict:
    corpus = tmp / "corpus"
    rows = qa_rows("train", 0, shards * rows_per_shard)
    rows[3]["answer"] = ""  # one bad row: rejected with a reason, never encoded
    for i in range(shards):
        write_shard(corpus / f"part-{i:05d}.parquet", rows[i * rows_per_shard : (i + 1) * rows_per_shard])
    queries = [{**r, "qid": f"q{i}"} for i, r in enumerate(qa_rows("test", 0, 4))]
    write_shard(tmp / "queries" / "q.parquet", queries)
    mapping = {"prompt_column": "question", "response_column": "answer"}
    return {
        "run_dir": str(tmp / "run"),
        "corpus": {"path": str(corpus), **mapping},
        "anchors": {"path": str(tmp / "queries"), **mapping},
        "encoder": {"model": encoder_dir, "max_len": MAX_LEN},
        "encode": {"batch_size": 32, "index": "none", **encode},
        "score": {"queries": {"path": str(tmp / "queries"), "id_column": "qid", **mapping}, "top_k": 5},
        "ray": {"num_cpus": 2, "include_dashboard": False},  # no fit here: its State API is not needed
    }


def fake_upstream(job) -> None:
    """sketch: an empty stage; fit: the job's (untrained) encoder exported as the 'fitted' one."""
    from pipeline.encoder import TextEncoder
    from pipeline.models import resolve_encoder

    artifacts.run_stage(job, "sketch", runner=lambda ctx: None)
    artifacts.run_stage(
        job,
        "fit",
        runner=lambda ctx: TextEncoder(resolve_encoder(job.encoder.model), MAX_LEN).save(
            os.path.join(ctx.out_dir, "encoder")
        ),
    )


def encoder_dim(job) -> int:
    return json.loads((Path(job.encoder.model) / "config.json").read_text())["hidden_size"]


def table_rows(job) -> pa.Table:
    store = CodeStore(job.lancedb_uri, job.encode.table)
    return store.table.to_arrow()


def numpy_scores(job, table: pa.Table) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Reference: embed the queries directly and score the LanceDB codes with plain numpy."""
    from pipeline.encoder import TextEncoder

    q = pq.read_table(Path(job.score.queries.path) / "q.parquet").to_pylist()
    q.sort(key=lambda r: r["qid"])
    enc = TextEncoder(os.path.join(job.run_dir, "fit", "encoder"), MAX_LEN)
    qemb = enc.embed([job.encoder.anchor_prefix + f"{r['question']}\n{r['answer']}" for r in q])
    dtype = table.column("code_dtype")[0].as_py()
    codes = dequantize(codes_from_arrow(table.column("code"), dtype), table.column(CODE_SCALE).to_numpy())
    return codes @ qemb.T, [r["qid"] for r in q], np.array(table.column("id").to_pylist())


@pytest.mark.slow  # a whole stage or job run
@pytest.mark.timeout(400)
def test_encode_incremental_then_score(tmp_path, tiny_encoder_dir, ray_local):
    data = make_job(tmp_path, tiny_encoder_dir, shards=3, rows_per_shard=60, index="ivf_hnsw_sq")
    job = load_job(data=data)
    fake_upstream(job)
    dim = encoder_dim(job)

    # 1. First encode: every good row once, the bad row rejected with its reason.
    m1 = artifacts.run_stage(job, "encode")
    assert m1["rows"] == {"encoded": 179, "in_table": 179, "rejected": 1}
    rej = pq.read_table(Path(job.run_dir) / "encode" / "rejects.parquet").to_pylist()
    assert rej[0]["id"] == "part-00000.parquet#3" and rej[0]["reason"].startswith("empty_text")
    assert m1["lancedb"]["table"] == "codes" and m1["lancedb"]["distinct_ids"] == 179
    assert m1["code_dtype"] == "float16" and m1["bytes_per_row"] == 2 * dim
    assert m1["index"]["type"] == "ivf_hnsw_sq" and m1["index"]["recall"]["recall_refined"] >= 0.9
    t = table_rows(job)
    assert t.schema.field("code").type == pa.list_(pa.float16(), dim)
    assert t.num_rows == len(set(t.column("id").to_pylist())) == 179

    # 2. Reruns add nothing: skipped by identity; and with the stage output gone (a forced rerun),
    #    the ledger knows every file is in the table already.
    assert artifacts.run_stage(job, "encode")["finished_utc"] == m1["finished_utc"]
    shutil.rmtree(Path(job.run_dir) / "encode")
    m2 = artifacts.run_stage(job, "encode")
    assert m2["rows"]["encoded"] == 0 and m2["rows"]["in_table"] == 179

    # 3. A new shard: the stage reruns without --overwrite and encodes exactly its rows.
    write_shard(Path(data["corpus"]["path"]) / "part-00003.parquet", qa_rows("train", 500, 25))
    m3 = artifacts.run_stage(job, "encode")
    assert m3["rows"] == {"encoded": 25, "in_table": 204, "rejected": 1}
    assert m3["files"]["encoded_this_run"] == 1
    t = table_rows(job)
    assert t.num_rows == len(set(t.column("id").to_pylist())) == 204

    # 4. Exact scores from LanceDB == numpy on the same codes; ranks; top-k == brute force.
    ms = artifacts.run_stage(job, "score")
    assert ms["rows"]["scored"] == 204 and ms["rows"]["queries"] == 4 and ms["topk"]["method"] == "exact"
    ref, qids, ids = numpy_scores(job, t)
    scores = pq.read_table(Path(job.run_dir) / "score" / "scores.parquet")
    assert scores.column("rank").to_pylist() == list(range(1, 205))
    by_id = {i: k for k, i in enumerate(ids)}
    rows = [by_id[i] for i in scores.column("id").to_pylist()]
    np.testing.assert_allclose(scores.column("score").to_numpy(), ref[rows].mean(1), atol=1e-4)
    np.testing.assert_allclose(scores.column("score_max").to_numpy(), ref[rows].max(1), atol=1e-4)
    assert (np.diff(scores.column("score").to_numpy()) <= 0).all()
    topk = pq.read_table(Path(job.run_dir) / "score" / "topk.parquet").to_pylist()
    for j, q in enumerate(qids):
        got = [r for r in topk if r["query_id"] == q]
        assert [r["rank"] for r in got] == [1, 2, 3, 4, 5]
        want = np.sort(ref[:, j])[::-1][:5]
        np.testing.assert_allclose([r["score"] for r in got], want, atol=1e-4)
        np.testing.assert_allclose([ref[by_id[r["id"]], j] for r in got], want, atol=1e-4)

    # 4b. The same pass in Ray tasks that spill their runs under the work dir: the same files.
    #     (score.scan is execution-only: the same identity, so the finished stage is removed first.)
    shutil.rmtree(Path(job.run_dir) / "score")
    mw = artifacts.run_stage(load_job(data=data, overrides=["score.scan=workers"]), "score")
    assert ms["scan"]["where"] == "driver" and mw["scan"]["where"] == "workers" and mw["scan"]["tasks"] >= 1
    assert pq.read_table(Path(job.run_dir) / "score" / "scores.parquet").equals(scores)
    assert pq.read_table(Path(job.run_dir) / "score" / "topk.parquet").to_pylist() == topk

    # 5. ANN top-k through the index agrees with exact; curation selection of the top 10%.
    ms2 = artifacts.run_stage(
        load_job(data=data, overrides=["score.ann=true", "score.select_top_frac=0.1"]), "score", overwrite=True
    )
    assert ms2["topk"]["method"] == "ann" and ms2["selection"]["rows"] == 21
    ann = pq.read_table(Path(job.run_dir) / "score" / "topk.parquet").to_pylist()
    overlap = np.mean(
        [
            len({r["id"] for r in ann if r["query_id"] == q} & {r["id"] for r in topk if r["query_id"] == q}) / 5
            for q in qids
        ]
    )
    assert overlap >= 0.8
    sel = pq.read_table(Path(job.run_dir) / "score" / "selected_ids.parquet")
    assert sel.column("id").to_pylist() == scores.column("id").to_pylist()[:21]
    assert set(sel.column("action").to_pylist()) == {"drop"}

    # 6. Other codes (int8) never mix with the float16 ones: the table is replaced by a new version.
    job8 = load_job(data=data, overrides=["encode.code_dtype=int8"])
    m8 = artifacts.run_stage(job8, "encode", overwrite=True)
    assert m8["lancedb"]["opened"]["action"] == "replaced"
    assert m8["rows"] == {"encoded": 204, "in_table": 204, "rejected": 1}
    assert m8["bytes_per_row"] == dim + 4 and m8["index"]["type"] is None  # int8 codes + a float32 scale
    assert m8["code_fidelity"]["spearman_min"] >= 0.99
    t8 = table_rows(job8)
    assert t8.schema.field("code").type == pa.list_(pa.int8(), dim) and t8.num_rows == 204
    ms8 = artifacts.run_stage(job8, "score", overwrite=True)
    ref8, _, ids8 = numpy_scores(job8, t8)
    s8 = pq.read_table(Path(job.run_dir) / "score" / "scores.parquet")
    rows8 = [list(ids8).index(i) for i in s8.column("id").to_pylist()]
    np.testing.assert_allclose(s8.column("score").to_numpy(), ref8[rows8].mean(1), atol=1e-4)
    assert ms8["lancedb"]["code_dtype"] == "int8"


@pytest.mark.slow  # a whole stage run
def test_blended_export_encodes_and_scores(tmp_path, tiny_encoder_dir, ray_local):
    """A blended fit export (fit.blend): codes twice the width, scored like its own embeddings."""
    from tiny_models import build_blended_encoder

    job = load_job(data=make_job(tmp_path, tiny_encoder_dir, shards=1, rows_per_shard=40))
    artifacts.run_stage(job, "sketch", runner=lambda ctx: None)
    artifacts.run_stage(
        job,
        "fit",
        runner=lambda ctx: build_blended_encoder(Path(ctx.out_dir) / "encoder", tiny_encoder_dir, 0.4),
    )
    dim = 2 * encoder_dim(job)
    m = artifacts.run_stage(job, "encode")
    assert m["rows"]["in_table"] == 39 and m["bytes_per_row"] == 2 * dim
    t = table_rows(job)
    assert t.schema.field("code").type == pa.list_(pa.float16(), dim)
    artifacts.run_stage(job, "score")
    ref, _, ids = numpy_scores(job, t)  # the queries embedded by the blended encoder, in numpy
    scores = pq.read_table(Path(job.run_dir) / "score" / "scores.parquet")
    by_id = {i: k for k, i in enumerate(ids)}
    rows = [by_id[i] for i in scores.column("id").to_pylist()]
    np.testing.assert_allclose(scores.column("score").to_numpy(), ref[rows].mean(1), atol=1e-3)


KILL_SCRIPT = """
import json, sys, time
from pipeline import artifacts
from pipeline.codestore import CodeStore
from pipeline.config import load_job
from pipeline.stages import encode

encode.WAVE_BYTES = 1      # one file per wave: one commit per file
_commit = CodeStore.commit_fragments
def slow_commit(self, fragments):  # a slow committer, so the test can kill the stage mid-way
    out = _commit(self, fragments)
    time.sleep(1.0)
    return out
CodeStore.commit_fragments = slow_commit
artifacts.run_stage(load_job(data=json.loads(sys.argv[1])), "encode")
"""


def _count(job) -> int:
    try:
        store = CodeStore(job.lancedb_uri, job.encode.table)
        return store.count_rows()
    except Exception:  # noqa: BLE001 - the table may not exist yet, or be mid-commit
        return 0


@pytest.mark.slow  # starts its own Ray in a subprocess
@pytest.mark.timeout(480)
def test_encode_resumes_after_kill(tmp_path, tiny_encoder_dir, ray_local):
    data = make_job(tmp_path, tiny_encoder_dir, shards=3, rows_per_shard=40)
    job = load_job(data=data)
    fake_upstream(job)
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    log_path = tmp_path / "encode_subprocess.log"  # kept for the failure message: a dead subprocess says why
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", KILL_SCRIPT, json.dumps(data)],
            cwd=str(REPO),
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        # A guard against a hang, not a speed check: the loop ends at the first committed rows. The
        # subprocess starts its own Ray and actor, which `make test`'s second xdist worker slows down.
        deadline = time.time() + 300
        while _count(job) == 0 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, (
            f"the encode subprocess ended (rc {proc.returncode}) before the test could kill it; its output ends:\n"
            + log_path.read_text(errors="replace")[-3000:]
        )
        assert _count(job) > 0
    finally:
        # SIGKILL the subprocess's whole session (its driver and the Ray it started): a hard crash.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    partial = _count(job)
    assert 0 < partial < 119
    assert not (Path(job.run_dir) / "encode" / "manifest.json").exists()
    done_before = set(
        Ledger(job.lancedb_uri, job.encode.table)
        .load({"spec": CodeStore(job.lancedb_uri, "codes").stored_spec().to_json()})
        .files
    )

    m = artifacts.run_stage(job, "encode")  # same identity: resumes
    assert m["rows"]["in_table"] == 119 and m["lancedb"]["distinct_ids"] == 119
    assert m["files"]["encoded_this_run"] == 3 - len(done_before)
    ids = table_rows(job).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 119


def test_waves_bound_bytes_and_rows():
    """Crash-recovery units: whole files, within the byte and the row budget (JSONL: bytes only)."""
    from pipeline.corpus import FileInfo
    from pipeline.stages.encode import waves

    def f(name, size, rows):
        return FileInfo(name, name, "parquet" if rows is not None else "jsonl", size, 0.0, rows, 1, ())

    files = [f("a", 10, 60), f("b", 10, 60), f("c", 10, None), f("d", 50, 10), f("e", 10, 500), f("g", 5, 1)]
    got = [[x.path for x in w] for w in waves(files, max_bytes=60, max_rows=100)]
    # a+b would be 120 rows; c has no row count; d would pass 60 bytes; e alone exceeds the rows.
    assert got == [["a"], ["b", "c"], ["d"], ["e"], ["g"]]
    assert sum(got, []) == [x.path for x in files]  # every file once, in order
