"""The teacher re-rank cascade (score.rerank_top) and the score stage's fidelity gate.

- pipeline/cascade.py (pure numpy): checked against brute-force Python sorts on seeded random data.
- The score stage end to end on a tiny GSM8K corpus (`slow`): local Ray, real LanceDB, the tiny
  random teacher and encoder built from configs (the stage's logic is under test, not the models),
  checked against the teacher run directly. The fit stage is a stand-in that exports the tiny encoder
  and writes a fit/metrics.json, so manifests and identities are the real ones.
- eval's cascade block on synthetic scores, and the whole job with the cascade on the fixture
  corpora with the tiny models (`tiny_job`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import copy_run
from pipeline import artifacts, cascade
from pipeline.config import load_job
from pipeline.errors import ConfigError

MAX_LEN = 64


# --------------------------------------------------------------------------- pure maths


def _brute_cascade(ids, enc, teach, k, by="teacher"):
    """Reference: sort with Python keys; re-rank the first k by (teacher desc, id) or by the RRF of
    (block position, teacher rank) with Python fractions (exact, so no float ties are invented); NaN last."""
    from fractions import Fraction

    order = sorted(range(len(ids)), key=lambda i: (-enc[i], ids[i]))
    block, rest = order[:k], order[k:]
    scored = [i for i in block if not math.isnan(teach[i])]
    by_teacher = sorted(scored, key=lambda i: (-teach[i], ids[i]))
    if by == "fused":
        teacher_rank = {i: r for r, i in enumerate(by_teacher, start=1)}
        block_rank = {i: r for r, i in enumerate(block, start=1)}
        rrf = {i: Fraction(1, 60 + block_rank[i]) + Fraction(1, 60 + teacher_rank[i]) for i in scored}
        by_teacher = sorted(scored, key=lambda i: (-rrf[i], ids[i]))
    unscored = [i for i in block if math.isnan(teach[i])]
    return by_teacher + unscored + rest


def _random_case(seed, n=40, ties=True):
    rng = np.random.default_rng(seed)
    ids = np.array([f"r{i:03d}" for i in rng.permutation(n)])
    # Rounded scores make ties common, so the id tie-break is exercised.
    enc = np.round(rng.normal(size=n), 1 if ties else 6)
    teach = np.round(rng.normal(size=n), 1 if ties else 6)
    return ids, enc, teach


@pytest.mark.parametrize("by", cascade.RERANK_BY)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 7, 40])
def test_cascade_order_matches_a_brute_force_sort(seed, k, by):
    ids, enc, teach = _random_case(seed)
    teach[np.random.default_rng(seed + 10).choice(len(ids), 3, replace=False)] = np.nan  # teacher rejects
    got = cascade.cascade_order(ids, enc, teach, k, by)
    assert got.tolist() == _brute_cascade(ids.tolist(), enc.tolist(), teach.tolist(), k, by)


def test_fused_rerank_by_hand():
    """Block a, b, c, d in encoder order; the teacher ranks b, c, d, a. RRF (constant 60):
    a 1/61 + 1/64 = .032018, b 1/62 + 1/61 = .032522, c 1/63 + 1/62 = .032002, d 1/64 + 1/63 = .031498.
    The teacher alone would put a last; fused, a stays second: both rankers' evidence counts."""
    ids = np.array(["a", "b", "c", "d"])
    teach = np.array([0.1, 0.4, 0.3, 0.2])
    assert ids[cascade.rerank(ids, teach, "fused")].tolist() == ["b", "a", "c", "d"]
    assert ids[cascade.rerank(ids, teach, "teacher")].tolist() == ["b", "c", "d", "a"]
    # Mirror-image ranks tie exactly (1/61 + 1/62 both ways): ties break by id, as everywhere.
    two = np.array(["y", "x"])
    assert two[cascade.rerank(two, np.array([0.1, 0.9]), "fused")].tolist() == ["x", "y"]
    # A rejected row (NaN) keeps its place after the scored rows and does not count in their ranks.
    teach = np.array([np.nan, 0.4, 0.3, 0.2])
    assert ids[cascade.rerank(ids, teach, "fused")].tolist() == ["b", "c", "d", "a"]
    with pytest.raises(ValueError, match="rerank_by"):
        cascade.rerank(ids, teach, "mean")


