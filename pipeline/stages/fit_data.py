"""The fit stage's inputs: the sketch artifact's rows, split and checked, and the teacher targets.

`load_fit_data` reads `sketch/anchors/*.parquet` and `sketch/pool/*.parquet`, checks that every
sketch is a unit vector and every split name is known, and returns the rows of both sides with the
teacher's cosine matrices:
- train: what the loss sees (the distillation targets);
- validation: carved from the sketch's train split by a seeded hash order (`fit.val_frac` of its
  anchors and of its pool rows); every choice made while fitting (epoch, weight interpolation) is
  made here;
- eval: the sketch stage's held-out split, the ground truth that is reported and never chosen on.
pyarrow/numpy and no Ray; the cosine and centring maths come from `pipeline.distill` (which imports
torch); encoder views are plain tuples built by `pipeline.encoder`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.distill import center_sketches, cosine_targets, teacher_center
from pipeline.textview import EncoderInput, table_views
from pipeline.errors import ArtifactMissingError, InputDataError
from pipeline.sampling import order_key
from pipeline.schema import ID, SKETCH, SKETCH_TEXTS, SPLIT, TEXT, sketch_matrix, sketch_schema, split_in_id_order

SIDES = ("anchors", "pool")
SPLITS = ("train", "eval")
NORM_TOL = 1e-3  # sketches are float32 unit vectors; anything further off was not normalised


@dataclass
class SplitRows:
    ids: list[str]
    texts: list[str]  # the plain text (what a user's off-the-shelf encoder would embed)
    views: list[EncoderInput]  # what the student embeds (anchor prefix, response-keeping pairs)
    sketches: np.ndarray  # float32 [n, proj_dim], unit rows

    def take(self, idx: np.ndarray) -> "SplitRows":
        return SplitRows(
            [self.ids[i] for i in idx], [self.texts[i] for i in idx], [self.views[i] for i in idx], self.sketches[idx]
        )


@dataclass
class FitData:
    """Everything the workers need; small (targets are a few thousand x a few thousand floats)."""

    train_anchors: SplitRows
    train_pool: SplitRows
    eval_anchors: SplitRows
    eval_pool: SplitRows
    targets: np.ndarray  # train anchors x train pool cosines (distillation targets)
    ground_truth: np.ndarray  # eval anchors x eval pool cosines (held-out)
    val_anchors: Optional[SplitRows] = None
    val_pool: Optional[SplitRows] = None
    val_truth: Optional[np.ndarray] = None  # validation anchors x validation pool cosines
    # fit.center_teacher: the mean sketch of the train pool, removed from every sketch above before
    # any cosine (targets, validation, held-out truth); None: raw cosines.
    teacher_center: Optional[np.ndarray] = None

    def sizes(self) -> dict[str, int]:
        out = {
            "train_anchors": len(self.train_anchors.ids),
            "train_pool": len(self.train_pool.ids),
            "eval_anchors": len(self.eval_anchors.ids),
            "eval_pool": len(self.eval_pool.ids),
        }
        if self.val_anchors is not None:
            out.update(val_anchors=len(self.val_anchors.ids), val_pool=len(self.val_pool.ids))
        return out


# side ("anchors" | "pool"), ids -> a table of (id, text, prompt, response) for those ids
TextLookup = Callable[[str, list[str]], pa.Table]


def texts_from_inputs(job) -> TextLookup:
    """Look the rows' texts up in the job's anchors / pool inputs, for a sketch artifact that carries
    only the contract's columns (id, split, sketch). Streams the input files in-process, keeping only
    the wanted ids (the first occurrence of an id wins, as in the sketch stage's selection)."""
    from pipeline import corpus

    def lookup(side: str, ids: list[str]) -> pa.Table:
        cfg, section = (
            (job.anchors, "anchors") if side == "anchors" else (job.pool_dataset, "pool" if job.pool else "corpus")
        )
        wanted = pa.array(sorted(set(ids)), pa.string())
        found: dict[str, dict] = {}
        for file in corpus.discover(cfg, section):
            for batch in corpus.iter_file(file, cfg):
                good, _ = corpus.split_rejects(batch)
                for row in (
                    good.filter(pc.is_in(good[ID], value_set=wanted)).select([ID, *SKETCH_TEXTS.names]).to_pylist()
                ):
                    found.setdefault(row[ID], row)
        return pa.Table.from_pylist(list(found.values()), schema=pa.schema([pa.field(ID, pa.string()), *SKETCH_TEXTS]))

    return lookup


def _read_side(sketch_dir: str, side: str, lookup: Optional[TextLookup] = None) -> pa.Table:
    folder = storage.join(sketch_dir, side)
    files = storage.list_files(folder, ".parquet")
    if not files:
        raise ArtifactMissingError(
            f"fit: no Parquet files under {storage.redact(folder)}; rerun the sketch "
            f"stage (`influcoder sketch JOB.yaml --overwrite`)."
        )
    tables = []
    for path in files:
        fs, p = storage.filesystem(path)
        names = pq.read_schema(p, filesystem=fs).names
        missing = [c for c in sketch_schema(1).names if c not in names]
        if missing:
            raise InputDataError(
                f"fit: {storage.redact(path)} lacks column(s) {missing} (has {names}); the sketch "
                f"artifact must carry id, split and sketch. Rerun the sketch stage."
            )
        # The texts are optional (the contract names id, split, sketch): without `text` they are looked
        # up in the inputs; without prompt/response the encoder sees the plain text.
        text_cols = [c for c in SKETCH_TEXTS.names if c in names] if TEXT in names else []
        tables.append(pq.read_table(p, filesystem=fs, columns=[ID, SPLIT, SKETCH, *text_cols]))
    table = pa.concat_tables(tables, promote_options="permissive")
    if TEXT in table.column_names:
        return table
    if lookup is None:
        raise InputDataError(f"fit: sketch/{side} has no `text` column and no inputs to look the texts up in.")
    ids = table[ID].to_pylist()
    texts = lookup(side, ids)
    pos = {rid: i for i, rid in enumerate(texts[ID].to_pylist())}
    lost = [rid for rid in ids if rid not in pos]
    if lost:
        raise InputDataError(
            f"fit: sketch/{side} has no `text` column and {len(lost)} of its ids are not in the {side} input "
            f"(first: {lost[:3]}); point `{side}.path` at the data that was sketched, or rerun the sketch stage."
        )
    take = texts.take(pa.array([pos[rid] for rid in ids], pa.int64()))
    for name in SKETCH_TEXTS.names:
        table = table.append_column(name, take[name])
    return table


def _split_rows(table: pa.Table, split: str, side: str, prefix: str) -> SplitRows:
    rows = split_in_id_order(table, split)
    ids = rows[ID].to_pylist()
    texts = rows[TEXT].to_pylist()
    if any(t is None for t in texts):
        raise InputDataError(f"fit: {side} rows with a null `text` in the {split} split; fix the sketch artifact.")
    views = table_views(rows, prefix=prefix)
    sketches, _ = sketch_matrix(rows[SKETCH])  # a null sketch is a zero row: the norm check names it
    norms = np.linalg.norm(sketches, axis=1)
    if len(ids) and np.abs(norms - 1.0).max() > NORM_TOL:
        bad = int(np.argmax(np.abs(norms - 1.0)))
        raise InputDataError(
            f"fit: {side} sketch of id {ids[bad]!r} has L2 norm {norms[bad]:.4f}; the contract "
            f"requires unit-norm sketches. Rerun the sketch stage."
        )
    return SplitRows(ids=ids, texts=texts, views=views, sketches=sketches)


def carve_validation(rows: SplitRows, frac: float, seed: int, minimum: int) -> tuple[SplitRows, SplitRows | None]:
    """(fit rows, validation rows): the validation rows are the `ceil(frac * n)` smallest seeded hash
    keys of the ids, so the split depends on the ids only (not on sharding or order), and rows are
    returned in id order. None when frac is 0."""
    if frac <= 0:
        return rows, None
    n_val = max(math.ceil(frac * len(rows.ids)), minimum)
    if len(rows.ids) - n_val < minimum:
        raise InputDataError(
            f"fit: fit.val_frac={frac} leaves {len(rows.ids) - n_val} of {len(rows.ids)} train rows "
            f"to fit on; raise the sketch's train sizes or lower fit.val_frac."
        )
    keys = np.array([order_key(seed, i) for i in rows.ids], dtype=np.uint64)
    val = np.zeros(len(rows.ids), bool)
    val[np.argsort(keys, kind="stable")[:n_val]] = True
    return rows.take(np.flatnonzero(~val)), rows.take(np.flatnonzero(val))


def load_fit_data(
    sketch_dir: str,
    anchor_prefix: str,
    val_frac: float = 0.0,
    val_seed: int = 0,
    lookup: Optional[TextLookup] = None,
    center_teacher: bool = False,
) -> FitData:
    """Read the sketch artifact, split it and build targets, validation and held-out ground truth.
    `lookup` supplies the texts when the artifact carries only the contract's columns.
    `center_teacher`: every cosine is taken between centred sketches (`distill.center_sketches`),
    the center being the mean sketch of the rows fit trains on (the train pool after validation is
    carved out), so neither validation nor the held-out split informs it."""
    parts: dict[tuple[str, str], SplitRows] = {}
    for side in SIDES:
        table = _read_side(sketch_dir, side, lookup)
        ids = table[ID].to_pylist()
        if len(set(ids)) != len(ids):
            raise InputDataError(f"fit: duplicate ids in sketch/{side}; every row must have a unique id.")
        unknown = set(table[SPLIT].to_pylist()) - set(SPLITS)
        if unknown:
            raise InputDataError(f"fit: sketch/{side} has split values {sorted(unknown)}; expected 'train' or 'eval'.")
        for split in SPLITS:
            parts[side, split] = _split_rows(table, split, side, anchor_prefix if side == "anchors" else "")
    for side in SIDES:
        overlap = set(parts[side, "train"].ids) & set(parts[side, "eval"].ids)
        if overlap:  # leakage (METHOD.md 4.4): unique ids already make this impossible, keep it explicit
            raise InputDataError(f"fit: ids in both train and eval {side}: {sorted(overlap)[:3]}")
    for (side, split), rows in parts.items():
        minimum = 2 if side == "pool" else 1  # Spearman over the pool needs two items
        if len(rows.ids) < minimum:
            raise InputDataError(
                f"fit: the {split} split has {len(rows.ids)} {side} rows, at least {minimum} needed; "
                f"raise sketch.{split}_{side if side == 'pool' else 'anchors'}."
            )
    # Validation needs two rows a side (Spearman over the pool), fitting at least as many.
    train_a, val_a = carve_validation(parts["anchors", "train"], val_frac, val_seed, minimum=2)
    train_p, val_p = carve_validation(parts["pool", "train"], val_frac, val_seed, minimum=2)
    center = teacher_center(train_p.sketches) if center_teacher else None
    if center is not None:
        train_a, train_p = _centered(train_a, center), _centered(train_p, center)
        val_a, val_p = (None, None) if val_a is None else (_centered(val_a, center), _centered(val_p, center))
        for side in SIDES:
            parts[side, "eval"] = _centered(parts[side, "eval"], center)
    return FitData(
        train_anchors=train_a,
        train_pool=train_p,
        eval_anchors=parts["anchors", "eval"],
        eval_pool=parts["pool", "eval"],
        targets=cosine_targets(train_a.sketches, train_p.sketches),
        ground_truth=cosine_targets(parts["anchors", "eval"].sketches, parts["pool", "eval"].sketches),
        val_anchors=val_a,
        val_pool=val_p,
        val_truth=None if val_a is None else cosine_targets(val_a.sketches, val_p.sketches),
        teacher_center=center,
    )


def _centered(rows: SplitRows, center: np.ndarray) -> SplitRows:
    return dataclasses.replace(rows, sketches=center_sketches(rows.sketches, center))


# fit/heldout_scores.parquet: the exported encoder's cosines on the held-out split (one row per
# held-out anchor x pool row), and how they were computed (`TextEncoder.compute`, schema metadata).
# Eval reports influcoder's held-out fidelity from them instead of embedding the split again (the
# same figures as fit's `exported`).
HELDOUT_SCORES_FILE = "heldout_scores.parquet"
_COMPUTE_KEY = b"influcoder.compute"


def write_heldout_scores(
    fit_dir: str, scores: np.ndarray, anchor_ids: list[str], pool_ids: list[str], compute: str
) -> None:
    table = pa.table(
        {
            "anchor_id": pa.array(np.repeat(np.asarray(anchor_ids, dtype=object), len(pool_ids)), pa.string()),
            "pool_id": pa.array(np.tile(np.asarray(pool_ids, dtype=object), len(anchor_ids)), pa.string()),
            "score": pa.array(np.asarray(scores, dtype=np.float32).ravel(), pa.float32()),
        }
    ).replace_schema_metadata({_COMPUTE_KEY: compute.encode()})
    fs, path = storage.filesystem(storage.join(fit_dir, HELDOUT_SCORES_FILE))
    pq.write_table(table, path, filesystem=fs)


def read_heldout_scores(
    fit_dir: str, anchor_ids: list[str], pool_ids: list[str], compute: str
) -> tuple[Optional[np.ndarray], str]:
    """The exported encoder's held-out cosines as [anchor_ids, pool_ids], or None with the reason: no
    file (a fit from before it was written), computed otherwise than `compute`, or of other rows."""
    path = storage.join(fit_dir, HELDOUT_SCORES_FILE)
    if not storage.exists(path):
        return None, f"{HELDOUT_SCORES_FILE} not found (a fit from an older version)"
    table = storage.read_table(path)
    stored = (table.schema.metadata or {}).get(_COMPUTE_KEY, b"").decode()
    if stored != compute:
        return None, f"fit computed the held-out scores in {stored or 'an unknown precision'}, eval in {compute}"
    out = np.full((len(anchor_ids), len(pool_ids)), np.nan, dtype=np.float32)
    a = pc.index_in(table.column("anchor_id"), value_set=pa.array(anchor_ids, pa.string()))
    p = pc.index_in(table.column("pool_id"), value_set=pa.array(pool_ids, pa.string()))
    if table.num_rows != out.size or a.null_count or p.null_count:
        return None, "its held-out rows are not the sketch's held-out split"
    out[a.to_numpy().astype(np.int64), p.to_numpy().astype(np.int64)] = table.column("score").to_numpy()
    if np.isnan(out).any():  # a pair listed twice, another missing
        return None, "its held-out rows are not the sketch's held-out split"
    return out, ""
