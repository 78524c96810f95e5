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

import logging
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from pipeline.batching import token_budget_batches
from pipeline.encoder import EncoderInput, TextEncoder, blend_codes
from pipeline.errors import InputDataError

log = logging.getLogger("influcoder.eval")

Pair = tuple[Sequence[EncoderInput], Sequence[EncoderInput]]

PASS_BATCH = 32
"""Rows per forward pass of eval's encoder passes (after sorting by length)."""
STORED_CODES_MIN_COSINE = 0.999
"""Below this cosine between a stored code and a fresh pass over the same row, eval warns (float16 and
int8 codes, and bf16 passes, stay above it)."""
TIMED_ROWS = 128
"""Corpus rows each encoder method is timed on (`timing_sample`, by the method's own token counts)."""


def timing_sample(lengths: Sequence[int], size: int = TIMED_ROWS, batch: int = PASS_BATCH) -> np.ndarray:
    """Sorted positions of about `size` of the rows (all of them when there are no more): whole passes
    of `batch` rows, as `TextEncoder.embed` cuts all the rows by their token `lengths`, spread evenly
    over the lengths.

    A row's cost grows with its length and with the padding of its pass. A random sample of this size
    misses both: on the demo's rows a seeded draw timed 30 % above the whole set (longer rows by chance,
    and passes cut from fewer rows pad more); rows spread over the lengths but re-batched still timed
    ~10 % above it. Whole passes of the token-sorted rows keep each pass's padding as in the full set
    (measured on the demo's rows: within ~2 % of timing every row)."""
    n = len(lengths)
    if n <= size:
        return np.arange(n)
    # The passes `TextEncoder.embed` makes of all the rows (longest first); a short last one is never taken.
    passes = [p for p in token_budget_batches(list(lengths), None, batch, section="eval") if len(p) == batch]
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

    def compute(self, model_dir: str) -> str:
        """How the encoder in `model_dir` embeds here (`TextEncoder.compute`)."""
        return self._load(model_dir).compute

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


@dataclass
class RowEmbeddings:
    """An encoder method's embeddings of eval's queries, corpus rows and held-out split."""

    queries: np.ndarray
    rows: np.ndarray
    """[rows, dim], in input order: the stored codes where given, a fresh pass elsewhere."""
    heldout: Optional[tuple[np.ndarray, np.ndarray]]
    """(held-out anchors, held-out pool); None where no held-out inputs were given."""
    ms_per_row: float
    """ms per row of the timed sample (`timing_sample`)."""
    load_s: float
    dim: int
    timed_rows: int
    stored_check: Optional[dict]
    """With stored codes: `stored_codes_check` of the timed rows."""


def embed_rows(
    passes: EncoderPasses,
    model_dir: str,
    queries: Sequence[EncoderInput],
    rows: Sequence[EncoderInput],
    heldout: Optional[Pair],
    plain_dir: Optional[str] = None,
    stored: Optional[tuple[np.ndarray, np.ndarray]] = None,
) -> RowEmbeddings:
    """The encoder in `model_dir` on eval's inputs (`heldout` None: not the held-out split), timed on
    `timing_sample` of `rows`. `stored`: (positions in `rows`, their float32 codes) read from the codes
    table, used for those rows instead of a fresh pass; the timed rows are embedded anyway, which
    checks the stored codes."""
    timed = timing_sample(passes.token_lengths(model_dir, rows))
    known, codes = stored if stored is not None else (np.zeros(0, np.int64), None)
    rest = np.setdiff1d(np.arange(len(rows)), np.union1d(timed, known))
    pairs = [(queries, [rows[i] for i in timed]), (queries, [rows[i] for i in rest])]
    emb = passes.method(model_dir, pairs + ([heldout] if heldout is not None else []), plain_dir=plain_dir)
    (q, timed_codes), (_, rest_codes) = emb.pairs[:2]
    held = emb.pairs[2] if heldout is not None else None
    out = np.empty((len(rows), emb.dim), np.float32)
    out[timed], out[rest] = timed_codes, rest_codes  # every row not in `known` is in one of the two
    check = None
    if codes is not None:
        if codes.shape[1] != emb.dim:
            raise InputDataError(
                f"eval: the codes table holds {codes.shape[1]}-dim codes, the fitted encoder gives {emb.dim}; "
                f"rerun `influcoder encode JOB.yaml --overwrite`."
            )
        check = stored_codes_check(out, known, codes, timed)
        out[known] = codes
    return RowEmbeddings(q, out, held, emb.ms_per_row, emb.load_s, emb.dim, len(timed), check)


def stored_codes_check(fresh: np.ndarray, known: np.ndarray, codes: np.ndarray, timed: np.ndarray) -> dict:
    """How the stored codes of the timed rows compare with a fresh pass over them (`fresh`, indexed like
    the rows): they differ by the codes' rounding (float16: ~1e-4 per component) unless the table is
    stale or corrupt. Only rows in both `known` and `timed` are read from `fresh`."""
    both, in_known, _ = np.intersect1d(known, timed, return_indices=True)
    out: dict = {"rows": int(len(known)), "embedded_here": int(len(fresh) - len(known)), "checked": 0}
    if len(both):
        a, b = fresh[both], codes[in_known]
        cos = (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        out.update(
            {"checked": int(len(both)), "max_abs_diff": float(np.abs(a - b).max()), "min_cosine": float(cos.min())}
        )
        if cos.min() < STORED_CODES_MIN_COSINE:
            log.warning(
                "eval: stored codes differ from a fresh pass of the same encoder (min cosine %.4f < %.3f over %d "
                "rows): the table may be stale; rerun `influcoder encode JOB.yaml --overwrite`.",
                cos.min(),
                STORED_CODES_MIN_COSINE,
                len(both),
            )
    return out