def test_block_follows_the_teacher_and_rows_past_k_keep_the_encoder_order():
    ids, enc, teach = _random_case(3, ties=False)
    k = 10
    order = cascade.cascade_order(ids, enc, teach, k, "teacher")
    enc_order = np.lexsort((ids, -enc))
    assert set(order[:k]) == set(enc_order[:k])  # the block is the encoder's top k
    assert (np.diff(teach[order[:k]]) <= 0).all()  # ... ordered by the teacher
    assert order[k:].tolist() == enc_order[k:].tolist()  # the rest: encoder order, untouched


def test_ties_in_the_teacher_score_break_by_id():
    ids = np.array(["c", "a", "d", "b"])
    perm = cascade.rerank(ids, np.array([0.5, 0.5, 0.9, 0.5]), "teacher")
    assert ids[perm].tolist() == ["d", "a", "b", "c"]
    # NaN (teacher rejected) rows go last, in the order given (the encoder's), not by id.
    perm = cascade.rerank(ids, np.array([np.nan, 0.1, np.nan, 0.2]), "teacher")
    assert ids[perm].tolist() == ["b", "a", "c", "d"]


@pytest.mark.parametrize(
    "top, n, want",
    [
        (0.2, 10, 2),
        (0.25, 10, 3),
        (0.001, 10, 1),
        (0.5, 1, 1),
        (3, 10, 3),
        (3.0, 10, 3),
        (50, 10, 10),
        (1, 10, 1),
        (0.2, 0, 0),
    ],
)
def test_resolve_k_fraction_or_count(top, n, want):
    assert cascade.resolve_k(top, n) == want


def test_resolve_k_refuses_a_fractional_count():
    with pytest.raises(ValueError, match="whole number"):
        cascade.resolve_k(2.5, 10)


def test_scores_from_order_rank_exactly_like_the_order():
    ids, enc, teach = _random_case(4)
    order = cascade.cascade_order(ids, enc, teach, 12, "fused")
    s = cascade.scores_from_order(order)
    assert len(set(s.tolist())) == len(s)  # no ties: metrics see exactly this order
    assert np.argsort(-s, kind="stable").tolist() == order.tolist()


@pytest.mark.parametrize("by", cascade.RERANK_BY)
def test_per_query_cascade_reranks_each_querys_own_top_k(by):
    rng = np.random.default_rng(5)
    ids = np.array([f"r{i:02d}" for i in range(30)])
    enc, teach = rng.normal(size=(4, 30)), rng.normal(size=(4, 30))
    s = cascade.per_query_cascade_scores(ids, enc, teach, 6, by)
    for q in range(4):
        assert np.argsort(-s[q], kind="stable").tolist() == _brute_cascade(
            ids.tolist(), enc[q].tolist(), teach[q].tolist(), 6, by
        )
    need = cascade.rows_needing_teacher(ids, enc.mean(0), enc, 6)
    want = set(np.argsort(-enc.mean(0))[:6].tolist()) | {j for q in range(4) for j in np.argsort(-enc[q])[:6]}
    assert need.tolist() == sorted(want)


def test_teacher_scores_skip_rejected_queries_and_mark_rejected_rows():
    rng = np.random.default_rng(6)
    unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)  # noqa: E731
    rows, qs = unit(rng.normal(size=(5, 8))), unit(rng.normal(size=(3, 8)))
    rv, qv = np.array([1, 1, 0, 1, 1], bool), np.array([1, 0, 1], bool)
    cos, mean = cascade.teacher_scores(rows, rv, qs, qv)
    want = (qs[[0, 2]] @ rows.T).mean(0)
    assert np.isnan(mean[2]) and np.isnan(cos[1]).all() and np.isnan(cos[:, 2]).all()
    np.testing.assert_allclose(mean[rv], want[rv])
    with pytest.raises(ValueError, match="every query"):
        cascade.teacher_scores(rows, rv, qs, np.zeros(3, bool))


def _minimal_job(tmp_path, **score):
    return {
        "run_dir": str(tmp_path / "run"),
        "corpus": {"path": str(tmp_path)},
        "anchors": {"path": str(tmp_path)},
        "score": score,
    }


