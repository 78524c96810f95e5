"""Global ranks of a score stream that may not fit in memory: sorted runs + one k-way merge.

The scorer produces (id, score, score_max) in corpus-scan order. `RunSpiller` buffers up to
`run_rows` of them, sorts the buffer (score desc, id asc) and spills it as one Parquet *run*.
`merge_runs` then streams all runs at once, `chunk_rows` rows of each in memory, and emits rows in
global order with rank = 1, 2, ... (ties broken by id, so ranks are unique and deterministic).

Memory: run_rows rows while scoring; runs x chunk_rows rows while merging (chunk_rows shrinks as
the number of runs grows, see `merge_runs`). At demo scale there is a single run and the merge is a
streamed copy.

The merge step is vectorised (pyarrow kernels, no per-row Python): with one buffered chunk per
run, let B be the earliest of the runs' *last buffered* keys among runs not yet exhausted. Every
buffered row that sorts at or before B is final (each run is sorted, so all its unseen rows sort
after its last buffered key, hence after B), so those rows are sorted together and emitted. The
run that defined B is emptied each step, so every step makes progress.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.schema import ID, RANK, SCORE

SORT_KEYS = [(SCORE, "descending"), (ID, "ascending")]


def rows_for_fraction(fraction: float, n: int) -> int:
    """ceil(fraction * n) on the decimal the user wrote: in binary floating point 0.07 * 100 is
    7.000000000000001, whose ceiling selected one row too many."""
    return math.ceil(Fraction(repr(float(fraction))) * n)


DEFAULT_RUN_ROWS = 4_000_000  # ~100 MB of (id, score, score_max) for typical ids
MERGE_BUDGET_ROWS = 4_000_000  # rows buffered across all runs during the merge


def sort_run(table: pa.Table) -> pa.Table:
    return table.sort_by(SORT_KEYS)


class RunSpiller:
    """Accumulates score rows and spills sorted runs `run-00000.parquet`, ... into `run_dir` (a local
    folder or a URI: workers that score on other nodes spill where the merging driver can read)."""

    def __init__(self, run_dir: str, run_rows: int = DEFAULT_RUN_ROWS):
        self.run_dir = run_dir
        self.run_rows = run_rows
        self.paths: list[str] = []
        self.rows = 0
        self._buf: list[pa.Table] = []
        self._buf_rows = 0
        storage.makedirs(run_dir)

    def add(self, table: pa.Table) -> None:
        self._buf.append(table)
        self._buf_rows += table.num_rows
        self.rows += table.num_rows
        if self._buf_rows >= self.run_rows:
            self.flush()

    def flush(self) -> None:
        if not self._buf_rows:
            return
        run = sort_run(pa.concat_tables(self._buf).combine_chunks())
        path = storage.join(self.run_dir, f"run-{len(self.paths):05d}.parquet")
        fs, p = storage.filesystem(path)
        pq.write_table(run, p, filesystem=fs)
        self.paths.append(path)
        self._buf, self._buf_rows = [], 0


def _precedes_or_equal(table: pa.Table, score: pa.Scalar, ident: pa.Scalar) -> pa.ChunkedArray:
    """Mask of rows that sort at or before the key (score, id) in (score desc, id asc) order."""
    s, i = table.column(SCORE), table.column(ID)
    return pc.or_(pc.greater(s, score), pc.and_(pc.equal(s, score), pc.less_equal(i, ident)))


def merge_runs(paths: list[str], chunk_rows: Optional[int] = None) -> Iterator[pa.Table]:
    """Yield the rows of all sorted runs in global order, with a `rank` column (1 = best)."""
    if not paths:
        return
    chunk_rows = chunk_rows or max(1024, min(65536, MERGE_BUDGET_ROWS // len(paths)))
    readers = [_open_run(p).iter_batches(batch_size=chunk_rows) for p in paths]
    bufs: list[Optional[pa.Table]] = [None] * len(paths)  # None: run exhausted
    next_rank = 1

    def refill(j: int) -> None:
        while bufs[j] is None or bufs[j].num_rows == 0:
            try:
                bufs[j] = pa.Table.from_batches([next(readers[j])])
            except StopIteration:
                bufs[j] = None
                return

    for j in range(len(paths)):
        refill(j)
    while True:
        live = [j for j in range(len(paths)) if bufs[j] is not None]
        if not live:
            return
        # The earliest last-key among live runs bounds what is final (see the module docstring).
        lasts = pa.table(
            {
                SCORE: [bufs[j].column(SCORE)[-1].as_py() for j in live],
                ID: [bufs[j].column(ID)[-1].as_py() for j in live],
                "_j": live,
            },
            schema=pa.schema(
                [bufs[live[0]].schema.field(SCORE), bufs[live[0]].schema.field(ID), pa.field("_j", pa.int64())]
            ),
        ).sort_by(SORT_KEYS)
        b_score, b_id, b_run = lasts.column(SCORE)[0], lasts.column(ID)[0], lasts.column("_j")[0].as_py()
        out = []
        for j in range(len(paths)):
            if bufs[j] is None:
                continue
            if j == b_run:
                out.append(bufs[j])
                bufs[j] = None
                continue
            mask = _precedes_or_equal(bufs[j], b_score, b_id)
            n_take = pc.sum(mask).as_py() or 0
            if n_take:
                # Runs are sorted, so the rows that qualify are a prefix of the buffer.
                out.append(bufs[j].slice(0, n_take))
                bufs[j] = bufs[j].slice(n_take)
        refill(b_run)
        for j in range(len(paths)):
            if bufs[j] is not None and bufs[j].num_rows == 0:
                bufs[j] = None
                refill(j)
        chunk = sort_run(pa.concat_tables(out)) if len(out) > 1 else out[0]
        yield _with_ranks(chunk, next_rank)
        next_rank += chunk.num_rows


def _open_run(path: str) -> pq.ParquetFile:
    fs, p = storage.filesystem(path)
    return pq.ParquetFile(fs.open_input_file(p))


def _with_ranks(table: pa.Table, first: int) -> pa.Table:
    return table.append_column(RANK, pa.array(range(first, first + table.num_rows), pa.int64()))
