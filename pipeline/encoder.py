"""The student bi-encoder: one shared transformer, masked mean pooling, L2-normalised embeddings.

Pure torch/transformers (no Ray). The same class embeds anchors/queries (with the anchor prefix)
and corpus rows, so both sides always share weights. The exported folder is a standard Hugging
Face model plus the sentence-transformers module files (Transformer -> mean Pooling -> Normalize),
so `AutoModel.from_pretrained` and `SentenceTransformer` both load it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from pipeline.models import model_fingerprint


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states that are not padding (pad states never leak into the mean)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


@dataclass
class EmbedStats:
    texts: int = 0
    truncated: int = 0  # texts longer than max_len (their tail is not seen by the encoder)


class TextEncoder(torch.nn.Module):
    """Wraps an AutoModel + tokenizer; `forward` returns normalised embeddings with grad."""

    def __init__(self, model_dir: str, max_len: int = 256, trust_remote_code: bool = False,
                 device: str | torch.device = "cpu"):
        super().__init__()
        self.model_dir = model_dir
        self.max_len = max_len
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        self.model = AutoModel.from_pretrained(model_dir, trust_remote_code=trust_remote_code,
                                               dtype=torch.float32)
        self.device_ = torch.device(device)
        self.model.to(self.device_)
        self.stats = EmbedStats()

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def fingerprint(self) -> str:
        return model_fingerprint(self.model_dir)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_len,
                             return_tensors="pt", return_overflowing_tokens=False, return_length=False)
        return {k: v.to(self.device_) for k, v in enc.items()}

    def count_truncated(self, texts: list[str]) -> int:
        lengths = self.tokenizer(texts, truncation=False, add_special_tokens=True, return_length=True)["length"]
        return int(sum(1 for n in lengths if n > self.max_len))

    def forward(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenize(texts)
        out = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                         **({"token_type_ids": enc["token_type_ids"]} if "token_type_ids" in enc else {}))
        pooled = mean_pool(out.last_hidden_state, enc["attention_mask"])
        return F.normalize(pooled.float(), dim=-1)

    @torch.inference_mode()
    def embed(self, texts: list[str], batch_size: int = 64, count_truncation: bool = False) -> np.ndarray:
        """float32 [n, dim] unit-norm embeddings; batches sorted by length to limit padding."""
        was_training = self.model.training
        self.model.eval()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        autocast = (self.device_.type == "cuda" and torch.cuda.is_bf16_supported())
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            chunk = [texts[i] for i in idx]
            with torch.autocast(self.device_.type, dtype=torch.bfloat16, enabled=autocast):
                emb = self.forward(chunk)
            out[idx] = emb.float().cpu().numpy()
        self.stats.texts += len(texts)
        if count_truncation:
            self.stats.truncated += self.count_truncated(texts)
        self.model.train(was_training)
        return out

    def save(self, out_dir: str) -> None:
        """Export a folder that AutoModel and SentenceTransformer both load (safetensors only)."""
        os.makedirs(out_dir, exist_ok=True)
        self.model.save_pretrained(out_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(out_dir)
        dim = self.dim
        os.makedirs(os.path.join(out_dir, "1_Pooling"), exist_ok=True)
        with open(os.path.join(out_dir, "1_Pooling", "config.json"), "w") as f:
            json.dump({"word_embedding_dimension": dim, "pooling_mode_cls_token": False,
                       "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
                       "pooling_mode_mean_sqrt_len_tokens": False}, f, indent=2)
        with open(os.path.join(out_dir, "modules.json"), "w") as f:
            json.dump([
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
            ], f, indent=2)
        os.makedirs(os.path.join(out_dir, "2_Normalize"), exist_ok=True)
        with open(os.path.join(out_dir, "sentence_bert_config.json"), "w") as f:
            json.dump({"max_seq_length": self.max_len, "do_lower_case": False}, f, indent=2)
        # Drop pickle-based leftovers a source folder may carry: artifacts are safetensors only.
        for name in ("pytorch_model.bin", "training_args.bin"):
            path = os.path.join(out_dir, name)
            if os.path.exists(path):
                os.remove(path)
