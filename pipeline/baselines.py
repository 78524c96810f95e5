"""Cheap baselines scored on exactly the rows and queries the other methods see. No Ray.

- BM25 (the maintained `bm25s` package, English stop-words), as in DATE-LM.
- Random: seeded uniform scores, the floor every method must beat.
Each returns a [n_queries, n_rows] score matrix plus its measured costs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np


@dataclass
class BaselineScores:
    scores: np.ndarray  # [n_queries, n_rows]
    setup_s: float  # one-time cost (index build)
    seconds: float  # total time to score every row against every query, setup excluded
    bytes_per_sample: float  # what is stored per corpus row


def bm25_scores(queries: list[str], rows: list[str]) -> BaselineScores:
    import bm25s

    # bm25s sets its logger to DEBUG on import ("Building index from IDs objects" per index): keep it
    # to warnings unless influcoder itself logs at debug (-v).
    if not logging.getLogger("influcoder").isEnabledFor(logging.DEBUG):
        logging.getLogger("bm25s").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    tokens = bm25s.tokenize(rows, stopwords="en", show_progress=False)
    index = bm25s.BM25()
    index.index(tokens, show_progress=False)
    setup = time.perf_counter() - t0
    t1 = time.perf_counter()
    query_tokens = bm25s.tokenize(queries, stopwords="en", show_progress=False, return_ids=False)
    out = np.zeros((len(queries), len(rows)), dtype=np.float32)
    for i, q in enumerate(query_tokens):
        if q:  # a query made only of stop-words matches nothing
            out[i] = index.get_scores(q)
    seconds = time.perf_counter() - t1
    # The index is a sparse matrix (data, indices, indptr) plus the vocabulary.
    stored = sum(np.asarray(v).nbytes for v in index.scores.values() if hasattr(v, "nbytes"))
    stored += sum(len(w) for w in index.vocab_dict) if getattr(index, "vocab_dict", None) else 0
    return BaselineScores(out, setup, seconds, stored / max(len(rows), 1))


def random_scores(n_queries: int, n_rows: int, seed: int) -> BaselineScores:
    t0 = time.perf_counter()
    out = np.random.default_rng(seed).random((n_queries, n_rows), dtype=np.float32)
    return BaselineScores(out, 0.0, time.perf_counter() - t0, 0.0)
