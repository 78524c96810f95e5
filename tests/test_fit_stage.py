"""The fit stage on Ray Train (CPU): artifacts, export round trip, worker-count band, crash resume.

The sketch artifact is synthetic but built on real texts from four sources (maths word problems,
ToxiGen statements, two BBH tasks). The planted "teacher" pairs the sources across styles:
{maths, sports} form one influence cluster and {ToxiGen, dates} the other, with rows of the same
source closer still. An untrained encoder ranks by surface style, so it gets the cross-source
half of that structure wrong; distillation has to learn it. Eval anchors are drawn with unequal
source weights, so the anchor-mean (aggregated) ranking of the eval pool is graded too.

Training runs the real MiniLM, because learning is what these tests assert: they are marked `slow`.
Fit on the tiny encoder runs in the fast tier inside test_e2e.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import artifacts
from pipeline.config import load_job
from pipeline.schema import ID, SKETCH, SPLIT, TEXT

PROJ_DIM = 32
SIZES = {"train_anchors": 24, "train_pool": 48, "eval_anchors": 8, "eval_pool": 16}
EPOCHS = 2


def _group_texts(data: Path) -> list[list[str]]:
    """Four groups of distinct real texts, 40 each (enough for every split)."""

    def jsonl(path, fn, n):
        out = []
        with open(path) as f:
            for line in f:
                out.append(fn(json.loads(line)))
                if len(out) == n:
                    break
        return out

    def bbh(task, n):
        with open(data / "bbh" / "bbh" / f"{task}.json") as f:
            return [f"Q: {e['input']}\nA: {e['target']}" for e in json.load(f)["examples"][:n]]

    return [
        jsonl(data / "gsm8k" / "train.jsonl", lambda r: f"{r['question']}\n{r['answer']}", 40),
        jsonl(data / "toxigen" / "toxigen_statements.jsonl", lambda r: r["text"], 40),
        bbh("sports_understanding", 40),
        bbh("date_understanding", 40),
    ]


def _sketch_runner(data: Path, seed: int = 0):
    """A stand-in sketch stage: writes the contract's parquet files from a planted group structure."""
    groups = _group_texts(data)
    rng = np.random.default_rng(seed)
    axes = np.linalg.qr(rng.normal(size=(PROJ_DIM, 6)))[0].T  # 2 cluster axes + 4 source axes
    cluster_of = [0, 1, 0, 1]  # maths+sports, toxigen+dates
    directions = [axes[cluster_of[g]] + 0.7 * axes[2 + g] for g in range(len(groups))]
    directions = [d / np.linalg.norm(d) for d in directions]
    cursor = [0] * len(groups)

    def rows(prefix: str, split: str, n: int, weights: list[float]) -> list[dict]:
        out = []
        picks = rng.choice(len(groups), size=n, p=np.asarray(weights) / sum(weights))
        for i, g in enumerate(picks):
            text = groups[g][cursor[g]]
            cursor[g] += 1
            vec = 2.0 * directions[g] + 0.3 * rng.normal(size=PROJ_DIM)
            out.append(
                {
                    ID: f"{prefix}-{split}-{i:03d}",
                    SPLIT: split,
                    TEXT: text,
                    SKETCH: (vec / np.linalg.norm(vec)).astype(np.float32).tolist(),
                }
            )
        return out

    uniform, skewed = [1, 1, 1, 1], [4, 2, 1, 1]
    anchors = rows("a", "eval", SIZES["eval_anchors"], skewed) + rows("a", "train", SIZES["train_anchors"], uniform)
    pool = rows("p", "eval", SIZES["eval_pool"], uniform) + rows("p", "train", SIZES["train_pool"], uniform)
    schema = pa.schema(
        [
            pa.field(ID, pa.string()),
            pa.field(SPLIT, pa.string()),
            pa.field(TEXT, pa.string()),
            pa.field(SKETCH, pa.list_(pa.float32(), PROJ_DIM)),
        ]
    )

    def run(ctx):
        for side, side_rows in (("anchors", anchors), ("pool", pool)):
            os.makedirs(os.path.join(ctx.out_dir, side))
            for shard, start in enumerate(range(0, len(side_rows), 20)):  # several shards, like the real stage
                table = pa.Table.from_pylist(side_rows[start : start + 20], schema=schema)
                pq.write_table(table, os.path.join(ctx.out_dir, side, f"part-{shard:05d}.parquet"))
        ctx.record(rows={side: len(r) for side, r in (("anchors", anchors), ("pool", pool))})

    return run


def _job(run_dir: Path, **fit):
    return load_job(
        data={
            "run_dir": str(run_dir),
            "seed": 0,
            "corpus": {"path": "unused"},
            "anchors": {"path": "unused"},
            "sketch": {"proj_dim": PROJ_DIM, **SIZES},
            "encoder": {"model": "all-minilm-l6-v2", "max_len": 64},
            "fit": {"epochs": EPOCHS, "lr": 4e-4, "warmup_frac": 0.1, "hard_ratio": 0.25, "max_failures": 1, **fit},
            "ray": {"num_cpus": 2},
        }
    )