@pytest.mark.parametrize("bad", [0, -1, 1.5, 0.0])
def test_config_refuses_bad_rerank_top(tmp_path, bad):
    with pytest.raises(ConfigError, match="score.rerank_top"):
        load_job(data=_minimal_job(tmp_path, rerank_top=bad))


def test_config_rerank_by_names_the_cascade_orders(tmp_path):
    """score.rerank_by accepts exactly cascade.RERANK_BY, defaults to its first (fused), and names the
    key in the error for anything else."""
    import typing

    from pipeline.config import ScoreConfig

    assert typing.get_args(typing.get_type_hints(ScoreConfig)["rerank_by"]) == cascade.RERANK_BY
    assert load_job(data=_minimal_job(tmp_path, rerank_top=0.2)).score.rerank_by == cascade.RERANK_BY[0] == "fused"
    assert load_job(data=_minimal_job(tmp_path, rerank_top=0.2, rerank_by="teacher")).score.rerank_by == "teacher"
    with pytest.raises(ConfigError, match="score.rerank_by"):
        load_job(data=_minimal_job(tmp_path, rerank_top=0.2, rerank_by="mean"))


def test_config_accepts_a_fraction_or_a_count_and_cascade_needs_influcoder(tmp_path):
    assert load_job(data=_minimal_job(tmp_path, rerank_top=0.2)).score.rerank_top == 0.2
    assert load_job(data=_minimal_job(tmp_path, rerank_top=50)).score.rerank_top == 50
    with pytest.raises(ConfigError, match="eval.methods"):
        load_job(data={**_minimal_job(tmp_path), "eval": {"methods": ["gradient", "cascade"]}})


# --------------------------------------------------------------------------- fidelity gate


@pytest.mark.parametrize(
    "metrics, passed, exported",
    [
        (
            {
                "untrained": {"spearman_aggregated": 0.3},
                "exported": {"spearman_aggregated": 0.5, "spearman_per_anchor": 0.1},
                "selected_epoch": 1,
                "epochs": [{"epoch": 1, "spearman_aggregated": 0.1}],
            },
            True,
            0.5,
        ),
        ({"untrained": {"spearman_aggregated": 0.3}, "exported": {"spearman_aggregated": 0.3}}, False, 0.3),  # strict
        # Older artifacts: no `exported`, the selected epoch's entry counts.
        (
            {
                "untrained": {"spearman_aggregated": 0.3},
                "selected_epoch": 2,
                "epochs": [{"epoch": 1, "spearman_aggregated": 0.9}, {"epoch": 2, "spearman_aggregated": 0.2}],
            },
            False,
            0.2,
        ),
        (
            {
                "untrained": {"spearman_aggregated": 0.3},
                "selected_epoch": 1,
                "epochs": [{"epoch": 1, "spearman_aggregated": 0.4}],
            },
            True,
            0.4,
        ),
    ],
)
def test_fidelity_gate_reads_fit_metrics(tmp_path, metrics, passed, exported):
    from pipeline.stages.score import fidelity_gate

    p = tmp_path / "metrics.json"
    p.write_text(json.dumps(metrics))
    gate = fidelity_gate(str(p))
    assert gate["passed"] is passed and gate["exported"] == exported and gate["untrained"] == 0.3


def test_fidelity_gate_without_figures_is_not_a_verdict(tmp_path):
    from pipeline.stages.score import fidelity_gate

    assert fidelity_gate(str(tmp_path / "missing.json"))["passed"] is None
    p = tmp_path / "metrics.json"
    p.write_text(
        json.dumps({"untrained": {"spearman_aggregated": float("nan")}, "exported": {"spearman_aggregated": 0.2}})
    )
    assert fidelity_gate(str(p))["passed"] is None


# --------------------------------------------------------------------------- the score stage


def _gsm8k(shared_data: Path, split: str, n: int) -> list[dict]:
    with open(shared_data / "gsm8k" / f"{split}.jsonl") as f:
        return [json.loads(line) for line in f.readlines()[:n]]


