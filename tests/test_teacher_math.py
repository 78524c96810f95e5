"""Teacher maths: CountSketch, exact batched per-sample LoRA gradients, example building, fidelity.

Everything runs offline on the CPU: a tiny random Llama with a byte-level BPE tokenizer trained
on the spot, plus one check on the packaged SmolLM2 teacher (marked slow).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_models import LLAMA, randomise_lora_b  # noqa: E402

from pipeline.config import TeacherConfig  # noqa: E402
from pipeline.gradients import collate, hf_loss, per_sample_loss, reference_per_sample_grads  # noqa: E402
from pipeline.sketching import CountSketch, l2_normalize  # noqa: E402
from pipeline.teacher import TeacherSketcher, build_example, fidelity_report  # noqa: E402

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine",
    "question: what is two plus two? answer: four",
    "all that glitters is not gold",
    "to be or not to be, that is the question",
    "the rain in spain stays mainly in the plain",
    "numbers 0123456789 and symbols !?.,;:()",
    "Natalia sold clips to 48 of her friends in April",
] * 20

PROMPTS = [
    "Q: what is two plus two?\nA:",
    "Tell me a story about a fox.",
    "hi",
    "Translate to French: the cat sleeps on the mat, and the dog barks at the moon all night long.",
    "Summarise: " + "the rain in spain " * 6,
    "Name a colour.",
]
RESPONSES = [
    " four",
    " Once upon a time a quick brown fox jumped over a lazy dog.",
    " hello there",
    " le chat dort",
    " It rains in Spain.",
    " blue",
]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random LlamaForCausalLM + byte-level BPE tokenizer saved as a local model folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        **{**LLAMA, "max_position_embeddings": 256, "tie_word_embeddings": False},
        vocab_size=512,
        pad_token_id=fast.pad_token_id,
        eos_token_id=fast.eos_token_id,
        bos_token_id=None,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    return str(out)


def make_teacher(
    model_dir: str, *, proj_dim: int = 256, lora_seed: int = 0, proj_seed: int = 42, rank: int = 4, max_len: int = 64
) -> TeacherSketcher:
    cfg = TeacherConfig(model=model_dir, max_len=max_len, lora_rank=rank, dtype="float32")
    return TeacherSketcher(cfg, proj_dim=proj_dim, proj_seed=proj_seed, lora_seed=lora_seed)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


@pytest.fixture(scope="module")
def tiny_teacher(tiny_model_dir: str) -> TeacherSketcher:
    teacher = make_teacher(tiny_model_dir, proj_dim=4096)
    randomise_lora_b(teacher)
    return teacher


# --------------------------------------------------------------------------- (a) exact grads


def test_batched_per_sample_grads_equal_autograd_reference(tiny_teacher: TeacherSketcher) -> None:
    exs = [build_example(tiny_teacher.tokenizer, p, r, 64)[0] for p, r in zip(PROMPTS, RESPONSES)]
    assert len({len(e.input_ids) for e in exs}) > 3  # genuinely mixed lengths -> real padding
    batch = collate([e.input_ids for e in exs], [e.labels for e in exs], tiny_teacher.pad_id)
    batched, stats = tiny_teacher.engine.exact(batch)
    ref = reference_per_sample_grads(tiny_teacher.model, [(e.input_ids, e.labels) for e in exs])
    assert batched.shape == ref.shape == (len(exs), tiny_teacher.num_params)
    torch.testing.assert_close(batched, ref, rtol=1e-4, atol=1e-6)
    # lora_A blocks are non-zero because B was randomised (the hooks cover both factors).
    a_cols = torch.cat(
        [torch.arange(s.offset, s.offset + s.numel) for s in tiny_teacher.engine.segments if "lora_A" in s.name]
    )
    assert ref[:, a_cols].abs().max() > 1e-4
    torch.testing.assert_close(stats.sq_norm, ref.square().sum(1), rtol=1e-4, atol=1e-8)


def test_loss_matches_hf_response_mean_ce(tiny_teacher: TeacherSketcher) -> None:
    ex, _ = build_example(tiny_teacher.tokenizer, PROMPTS[1], RESPONSES[1], 64)
    batch = collate([ex.input_ids], [ex.labels], tiny_teacher.pad_id)
    with torch.no_grad():
        want = hf_loss(tiny_teacher.model, ex.input_ids, ex.labels)
        for mode in ("gather", "full"):
            got, counts = per_sample_loss(tiny_teacher.model, batch, mode)
            assert math.isclose(float(got[0]), float(want), rel_tol=1e-5)
            assert int(counts[0]) == ex.loss_tokens == len([y for y in ex.labels if y != -100])
    assert tiny_teacher.engine.logits_mode == "gather"


# --------------------------------------------------------------------------- (b) batching invariance


def test_sketch_independent_of_batch_size(tiny_teacher: TeacherSketcher) -> None:
    one = tiny_teacher.sketch(PROMPTS, RESPONSES, batch_size=1)
    assert one.ok_index.tolist() == list(range(len(PROMPTS))) and not one.rejects
    np.testing.assert_allclose(np.linalg.norm(one.sketches, axis=1), 1.0, rtol=1e-5)
    for bs in (3, 8):
        other = tiny_teacher.sketch(PROMPTS, RESPONSES, batch_size=bs)
        assert other.ok_index.tolist() == one.ok_index.tolist()
        assert cosines(one.sketches, other.sketches).min() >= 0.9999
        assert (other.tokens, other.loss_tokens) == (one.tokens, one.loss_tokens)


def test_sketch_equals_countsketch_of_reference_grads(tiny_teacher: TeacherSketcher) -> None:
    res = tiny_teacher.sketch(PROMPTS, RESPONSES, batch_size=6)
    ref = torch.from_numpy(tiny_teacher.exact_gradients(PROMPTS, RESPONSES))
    want = l2_normalize(tiny_teacher.sketcher.project(ref)).numpy()
    assert cosines(res.sketches, want).min() >= 0.9999
    np.testing.assert_allclose(res.grad_norms, ref.norm(dim=1).numpy(), rtol=1e-4)


def test_rejects_keep_input_order(tiny_teacher: TeacherSketcher) -> None:
    prompts = ["a", "b", "c", "d"]
    responses = [" yes", "   ", None, " no"]
    res = tiny_teacher.sketch(prompts, responses, batch_size=2)
    assert res.ok_index.tolist() == [0, 3]
    assert res.rejects == [(1, "empty_response"), (2, "missing_response")]
    assert res.sketches.shape == (2, tiny_teacher.proj_dim)


# --------------------------------------------------------------------------- (c, d) CountSketch


def test_countsketch_matches_dense_and_segments() -> None:
    cs = CountSketch(num_params=1000, proj_dim=64, seed=42)
    g = torch.randn(5, 1000, dtype=torch.float64)
    dense = cs.dense_matrix().double()
    torch.testing.assert_close(cs.project(g).double(), g @ dense.T, rtol=1e-5, atol=1e-5)
    acc = cs.new_accumulator(5)
    for lo, hi in [(700, 1000), (0, 123), (123, 700)]:  # any block order: the sketch is linear
        cs.project_segment(acc, lo, g[:, lo:hi])
    torch.testing.assert_close(acc, cs.project(g), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cs.project(g[0]), cs.project(g)[0])


def test_countsketch_seed_determinism() -> None:
    a, b, c = CountSketch(5000, 128, 42), CountSketch(5000, 128, 42), CountSketch(5000, 128, 43)
    assert torch.equal(a.buckets, b.buckets) and torch.equal(a.signs, b.signs)
    assert not torch.equal(a.buckets, c.buckets) and not torch.equal(a.signs, c.signs)
    # Buckets are drawn first, then signs, from one CPU generator.
    gen = torch.Generator().manual_seed(42)
    assert torch.equal(a.buckets, torch.randint(0, 128, (5000,), generator=gen))
    assert torch.equal(a.signs, (torch.randint(0, 2, (5000,), generator=gen) * 2 - 1).float())


def test_countsketch_preserves_inner_products() -> None:
    gen = torch.Generator().manual_seed(0)
    p, d, n = 200_000, 4096, 12
    base = torch.randn(1, p, generator=gen)
    x = base + torch.randn(n, p, generator=gen) * torch.linspace(0.3, 3.0, n)[:, None]  # varied cosines
    exact = l2_normalize(x) @ l2_normalize(x).T
    sk = l2_normalize(CountSketch(p, d, seed=7).project(x))
    est = sk @ sk.T
    # CountSketch inner products of unit vectors have std <= sqrt(2/d) ~ 0.022; 0.12 is > 5 sigma.
    assert (est - exact).abs().max() < 0.12
    assert (est - exact).abs().mean() < 0.03


# --------------------------------------------------------------------------- (e) examples


def test_build_example_truncation(tiny_teacher: TeacherSketcher) -> None:
    tok = tiny_teacher.tokenizer
    max_len = 32
    response = " the quick brown fox"
    resp_ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    huge_prompt = "start " + "all that glitters is not gold " * 200 + "THE END"
    ex, reason = build_example(tok, huge_prompt, response, max_len)
    assert reason is None and ex is not None
    assert len(ex.input_ids) == max_len and ex.prompt_truncated and not ex.response_truncated
    assert ex.input_ids[-len(resp_ids) :] == resp_ids  # response intact, EOS last
    assert [y for y in ex.labels if y != -100] == resp_ids
    prompt_ids = tok(huge_prompt, add_special_tokens=False)["input_ids"]
    assert ex.input_ids[: max_len - len(resp_ids)] == prompt_ids[-(max_len - len(resp_ids)) :]  # keeps the tail

    long_resp = " all that glitters is not gold" * 40
    ex2, _ = build_example(tok, huge_prompt, long_resp, max_len)
    assert ex2.response_truncated and sum(y != -100 for y in ex2.labels) == max_len // 2
    assert len(ex2.input_ids) == max_len

    ex3, _ = build_example(tok, "short", response, max_len)
    assert not ex3.prompt_truncated and ex3.input_ids == tok("short", add_special_tokens=False)["input_ids"] + resp_ids

    for bad in ("", "   \n\t"):
        assert build_example(tok, "prompt", bad, max_len) == (None, "empty_response")
    assert build_example(tok, "prompt", None, max_len) == (None, "missing_response")


# --------------------------------------------------------------------------- (f) LoRA seed


def test_lora_seed_determinism(tiny_model_dir: str) -> None:
    def adapter(t: TeacherSketcher) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for n, p in t.model.named_parameters() if "lora_A" in n])

    a, b, c = (make_teacher(tiny_model_dir, lora_seed=s) for s in (0, 0, 1))
    assert torch.equal(adapter(a), adapter(b)) and not torch.equal(adapter(a), adapter(c))
    sa, sb, sc = (t.sketch(PROMPTS[:3], RESPONSES[:3], batch_size=3).sketches for t in (a, b, c))
    np.testing.assert_array_equal(sa, sb)
    assert cosines(sa, sc).min() < 0.99
    assert a.fingerprint() == b.fingerprint() and a.fingerprint()["lora_seed"] != c.fingerprint()["lora_seed"]


# --------------------------------------------------------------------------- (g) fidelity


def test_fidelity_report(tiny_teacher: TeacherSketcher) -> None:
    exact = tiny_teacher.exact_gradients(PROMPTS, RESPONSES)
    sketches = tiny_teacher.sketch(PROMPTS, RESPONSES, batch_size=6).sketches
    rep = fidelity_report(exact, sketches)
    assert rep["samples"] == len(PROMPTS)
    assert rep["max_abs_err"] < 0.15 and rep["mean_abs_err"] < 0.05 and rep["spearman"] > 0.9
    perfect = fidelity_report(exact, exact)
    assert perfect["max_abs_err"] < 1e-9 and perfect["spearman"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- (h) real teacher


@pytest.mark.slow
def test_real_smollm2_teacher_batched_equals_single() -> None:
    """On the real teacher (the offline wheel `make install` installs: missing, this test fails)."""
    cfg = TeacherConfig(model="smollm2-135m-instruct", max_len=64, lora_rank=8, dtype="float32")
    teacher = TeacherSketcher(cfg, proj_dim=8192, proj_seed=42, lora_seed=0)
    prompts = [
        "<|user|>\nWhat is 2+3?\n<|assistant|>\n",
        "<|user|>\nName a fruit.\n<|assistant|>\n",
        "Q: Is the sky blue on a clear day?\nA:",
    ]
    responses = ["2+3 = 5.", "Apple.", " Yes, because of Rayleigh scattering."]
    assert teacher.engine.logits_mode == "gather"
    batched = teacher.sketch(prompts, responses, batch_size=3)
    single = teacher.sketch(prompts, responses, batch_size=1)
    assert batched.ok_index.tolist() == [0, 1, 2]
    assert cosines(batched.sketches, single.sketches).min() >= 0.9999
