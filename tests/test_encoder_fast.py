"""The encoder's fast path: token-budget batching, bf16 (a bf16 copy of the weights on a CPU) and its agreement gate.

Logic runs on the tiny random encoder (tests/tiny_models.py); the bf16 fidelity claim is checked on
the real all-MiniLM-L6-v2 (marked slow). The stage test runs the real encode and score stages (local
Ray, real LanceDB) and checks that the precision chosen is recorded and shared by codes and queries.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import artifacts
from pipeline.batching import token_budget_batches
from pipeline.config import load_job
from pipeline.encoder import MIN_SPEARMAN, PairView, TextEncoder, precision_agreement
from pipeline.errors import ConfigError
from pipeline.hardware import native_bf16

MAX_LEN = 48
BF16_MIN_COS = 0.995
"""Stated tolerance: each row's bf16 embedding has cosine >= this with its float32 embedding (the
tiny random encoder; the real MiniLM's ranking agreement is the slow test's Spearman >= 0.999)."""


def texts(n: int, seed: int = 0) -> list:
    """Plain texts and pair views of very different lengths, some longer than MAX_LEN tokens."""
    rng = np.random.default_rng(seed)
    words = "alpha beta gamma delta river stone cloud seven apples train station minute".split()
    out: list = []
    for i in range(n):
        body = " ".join(rng.choice(words, size=int(rng.integers(1, 70))))
        if i % 3 == 2:
            out.append(PairView(prompt=f"question {i}: {body}", response=f"answer {i}", prefix=""))
        else:
            out.append(f"row {i}: {body}")
    return out


@pytest.fixture(scope="module")
def tiny(tiny_encoder_dir) -> TextEncoder:
    torch.set_num_threads(2)
    return TextEncoder(tiny_encoder_dir, max_len=MAX_LEN, dtype="float32")


def test_token_budget_embeddings_equal_one_at_a_time_and_padded_batches(tiny) -> None:
    items = texts(40)
    budgeted, cut = tiny.embed(items, batch_size=16, token_budget=200, return_truncated=True)
    one = np.concatenate([tiny.embed([t], batch_size=1) for t in items])
    enc, cut_padded = tiny.tokenize(items)  # one batch padded to its longest row, input order
    with torch.inference_mode():
        padded = tiny._forward_tokens(enc).numpy()
    np.testing.assert_allclose(budgeted, one, atol=1e-5)
    np.testing.assert_allclose(budgeted, padded, atol=1e-5)
    assert cut.any() and not cut.all()  # the set has texts both within and beyond max_len
    np.testing.assert_array_equal(cut, cut_padded)
    # The budget really packed several passes of different sizes, and the output follows the input.
    lengths = [len(ids) for ids in tiny.features(items)[0]["input_ids"]]
    groups = token_budget_batches(lengths, 200, 16, section="encode")
    assert len({len(g) for g in groups}) > 1
    perm = np.random.default_rng(1).permutation(len(items))
    np.testing.assert_allclose(tiny.embed([items[i] for i in perm], 16, token_budget=200), budgeted[perm], atol=1e-5)


def test_precision_setting_follows_native_bf16(tiny_encoder_dir) -> None:
    cpu = torch.device("cpu")
    auto = TextEncoder(tiny_encoder_dir, max_len=MAX_LEN, dtype="auto")
    assert auto.precision == ("bfloat16" if native_bf16(cpu) else "float32")
    assert TextEncoder(tiny_encoder_dir, max_len=MAX_LEN, dtype="bfloat16").precision == "bfloat16"
    assert TextEncoder(tiny_encoder_dir, max_len=MAX_LEN).precision == "float32"  # fit's rule on a CPU
    with pytest.raises(ConfigError, match="encode.dtype"):
        TextEncoder(tiny_encoder_dir, max_len=MAX_LEN, dtype="float16")
    with pytest.raises(ConfigError, match="encode.token_budget"):
        auto.embed(["a"], token_budget=0)


def test_bf16_embeddings_agree_with_float32_within_the_stated_tolerance(tiny) -> None:
    items = texts(40, seed=2)
    fp32 = tiny.embed(items, 16, token_budget=256)
    bf16 = tiny.embed(items, 16, token_budget=256, precision="bfloat16")
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(bf16, axis=1), 1.0, atol=1e-5)
    assert not np.array_equal(bf16, fp32)  # bf16 really ran
    assert (bf16 * fp32).sum(1).min() >= BF16_MIN_COS


def test_cpu_bf16_computes_what_autocast_does_and_follows_the_weights(tiny_encoder_dir) -> None:
    """On a CPU, bf16 `embed` runs a copy with bf16 linear layers: the embeddings of autocast (the
    module's float32 weights untouched), built again after a training step or a new blend half."""
    items = texts(24, seed=4)
    enc = TextEncoder(tiny_encoder_dir, max_len=MAX_LEN, dtype="bfloat16")
    names = set(enc.state_dict())
    first = enc.embed(items, 8, token_budget=128)
    model, plain = enc._cpu_bf16_models()
    assert plain is None and model is not enc.model
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert {b.dtype for n, b in model.named_buffers() if n.endswith(".weight")} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # embeddings, layer norms
    assert all(p.dtype == torch.float32 for p in enc.parameters()) and set(enc.state_dict()) == names
    enc_in, _ = enc.tokenize(items)  # one padded batch, through the float32 module under autocast
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = enc._forward_tokens(enc_in).numpy()
    np.testing.assert_allclose(enc.embed(items, len(items)), autocast, atol=1e-6)
    np.testing.assert_array_equal(enc.embed(items, 8, token_budget=128), first)
    assert enc._cpu_bf16_models()[0] is model  # unchanged weights: the same copy

    # A training step changes the weights: the next bf16 pass uses them.
    optimizer = torch.optim.SGD(enc.parameters(), lr=0.5)
    loss = enc.forward(items[:4]).sum()
    loss.backward()
    optimizer.step()
    stepped = enc.embed(items, 8, token_budget=128)
    assert enc._cpu_bf16_models()[0] is not model and not np.allclose(stepped, first, atol=1e-3)
    assert (stepped * enc.embed(items, 8, token_budget=128, precision="float32")).sum(1).min() >= BF16_MIN_COS

    # A blend's plain half gets its own copy.
    enc.blend_with(TextEncoder(tiny_encoder_dir, max_len=MAX_LEN).model, 0.3)
    assert enc._cpu_bf16_models()[1] is not None
    blended = enc.embed(items, 8, token_budget=128)
    assert blended.shape == (len(items), enc.dim)
    assert (blended * enc.embed(items, 8, token_budget=128, precision="float32")).sum(1).min() >= BF16_MIN_COS


def test_precision_agreement_measures_rank_and_top_k() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(4, 50))
    same = precision_agreement(ref, ref + 1e-9)
    assert same["spearman_min"] == pytest.approx(1.0) and same["topk_overlap_min"] == 1.0
    flipped = precision_agreement(ref, -ref)
    assert flipped["spearman_min"] == pytest.approx(-1.0)
    assert flipped["topk_overlap_mean"] == 0.0 and flipped["k"] == 10
    assert precision_agreement(ref[:, :2], ref[:, :2])["spearman_min"] is None  # too few rows to rank