@pytest.fixture(scope="module")
def sketched_run(tmp_path_factory, shared_data) -> Path:
    """A run dir holding only a finished sketch stage; tests copy it so each fit starts clean."""
    run_dir = tmp_path_factory.mktemp("fit") / "template"
    artifacts.run_stage(_job(run_dir), "sketch", runner=_sketch_runner(shared_data))
    return run_dir


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def resumed_fit(ray_local, sketched_run, tmp_path_factory):
    """One worker; the first attempt's worker raises in epoch 2 and Ray Train restarts it."""
    from pipeline.stages import fit

    run_dir = _copy_run(sketched_run, tmp_path_factory.mktemp("resume") / "run")
    # The default recipe (no validation split, the last epoch exported); the validated one is tested below.
    job = _job(run_dir, num_workers=1, val_frac=0.0, restore_best=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fit.fit_worker, "train_loop", failing_once_in_epoch(2, fit.fit_worker.train_loop))
        manifest = artifacts.run_stage(job, "fit")
    return job, manifest


def failing_once_in_epoch(epoch: int, train_loop):
    """A Ray Train loop that runs `train_loop`, but whose first attempt (no checkpoint yet) raises at
    the first block of `epoch`: the fault is injected here, in the test, through the per-block loss
    check the loop imports from pipeline.distill. Nested, so Ray pickles it by value."""

    def loop(config):
        import ray.train

        import pipeline.distill as distill

        check = distill.check_finite
        if ray.train.get_checkpoint() is None:

            def failing_check(loss, at_epoch, block_id):
                if at_epoch == epoch:
                    raise RuntimeError(f"injected failure in epoch {epoch} (test)")
                check(loss, at_epoch, block_id)

            distill.check_finite = failing_check
        try:
            train_loop(config)
        finally:
            distill.check_finite = check

    return loop


@pytest.mark.slow
def test_fit_outputs_and_resume(resumed_fit):
    job, manifest = resumed_fit
    out = Path(job.run_dir) / "fit"
    assert (out / "encoder" / "model.safetensors").exists() and (out / "curves.png").stat().st_size > 0
    m = json.loads((out / "metrics.json").read_text())
    # Each epoch once, in order, although epoch 2 was interrupted: the run resumed from epoch 1.
    assert [e["epoch"] for e in m["epochs"]] == list(range(1, EPOCHS + 1))
    assert m["resumed_from_epochs"] == [1]
    # The export embedded nothing itself: the starting encoder's held-out scores, kept by the first
    # attempt's worker, came through the resume in the checkpoint (fit_worker.PREDICTIONS).
    assert m["timings"]["export_passes"] == []
    assert m["selected_epoch"] == EPOCHS and m["restore_best"] is False
    assert m["splits"] == SIZES
    assert set(m["truncated"]) == {"max_len", *SIZES} and m["truncated"]["max_len"] == 64
    for entry in [m["untrained"], *m["epochs"]]:
        assert np.isfinite([entry["spearman_aggregated"], entry["spearman_per_anchor"]]).all()
    assert all(np.isfinite(e["loss"]) for e in m["epochs"])
    assert manifest["fit"]["selected_epoch"] == EPOCHS and manifest["rows"] == SIZES
    # Learning happened: held-out per-anchor ranking beats the untrained encoder, into the band the
    # planted structure allows (observed: 0.19 untrained, 0.60 after 2 epochs).
    last = m["epochs"][-1]
    assert last["spearman_per_anchor"] > m["untrained"]["spearman_per_anchor"]
    assert last["spearman_per_anchor"] >= 0.35
    assert m["epochs"][-1]["loss"] < m["epochs"][0]["loss"]
    # Checkpoints and work dirs are gone once the stage committed.
    assert not (Path(job.run_dir) / ".work").exists() or not list((Path(job.run_dir) / ".work").iterdir())


@pytest.mark.slow
def test_exported_encoder_reloads_identically(resumed_fit):
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    from pipeline.encoder import TextEncoder, mean_pool

    job, _ = resumed_fit
    folder = str(Path(job.run_dir) / "fit" / "encoder")
    texts = ["Natalia sold clips to 48 of her friends.", "Q: Is the sentence plausible?\nA: no", "hello"]
    ours = TextEncoder(folder, max_len=64).embed(texts)

    st = SentenceTransformer(folder, device="cpu")
    np.testing.assert_allclose(st.encode(texts, normalize_embeddings=True), ours, atol=1e-5)

    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        pooled = mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])
    np.testing.assert_allclose(torch.nn.functional.normalize(pooled, dim=-1).numpy(), ours, atol=1e-5)
    # The export differs from the untrained model: training changed the weights.
    base = TextEncoder(os.fspath(_minilm()), max_len=64).embed(texts)
    assert np.abs(base - ours).max() > 1e-4


def _minilm() -> str:
    from pipeline.models import resolve_encoder

    return resolve_encoder("all-minilm-l6-v2")


