"""Column names and Arrow schemas of every artifact, defined once.

Canonical rows (what `corpus.read_dataset` yields after column mapping):
    id        string   unique row id (id column, or derived from source file + row)
    prompt    string   teacher context (no loss); "" for text-only datasets
    response  string   teacher loss span
    text      string   encoder view (encoder_text column, else prompt + "\\n" + response)
    label     int64    optional label (null when the dataset has none)
    source    string   input file the row came from
    row       int64    row number within that file
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ID = "id"
PROMPT = "prompt"
RESPONSE = "response"
TEXT = "text"
LABEL = "label"
SOURCE = "source"
ROW = "row"
SPLIT = "split"
SKETCH = "sketch"
CODE = "code"
SCORE = "score"
SCORE_MAX = "score_max"
RANK = "rank"
QUERY_ID = "query_id"
REASON = "reason"
TEACHER_SCORE = "teacher_score"
RERANKED = "reranked"

CANONICAL = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(PROMPT, pa.string()),
        pa.field(RESPONSE, pa.string()),
        pa.field(TEXT, pa.string()),
        pa.field(LABEL, pa.int64()),
        pa.field(SOURCE, pa.string()),
        pa.field(ROW, pa.int64()),
    ]
)

REJECTS = pa.schema(
    [
        pa.field(SOURCE, pa.string()),
        pa.field(ROW, pa.int64()),
        pa.field(ID, pa.string()),
        pa.field(REASON, pa.string()),
    ]
)


def split_by_reason(table: pa.Table, reason_column: str) -> tuple[pa.Table, pa.Table]:
    """(rows whose `reason_column` is null, without that column; the others as REJECTS rows).

    Every stage routes its bad rows through here (corpus reads, encoder and teacher actors), so a
    rejects.parquet always has the REJECTS columns and types."""
    bad = pc.is_valid(table.column(reason_column))
    good = table.filter(pc.invert(bad)).drop_columns([reason_column])
    b = table.filter(bad)
    rejects = pa.table(
        [b.column(SOURCE), b.column(ROW), b.column(ID), b.column(reason_column)], names=REJECTS.names
    ).cast(REJECTS)
    return good, rejects


def sketch_schema(proj_dim: int) -> pa.Schema:
    """`sketch/anchors/*.parquet` and `sketch/pool/*.parquet`: the columns the contract names, all
    that a sketch artifact must have (`fit` reads these, and the texts below when present)."""
    return pa.schema(
        [
            pa.field(ID, pa.string(), nullable=False),
            pa.field(SPLIT, pa.string(), nullable=False),  # "train" | "eval"
            pa.field(SKETCH, pa.list_(pa.float32(), proj_dim), nullable=False),
        ]
    )


def sketch_matrix(column: pa.Array | pa.ChunkedArray, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A sketch column (fixed-size lists, nullable where the teacher rejected a row) as an
    ``[n, width]`` float32 matrix with zero rows where null, and the valid-row mask.
    ``width`` defaults to the column's list size; every reader of sketches goes through here."""
    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = col.type.list_size if width is None else width
    ok = np.asarray(col.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    mat = np.zeros((len(col), width), dtype=np.float32)
    if ok.any():
        values = col if ok.all() else col.filter(pa.array(ok))
        mat[ok] = values.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, width)
    return mat, ok


def split_in_id_order(table: pa.Table, split: str) -> pa.Table:
    """One split (`train` | `eval`) of a sketch artifact side, sorted by id: what fit and eval read
    must not depend on how the sketch stage sharded its output."""
    rows = table.filter(pc.equal(table.column(SPLIT), split))
    return rows.take(pc.sort_indices(rows, sort_keys=[(ID, "ascending")]))


# The row's texts, which the sketch stage adds to its artifact so that `fit` need not re-read the
# inputs: `text` (the plain text) and the encoder's instruction view (`prompt`, `response`).
SKETCH_TEXTS = pa.schema([pa.field(TEXT, pa.string()), pa.field(PROMPT, pa.string()), pa.field(RESPONSE, pa.string())])


def sketch_artifact_schema(proj_dim: int) -> pa.Schema:
    """What the sketch stage writes: the contract's columns plus SKETCH_TEXTS."""
    return pa.schema([*sketch_schema(proj_dim), *SKETCH_TEXTS])


SCORES = pa.schema(
    [
        pa.field(ID, pa.string()),
        pa.field(SCORE, pa.float32()),
        pa.field(SCORE_MAX, pa.float32()),
        pa.field(RANK, pa.int64()),
    ]
)

# scores.parquet when the cascade (score.rerank_top) ran: `score` stays the encoder's mean cosine,
# `rank` is the cascade's. `teacher_score` is the teacher's mean cosine over queries, null for rows
# the teacher was not asked about (past the top block) or rejected; `reranked` marks the top block.
SCORES_CASCADE = pa.schema(
    [
        *SCORES,
        pa.field(TEACHER_SCORE, pa.float32()),
        pa.field(RERANKED, pa.bool_()),
    ]
)

TOPK = pa.schema(
    [
        pa.field(QUERY_ID, pa.string()),
        pa.field(ID, pa.string()),
        pa.field(SCORE, pa.float32()),
        pa.field(RANK, pa.int64()),
    ]
)