def test_the_gate_keeps_bf16_when_it_agrees_and_falls_back_on_a_miss(tiny_encoder_dir) -> None:
    rows, queries = texts(48, seed=3), [f"query {i} alpha river" for i in range(6)]
    enc = TextEncoder(tiny_encoder_dir, max_len=MAX_LEN, dtype="bfloat16")
    kept = enc.choose_precision(rows, queries, batch_size=16, min_spearman=-1.0, min_overlap=0.0)
    assert kept["dtype"] == "bfloat16" and not kept["fell_back"] and kept["agreement"]["passed"]
    assert kept["agreement"]["rows"] == 48 and kept["agreement"]["queries"] == 6
    assert enc.precision == "bfloat16"

    # An unreachable threshold forces a miss: the encoder switches to float32 and says why.
    missed = enc.choose_precision(rows, queries, batch_size=16, min_spearman=1.5)
    assert missed["dtype"] == "float32" and missed["fell_back"] and not missed["agreement"]["passed"]
    assert missed["wanted"] == "bfloat16" and "unlike float32" in missed["reason"]
    assert enc.precision == "float32"
    fp32 = TextEncoder(tiny_encoder_dir, max_len=MAX_LEN, dtype="float32")
    np.testing.assert_array_equal(enc.embed(rows, 16), fp32.embed(rows, 16))

    # float32 asked for: nothing to measure. A sample too small to rank: float32, with the reason.
    assert fp32.choose_precision(rows, queries)["agreement"] is None
    small = TextEncoder(tiny_encoder_dir, max_len=MAX_LEN, dtype="bfloat16").choose_precision(rows[:2], queries)
    assert small["dtype"] == "float32" and "too small" in small["reason"]


