"""The student bi-encoder: one shared transformer, masked mean pooling, L2-normalised embeddings.

Pure torch/transformers (no Ray). The same class embeds anchors/queries (with the anchor prefix)
and corpus rows, so both sides always share weights. The exported folder is a standard Hugging
Face model plus the sentence-transformers module files (Transformer -> mean Pooling -> Normalize),
so `AutoModel.from_pretrained` and `SentenceTransformer` both load it.

What the encoder sees of a row (its view, `pipeline.textview`) follows what the teacher's loss sees.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from pipeline.models import model_fingerprint
from pipeline.textview import EncoderInput, PairView, text_views, tokenize_views, view_text  # noqa: F401


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states that are not padding (pad states never leak into the mean)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


class TextEncoder(torch.nn.Module):
    """Wraps an AutoModel + tokenizer; `forward` returns normalised embeddings with grad."""

    def __init__(
        self, model_dir: str, max_len: int = 256, trust_remote_code: bool = False, device: str | torch.device = "cpu"
    ):
        super().__init__()
        self.model_dir = model_dir
        self.max_len = max_len
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        self.model = AutoModel.from_pretrained(model_dir, trust_remote_code=trust_remote_code, dtype=torch.float32)
        self.device_ = torch.device(device)
        self.model.to(self.device_)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def fingerprint(self) -> str:
        return model_fingerprint(self.model_dir)

    def tokenize(self, texts: Sequence[EncoderInput]) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        """Model inputs (padded, cut at max_len) and, per text, whether it was longer than max_len.

        Plain strings take one batched tokenizer call that cuts their tails. A fast tokenizer
        tokenises the whole text before cutting it, and `return_overflowing_tokens` says which
        texts had a tail (as extra rows, dropped here): one pass, where a second, untruncated pass
        just to count cut texts cost ~10 % of encode time at max_len 16 on CPU. Pair views go
        through `tokenize_views` (response kept, prompt cut from the left).
        """
        if any(not isinstance(t, str) for t in texts):
            ids, cut = tokenize_views(self.tokenizer, texts, self.max_len)
            enc = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
            return {k: v.to(self.device_) for k, v in enc.items()}, cut
        texts = list(texts)
        kwargs = dict(padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
        if not self.tokenizer.is_fast:  # slow tokenizers have no overflow mapping: count separately
            lengths = self.tokenizer(texts, truncation=False, return_length=True, verbose=False)["length"]
            enc = self.tokenizer(texts, **kwargs)
            return {k: v.to(self.device_) for k, v in enc.items()}, np.asarray(lengths) > self.max_len
        enc = self.tokenizer(texts, return_overflowing_tokens=True, stride=0, **kwargs)
        owner = enc.pop("overflow_to_sample_mapping")
        enc.pop("overflowing_tokens", None)
        rows_per_text = torch.bincount(owner, minlength=len(texts))
        first_row = torch.cumsum(rows_per_text, 0) - rows_per_text  # a text's rows are contiguous
        return ({k: v[first_row].to(self.device_) for k, v in enc.items()}, (rows_per_text > 1).numpy())

    def forward(self, texts: Sequence[EncoderInput]) -> torch.Tensor:
        return self._forward_tokens(self.tokenize(texts)[0])

    def _forward_tokens(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            **({"token_type_ids": enc["token_type_ids"]} if "token_type_ids" in enc else {}),
        )
        pooled = mean_pool(out.last_hidden_state, enc["attention_mask"])
        return F.normalize(pooled.float(), dim=-1)

    @torch.inference_mode()
    def embed(self, texts: Sequence[EncoderInput], batch_size: int = 64, return_truncated: bool = False):
        """float32 [n, dim] unit-norm embeddings; batches sorted by length to limit padding.

        With `return_truncated`, also a bool [n] array: which texts were longer than max_len.
        """
        was_training = self.model.training
        self.model.eval()
        order = sorted(range(len(texts)), key=lambda i: len(view_text(texts[i])))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        truncated = np.zeros(len(texts), bool)
        autocast = self.device_.type == "cuda" and torch.cuda.is_bf16_supported()
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc, cut = self.tokenize([texts[i] for i in idx])
            with torch.autocast(self.device_.type, dtype=torch.bfloat16, enabled=autocast):
                emb = self._forward_tokens(enc)
            out[idx] = emb.float().cpu().numpy()
            truncated[idx] = cut
        self.model.train(was_training)
        return (out, truncated) if return_truncated else out

    def save(self, out_dir: str) -> None:
        """Export a folder that AutoModel and SentenceTransformer both load (safetensors only)."""
        os.makedirs(out_dir, exist_ok=True)
        self.model.save_pretrained(out_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(out_dir)
        dim = self.dim
        os.makedirs(os.path.join(out_dir, "1_Pooling"), exist_ok=True)
        with open(os.path.join(out_dir, "1_Pooling", "config.json"), "w") as f:
            json.dump(
                {
                    "word_embedding_dimension": dim,
                    "pooling_mode_cls_token": False,
                    "pooling_mode_mean_tokens": True,
                    "pooling_mode_max_tokens": False,
                    "pooling_mode_mean_sqrt_len_tokens": False,
                },
                f,
                indent=2,
            )
        with open(os.path.join(out_dir, "modules.json"), "w") as f:
            json.dump(
                [
                    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
                ],
                f,
                indent=2,
            )
        os.makedirs(os.path.join(out_dir, "2_Normalize"), exist_ok=True)
        with open(os.path.join(out_dir, "sentence_bert_config.json"), "w") as f:
            json.dump({"max_seq_length": self.max_len, "do_lower_case": False}, f, indent=2)
        # Drop pickle-based leftovers a source folder may carry: artifacts are safetensors only.
        for name in ("pytorch_model.bin", "training_args.bin"):
            path = os.path.join(out_dir, name)
            if os.path.exists(path):
                os.remove(path)
