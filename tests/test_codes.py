"""Pure tests of code quantisation, exact scores, streaming top-k and external ranking (no Ray/LanceDB)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.codes import (
    MultiTopK,
    TopK,
    bytes_per_row,
    dequantize,
    exact_scores,
    quantization_fidelity,
    quantize,
    ranking_order,
    score_block,
)
from pipeline.metrics import spearman
from pipeline.ranking import RunSpiller, merge_runs


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("dtype,max_err", [("float32", 0.0), ("float16", 2e-3), ("int8", 0.03)])
def test_quantize_round_trip_error_bounds(rng, dtype, max_err):
    x = unit(rng, 500, 384)
    q = quantize(x, dtype)
    assert q.codes.dtype == np.dtype(dtype) and q.codes.shape == x.shape and q.scales.shape == (500,)
    back = dequantize(q.codes, q.scales)
    # Score error against unit queries is what matters for ranking.
    queries = unit(rng, 20, 384)
    assert np.abs(back @ queries.T - x @ queries.T).max() <= max_err
    if dtype == "int8":
        # Per-row grid: each component is within half a step (max|x|/127/2) before renormalisation,
        # and the stored scale makes the de-quantised row exactly unit norm.
        np.testing.assert_allclose(np.linalg.norm(back, axis=1), 1.0, atol=1e-5)
        step = np.abs(x).max(1) / 127
        raw = q.codes.astype(np.float32) * step[:, None]
        assert (np.abs(raw - x) <= step[:, None] / 2 + 1e-7).all()


def test_quantize_zero_row_and_bytes():
    q = quantize(np.zeros((2, 8), np.float32), "int8")
    assert (q.codes == 0).all() and (q.scales == 0).all()
    assert bytes_per_row(384, "float16") == 768 and bytes_per_row(384, "int8") == 388
    assert bytes_per_row(384, "float32") == 1536
    with pytest.raises(ValueError, match="expected one of"):
        quantize(np.zeros((1, 4), np.float32), "bf16")


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_exact_scores_match_numpy(rng, dtype):
    x, queries = unit(rng, 1000, 64), unit(rng, 7, 64)
    q = quantize(x, dtype)
    full = dequantize(q.codes, q.scales) @ queries.T
    blocks = []
    # A tiny block size forces many blocks; on_block sees the same matrix piecewise.
    mean, mx = exact_scores(
        queries, q.codes, q.scales, block_elems=64 * 64, on_block=lambda off, s: blocks.append((off, s.copy()))
    )
    np.testing.assert_allclose(mean, full.mean(1), atol=1e-5)
    np.testing.assert_allclose(mx, full.max(1), atol=1e-5)
    assert len(blocks) == 1000 // 64 + 1
    np.testing.assert_allclose(np.concatenate([s for _, s in blocks]), full, atol=1e-5)
    np.testing.assert_allclose(score_block(queries, q.codes, q.scales), full, atol=1e-5)


def brute_topk(ids, scores, k):
    order = sorted(range(len(ids)), key=lambda i: (-float(scores[i]), ids[i]))[:k]
    return [ids[i] for i in order], [float(scores[i]) for i in order]


def test_topk_streaming_equals_sort_with_ties(rng):
    n, k = 3000, 25
    ids = [f"row{i:05d}" for i in rng.permutation(n)]
    scores = np.round(rng.standard_normal(n), 1).astype(np.float32)  # heavy ties
    tk = TopK(k)
    for start in range(0, n, 137):
        tk.update(ids[start : start + 137], scores[start : start + 137])
    got_ids, got_scores = tk.result()
    want_ids, want_scores = brute_topk(ids, scores, k)
    assert list(got_ids) == want_ids
    np.testing.assert_array_equal(got_scores, np.array(want_scores, np.float32))


@pytest.mark.parametrize("block", [300, 7, 1])  # blocks larger and smaller than k
def test_multitopk_equals_per_query_sort(rng, block):
    n, nq, k = 2000, 5, 10
    ids = np.array([f"d{i}" for i in rng.permutation(n)], dtype=object)  # scan order != id order
    s = np.round(rng.standard_normal((n, nq)), 2).astype(np.float32)
    mt = MultiTopK(nq, k)
    for start in range(0, n, block):
        mt.update(ids[start : start + block], s[start : start + block])
    # Arrow ids (what the score stage passes): only candidate rows are converted.
    mt_arrow = MultiTopK(nq, k)
    for start in range(0, n, block):
        mt_arrow.update(pa.array(ids[start : start + block].tolist()), s[start : start + block])
    for q, ((got_ids, _), (arrow_ids, _)) in enumerate(zip(mt.results(), mt_arrow.results())):
        assert list(got_ids) == brute_topk(list(ids), s[:, q], k)[0]
        assert list(arrow_ids) == list(got_ids)


def test_ranking_order_ties_by_id():
    ids = np.array(["b", "a", "c", "d"], dtype=object)
    assert list(ranking_order(ids, np.array([1.0, 1.0, 2.0, 0.5]))) == [2, 1, 0, 3]


@pytest.mark.parametrize("run_rows,chunk_rows", [(10_000, None), (250, 40), (97, 7)])
def test_external_ranking_equals_global_sort(tmp_path, rng, run_rows, chunk_rows):
    n = 2000
    ids = np.array([f"id{i:05d}" for i in rng.permutation(n)])
    scores = np.round(rng.standard_normal(n), 1).astype(np.float32)
    spill = RunSpiller(str(tmp_path / "runs"), run_rows=run_rows)
    for start in range(0, n, 333):
        spill.add(
            pa.table(
                {
                    "id": ids[start : start + 333],
                    "score": scores[start : start + 333],
                    "score_max": scores[start : start + 333],
                }
            )
        )
    spill.flush()
    assert (len(spill.paths) > 1) == (run_rows < n)
    out = pa.concat_tables(list(merge_runs(spill.paths, chunk_rows=chunk_rows)))
    want_ids, _ = brute_topk(list(ids), scores, n)
    assert out.column("id").to_pylist() == want_ids
    assert out.column("rank").to_pylist() == list(range(1, n + 1))


def test_float16_and_int8_ranking_agreement(rng):
    """fp16 codes rank like fp32 (Spearman >= 0.999); int8 with per-row scales >= 0.99."""
    x, queries = unit(rng, 5000, 384), unit(rng, 8, 384)
    exact = x @ queries.T
    for dtype, bound in (("float16", 0.999), ("int8", 0.99)):
        q = quantize(x, dtype)
        approx = score_block(queries, q.codes, q.scales)
        rhos = [spearman(exact[:, j], approx[:, j]) for j in range(8)]
        assert min(rhos) >= bound, (dtype, rhos)
        mean_exact = exact.mean(1)
        mean_approx, _ = exact_scores(queries, q.codes, q.scales)
        assert spearman(mean_exact, mean_approx) >= bound
    fid = quantization_fidelity(x[:300], "int8", num_queries=12)
    assert fid["spearman_min"] >= 0.99 and fid["queries"] == 12 and fid["samples"] == 300
    assert quantization_fidelity(x[:20], "int8", num_queries=12)["queries"] == 5  # a quarter of the rows at most


def test_spearman_matches_scipy(rng):
    scipy_stats = pytest.importorskip("scipy.stats")
    a = np.round(rng.standard_normal(200), 1)
    b = a + rng.standard_normal(200)
    assert spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic, abs=1e-12)


def test_rows_for_fraction_takes_the_decimal_the_user_wrote():
    """0.07 * 100 is 7.000000000000001 in binary floating point: a plain ceil selected 8 rows."""
    import math

    from pipeline.ranking import rows_for_fraction

    assert math.ceil(0.07 * 100) == 8  # the trap
    assert rows_for_fraction(0.07, 100) == 7
    assert rows_for_fraction(0.1, 600) == 60 and rows_for_fraction(0.2, 600) == 120
    assert rows_for_fraction(0.07, 101) == 8  # 7.07 rounds up
    for frac in (0.01, 0.05, 0.1, 0.25, 0.3, 0.33):
        for n in (1, 7, 100, 1000, 12345):
            k = rows_for_fraction(frac, n)
            assert k - 1 < frac * n + 1e-9 and k >= frac * n - 1e-9
