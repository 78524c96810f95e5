"""Eval's encoder passes (pipeline/stages/eval_encoders.py): a blended influcoder export embedded as
its distilled half beside the starting encoder's passes gives the codes the blend itself gives, and
the passes the untrained baselines share with it run once."""

from __future__ import annotations

import numpy as np

from pipeline.encoder import TextEncoder
from pipeline.stages.eval_encoders import EncoderPasses
from tiny_models import build_blended_encoder, build_tiny_encoder

MAX_LEN = 48


def _inputs():
    rows = [f"row {i} " + "river stone " * (i % 7) for i in range(23)]
    queries = [f"query {i} about stones" for i in range(3)]
    pool = [f"pool {i} " + "cloud " * (i % 5) for i in range(11)]
    anchors = [f"anchor {i}" for i in range(4)]
    return queries, rows, anchors, pool


def test_blend_from_shared_plain_passes_equals_the_blended_encoder(tmp_path, tiny_encoder_dir):
    export = str(build_blended_encoder(tmp_path / "export", tiny_encoder_dir, weight=0.3))
    queries, rows, anchors, pool = _inputs()
    prefixed = ["Query: " + q for q in queries]
    passes = EncoderPasses(MAX_LEN, False, "float32", threads=2)

    influ = passes.method(export, [(prefixed, rows), (anchors, pool)], plain_dir=tiny_encoder_dir)
    assert passes.passes_run == 8  # 4 input lists x (distilled half, starting encoder)
    whole = TextEncoder(export, max_len=MAX_LEN, dtype="float32")
    for (q, r), (q_in, r_in) in zip(influ.pairs, [(prefixed, rows), (anchors, pool)]):
        np.testing.assert_allclose(q, whole.embed(q_in, batch_size=32), atol=1e-5)
        np.testing.assert_allclose(r, whole.embed(r_in, batch_size=32), atol=1e-5)
    assert influ.dim == whole.dim == 2 * TextEncoder(tiny_encoder_dir, max_len=MAX_LEN).dim
    assert influ.ms_per_row > 0

    # The untrained encoder (plain queries) and its prefixed variant reuse the rows and pool passes
    # (and the prefixed variant the blend's plain passes of the prefixed queries): 2 passes in all.
    plain = passes.method(tiny_encoder_dir, [(queries, rows), (anchors, pool)])
    assert passes.passes_run == 9
    passes.method(tiny_encoder_dir, [(prefixed, rows), (anchors, pool)])
    assert passes.passes_run == 9
    alone = TextEncoder(tiny_encoder_dir, max_len=MAX_LEN, dtype="float32")
    np.testing.assert_allclose(plain.pairs[0][1], alone.embed(rows, batch_size=32), atol=1e-5)
    np.testing.assert_allclose(plain.pairs[0][0], alone.embed(queries, batch_size=32), atol=1e-5)
    assert plain.dim == alone.dim


def test_a_blend_whose_plain_half_is_another_model_runs_whole(tmp_path, tiny_encoder_dir):
    """The starting encoder named by the job is not the blend's plain half: nothing is shared, and the
    codes are still the blend's own."""
    other = str(build_tiny_encoder(tmp_path / "other", seed=7))
    export = str(build_blended_encoder(tmp_path / "export", tiny_encoder_dir, weight=0.4))
    queries, rows, anchors, pool = _inputs()
    passes = EncoderPasses(MAX_LEN, False, "float32", threads=2)
    influ = passes.method(export, [(queries, rows)], plain_dir=other)
    assert passes.passes_run == 2  # the blend as one model: queries, rows
    whole = TextEncoder(export, max_len=MAX_LEN, dtype="float32")
    np.testing.assert_allclose(influ.pairs[0][1], whole.embed(rows, batch_size=32), atol=1e-5)
    passes.method(other, [(queries, rows)])
    assert passes.passes_run == 4


def test_timing_sample_takes_whole_passes_of_the_full_pass_spread_over_the_lengths():
    from pipeline.batching import token_budget_batches
    from pipeline.stages.eval_encoders import PASS_BATCH, TIMED_ROWS, timing_sample

    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(5, 20, 150), rng.integers(80, 400, 455)])  # 605: a short last pass
    rng.shuffle(lengths)
    a = timing_sample(lengths)
    assert len(a) == TIMED_ROWS and np.all(np.diff(a) > 0) and a.max() < len(lengths)
    # Each pass `embed` makes of the sample is a pass it makes of all the rows (the same padding).
    full = {tuple(sorted(p)) for p in token_budget_batches(list(lengths), None, PASS_BATCH)}
    sample_passes = token_budget_batches(list(lengths[a]), None, PASS_BATCH)
    assert len(sample_passes) == TIMED_ROWS // PASS_BATCH
    assert all(tuple(sorted(a[p])) in full for p in sample_passes)
    # Spread over the lengths: the short rows' share and the mean length follow the whole set's.
    assert abs(np.mean(lengths[a] < 50) - np.mean(lengths < 50)) < 0.05
    assert abs(lengths[a].mean() / lengths.mean() - 1) < 0.1
    np.testing.assert_array_equal(timing_sample([3, 1, 2]), [0, 1, 2])  # fewer rows: all of them
    assert len(timing_sample([])) == 0