@pytest.mark.slow
def test_two_workers_reach_the_same_quality_band_and_restore_best(resumed_fit, sketched_run, tmp_path):
    job1, _ = resumed_fit
    run_dir = _copy_run(sketched_run, tmp_path / "run")
    # Also exercises the validated recipe: the exported candidate (epoch 0 included, then weight
    # interpolations) is the best one on the validation split, never chosen on the held-out split.
    # It also tries score-space blends with the starting encoder (fit.blend) on the same split.
    job2 = _job(
        run_dir,
        num_workers=2,
        restore_best=True,
        val_frac=0.25,
        dropout=0.0,
        select_best_on="per_anchor",
        blend=[0.3, 0.6],
    )
    artifacts.run_stage(job2, "fit")
    one = json.loads((Path(job1.run_dir) / "fit" / "metrics.json").read_text())
    two = json.loads((run_dir / "fit" / "metrics.json").read_text())
    assert two["workers"]["num_workers"] == 2 and two["resumed_from_epochs"] == []
    assert [e["epoch"] for e in two["epochs"]] == list(range(1, EPOCHS + 1))
    for key, value in one["untrained"].items():  # same encoder, same eval data
        assert two["untrained"][key] == pytest.approx(value, abs=1e-5), key
    entries = [{"epoch": 0, **two["untrained"]}, *two["epochs"]]
    best = max(entries, key=lambda e: e["val_spearman_per_anchor"])
    assert two["restore_best"] is True and two["selected_epoch"] == best["epoch"]
    assert two["splits"]["val_anchors"] == 6 and two["splits"]["train_anchors"] == SIZES["train_anchors"] - 6
    chosen = max(two["candidates"], key=lambda c: c["validation"])
    assert two["interpolation_weight"] == chosen["weight"] and two["exported"]["validation"] == chosen["validation"]
    # Each blend carries its paired validation gain over the distilled encoder (the selected epoch) alone.
    blends = [c for c in two["candidates"] if "blend" in c]
    assert sorted(c["blend"] for c in blends) == [0.3, 0.6]
    selected_validation = next(c["validation"] for c in two["candidates"] if "blend" not in c and c["weight"] == 1.0)
    for c in blends:
        assert c["gain"] == pytest.approx(c["validation"] - selected_validation, abs=1e-3)
        assert c["gain_ci"][0] <= c["gain"] <= c["gain_ci"][1]
    assert two["blend_weight"] == chosen.get("blend", 0.0)
    blend_file = run_dir / "fit" / "encoder" / "influcoder_blend.json"
    assert blend_file.exists() == (two["blend_weight"] > 0)
    lo, hi = two["exported"]["spearman_aggregated_ci"]
    assert lo <= two["exported"]["spearman_aggregated"] <= hi
    # The two runs differ in recipe (one has no validation split, so 6 more train anchors): their
    # per-anchor quality (mean of 8 rankings) stays in a band; the aggregated one over 16 pool rows is
    # too noisy to compare across recipes.
    assert abs(two["epochs"][-1]["spearman_per_anchor"] - one["epochs"][-1]["spearman_per_anchor"]) < 0.2
    assert two["epochs"][-1]["spearman_per_anchor"] > two["untrained"]["spearman_per_anchor"]


@pytest.mark.slow  # a whole stage or job run
def test_gpu_request_on_cpu_cluster_fails_fast(ray_local, sketched_run, tmp_path):
    from pipeline.errors import ResourceError

    if ray_local.cluster_resources().get("GPU", 0) >= 1:
        pytest.skip("the cluster has a GPU")
    run_dir = _copy_run(sketched_run, tmp_path / "run")
    with pytest.raises(ResourceError, match="fit.use_gpu"):
        artifacts.run_stage(_job(run_dir, use_gpu=True), "fit")


@pytest.mark.slow  # a whole stage or job run
def test_too_many_candidates_is_a_config_error(ray_local, sketched_run, tmp_path):
    from pipeline.errors import ConfigError

    run_dir = _copy_run(sketched_run, tmp_path / "run")
    with pytest.raises(ConfigError, match="fit.block_candidates"):
        artifacts.run_stage(_job(run_dir, block_candidates=SIZES["train_pool"] + 1), "fit")


@pytest.mark.parametrize("max_len", [8, 32])
def test_one_tokenizer_pass_gives_the_inputs_and_the_cut_texts(max_len):
    """TextEncoder.tokenize (one pass, overflow rows dropped) == the plain truncating call, and its
    flags == an untruncated length count (the two passes it replaces)."""
    import torch
    from transformers import AutoTokenizer

    from pipeline.encoder import TextEncoder

    texts = [
        "hello",
        "Q: Is the sentence plausible?\nA: no",
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?",
        "short one",
        "word " * 40,
        "Ünïcödé tëxt with àccents and emoji 🙂 " * 3,
    ]
    got, cut = TextEncoder(_minilm(), max_len=max_len).tokenize(texts)
    tok = AutoTokenizer.from_pretrained(_minilm())
    want = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    lengths = tok(texts, truncation=False, return_length=True)["length"]
    assert cut.tolist() == [n > max_len for n in lengths]
    assert cut.any() and not cut.all()
