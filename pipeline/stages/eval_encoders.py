"""Eval's encoder methods (influcoder, the untrained encoder as its users run it, its prefixed
variant), each pass of one model over one list of inputs computed once per eval.

A blended influcoder export scores with [sqrt(1 - b) distilled, sqrt(b) plain] (`encoder.blend_codes`),
and its plain half is the starting encoder that the untrained baselines run. When the two hold the
same weights, the blend is embedded as its distilled half beside the starting encoder's passes, and
those passes serve the baselines too wherever their inputs are the same: with `encoder.anchor_prefix`
set, the corpus rows and held-out pool rows were embedded three times by the same plain model before.
(In the demo nothing is shared: the baselines read the raw texts, the blend the pair views.) Each
pass is timed when it runs, after a warm-up, so a method's cost per row is the sum of its own passes
over the first pair's rows, whichever method ran them first; eval makes that pair a sample of the
corpus rows that times like all of them (`timing_sample`, on the method's own token counts).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from pipeline.encoder import EncoderInput, TextEncoder, blend_codes

Pair = tuple[Sequence[EncoderInput], Sequence[EncoderInput]]

PASS_BATCH = 32
"""Rows per forward pass of eval's encoder passes (after sorting by length)."""
TIMED_ROWS = 128
"""Corpus rows every encoder method is timed on: the same rows for every method (`timing_sample`)."""


def timing_sample(lengths: Sequence[int], size: int = TIMED_ROWS, batch: int = PASS_BATCH) -> np.ndarray:
    """Sorted positions of about `size` of the rows (all of them when there are no more): whole passes
    of `batch` rows of the rows sorted by their token `lengths`, spread evenly over the lengths.

    A row's cost grows with its length and with the padding of its pass. A random sample of this size
    misses both: on the demo's rows a seeded draw timed 30 % above the whole set (longer rows by chance,
    and passes cut from fewer rows pad more); rows spread over the lengths but re-batched still timed
    ~10 % above it. Whole passes of the token-sorted rows keep each pass's padding as in the full set
    (measured on the demo's rows: within ~2 % of timing every row)."""
    n = len(lengths)
    if n <= size:
        return np.arange(n)
    by_length = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")
    passes = [by_length[i : i + batch] for i in range(0, n - batch + 1, batch)]  # whole passes only
    k = min(len(passes), max(1, size // batch))
    chosen = np.floor((np.arange(k) + 0.5) * len(passes) / k).astype(np.int64)
    return np.sort(np.concatenate([passes[i] for i in chosen]))


@dataclass
class MethodEmbeddings:
    pairs: list[tuple[np.ndarray, np.ndarray]]
    """(queries, rows) embeddings per input pair, in input order."""
    ms_per_row: float
    """ms per row of the first pair's rows (model loading and warm-up excluded)."""
    load_s: float
    """Seconds to load the method's model (both halves of a blend)."""
    dim: int
    """Code width."""


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class EncoderPasses:
    """Loads each encoder once and runs each (model, inputs) pass once, in `dtype` (encode's precision)."""

    def __init__(self, max_len: int, trust_remote_code: bool, dtype: str, threads: int):
        torch.set_num_threads(threads)
        self.max_len, self.trust_remote_code, self.dtype = max_len, trust_remote_code, dtype
        self._encoders: dict[str, TextEncoder] = {}
        self._loaded: dict[str, tuple[float, int, Optional[tuple[float, torch.nn.Module]]]] = {}
        self._passes: dict[tuple[str, tuple], tuple[np.ndarray, float]] = {}
        self._split: dict[str, bool] = {}  # blended exports embedded as distilled half + plain_dir's passes
        self.passes_run = 0

    def _load(self, model_dir: str) -> TextEncoder:
        if model_dir not in self._encoders:
            t0 = time.perf_counter()
            enc = TextEncoder(
                model_dir, max_len=self.max_len, trust_remote_code=self.trust_remote_code, dtype=self.dtype
            )
            blend = (enc.blend_weight, enc.plain_model) if enc.plain_model is not None else None
            self._loaded[model_dir] = (time.perf_counter() - t0, enc.dim, blend)
            enc.embed(["warm-up"] * 2, batch_size=2)  # first-call kernels and allocations are not per-row cost
            self._encoders[model_dir] = enc
        return self._encoders[model_dir]

    def token_lengths(self, model_dir: str, inputs: Sequence[EncoderInput]) -> list[int]:
        """Tokens per input as the encoder in `model_dir` cuts them (what its passes sort and pad by)."""
        features, _ = self._load(model_dir).features(list(inputs))
        return [len(ids) for ids in features["input_ids"]]

    def _pass(self, model_dir: str, inputs: Sequence[EncoderInput]) -> tuple[np.ndarray, float]:
        key = (model_dir, tuple(inputs))
        if key not in self._passes:
            t0 = time.perf_counter()
            out = self._encoders[model_dir].embed(list(inputs), batch_size=PASS_BATCH)
            self._passes[key] = (out, time.perf_counter() - t0)
            self.passes_run += 1
        return self._passes[key]

    def method(self, model_dir: str, pairs: list[Pair], plain_dir: Optional[str] = None) -> MethodEmbeddings:
        """The encoder in `model_dir` on every (queries, rows) pair of inputs. A blended export whose
        plain half has the weights of `plain_dir` (the starting encoder) takes its plain passes from
        `plain_dir`'s, shared with the methods that run that encoder; otherwise it runs as one model."""
        enc = self._load(model_dir)
        load_s, dim, blend = self._loaded[model_dir]
        if model_dir not in self._split:  # decided once: the passes cached under model_dir are of one kind
            self._split[model_dir] = (
                blend is not None and plain_dir is not None and same_weights(blend[1], self._load(plain_dir).model)
            )
            if self._split[model_dir]:
                enc.drop_blend()  # its distilled half alone; the plain half's passes come from plain_dir
        shared = self._split[model_dir]
        out, ms = [], float("nan")
        for i, (query_inputs, row_inputs) in enumerate(pairs):
            q, _ = self._pass(model_dir, query_inputs)
            rows, rows_s = self._pass(model_dir, row_inputs)
            if shared:
                weight = blend[0]
                plain_q, _ = self._pass(plain_dir, query_inputs)
                plain_rows, plain_s = self._pass(plain_dir, row_inputs)
                q = _blend(q, plain_q, weight)
                rows, rows_s = _blend(rows, plain_rows, weight), rows_s + plain_s
            if i == 0:
                ms = 1000 * rows_s / max(len(row_inputs), 1)
            out.append((q, rows))
        return MethodEmbeddings(out, ms, load_s, dim)


def _blend(distilled: np.ndarray, plain: np.ndarray, weight: float) -> np.ndarray:
    return blend_codes(torch.from_numpy(distilled), torch.from_numpy(plain), weight).numpy()