def test_stored_codes_check_compares_the_timed_rows_it_holds(caplog):
    from pipeline.stages.eval_encoders import STORED_CODES_MIN_COSINE, stored_codes_check

    rng = np.random.default_rng(0)
    fresh = rng.standard_normal((10, 8)).astype(np.float32)
    known = np.array([0, 2, 3, 5, 6, 7, 8, 9])  # rows 1 and 4 are not in the table
    stored = fresh[known].astype(np.float16).astype(np.float32)
    timed = np.array([1, 2, 5, 9])
    out = stored_codes_check(fresh, known, stored, timed)
    assert out["rows"] == 8 and out["embedded_here"] == 2 and out["checked"] == 3  # 2, 5, 9
    assert out["min_cosine"] > STORED_CODES_MIN_COSINE and 0 < out["max_abs_diff"] < 1e-2
    assert "stale" not in caplog.text
    stale = stored.copy()
    stale[known.tolist().index(5)] = rng.standard_normal(8)  # a timed row whose stored code is another row's
    assert stored_codes_check(fresh, known, stale, timed)["min_cosine"] < STORED_CODES_MIN_COSINE
    assert "stale" in caplog.text


def test_embed_rows_uses_the_stored_codes_and_embeds_the_rest(tmp_path, tiny_encoder_dir):
    """More rows than the timed sample, some absent from the table: stored rows get their stored codes
    (even the timed ones), every other row its own fresh embedding, and the check reads the timed ones."""
    from pipeline.stages.eval_encoders import TIMED_ROWS, embed_rows

    export = str(build_blended_encoder(tmp_path / "export", tiny_encoder_dir, weight=0.3))
    rows = [f"row {i} " + "river stone " * (i % 9) for i in range(150)]
    queries, anchors, pool = ["query about stones", "another query"], ["anchor"], ["pool a", "pool b"]
    whole = TextEncoder(export, max_len=MAX_LEN, dtype="float32")
    truth = whole.embed(rows, batch_size=32)
    known = np.array([i for i in range(150) if i % 7])  # every 7th row is not in the table
    codes = truth[known].astype(np.float16).astype(np.float32)  # what a float16 table gives back
    passes = EncoderPasses(MAX_LEN, False, "float32", threads=2)

    emb = embed_rows(passes, export, queries, rows, (anchors, pool), plain_dir=tiny_encoder_dir, stored=(known, codes))
    assert emb.timed_rows == TIMED_ROWS and emb.rows.shape == truth.shape and np.isfinite(emb.rows).all()
    np.testing.assert_array_equal(emb.rows[known], codes)
    missing = np.setdiff1d(np.arange(150), known)
    np.testing.assert_allclose(emb.rows[missing], truth[missing], atol=1e-5)
    np.testing.assert_allclose(emb.queries, whole.embed(queries, batch_size=32), atol=1e-5)
    check = emb.stored_check
    assert check["rows"] == len(known) and check["embedded_here"] == len(missing)
    assert 0 < check["checked"] <= TIMED_ROWS and check["min_cosine"] > 0.999

    plain = embed_rows(passes, tiny_encoder_dir, queries, rows, (anchors, pool))  # no table: every row fresh
    assert plain.stored_check is None and plain.ms_per_row > 0
    np.testing.assert_allclose(plain.rows, TextEncoder(tiny_encoder_dir, max_len=MAX_LEN).embed(rows), atol=1e-5)
    np.testing.assert_allclose(plain.heldout[1], TextEncoder(tiny_encoder_dir, max_len=MAX_LEN).embed(pool), atol=1e-5)

    # Without held-out inputs (influcoder's come from fit) no held-out pass runs.
    before = passes.passes_run
    again = embed_rows(passes, tiny_encoder_dir, queries, rows[:40], None)
    assert again.heldout is None and again.rows.shape == (40, plain.rows.shape[1])
    assert passes.passes_run - before == 2  # the timed rows and the rest: queries and held-out are cached or absent


def test_fit_heldout_scores_are_read_in_evals_order_or_refused_with_the_reason(tmp_path):
    """fit/heldout_scores.parquet round-trips into whatever id order eval holds, and is refused (None and
    why) when missing, in another precision, or of other rows, so that eval embeds the split itself."""
    from pipeline.stages.fit_data import HELDOUT_SCORES_FILE, read_heldout_scores, write_heldout_scores

    rng = np.random.default_rng(0)
    a_ids, p_ids = [f"a{i}" for i in range(5)], [f"p{i}" for i in range(7)]
    scores = rng.standard_normal((5, 7)).astype(np.float32)
    cpu = "float32 on cpu"
    assert read_heldout_scores(str(tmp_path), a_ids, p_ids, cpu)[0] is None  # no file yet
    write_heldout_scores(str(tmp_path), scores, a_ids, p_ids, cpu)
    assert (tmp_path / HELDOUT_SCORES_FILE).exists()
    a_order, p_order = rng.permutation(5), rng.permutation(7)
    got, why = read_heldout_scores(str(tmp_path), [a_ids[i] for i in a_order], [p_ids[i] for i in p_order], cpu)
    assert why == ""
    np.testing.assert_array_equal(got, scores[np.ix_(a_order, p_order)])
    for other in ("bfloat16 on cpu", "float32 on cuda"):
        got, why = read_heldout_scores(str(tmp_path), a_ids, p_ids, other)
        assert got is None and cpu in why and other in why
    for other_a, other_p in ((a_ids[:4], p_ids), (a_ids, [*p_ids, "p7"]), (a_ids[:4] + ["x"], p_ids)):
        got, why = read_heldout_scores(str(tmp_path), other_a, other_p, cpu)
        assert got is None and "not the sketch's held-out split" in why