def _cascade_job(tmp: Path, shared_data: Path, n_rows: int, n_queries: int, teacher: str, encoder: str) -> dict:
    corpus = tmp / "corpus"
    corpus.mkdir(parents=True)
    rows = [{**r, "rid": f"row{i:03d}"} for i, r in enumerate(_gsm8k(shared_data, "train", n_rows))]
    half = n_rows // 2
    pq.write_table(pa.Table.from_pylist(rows[:half]), corpus / "part-00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[half:]), corpus / "part-00001.parquet")
    (tmp / "queries").mkdir()
    queries = [{**r, "qid": f"q{i}"} for i, r in enumerate(_gsm8k(shared_data, "test", n_queries))]
    pq.write_table(pa.Table.from_pylist(queries), tmp / "queries" / "q.parquet")
    mapping = {"prompt_column": "question", "response_column": "answer"}
    return {
        "run_dir": str(tmp / "run"),
        "corpus": {"path": str(corpus), "id_column": "rid", **mapping},
        "anchors": {"path": str(tmp / "queries"), **mapping},
        "teacher": {"model": teacher, "max_len": 48},
        "sketch": {"batch_size": 4, "proj_dim": 1024, "rows_per_shard": 4},
        "encoder": {"model": encoder, "max_len": MAX_LEN},
        "encode": {"batch_size": 32, "index": "none"},
        "score": {"queries": {"path": str(tmp / "queries"), "id_column": "qid", **mapping}, "top_k": 3},
        "ray": {"num_cpus": 2},
    }


def _fake_upstream(job, fit_metrics: dict, center=None) -> None:
    """sketch: an empty stage; fit: the job's starting encoder exported as the 'fitted' one + metrics.json
    (+ the teacher's center, as fit.center_teacher writes it, when given)."""
    from pipeline.encoder import TextEncoder
    from pipeline.stages.shared_teacher import write_teacher_center

    def fit(ctx):
        TextEncoder(job.encoder.model, MAX_LEN).save(os.path.join(ctx.out_dir, "encoder"))
        Path(ctx.out_dir, "metrics.json").write_text(json.dumps(fit_metrics))
        write_teacher_center(ctx.out_dir, center, rows=1)

    artifacts.run_stage(job, "sketch", runner=lambda ctx: None)
    artifacts.run_stage(job, "fit", runner=fit)


def _teacher(job):
    from pipeline.teacher import TeacherSketcher

    return TeacherSketcher(
        job.teacher,
        proj_dim=job.sketch.proj_dim,
        proj_seed=job.sketch.proj_seed,
        lora_seed=job.lora_seed,
        device="cpu",
        torch_threads=2,
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("centered", [False, True], ids=["raw", "fit.center_teacher"])
def test_score_cascade_reranks_the_top_rows_by_the_teacher(
    tmp_path, shared_data, tiny_teacher_dir, tiny_encoder_dir, ray_local, centered
):
    from pipeline.distill import center_sketches

    n, k = 24, 6
    data = _cascade_job(
        tmp_path, shared_data, n_rows=n, n_queries=3, teacher=tiny_teacher_dir, encoder=tiny_encoder_dir
    )
    data["score"].update(rerank_top=k, select_top_frac=0.125)  # selects ceil(3) rows: inside the block
    # Both ways of re-ordering the block, one per variant (each is a whole stage run).
    by = "fused" if centered else "teacher"
    if not centered:
        data["score"]["rerank_by"] = "teacher"
    job = load_job(data=data)
    assert job.score.rerank_by == by  # fused is the default
    # A center like fit's (a mean of unit sketches: shorter than 1), here a seeded random one.
    center = np.random.default_rng(0).normal(size=job.sketch.proj_dim).astype(np.float32) if centered else None
    if centered:
        center *= 0.4 / np.linalg.norm(center)
    _fake_upstream(
        job,
        {
            "untrained": {"spearman_aggregated": 0.30, "spearman_per_anchor": 0.2},
            "exported": {"spearman_aggregated": 0.10, "spearman_per_anchor": 0.1},
        },
        center,
    )
    artifacts.run_stage(job, "encode")
    m = artifacts.run_stage(job, "score")

    assert m["fidelity_gate"] == {"passed": False, "exported": 0.10, "untrained": 0.30, "source": "exported"}
    c = m["cascade"]
    assert c["k"] == k and c["rows"] == k and c["of_rows"] == n and c["teacher_s"] > 0
    assert c["teacher_centered"] is centered and c["rerank_by"] == by
    assert c["shards"] == {"total": 1 + math.ceil(k / 4), "resumed": 0}  # 3 queries + 6 rows, 4 per shard

    t = pq.read_table(Path(job.run_dir) / "score" / "scores.parquet").to_pylist()
    assert [r["rank"] for r in t] == list(range(1, n + 1))
    block, rest = t[:k], t[k:]
    assert all(r["reranked"] for r in block) and not any(r["reranked"] for r in rest)
    assert all(r["teacher_score"] is None for r in rest)
    # The block is the encoder's top k (by its mean score, ties by id) ...
    enc_order = sorted(t, key=lambda r: (-r["score"], r["id"]))
    assert {r["id"] for r in block} == {r["id"] for r in enc_order[:k]}
    # ... rows past k keep the encoder order ...
    assert [r["id"] for r in rest] == [r["id"] for r in enc_order[k:]]
    # ... and the block is re-ordered with the teacher's scores (by them alone, or fused with the
    # encoder's ranks), ties by id.
    ids = [r["id"] for r in enc_order]
    want = _brute_cascade(
        ids, [-i for i in range(n)], [r["teacher_score"] for r in enc_order[:k]] + [0.0] * (n - k), k, by
    )
    assert [r["id"] for r in block] == [ids[i] for i in want[:k]]
    assert c["rows_moved"] == sum(a["id"] != b["id"] for a, b in zip(block, enc_order[:k]))

    # The teacher scores equal an independent computation: TeacherSketcher on the raw rows.
    corpus = {
        r["rid"]: r for f in sorted((tmp_path / "corpus").glob("*.parquet")) for r in pq.read_table(f).to_pylist()
    }
    queries = pq.read_table(tmp_path / "queries" / "q.parquet").to_pylist()
    teacher = _teacher(job)
    rs = teacher.sketch([corpus[r["id"]]["question"] for r in block], [corpus[r["id"]]["answer"] for r in block], 4)
    qs = teacher.sketch([q["question"] for q in queries], [q["answer"] for q in queries], 4)
    assert not rs.rejects and not qs.rejects
    r_mat = center_sketches(rs.sketches / np.linalg.norm(rs.sketches, axis=1, keepdims=True), center)
    q_mat = center_sketches(qs.sketches / np.linalg.norm(qs.sketches, axis=1, keepdims=True), center)
    want = (q_mat @ r_mat.T).mean(axis=0)
    np.testing.assert_allclose([r["teacher_score"] for r in block], want, atol=2e-4)

    # The curation selection follows the cascade's ranks.
    sel = pq.read_table(Path(job.run_dir) / "score" / "selected_ids.parquet").to_pylist()
    assert [r["id"] for r in sel] == [r["id"] for r in t[:3]] and [r["rank"] for r in sel] == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cascade_teacher_shards_resume(tmp_path, shared_data, tiny_teacher_dir, tiny_encoder_dir, ray_local):
    """A shard file with the expected ids is reused as is (a crash does not redo it); one with other
    ids (another shard size, another block) is recomputed."""
    from pipeline.schema import ID, SKETCH
    from pipeline.stages.shared_teacher import teacher_sketch_groups

    data = _cascade_job(
        tmp_path, shared_data, n_rows=6, n_queries=1, teacher=tiny_teacher_dir, encoder=tiny_encoder_dir
    )
    job = load_job(data=data)
    recs = [
        {
            "id": f"row{i}",
            "source": "gsm8k",
            "row": i,
            "text": r["question"],
            "prompt": r["question"],
            "response": r["answer"],
        }
        for i, r in enumerate(_gsm8k(shared_data, "train", 6))
    ]
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    d = job.sketch.proj_dim

    def shard(ids, fill):
        flat = pa.array(np.full(len(ids) * d, fill, np.float32))
        return pa.table({ID: ids, SKETCH: pa.FixedSizeListArray.from_arrays(flat, d)})

    # rows-00000 "finished" earlier (a marker sketch), rows-00001 left over from another block.
    assert job.sketch.rows_per_shard == 4
    pq.write_table(shard(["row0", "row1", "row2", "row3"], 0.5), shard_dir / "rows-r4-00000.parquet")
    pq.write_table(shard(["other"], 0.25), shard_dir / "rows-r4-00001.parquet")
    # The last row was sketched by an earlier stage (`known`, by its texts): it is neither sharded nor computed.
    known = {(recs[5]["prompt"], recs[5]["response"]): np.full(d, 0.75, np.float32)}
    out, info = teacher_sketch_groups(job, {"rows": recs}, str(shard_dir), stage="score", known=known)
    assert info["shards"] == 2 and info["resumed_shards"] == 1 and info["computed_rows"] == 1
    assert info["known_rows"] == 1
    ids, mat, ok = out["rows"]
    assert ids == [r["id"] for r in recs] and ok.all()
    assert (mat[:4] == 0.5).all()  # reused, not recomputed
    assert (mat[5] == 0.75).all()  # known, not recomputed
    teacher = _teacher(job)
    want = teacher.sketch([recs[4]["prompt"]], [recs[4]["response"]], 4).sketches
    np.testing.assert_allclose(mat[4:5], want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5)


def test_teacher_cost_weighs_eval_rows_and_score_stage_rows_by_their_own_rates(tmp_path):
    """eval's teacher ms per row covers all its teacher rows: the ones it computed at its measured
    rate and the ones the score stage sketched at the score stage's rate (the cascade's rows are the
    encoder's top rows, of another length mix, so neither rate alone is the teacher's cost)."""
    from types import SimpleNamespace

    from pipeline.stages.eval import _teacher_ms

    ctx = SimpleNamespace(upstream={"score": {"cascade": {"teacher_ms_per_row": 200.0}}})
    info = {"compute_s": 3.0, "computed_rows": 6, "known_rows": 4, "rows": 10}  # eval: 500 ms a row
    assert _teacher_ms(ctx, str(tmp_path / "a"), info) == pytest.approx((6 * 500 + 4 * 200) / 10)
    everything_known = {"compute_s": 0.0, "computed_rows": 0, "known_rows": 10, "rows": 10}
    assert _teacher_ms(ctx, str(tmp_path / "b"), everything_known) == 200.0
    nothing_known = {"compute_s": 3.0, "computed_rows": 6, "known_rows": 0, "rows": 6}
    assert _teacher_ms(ctx, str(tmp_path / "c"), nothing_known) == pytest.approx(500.0)


def test_known_sketches_round_trip_and_belong_to_one_teacher(tmp_path):
    """score/teacher_sketches.parquet gives back each row's raw sketch by its texts (None where the
    teacher rejected the row), and nothing to a job whose teacher differs (another adapter seed)."""
    from pipeline.stages.shared_teacher import read_known_sketches, write_known_sketches

    job = load_job(data={**_minimal_job(tmp_path), "sketch": {"proj_dim": 8}})
    rng = np.random.default_rng(0)
    rows = {
        "queries": [{"id": "q0", "prompt": "Q?", "response": "A."}],
        "rows": [{"id": "r0", "prompt": "P0", "response": "R0"}, {"id": "r1", "prompt": "P1", "response": None}],
    }
    mats = {
        "queries": rng.standard_normal((1, 8)).astype(np.float32),
        "rows": rng.standard_normal((2, 8)).astype(np.float32),
    }
    mats["rows"][1] = 0  # rejected: a zero row, invalid
    groups = {
        "queries": (["q0"], mats["queries"], np.array([True])),
        "rows": (["r0", "r1"], mats["rows"], np.array([True, False])),
    }
    path = str(tmp_path / "teacher_sketches.parquet")
    assert write_known_sketches(job, groups, rows, path) == 3
    known = read_known_sketches(job, path)
    assert set(known) == {("Q?", "A."), ("P0", "R0"), ("P1", "")}
    np.testing.assert_array_equal(known[("Q?", "A.")], mats["queries"][0])
    np.testing.assert_array_equal(known[("P0", "R0")], mats["rows"][0])
    assert known[("P1", "")] is None
    other = load_job(
        data={**_minimal_job(tmp_path), "sketch": {"proj_dim": 8}, "teacher": {"lora_seed": job.lora_seed + 1}}
    )
    assert read_known_sketches(other, path) == {}
    assert read_known_sketches(job, str(tmp_path / "absent.parquet")) == {}


# --------------------------------------------------------------------------- the eval stage's cascade block


def test_eval_cascade_metrics_follow_the_cascade_rankings(tmp_path):
    """eval's cascade block on synthetic scores (the gradient method's matrix as the teacher, so no
    model runs): AUPRC from the aggregate cascade order, MRR from each query's own re-ranked top-K,
    cost = influcoder's + K/N of the teacher's."""
    from pipeline import metrics
    from pipeline.artifacts import StageRun
    from pipeline.stages.eval import _cascade_method

    rng = np.random.default_rng(7)
    n, q, k = 60, 5, 12
    ids = [f"r{i:03d}" for i in range(n)]
    labels = (rng.random(n) < 0.2).astype(int)
    labels[:2] = 1
    enc = rng.normal(size=(q, n)) + 0.8 * labels  # a weak encoder
    grad = rng.normal(size=(q, n)) * 0.3 + 2.0 * labels  # a teacher that knows the labels better
    grad[:, 5] = 0.0  # a row the teacher rejected (zero sketch)
    job = load_job(data=_minimal_job(tmp_path, rerank_top=k / n))
    ctx = StageRun(
        job=job,
        stage="eval",
        config_hash="x",
        identity="x",
        upstream={"score": {"rows": {"scored": n}}},
        out_dir=str(tmp_path / "out"),
        work_dir=str(tmp_path / "work"),
    )
    results = {
        "influcoder": {"ms_per_sample": 0.5, "setup_s": 3.0, "bytes_per_sample": 768.0},
        "gradient": {"ms_per_sample": 100.0},
    }
    a, p = 4, 20
    gt = rng.normal(size=(a, p))
    curves, reps = {}, {}
    _cascade_method(
        ctx,
        pa.table({"id": ids}),
        pa.table({"id": [f"q{i}" for i in range(q)]}),
        ids,
        labels,
        {"influcoder": enc, "gradient": grad},
        {"influcoder": gt + rng.normal(size=(a, p))},
        gt,
        [f"p{i:02d}" for i in range(p)],
        results,
        curves,
        reps,
        None,  # no teacher center: the gradient method's matrix is already the teacher's cosines
    )
    r = results["cascade"]
    assert r["k"] == k and r["ms_per_sample"] == pytest.approx(0.5 + k / n * 100.0)

    # Aggregate: the encoder's top k by mean re-ranked with the teacher's mean (rejected row last).
    t_mean = grad.mean(0).copy()
    t_mean[5] = np.nan
    by = job.score.rerank_by
    assert by == "fused"  # the default
    order = _brute_cascade(ids, enc.mean(0).tolist(), t_mean.tolist(), k, by)
    agg = np.empty(n)
    agg[order] = np.arange(n, 0, -1)
    assert r["auprc"] == pytest.approx(metrics.auprc(labels, agg))
    assert r["auprc"] >= metrics.auprc(labels, enc.mean(0))  # the teacher knows better: the cascade gains
    assert "cascade" in curves and "cascade" in reps

    # Per query: that query's own encoder top k re-ranked with that query's teacher cosine.
    rr = []
    for j in range(q):
        t = grad[j].copy()
        t[5] = np.nan
        ranked = _brute_cascade(ids, enc[j].tolist(), t.tolist(), k, by)
        first = next(pos for pos, i in enumerate(ranked, start=1) if labels[i] == 1)
        rr.append(1 / first)
    assert r["mrr"] == pytest.approx(np.mean(rr))
    assert r["heldout"]["spearman_aggregated"] is not None and r["consistency_with_score_stage"]["checked"] is False


@pytest.mark.slow  # a whole stage or job run
@pytest.mark.timeout(600)
def test_whole_job_with_the_cascade(tiny_run, tmp_path):
    """Every stage with score.rerank_top on the fixture corpora (tiny models; conftest's shared
    `tiny_run`, every eval method): scores.parquet carries the cascade, eval reports `cascade` next to
    the others, and eval's block is the score stage's."""
    shared, out = tiny_run
    assert shared["score"]["rerank_top"] == 0.25  # the k asserted below
    data = copy_run(shared, tmp_path / "run")  # eval reruns below: on a copy, the shared run stays as it is
    job = load_job(data=data)
    manifests = {stage: r["manifest"] for stage, r in out.items()}
    c = manifests["score"]["cascade"]
    n = manifests["score"]["rows"]["scored"]
    assert c["k"] == math.ceil(0.25 * n) and "fidelity_gate" in manifests["score"]
    t = pq.read_table(Path(job.run_dir) / "score" / "scores.parquet")
    assert t.column_names == ["id", "score", "score_max", "rank", "teacher_score", "reranked"]
    assert sum(t.column("reranked").to_pylist()) == c["k"]
    # The cascade keeps its raw teacher sketches (block rows and queries) for eval.
    kept = pq.read_table(Path(job.run_dir) / "score" / "teacher_sketches.parquet")
    assert kept.num_rows == c["teacher_sketches_kept"] == c["k"] + c["teacher_queries"] + c["teacher_rejected_queries"]

    m = json.loads((Path(job.run_dir) / "eval" / "metrics.json").read_text())
    r = m["methods"]["cascade"]
    assert r["k"] == c["k"] and {"auprc", "auprc_ci", "mrr", "recall@5", "heldout"} <= set(r)
    g, i = m["methods"]["gradient"], m["methods"]["influcoder"]
    # eval's teacher took the queries (and the block rows it evaluates) from the score stage.
    n_queries = c["teacher_queries"] + c["teacher_rejected_queries"]
    assert n_queries < g["teacher_rows_from_score_stage"] <= kept.num_rows
    assert r["ms_per_sample"] == pytest.approx(i["ms_per_sample"] + c["k"] / n * g["ms_per_sample"])
    assert "cascade" in i["vs"]  # paired with influcoder's replicates
    # ... and Recall@k and MRR paired on the same resampled queries, the cascade's per query ranking included.
    for other in ("cascade", "untrained_encoder"):
        vs = i["vs"][other]
        assert vs["mrr_diff"] == pytest.approx(i["mrr"] - m["methods"][other]["mrr"])
        assert vs["mrr_diff_ci"][0] <= vs["mrr_diff"] <= vs["mrr_diff_ci"][1]
        assert {"recall@5_diff", "recall@5_diff_ci"} <= set(vs)
    cons = r["consistency_with_score_stage"]
    assert cons["checked"] and cons["block_overlap"] >= 0.8
    report = (Path(job.run_dir) / "eval" / "report" / "report.md").read_text()
    assert "cascade" in report
    # The verdict is one paragraph: the headline's indented per-query line is a sentence of it.
    verdict_paragraph = next(line for line in report.splitlines() if line.startswith("**Verdict.**"))
    assert ". Per query: " in verdict_paragraph
    assert "  " not in verdict_paragraph

    # fit.center_teacher (on in this run): fit wrote the mean of its train pool's sketches, and eval
    # and the score cascade took their teacher cosines between sketches centred by it.
    from pipeline.stages.shared_teacher import read_teacher_center

    pool = pq.read_table(Path(job.run_dir) / "sketch" / "pool").to_pylist()
    train = np.array([r["sketch"] for r in pool if r["split"] == "train"], np.float32)
    np.testing.assert_allclose(read_teacher_center(job), train.mean(axis=0), atol=1e-6)
    assert json.loads((Path(job.run_dir) / "fit" / "metrics.json").read_text())["teacher_center"]["rows"] == len(train)
    assert m["teacher_centered"] and c["teacher_centered"]

    # Without the gradient method, eval runs the teacher on the rows the cascade needs only.
    data["eval"]["methods"] = ["influcoder", "cascade"]
    job2 = load_job(data=data)
    artifacts.run_stage(job2, "eval", overwrite=True)
    r2 = json.loads((Path(job.run_dir) / "eval" / "metrics.json").read_text())["methods"]["cascade"]
    assert set(json.loads((Path(job.run_dir) / "eval" / "metrics.json").read_text())["methods"]) == {
        "influcoder",
        "cascade",
    }
    assert math.isfinite(r2["teacher_ms_per_row"]) and c["k"] <= r2["teacher_rows_per_query_union"] <= n
    assert r2["auprc"] == pytest.approx(r["auprc"], abs=1e-6)  # the same teacher scores, the same ranking
    assert r2["consistency_with_score_stage"]["block_overlap"] == cons["block_overlap"]
