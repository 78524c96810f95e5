"""The filter stage: the curated corpus a training job reads, under `run_dir/filter/corpus/`.

What it writes: for every corpus input file, one Parquet file under the same relative path (a
`.jsonl`/`.arrow` name gets `.parquet`), holding the input's rows in input order minus the rows the
score stage selected to drop (`score.select_action: drop`), or only the selected rows (`keep`), with
every input column and the input's own Arrow schema and metadata (so a Hugging Face dataset's
`features` survive and `datasets.load_dataset("parquet", ...)` gives them back). Rows the reader
rejected (`encode/rejects.parquet`) are counted and kept or left out per `filter.keep_rejected`. When
score selected nothing (neither `score.select_top_frac` nor `score.select_threshold`), every readable
row passes and the manifest says why.

Shape: the driver holds only the selection (`score/selected_ids.parquet`, a small id set) and, from
the LanceDB codes table pinned at the encode manifest's version, which input file each selected id
came from (`source`). One Ray Data task per input file to filter reads the file (Parquet row group by
row group, Arrow IPC batch by batch, JSONL whole), decides row by row with `corpus.iter_file` (the
ids, row numbers and rejects every other stage sees) and writes the kept rows.

Incremental, with encode's mechanism (`codestore.Ledger`): `filter/filter.ledger.json` lists the
files filtered, by (path, size, mtime), with a digest of the selected ids that fall in each. A
rerun filters only the files that are new, changed, or whose selected ids changed; the others are
hard-linked (copied on object stores) from the previous `filter/` into the new one, so a new corpus
shard filters only itself. The ledger is keyed by the action and the filter/corpus-mapping config: a
change there refilters everything.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import corpus, storage
from pipeline.artifacts import utc_now
from pipeline.codestore import Ledger
from pipeline.config import JobConfig, stable_hash, to_dict
from pipeline.errors import InputDataError
from pipeline.schema import ID, ROW

log = logging.getLogger("influcoder.filter")

LEDGER = "filter"  # -> filter/filter.ledger.json
# The curated corpus lives in its own folder (filter/corpus/), apart from the manifest and ledger, so a
# reader can take the folder whole: `pq.read_table("run/filter/corpus")`, `ray.data.read_parquet(...)`.
CORPUS_DIR = "corpus"
SELECTED_IDS = "selected_ids.parquet"
PASS_ALL = "none"  # the action when score selected nothing: every readable row passes
COUNTS = ("rows_in", "selected", "rejected", "kept", "dropped", "unwritable")


def input_fingerprint(job: JobConfig) -> dict[str, Any]:
    """The corpus files, as encode fingerprints them: a new shard reruns filter, which filters only it."""
    from pipeline.stages.encode import input_fingerprint as corpus_fingerprint

    return corpus_fingerprint(job)


def output_rel(file: corpus.FileInfo) -> str:
    """Where a file's filtered rows go, relative to filter/corpus/: the input's relative path, as Parquet."""
    if file.format == "parquet":
        return file.rel
    return posixpath.splitext(file.rel)[0] + ".parquet"


# --------------------------------------------------------------------------- per file (no Ray)


def decide(
    file: corpus.FileInfo, cfg, selected: pa.Array, action: str, keep_rejected: bool
) -> tuple[np.ndarray, dict[str, Any]]:
    """Which rows of one input file to write: a bool array indexed by the reader's row number
    (Parquet/Arrow: row index; JSONL: line number), and the counts (rows_in, selected, rejected,
    by_reason)."""
    rows_parts, keep_parts = [], []
    counts: dict[str, Any] = {"rows_in": 0, "selected": 0, "rejected": 0, "by_reason": {}}
    for batch in corpus.iter_file(file, cfg):
        rejected = pc.is_valid(batch.column(corpus.REJECT_REASON))
        hit = pc.and_(pc.is_in(batch.column(ID), value_set=selected), pc.invert(rejected))
        if action == "drop":
            keep = pc.invert(hit)
        elif action == "keep":
            keep = hit
        else:
            keep = pa.array(np.ones(batch.num_rows, bool))
        keep = pc.and_(keep, pc.invert(rejected))
        if keep_rejected:
            keep = pc.or_(keep, rejected)
        rows_parts.append(batch.column(ROW).to_numpy())
        keep_parts.append(keep.to_numpy(zero_copy_only=False))
        counts["rows_in"] += batch.num_rows
        counts["selected"] += int(pc.sum(hit).as_py() or 0)
        n_bad = int(pc.sum(rejected).as_py() or 0)
        counts["rejected"] += n_bad
        if n_bad:
            for reason in batch.column(corpus.REJECT_REASON).drop_null().to_pylist():
                key = reason.split(":")[0]
                counts["by_reason"][key] = counts["by_reason"].get(key, 0) + 1
    rows = np.concatenate(rows_parts) if rows_parts else np.zeros(0, np.int64)
    keep = np.concatenate(keep_parts) if keep_parts else np.zeros(0, bool)
    mask = np.zeros(int(rows.max()) + 1 if len(rows) else 0, bool)
    mask[rows[keep]] = True
    return mask, counts


def _segment(mask: np.ndarray, start: int, n: int) -> pa.Array:
    out = np.zeros(n, bool)
    seg = mask[start : start + n]
    out[: len(seg)] = seg
    return pa.array(out)


def filter_file(
    file: corpus.FileInfo,
    cfg,
    out_path: str,
    selected: pa.Array,
    action: str,
    keep_rejected: bool,
    compression: str,
) -> dict[str, Any]:
    """Write one input file's kept rows to `out_path` (Parquet, the input's schema); return its counts."""
    mask, counts = decide(file, cfg, selected, action, keep_rejected)
    fs, path = storage.filesystem(file.path)
    out_fs, out = storage.filesystem(out_path)
    out_fs.create_dir(posixpath.dirname(out), recursive=True)
    codec = None if compression == "none" else compression
    kept = unwritable = 0
    if file.format == "parquet":
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            with pq.ParquetWriter(out, pf.schema_arrow, filesystem=out_fs, compression=codec) as w:
                start = 0
                for g in range(pf.metadata.num_row_groups):  # one row group in memory at a time
                    t = pf.read_row_group(g)
                    part = t.filter(_segment(mask, start, t.num_rows))
                    w.write_table(part)
                    kept, start = kept + part.num_rows, start + t.num_rows
    elif file.format == "arrow":
        with corpus.open_arrow(fs, path) as reader:
            with pq.ParquetWriter(out, reader.schema, filesystem=out_fs, compression=codec) as w:
                start = 0
                for batch in reader:
                    part = batch.filter(_segment(mask, start, batch.num_rows))
                    w.write_batch(part)
                    kept, start = kept + part.num_rows, start + batch.num_rows
    else:
        table, unwritable = _jsonl_table(fs, path, file, mask)
        pq.write_table(table, out, filesystem=out_fs, compression=codec)
        kept = table.num_rows
    counts.update(kept=kept, dropped=counts["rows_in"] - kept, unwritable=unwritable)
    return counts


def _jsonl_table(fs, path: str, file: corpus.FileInfo, mask: np.ndarray) -> tuple[pa.Table, int]:
    """The kept records of a JSONL file as one table. The column types are inferred from every record
    of the file (not only the kept ones), so two files with the same columns get the same schema even
    when one keeps no row. Line numbering matches corpus._iter_jsonl (0-based, blank lines are no rows)."""
    with fs.open_input_stream(path) as f:
        data = f.read()
    records, keep, unwritable = [], [], 0
    for line_no, line in enumerate(data.split(b"\n")):
        if not line.strip():
            continue
        wanted = line_no < len(mask) and bool(mask[line_no])
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if not isinstance(record, dict):
            unwritable += int(wanted)  # a rejected line kept by keep_rejected: it has no columns
            continue
        records.append(record)
        keep.append(wanted)
    try:
        arr = pa.array(records) if records else pa.array([], pa.struct([]))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise InputDataError(
            f"filter: the records of {storage.redact(file.path)} do not fit one Arrow schema ({e}); a JSONL "
            f"column must hold one type in every record. Fix the file, or convert it to Parquet with "
            f"`influcoder prepare --input ...` and point corpus.path at the result."
        ) from None
    return pa.Table.from_struct_array(arr).filter(pa.array(keep, pa.bool_())), unwritable


# --------------------------------------------------------------------------- driver helpers


def read_selection(score_dir: str, score_manifest: dict[str, Any]) -> tuple[str, pa.Array]:
    """(action, distinct selected ids) from the score stage; (PASS_ALL, []) when it selected nothing."""
    sel = score_manifest.get("selection") or {}
    action = sel.get("action")
    path = storage.join(score_dir, SELECTED_IDS)
    if action is None or not storage.exists(path):
        return PASS_ALL, pa.array([], pa.string())
    fs, p = storage.filesystem(path)
    ids = pq.read_table(p, columns=[ID], filesystem=fs).column(ID)
    return action, pc.unique(ids.combine_chunks()).cast(pa.string())


def sources_of(job: JobConfig, encode_manifest: dict[str, Any], ids: pa.Array) -> dict[str, list[str]]:
    """Input file -> the given ids whose rows came from it: the codes table's `source` column at the
    version the encode manifest recorded (the snapshot score ranked)."""
    if len(ids) == 0:
        return {}
    from pipeline.codestore import CodeStore

    store = CodeStore(job.lancedb_uri, job.encode.table)
    version = (encode_manifest.get("lancedb") or {}).get("version") or store.version
    return store.sources_of(ids, dataset=store.dataset().checkout_version(version))


def _link_or_copy(src: str, dst: str) -> None:
    """Carry a finished output file into the new stage directory without rewriting it."""
    if not storage.is_uri(src) and not storage.is_uri(dst):
        s, d = storage.local_path(src), storage.local_path(dst)
        os.makedirs(os.path.dirname(d), exist_ok=True)
        try:
            os.link(s, d)  # same run_dir, same filesystem: instant, and the old directory stays intact
        except OSError:
            shutil.copy2(s, d)
        return
    fs, s = storage.filesystem(src)
    _, d = storage.filesystem(dst)
    fs.copy_file(s, d)  # object stores: a server-side copy


def _filter_on_ray(job: JobConfig, tasks: list[tuple[corpus.FileInfo, str]], selected, action) -> list[dict]:
    """One Ray Data task per file: read, decide, write. Only the per-file counts come back."""
    if not tasks:
        return []
    import ray.data

    cfg, keep_rejected, compression = job.corpus, job.filter.keep_rejected, job.filter.compression

    def work(batch: dict[str, Any]) -> dict[str, Any]:
        out = []
        for i in batch["i"]:
            file, out_path = tasks[int(i)]
            counts = filter_file(file, cfg, out_path, selected, action, keep_rejected, compression)
            out.append(json.dumps({"path": file.path, **counts}))
        return {"result": np.array(out, dtype=object)}

    ds = ray.data.from_items([{"i": i} for i in range(len(tasks))], override_num_blocks=len(tasks))
    ds = ds.map_batches(work, batch_size=1, batch_format="numpy", num_cpus=1)
    return [json.loads(r["result"]) for r in ds.iter_rows()]


# --------------------------------------------------------------------------- the stage


def run(ctx) -> None:
    from pipeline.ray_runtime import ensure_ray

    job: JobConfig = ctx.job
    cfg = job.filter
    files = corpus.discover(job.corpus, "corpus")
    enc, score = ctx.upstream["encode"], ctx.upstream["score"]
    digest = input_fingerprint(job)["corpus_digest"]
    if (enc.get("inputs") or {}).get("corpus_digest") != digest:
        # Rows of a shard the encoder never saw were never scored: passing them as "kept" would be a lie.
        raise InputDataError(
            f"corpus.path {storage.redact(job.corpus.path)} changed since the encode stage ran (files added, "
            f"removed or modified); the new rows have no scores. Run `influcoder run JOB.yaml --from encode` "
            f"(encode and score are incremental) before filtering."
        )
    outs = {f.path: output_rel(f) for f in files}
    clash = _first_clash(outs)
    if clash:
        raise InputDataError(
            f"corpus.path: {clash[0]} and {clash[1]} would both be written to filter/{outs[clash[0]]}; rename "
            f"one of them (the filtered corpus keeps one Parquet file per input file, same relative path)."
        )
    ensure_ray(job.ray)  # before LanceDB starts its runtime threads: Ray forks helper processes
    action, selected = read_selection(ctx.upstream_dir("score"), score)
    if action == PASS_ALL:
        log.warning(
            "filter: score selected nothing (set score.select_top_frac or score.select_threshold); "
            "filter/ is the corpus minus %s rows.",
            "no" if cfg.keep_rejected else "its rejected",
        )
    by_source = sources_of(job, enc, selected)

    key = {"action": action, "corpus": to_dict(job.corpus), "filter": to_dict(cfg)}
    prev_dir = ctx.upstream_dir("filter")  # the previous finished output (run_dir/filter), if any
    previous = Ledger(prev_dir, LEDGER).load(key) if storage.exists(storage.join(prev_dir, "manifest.json")) else None
    ledger = Ledger(ctx.out_dir, LEDGER).load(key)
    entries: dict[str, dict[str, Any]] = {}
    todo = []
    for f in files:
        sel_digest = stable_hash(sorted(by_source.get(f.path, [])))
        old = previous.files.get(f.path) if previous else None
        src = storage.join(prev_dir, CORPUS_DIR, outs[f.path])
        if (
            old is not None
            and previous.is_done(f.path, f.size, f.mtime)
            and old.get("selected_digest") == sel_digest
            and old.get("out") == outs[f.path]
            and storage.exists(src)
        ):
            _link_or_copy(src, storage.join(ctx.out_dir, CORPUS_DIR, outs[f.path]))
            entries[f.path] = {**old, "filtered_this_run": False}
        else:
            todo.append(f)
            entries[f.path] = {"size": f.size, "mtime": f.mtime, "out": outs[f.path], "selected_digest": sel_digest}
    log.info(
        "filter: %d corpus files, %d unchanged (carried over), %d to filter; action %s, %d selected ids",
        len(files),
        len(files) - len(todo),
        len(todo),
        action,
        len(selected),
    )
    tasks = [(f, storage.join(ctx.out_dir, CORPUS_DIR, outs[f.path])) for f in todo]
    stamp = utc_now()
    for res in _filter_on_ray(job, tasks, selected, action):
        path = res.pop("path")
        entries[path].update(res, rows=res["kept"], filtered_utc=stamp, filtered_this_run=True)
    ledger.mark_done(entries)

    per_file = [
        {
            "input": storage.redact(f.path),
            "output": outs[f.path],
            **{k: int(entries[f.path].get(k, 0)) for k in COUNTS},
            "filtered_this_run": bool(entries[f.path]["filtered_this_run"]),
        }
        for f in files
    ]
    total = {k: sum(p[k] for p in per_file) for k in COUNTS}
    by_reason: dict[str, int] = {}
    for f in files:
        for reason, n in (entries[f.path].get("by_reason") or {}).items():
            by_reason[reason] = by_reason.get(reason, 0) + n
    if action == "keep" and total["kept"] == 0:
        log.warning("filter: select_action is keep and no row was selected: the filtered corpus is empty.")
    ctx.record(
        rows={"in": total["rows_in"], "dropped": total["dropped"], "kept": total["kept"]},
        counts=total,
        selection={
            "action": action,
            "selected_ids": len(selected),
            "matched_rows": total["selected"],
            "source": f"score/{SELECTED_IDS}" if action != PASS_ALL else None,
        },
        rejects={"rows": total["rejected"], "by_reason": by_reason, "kept": cfg.keep_rejected},
        files={"corpus": len(files), "filtered_this_run": len(todo), "carried_over": len(files) - len(todo)},
        per_file=per_file,
        output={"format": "parquet", "compression": cfg.compression, "files": len(files)},
    )


def _first_clash(outs: dict[str, str]) -> tuple[str, str] | None:
    seen: dict[str, str] = {}
    for src, out in outs.items():
        if out in seen:
            return seen[out], src
        seen[out] = src
    return None