@pytest.mark.slow
def test_bf16_ranks_like_float32_on_real_minilm(shared_data) -> None:
    """The fidelity claim: all-MiniLM-L6-v2 in bf16 ranks real T0 rows like float32 (max_len 128)."""
    from pipeline.models import resolve_encoder

    rows = []
    with open(shared_data / "t0" / "t0_train_50k.jsonl") as f:
        for line in f:
            r = json.loads(line)
            rows.append(f"{r['prompt']}\n{r['completion']}")
            if len(rows) >= 8 + 64:  # 8 queries x 64 rows: bf16 is emulated (~20x fp32's cost) on AVX2 hosts
                break
    torch.set_num_threads(2)
    enc = TextEncoder(resolve_encoder("all-minilm-l6-v2"), max_len=128, dtype="bfloat16")
    record = enc.choose_precision(rows[8:], rows[:8], batch_size=64, token_budget=8192)
    agreement = record["agreement"]
    assert agreement["spearman_min"] >= MIN_SPEARMAN, agreement
    assert agreement["topk_overlap_mean"] >= 0.9, agreement
    assert record["dtype"] == "bfloat16"
    # The bf16 copy `embed` runs on a CPU computes what autocast computes, on the real model too.
    enc_in, _ = enc.tokenize(rows[:16])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = enc._forward_tokens(enc_in).numpy()
    np.testing.assert_allclose(enc.embed(rows[:16], 16), autocast, atol=1e-6)


# --------------------------------------------------------------------------- the stages


def _qa(split: str, n: int) -> list[dict]:
    rng = np.random.default_rng(0 if split == "train" else 1)
    words = "apple river stone cloud number vote season paper garden signal winter market theory".split()
    return [
        {"question": f"{split} {i}: " + " ".join(rng.choice(words, 12)) + "?", "answer": " ".join(rng.choice(words, 8))}
        for i in range(n)
    ]


@pytest.mark.timeout(400)
def test_encode_records_its_precision_and_score_queries_share_it(tmp_path, tiny_encoder_dir, ray_local) -> None:
    from pipeline.codestore import Ledger

    corpus, queries = tmp_path / "corpus", tmp_path / "queries"
    corpus.mkdir()
    queries.mkdir()
    pq.write_table(pa.Table.from_pylist(_qa("train", 80)), corpus / "part-0.parquet")
    pq.write_table(
        pa.Table.from_pylist([{**r, "qid": f"q{i}"} for i, r in enumerate(_qa("test", 3))]), queries / "q.parquet"
    )
    mapping = {"prompt_column": "question", "response_column": "answer"}
    job = load_job(
        data={
            "run_dir": str(tmp_path / "run"),
            "corpus": {"path": str(corpus), **mapping},
            "anchors": {"path": str(queries), **mapping},
            "encoder": {"model": tiny_encoder_dir, "max_len": MAX_LEN},
            "encode": {"batch_size": 16, "token_budget": 256, "index": "none", "dtype": "bfloat16"},
            "score": {"queries": {"path": str(queries), "id_column": "qid", **mapping}, "top_k": 3},
            "ray": {"num_cpus": 2},
        }
    )
    artifacts.run_stage(job, "sketch", runner=lambda ctx: None)
    artifacts.run_stage(
        job, "fit", runner=lambda ctx: TextEncoder(tiny_encoder_dir, MAX_LEN).save(os.path.join(ctx.out_dir, "encoder"))
    )
    m = artifacts.run_stage(job, "encode")
    precision = m["precision"]
    assert precision["requested"] == "bfloat16" and precision["wanted"] == "bfloat16"
    agreement = precision["agreement"]
    assert agreement["rows"] == 72 and agreement["queries"] == 8  # 80 rows: 8 queries, 72 scored
    assert precision["dtype"] == ("bfloat16" if agreement["passed"] else "float32")
    assert precision["fell_back"] == (not agreement["passed"])
    ledger = Ledger(job.lancedb_uri, job.encode.table)
    ledger.files = json.loads(Path(ledger.path).read_text())["files"]
    assert {e["precision"] for e in ledger.files.values()} == {precision["dtype"]}

    s = artifacts.run_stage(job, "score")
    assert s["query_precision"] == precision["dtype"]  # codes and queries in one precision
