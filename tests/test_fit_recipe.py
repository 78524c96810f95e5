"""The student's recipe and honest measurement (issue 10): text views, the plain baseline, bootstrap
CIs, the validation split, dropout, weight interpolation and the non-finite-loss guard.

Real MiniLM tokenizer/weights where real behaviour is asserted (loading takes ~1 s); no Ray.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import metrics
from pipeline.distill import check_finite
from pipeline.models import resolve_encoder
from pipeline.schema import ID, PROMPT, RESPONSE, SKETCH, SPLIT, TEXT
from pipeline.stages.fit_data import load_fit_data
from pipeline.textview import PairView, text_views, tokenize_views


@pytest.fixture(scope="module")
def minilm():
    from pipeline.encoder import TextEncoder

    return TextEncoder(resolve_encoder("all-minilm-l6-v2"), max_len=32)


# --------------------------------------------------------------------------- text views


def test_text_view_keeps_the_response_when_the_prompt_overflows(minilm):
    prompt = " ".join(f"word{i}" for i in range(200))  # far longer than max_len
    response = "the final answer is forty two"
    views = text_views([f"{prompt}\n{response}"], [prompt], [response])
    assert views == [PairView("", prompt, response)]
    ids, cut = tokenize_views(minilm.tokenizer, views, 32)
    decoded = minilm.tokenizer.decode(ids[0], skip_special_tokens=True)
    assert len(ids[0]) == 32 and cut[0]
    assert decoded.endswith(response)  # the whole response survives
    assert "word199" in decoded and "word0 " not in decoded  # the prompt is cut from the left
    # A plain text keeps its head instead (what SentenceTransformer does).
    plain_ids, plain_cut = tokenize_views(minilm.tokenizer, [f"{prompt}\n{response}"], 32)
    plain = minilm.tokenizer.decode(plain_ids[0], skip_special_tokens=True)
    assert plain_cut[0] and plain.startswith("word0") and response not in plain


def test_text_view_only_pairs_rows_whose_text_is_prompt_and_response():
    views = text_views(
        ["p\nr", "own encoder text", "just a statement"], ["p", "p", ""], ["r", "r", "just a statement"], prefix="Q: "
    )
    assert views == [PairView("Q: ", "p", "r"), "Q: own encoder text", "Q: just a statement"]


def test_a_pair_that_fits_embeds_like_its_plain_text(minilm):
    prompt, response = "What colour is the sky?", "Blue, on a clear day."
    a = minilm.embed(text_views([f"{prompt}\n{response}"], [prompt], [response]))
    b = minilm.embed([f"{prompt}\n{response}"])
    assert float(a[0] @ b[0]) > 0.9999


def test_plain_baseline_embeds_what_sentence_transformers_gives():
    """The untrained baseline must be MiniLM as its users run it: SentenceTransformer(model).encode."""
    from sentence_transformers import SentenceTransformer

    from pipeline.encoder import TextEncoder

    model_dir = resolve_encoder("all-minilm-l6-v2")
    st = SentenceTransformer(model_dir, device="cpu")
    texts = ["Immigrants are ruining this country", "Solve 3 + 4 = ?\n7", "a " * 400]  # the last one overflows
    ours = TextEncoder(model_dir, max_len=st.max_seq_length).embed(texts)
    theirs = st.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(ours, theirs, atol=2e-5)


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_hand_checkable_cases():
    const = metrics.bootstrap_ci(lambda i: 0.5, [20], resamples=200)
    assert const == [0.5, 0.5]
    x = np.r_[np.ones(300), np.zeros(700)]
    lo, hi = metrics.bootstrap_ci(lambda i: float(x[i].mean()), [x.size], resamples=2000, seed=1)
    half = 1.96 * np.sqrt(0.3 * 0.7 / x.size)  # normal approximation of a proportion's CI
    assert lo == pytest.approx(0.3 - half, abs=0.008) and hi == pytest.approx(0.3 + half, abs=0.008)
    # Paired replicates of one statistic differ by exactly 0.
    reps = metrics.bootstrap_replicates(lambda i: float(x[i].mean()), [x.size], resamples=100, seed=3)
    again = metrics.bootstrap_replicates(lambda i: float(x[i].mean()), [x.size], resamples=100, seed=3)
    assert metrics.paired_difference(reps, again) == [0.0, 0.0]


def test_spearman_with_ci_brackets_the_point_and_narrows_with_more_data():
    rng = np.random.default_rng(0)
    widths = []
    for n_pool in (32, 512):
        gt = rng.normal(size=(16, n_pool))
        pred = gt + rng.normal(size=gt.shape)
        r = metrics.spearman_with_ci(pred, gt, resamples=300)
        lo, hi = r["spearman_aggregated_ci"]
        assert lo <= r["spearman_aggregated"] <= hi
        assert r["spearman_per_anchor_ci"][0] <= r["spearman_per_anchor"] <= r["spearman_per_anchor_ci"][1]
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2
    # The vectorised per-row Spearman equals scipy's.
    gt, pred = rng.normal(size=(4, 30)), rng.normal(size=(4, 30))
    assert metrics.spearman_rows(pred, gt) == pytest.approx([metrics.spearman(p, g) for p, g in zip(pred, gt)])


def test_paired_fidelity_difference_sees_what_overlapping_marginal_cis_hide():
    rng = np.random.default_rng(1)
    gt = rng.normal(size=(16, 128))
    shared = rng.normal(size=gt.shape)  # noise both methods share: the paired difference cancels it
    a = gt + shared + 0.5 * rng.normal(size=gt.shape)
    b = gt + shared + 1.0 * rng.normal(size=gt.shape)
    d = metrics.fidelity_difference(a, b, gt, resamples=400, seed=0)
    ra, rb = (metrics.spearman_with_ci(p, gt, resamples=400, seed=0) for p in (a, b))
    # The point difference is the difference of the two methods' own figures.
    assert d["spearman_per_anchor_diff"] == pytest.approx(ra["spearman_per_anchor"] - rb["spearman_per_anchor"])
    assert d["spearman_aggregated_diff"] == pytest.approx(ra["spearman_aggregated"] - rb["spearman_aggregated"])
    # a is more faithful per anchor beyond the noise although the marginal CIs overlap.
    assert d["spearman_per_anchor_diff_ci"][0] > 0
    assert ra["spearman_per_anchor_ci"][0] < rb["spearman_per_anchor_ci"][1]
    # Antisymmetric, and exactly 0 against itself.
    back = metrics.fidelity_difference(b, a, gt, resamples=400, seed=0)
    assert back["spearman_per_anchor_diff"] == pytest.approx(-d["spearman_per_anchor_diff"])
    same = metrics.fidelity_difference(a, a, gt, resamples=50, seed=0)
    assert same["spearman_aggregated_diff_ci"] == [0.0, 0.0] and same["spearman_per_anchor_diff"] == 0.0


# --------------------------------------------------------------------------- validation split


def _write_sketch(folder, n_anchor_train=20, n_anchor_eval=6, n_pool_train=40, n_pool_eval=12, files=1):
    rng = np.random.default_rng(0)
    for side, n_train, n_eval in (("anchors", n_anchor_train, n_anchor_eval), ("pool", n_pool_train, n_pool_eval)):
        ids = [f"{side}-{i:03d}" for i in range(n_train + n_eval)]
        splits = ["train"] * n_train + ["eval"] * n_eval
        sk = rng.normal(size=(len(ids), 8)).astype(np.float32)
        sk /= np.linalg.norm(sk, axis=1, keepdims=True)
        table = pa.table(
            {
                ID: ids,
                SPLIT: splits,
                SKETCH: pa.FixedSizeListArray.from_arrays(pa.array(sk.ravel()), 8),
                TEXT: [f"prompt {i}\nanswer {i}" for i in range(len(ids))],
                PROMPT: [f"prompt {i}" for i in range(len(ids))],
                RESPONSE: [f"answer {i}" for i in range(len(ids))],
            }
        )
        (folder / side).mkdir(parents=True, exist_ok=True)
        order = rng.permutation(len(ids))  # file layout and row order must not matter
        for f, part in enumerate(np.array_split(order, files)):
            pq.write_table(table.take(pa.array(part)), folder / side / f"part-{f:05d}.parquet")


def test_validation_is_carved_from_train_and_never_overlaps_eval(tmp_path):
    _write_sketch(tmp_path / "a", files=1)
    _write_sketch(tmp_path / "b", files=3)
    one = load_fit_data(str(tmp_path / "a"), "", val_frac=0.25, val_seed=7)
    three = load_fit_data(str(tmp_path / "b"), "", val_frac=0.25, val_seed=7)
    for side in ("anchors", "pool"):
        train, val, ev = (set(getattr(one, f"{s}_{side}").ids) for s in ("train", "val", "eval"))
        assert not (val & ev) and not (val & train) and not (train & ev)
        assert all(i.startswith(side) for i in val)
        assert len(val) == int(np.ceil(0.25 * (len(val) + len(train))))
        assert getattr(three, f"val_{side}").ids == getattr(one, f"val_{side}").ids  # sharding-invariant
    assert one.val_truth.shape == (len(one.val_anchors.ids), len(one.val_pool.ids))
    assert one.targets.shape == (len(one.train_anchors.ids), len(one.train_pool.ids))
    assert isinstance(one.train_pool.views[0], PairView)  # the encoder's view comes with the artifact
    other_seed = load_fit_data(str(tmp_path / "a"), "", val_frac=0.25, val_seed=8)
    assert other_seed.val_anchors.ids != one.val_anchors.ids
    none = load_fit_data(str(tmp_path / "a"), "", val_frac=0.0)
    assert none.val_anchors is None and len(none.train_anchors.ids) == 20


# --------------------------------------------------------------------------- the teacher's center


def test_center_sketches_by_hand():
    from pipeline.distill import center_sketches, teacher_center

    s = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.6, 0.8]], np.float32)
    c = teacher_center(s[[0, 1]])
    np.testing.assert_allclose(c, [0.5, 0.5])
    out = center_sketches(s, c)
    r = np.sqrt(0.5)
    # (1, 0) - (.5, .5) = (.5, -.5) -> (r, -r); a rejected (zero) row stays zero, it is no evidence.
    np.testing.assert_allclose(out[:3], [[r, -r], [-r, r], [0.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(out[3], np.array([0.1, 0.3]) / np.hypot(0.1, 0.3), atol=1e-6)
    assert (center_sketches(np.array([[0.5, 0.5]], np.float32), c) == 0).all()  # the center itself: zero
    assert (center_sketches(s, None) == s).all()  # no center: the raw cosines
    with pytest.raises(ValueError, match="do not match"):
        center_sketches(s, np.zeros(3, np.float32))


def test_centred_targets_use_the_fit_rows_mean_only(tmp_path):
    """fit.center_teacher: every cosine (targets, validation, held-out truth) is taken between
    centred sketches, and the center is the mean of the rows fit trains on: validation and held-out
    rows never inform it."""
    from pipeline.distill import center_sketches, cosine_targets

    _write_sketch(tmp_path / "a")
    raw = load_fit_data(str(tmp_path / "a"), "", val_frac=0.25, val_seed=7)
    cen = load_fit_data(str(tmp_path / "a"), "", val_frac=0.25, val_seed=7, center_teacher=True)
    assert raw.teacher_center is None
    np.testing.assert_allclose(cen.teacher_center, raw.train_pool.sketches.mean(axis=0), atol=1e-6)
    c = cen.teacher_center
    for got, (a, p) in (
        (cen.targets, (raw.train_anchors, raw.train_pool)),
        (cen.val_truth, (raw.val_anchors, raw.val_pool)),
        (cen.ground_truth, (raw.eval_anchors, raw.eval_pool)),
    ):
        want = cosine_targets(center_sketches(a.sketches, c), center_sketches(p.sketches, c))
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert not np.allclose(got, cosine_targets(a.sketches, p.sketches), atol=1e-3)  # it did change them
    assert cen.train_pool.ids == raw.train_pool.ids and cen.val_pool.ids == raw.val_pool.ids


def test_restore_best_needs_a_validation_split():
    from pipeline.config import FitConfig
    from pipeline.config import _FieldError

    with pytest.raises(_FieldError):
        FitConfig(val_frac=0.0, restore_best=True)
    FitConfig(val_frac=0.0, restore_best=False)


# --------------------------------------------------------------------------- training recipe


def test_fit_refuses_a_non_finite_loss():
    check_finite(0.5, 1, 0)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(FloatingPointError, match="fit.lr"):
            check_finite(bad, 3, 2)


def test_dropout_off_makes_training_forwards_deterministic(minilm):
    from pipeline.stages.fit_worker import set_dropout

    texts = ["one sentence", "another one"]
    minilm.train()
    assert not torch.allclose(minilm(texts), minilm(texts))  # MiniLM's own dropout 0.1
    set_dropout(minilm, 0.0)
    assert torch.allclose(minilm(texts), minilm(texts))
    minilm.eval()


def test_weight_interpolation_ends_are_the_two_models(minilm):
    from pipeline.stages.fit import _load_mix

    start = {k: v.clone() for k, v in minilm.model.state_dict().items()}
    tuned = {k: (v + 0.01) if v.is_floating_point() else v for k, v in start.items()}
    for w, want in ((0.0, start), (1.0, tuned)):
        _load_mix(minilm, start, tuned, w)
        got = minilm.model.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in start)
    _load_mix(minilm, start, tuned, 0.5)
    key = next(k for k, v in start.items() if v.is_floating_point())
    assert torch.allclose(minilm.model.state_dict()[key], start[key] + 0.005, atol=1e-6)
    _load_mix(minilm, start, start, 1.0)


def test_verdict_reads_paired_cis_for_auprc_and_fidelity():
    from pipeline.report import verdict, verdict_text

    def method(auprc):
        return {"auprc": auprc}

    results = {
        "influcoder": {
            **method(0.60),
            "vs": {
                "untrained_encoder": {
                    "auprc_diff": -0.10,
                    "auprc_diff_ci": [-0.20, -0.01],
                    "recall@10_diff": 0.01,
                    "recall@10_diff_ci": [-0.02, 0.04],
                    "mrr_diff": -0.2,
                    "mrr_diff_ci": [-0.3, -0.1],
                    "recall@50_diff": 0.0,
                    "recall@50_diff_ci": [-0.01, 0.01],
                    "heldout": {
                        "spearman_aggregated_diff": 0.04,
                        "spearman_aggregated_diff_ci": [0.01, 0.07],
                        "spearman_per_anchor_diff": 0.02,
                        "spearman_per_anchor_diff_ci": [-0.01, 0.05],
                    },
                },
                "bm25": {"auprc_diff": 0.3, "auprc_diff_ci": [-0.1, 0.5]},
            },
        },
        "untrained_encoder": method(0.70),
        "bm25": method(0.30),
    }
    v = verdict(results)
    assert v["best_auprc"] == "untrained_encoder"
    assert v["vs_plain_encoder"]["influcoder_is"] == "worse"
    both = "more faithful on the aggregated ranking, level (within the noise) per anchor"
    assert v["fidelity_vs_plain_encoder"]["influcoder_is"] == both
    text = " ".join(verdict_text(v))
    assert "AUPRC -0.100 [-0.200, -0.010]" in text and "influcoder is worse" in text
    assert "aggregated rho +0.040 [+0.010, +0.070]" in text and f"influcoder is {both}" in text
    # Recall@k and MRR, paired on the same queries, each read on its own CI.
    assert v["vs_plain_encoder"]["per_query"]["mrr"]["influcoder_is"] == "worse"
    assert (
        "per query: recall@10 +0.010 [-0.020, +0.040], MRR -0.200 [-0.300, -0.100], recall@50 +0.000 [-0.010, "
        "+0.010] (95 % CI): influcoder is level (within the noise) on recall@10 and recall@50, worse on MRR." in text
    )
    # A CI straddling 0 is level, whichever way the point leans; two that agree read as one.
    heldout = results["influcoder"]["vs"]["untrained_encoder"]["heldout"]
    heldout["spearman_aggregated_diff_ci"] = [-0.01, 0.07]
    assert verdict(results)["fidelity_vs_plain_encoder"]["influcoder_is"] == "level (within the noise)"
    heldout["spearman_per_anchor_diff_ci"] = [0.02, 0.08]
    assert verdict(results)["fidelity_vs_plain_encoder"]["influcoder_is"] == (
        "level (within the noise) on the aggregated ranking, more faithful per anchor"
    )


# --------------------------------------------------------------------------- score-space blend


def test_blended_export_scores_mix_the_two_encoders(tmp_path, tiny_encoder_dir):
    """codes = [sqrt(1-b) distilled, sqrt(b) plain]: a code dot product is (1-b) cos_d + b cos_p."""
    from tiny_models import build_blended_encoder
    from transformers import AutoModel

    from pipeline.encoder import BLEND_FILE, TextEncoder
    from pipeline.models import model_fingerprint

    folder = build_blended_encoder(tmp_path / "blend", tiny_encoder_dir, 0.3)
    texts = ["one sentence", "another, longer sentence about cats", "Q: 2 + 2?\nA: 4", "x"]
    blended = TextEncoder(str(folder), max_len=64, dtype="float32")
    plain = TextEncoder(tiny_encoder_dir, max_len=64, dtype="float32").embed(texts)
    codes = blended.embed(texts)
    assert codes.shape == (4, 2 * plain.shape[1]) and blended.dim == codes.shape[1]
    np.testing.assert_allclose(np.linalg.norm(codes, axis=1), 1.0, atol=1e-5)
    # The folder's top level is the distilled half alone (what AutoModel and SentenceTransformer load).
    half = TextEncoder(str(folder), max_len=64, dtype="float32")
    half.drop_blend()
    distilled = half.embed(texts)
    assert np.abs(distilled - plain).max() > 1e-3  # the two halves differ
    np.testing.assert_allclose(codes @ codes.T, 0.7 * distilled @ distilled.T + 0.3 * plain @ plain.T, atol=1e-5)
    assert AutoModel.from_pretrained(folder).config.hidden_size == plain.shape[1]
    # The kept starting encoder is part of the model's identity: changing it changes the fingerprint.
    before = model_fingerprint(str(folder))
    stored = json.loads((folder / BLEND_FILE).read_text())
    (folder / BLEND_FILE).write_text(json.dumps({**stored, "plain_weight": 0.6}))
    assert model_fingerprint(str(folder)) != before
    # The kept encoder is read from inside the export only.
    (folder / BLEND_FILE).write_text(json.dumps({**stored, "plain_dir": "../elsewhere"}))
    with pytest.raises(ValueError, match="plain_dir"):
        TextEncoder(str(folder), max_len=64)
    # Re-exporting an unblended encoder into the folder drops the stale blend.
    TextEncoder(tiny_encoder_dir, max_len=64).save(str(folder))
    assert not (folder / BLEND_FILE).exists() and not (folder / "plain").exists()
    assert TextEncoder(str(folder), max_len=64).dim == plain.shape[1]


def test_blend_needs_a_validation_split_and_weights_in_the_open_unit_interval():
    from pipeline.config import FitConfig, _FieldError

    with pytest.raises(_FieldError, match="val_frac"):
        FitConfig(blend=[0.3])
    for bad in ([0.0], [1.0], [1.5], ["a"]):
        with pytest.raises(_FieldError):
            FitConfig(val_frac=0.25, blend=bad)
    assert FitConfig(val_frac=0.25, blend=[0.2, 0.4]).blend == [0.2, 0.4]


def test_a_chosen_blend_is_reported_with_its_validation_lead_and_whether_it_clears_the_noise():
    """Headline and report say how far the chosen blend led the distilled encoder alone on validation,
    and whether that lead is beyond the noise (its CI above 0) or within it."""
    from pipeline.report import export_text
    from pipeline.stages.eval import _headline

    def headline(gain, ci):
        influcoder = {"heldout": {"spearman_aggregated": 0.6}, "blend_weight": 0.1, "blend_gain": gain}
        return _headline({"methods": {"influcoder": {**influcoder, "blend_gain_ci": ci}}, "speed": {}})

    assert "weight 0.10 for the plain one (chosen on fit's validation split, where its fidelity led the " in (
        headline(0.002, [-0.03, 0.029])
    )
    assert "by +0.002 [-0.030, +0.029], within the noise)." in headline(0.002, [-0.03, 0.029])
    assert "by +0.070 [+0.010, +0.200], beyond the noise)." in headline(0.07, [0.01, 0.2])
    assert "(chosen on fit's validation split)." in headline(None, None)  # a fit from before the lead was kept
    fit_metrics = {
        "selected_epoch": 8,
        "blend_weight": 0.5,
        "candidates": [
            {"weight": 1.0, "validation": 0.54},
            {"weight": 1.0, "blend": 0.5, "validation": 0.61, "gain": 0.07, "gain_ci": [-0.08, 0.2]},
        ],
    }
    assert "at weight 0.50 for the plain one, chosen on the validation split, where its fidelity led the " in (
        export_text(fit_metrics)
    )
    assert "by +0.070 [-0.080, +0.200], within the noise (codes of twice the width" in export_text(fit_metrics)


def test_paired_recall_and_mrr_differences_resample_the_same_queries():
    """a - b per application metric, its CI from replicates of a and b on the same resamples: equal to
    resampling the queries once and measuring both methods on them; a method against itself is 0."""
    from pipeline.stages.eval import BOOTSTRAP_RESAMPLES, _application_metrics, _paired_vs

    rng = np.random.default_rng(5)
    ids = [f"r{i}" for i in range(40)]
    labels = (rng.random(40) < 0.25).astype(int)
    labels[:2] = 1
    a_scores = rng.normal(size=(6, 40)) + labels  # a finds the positives; b guesses
    b_scores = rng.normal(size=(6, 40))
    ra, sa = _application_metrics(a_scores, labels, ids, [5], seed=3)
    rb, sb = _application_metrics(b_scores, labels, ids, [5], seed=3)
    vs = _paired_vs(ra, sa, rb, sb)
    assert list(vs) == ["auprc_diff", "auprc_diff_ci", "mrr_diff", "mrr_diff_ci", "recall@5_diff", "recall@5_diff_ci"]

    def per_query_mrr(scores):
        order = np.argsort(-scores, axis=1, kind="stable")
        return np.array([1.0 / (1 + np.flatnonzero(labels[row] == 1)[0]) for row in order])

    (queries,) = metrics.bootstrap_indices([6], BOOTSTRAP_RESAMPLES, seed=3)
    gaps = [per_query_mrr(a_scores)[q].mean() - per_query_mrr(b_scores)[q].mean() for q in queries]
    assert vs["mrr_diff"] == pytest.approx(per_query_mrr(a_scores).mean() - per_query_mrr(b_scores).mean())
    assert vs["mrr_diff_ci"] == pytest.approx(metrics.percentile_ci(np.array(gaps)))
    assert vs["auprc_diff"] > 0 and vs["auprc_diff_ci"][0] < vs["auprc_diff"] < vs["auprc_diff_ci"][1]
    itself = _paired_vs(ra, sa, ra, sa)
    assert all(itself[k] == 0.0 for k in itself if k.endswith("_diff"))
    assert all(itself[k] == [0.0, 0.0] for k in itself if k.endswith("_diff_ci"))


# --------------------------------------------------------------------------- the export


def _split(rng, n: int, tag: str):
    from pipeline.stages.fit_data import SplitRows

    words = ["cats", "rain", "tax", "code", "music", "war", "bread", "sea", "law", "games"]
    texts = [" ".join(rng.choice(words, size=rng.integers(3, 9))) + f" {tag}{i}" for i in range(n)]
    sketches = rng.standard_normal((n, 8)).astype(np.float32)
    sketches /= np.linalg.norm(sketches, axis=1, keepdims=True)
    return SplitRows([f"{tag}{i}" for i in range(n)], texts, texts, sketches)


@pytest.mark.parametrize("recipe", ["blend", "restore_best"])
def test_export_takes_the_workers_split_scores_and_reports_what_a_pass_here_gives(tmp_path, tiny_encoder_dir, recipe):
    """The export reuses the split scores the worker kept for the start and the selected epoch
    (fit_worker.PREDICTIONS, computed by the worker's own `evaluate_splits`) instead of embedding those
    splits again, and reports what embedding them here gives: the same candidates, choice and held-out
    figures, and the same exported encoder. Only interpolated weights are still embedded here."""
    from safetensors.torch import save_file

    from pipeline.config import load_job
    from pipeline.encoder import TextEncoder
    from pipeline.stages.fit import _choose_and_export
    from pipeline.stages.fit_data import FitData
    from pipeline.stages.fit_worker import evaluate_splits

    rng = np.random.default_rng(0)
    split = {
        name: _split(rng, n, name) for name, n in [("ta", 4), ("tp", 6), ("ea", 5), ("ep", 9), ("va", 4), ("vp", 7)]
    }
    data = FitData(
        split["ta"], split["tp"], split["ea"], split["ep"],
        targets=split["ta"].sketches @ split["tp"].sketches.T,
        ground_truth=split["ea"].sketches @ split["ep"].sketches.T,
        val_anchors=split["va"], val_pool=split["vp"], val_truth=split["va"].sketches @ split["vp"].sketches.T,
    )  # fmt: skip
    fit = {"val_frac": 0.25, "blend": [0.3, 0.6]} if recipe == "blend" else {"val_frac": 0.25, "restore_best": True}
    job = load_job(
        data={
            "run_dir": str(tmp_path / "run"),
            "corpus": {"path": "unused"},
            "anchors": {"path": "unused"},
            "encoder": {"model": tiny_encoder_dir, "max_len": 32},
            "fit": {"epochs": 2, **fit},
        }
    )
    # A "trained" epoch: the starting weights moved by noise, as the worker would have checkpointed them.
    enc = TextEncoder(tiny_encoder_dir, max_len=32)
    torch.manual_seed(0)
    tuned = {
        k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in enc.model.state_dict().items()
    }
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    kept: dict = {}
    untrained = evaluate_splits(enc, data, 4, keep=kept)
    kept = {f"0.{s}": p for s, p in kept.items()}
    enc.model.load_state_dict(tuned)
    last: dict = {}
    epoch = evaluate_splits(enc, data, 4, keep=last)
    kept.update({f"2.{s}": p for s, p in last.items()})
    # The choice is forced, so that each recipe's path is the one tested: with the blend recipe the
    # epoch's recorded validation is put below every blend's (a blend is chosen), with restore_best above
    # every interpolation's (the selected epoch is exported, w = 1).
    epoch_val = -1.0 if recipe == "blend" else 2.0
    history = {
        "untrained": untrained,
        "epochs": [{"epoch": 1}, {"epoch": 2, **epoch, "val_spearman_aggregated": epoch_val}],
        "compute": enc.compute,
    }

    args = (job, data, tiny_encoder_dir, str(tmp_path / "tuned.safetensors"), history, 2)
    reused = _choose_and_export(*args, str(tmp_path / "reused"), kept)
    here = _choose_and_export(*args, str(tmp_path / "here"), None)
    if recipe == "blend":
        assert reused["blend"] in (0.3, 0.6) and reused["embedded_here"] == []
        assert set(here["embedded_here"]) == {"w=0.00 val", "w=1.00 val", "w=0.00 heldout", "w=1.00 heldout"}
    else:  # the interpolations are new weights: only those are embedded, and only on validation
        assert reused["weight"] == 1.0 and reused["blend"] == 0.0
        assert sorted(reused["embedded_here"]) == ["w=0.25 val", "w=0.50 val", "w=0.75 val"]
        assert sorted(here["embedded_here"]) == sorted(reused["embedded_here"] + ["w=0.00 heldout", "w=1.00 heldout"])
    assert (reused["weight"], reused["blend"]) == (here["weight"], here["blend"])
    for a, b in zip(reused["candidates"], here["candidates"]):
        assert a.keys() == b.keys() and a["validation"] == pytest.approx(b["validation"], abs=1e-6)
    for key in ("spearman_aggregated", "spearman_per_anchor"):
        assert reused["exported"][key] == pytest.approx(here["exported"][key], abs=1e-6)
        np.testing.assert_allclose(reused["exported"][f"{key}_ci"], here["exported"][f"{key}_ci"], atol=1e-6)
    for key, value in here["exported"]["vs_untrained"].items():
        np.testing.assert_allclose(reused["exported"]["vs_untrained"][key], value, atol=1e-6, err_msg=key)
    # Both folders hold the same encoder.
    texts = [*data.eval_anchors.texts, *data.eval_pool.texts]
    a, b = (TextEncoder(str(tmp_path / d), max_len=32).embed(texts) for d in ("reused", "here"))
    np.testing.assert_allclose(a, b, atol=1e-6)
    # A worker that embedded otherwise (another precision or device): its scores are not reused.
    other = _choose_and_export(*args[:4], {**history, "compute": "bfloat16 on cuda"}, 2, str(tmp_path / "o"), kept)
    assert len(other["embedded_here"]) == len(here["embedded_here"])
