"""Reading corpora: Parquet, JSONL and Arrow IPC streams (a folder written by Hugging Face
`datasets.save_to_disk`: `data-*.arrow` + `state.json`, read with pyarrow, no `datasets` import),
local or on pyarrow filesystems, streamed, never loaded whole.

Two steps, so that bad input fails before any Ray work:
1. `discover(ds_cfg, what)` lists the files (file, directory, glob or URI; hive partitions),
   reads every Parquet footer and the first record of every JSONL file, and raises
   `InputDataError` naming the file and column when a file is unreadable, a mapped column is
   missing, or a column has the wrong type.
2. `read_dataset(ds_cfg, files)` streams canonical rows (schema.CANONICAL plus `reject_reason`)
   through Ray Data: one read task per Parquet row group or JSONL file, yielding bounded batches
   with exact row numbers. Bad rows are never dropped silently: they carry a `reject_reason`
   (empty text, null, non-string, invalid UTF-8, bad JSON, bad label) and each stage routes
   them to its rejects.parquet.

Ids are the id column when configured, else `<file path relative to the dataset root>#<row>`,
which is stable across machines and keeps duplicate texts as distinct rows.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import posixpath
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import DatasetConfig
from pipeline.errors import InputDataError
from pipeline.schema import CANONICAL, ID, LABEL, PROMPT, RESPONSE, ROW, SOURCE, TEXT, split_by_reason

REJECT_REASON = "reject_reason"
READ_SCHEMA = pa.schema([*CANONICAL, pa.field(REJECT_REASON, pa.string())])
PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
ARROW_SUFFIXES = (".arrow",)  # Arrow IPC streams: what `datasets.Dataset.save_to_disk` writes
# The JSON files next to a saved Hugging Face dataset's `data-*.arrow`: metadata, not rows.
HF_METADATA = ("state.json", "dataset_info.json", "dataset_dict.json")
BATCH_ROWS = 4096  # rows per yielded batch: bounds a read task's memory


@dataclass(frozen=True)
class FileInfo:
    path: str  # as given (URI-preserving)
    rel: str  # relative to the dataset root: used in derived ids and `source`
    format: str  # "parquet" | "jsonl" | "arrow"
    size: int
    mtime: float
    num_rows: int | None  # known for Parquet from the footer, for a JSONL file when it fits its checked head
    row_groups: int  # Parquet row groups (1 for JSONL)
    partitions: tuple[tuple[str, str], ...]  # hive `key=value` segments of the path


def _mapped_columns(cfg: DatasetConfig) -> dict[str, str]:
    """role -> column name for every column the mapping needs."""
    cols = {}
    if cfg.text_column:
        cols["text_column"] = cfg.text_column
    else:
        if cfg.prompt_column:
            cols["prompt_column"] = cfg.prompt_column
        cols["response_column"] = cfg.response_column  # type: ignore[assignment]
    for role in ("id_column", "encoder_text_column", "label_column"):
        if getattr(cfg, role):
            cols[role] = getattr(cfg, role)
    return cols


def _format_of(path: str, cfg: DatasetConfig) -> str | None:
    if cfg.format != "auto":
        return cfg.format
    low = path.lower()
    if low.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if low.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if low.endswith(ARROW_SUFFIXES):
        return "arrow"
    return None


def _hive_partitions(rel: str) -> tuple[tuple[str, str], ...]:
    parts = rel.split("/")[:-1]
    return tuple(tuple(p.split("=", 1)) for p in parts if "=" in p)  # type: ignore[misc]


def _list(cfg: DatasetConfig, what: str) -> tuple[pafs.FileSystem, str, list[pafs.FileInfo]]:
    path = cfg.path
    has_glob = any(c in path for c in "*?[")
    if has_glob:
        # The root is the longest directory prefix without wildcards.
        head = path
        while any(c in head for c in "*?["):
            head = posixpath.dirname(head) if storage.is_uri(head) else os.path.dirname(head)
        fs, root = storage.filesystem(head or ".")
        _, pattern = storage.filesystem(path)
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        infos = [i for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, pattern)]
        if not infos:
            raise InputDataError(f"{what}.path: the glob {storage.redact(path)} matches no file; check the pattern.")
        return fs, root, infos
    fs, p = storage.filesystem(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise InputDataError(
            f"{what}.path: {storage.redact(path)} does not exist; give a file, directory, glob or URI."
        )
    if info.type == pafs.FileType.File:
        return fs, posixpath.dirname(p), [info]
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True))
    return fs, p, [i for i in infos if i.type == pafs.FileType.File]


def _uri_for(cfg: DatasetConfig, fs_path: str) -> str:
    """Turn a filesystem path back into what the user would recognise (a URI for URI datasets)."""
    if storage.is_uri(cfg.path):
        scheme = cfg.path.split("://", 1)[0]
        return f"{scheme}://{fs_path}"
    return fs_path


# Listings of the datasets discovered in the current `discovery_scope`, keyed by the source spec.
_discovered: dict[str, list[FileInfo]] | None = None


@contextlib.contextmanager
def discovery_scope() -> Iterator[None]:
    """Within it, `discover` lists each dataset and reads its footers once: preflight, the input
    fingerprint and the stage run share the listing (on an object store with thousands of files,
    listing and opening every footer three times per stage is most of a small stage's time).
    Scopes nest; the outermost one owns the cache. Also usable as a decorator."""
    global _discovered
    outer = _discovered is not None
    if not outer:
        _discovered = {}
    try:
        yield
    finally:
        if not outer:
            _discovered = None


def discover(cfg: DatasetConfig, what: str) -> list[FileInfo]:
    """List and validate a dataset's files before any work starts. `what` names the config section."""
    if _discovered is None:
        return _discover(cfg, what)
    key = repr(cfg)  # the whole source spec: path, format and column mapping
    if key not in _discovered:
        _discovered[key] = _discover(cfg, what)
    return list(_discovered[key])


def _discover(cfg: DatasetConfig, what: str) -> list[FileInfo]:
    fs, root, infos = _list(cfg, what)
    files: list[FileInfo] = []
    mapped = _mapped_columns(cfg)
    # Folders written by `datasets.save_to_disk` (a Dataset: state.json next to data-*.arrow; a
    # DatasetDict: dataset_dict.json above one such folder per split): their JSON files are metadata.
    hf_dirs = {posixpath.dirname(i.path) for i in infos if posixpath.basename(i.path) in HF_METADATA}
    for info in sorted(infos, key=lambda i: i.path):
        base = posixpath.basename(info.path)
        if base.startswith((".", "_")):  # _SUCCESS, .crc, hidden files
            continue
        if base in HF_METADATA and posixpath.dirname(info.path) in hf_dirs:
            continue
        fmt = _format_of(info.path, cfg)
        if fmt is None:
            continue
        rel = posixpath.relpath(info.path, root) if root else base
        shown = storage.redact(_uri_for(cfg, info.path))
        partitions = _hive_partitions(rel)
        if fmt == "parquet":
            num_rows, row_groups = _check_parquet(fs, info.path, shown, mapped, dict(partitions), what)
        elif fmt == "arrow":
            num_rows, row_groups = _check_arrow(fs, info.path, shown, mapped, dict(partitions), what), 1
        else:
            row_groups = 1
            num_rows = _check_jsonl(fs, info.path, shown, mapped, dict(partitions), what, info.size)
        mtime = info.mtime.timestamp() if info.mtime else 0.0
        files.append(
            FileInfo(_uri_for(cfg, info.path), rel, fmt, int(info.size or 0), mtime, num_rows, row_groups, partitions)
        )
    if not files:
        raise InputDataError(
            f"{what}.path: no Parquet (.parquet/.pq), JSONL (.jsonl/.json) or Arrow (.arrow, a Hugging Face "
            f"`save_to_disk` folder) files under {storage.redact(cfg.path)}; point it at your data or set "
            f"{what}.format."
        )
    return files


def _check_parquet(
    fs: pafs.FileSystem, path: str, shown: str, mapped: dict[str, str], partitions: dict[str, str], what: str
) -> tuple[int, int]:
    try:
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
            schema = meta.schema.to_arrow_schema()
    except Exception as e:  # noqa: BLE001 - any footer failure means the file is unusable
        raise InputDataError(
            f"{what}: cannot read Parquet file {shown} ({type(e).__name__}: {e}). The file is truncated or "
            f"not Parquet; re-export it or remove it from {what}.path."
        ) from None
    _check_schema(schema, shown, mapped, partitions, what)
    return meta.num_rows, meta.num_row_groups


def _check_arrow(
    fs: pafs.FileSystem, path: str, shown: str, mapped: dict[str, str], partitions: dict[str, str], what: str
) -> int:
    """An Arrow IPC stream (`datasets.save_to_disk`): check its schema, count its rows (batch headers
    only: memory-mapped locally, so no row data is copied)."""
    try:
        with open_arrow(fs, path) as reader:
            _check_schema(reader.schema, shown, mapped, partitions, what)
            return sum(b.num_rows for b in reader)
    except InputDataError:
        raise
    except Exception as e:  # noqa: BLE001 - any stream failure means the file is unusable
        raise InputDataError(
            f"{what}: cannot read Arrow file {shown} ({type(e).__name__}: {e}). It is truncated or not an "
            f"Arrow IPC stream (what `datasets.save_to_disk` writes); re-save it or remove it from {what}.path."
        ) from None


@contextlib.contextmanager
def open_arrow(fs: pafs.FileSystem, path: str) -> Iterator[pa.ipc.RecordBatchStreamReader]:
    """An Arrow IPC stream reader; local files are memory-mapped (batches are zero-copy views)."""
    source = pa.memory_map(path) if isinstance(fs, pafs.LocalFileSystem) else fs.open_input_stream(path)
    try:
        yield pa.ipc.open_stream(source)
    finally:
        source.close()


def _check_schema(schema: pa.Schema, shown: str, mapped: dict[str, str], partitions: dict[str, str], what: str) -> None:
    for role, col in mapped.items():
        if col in partitions:
            continue
        if col not in schema.names:
            raise InputDataError(
                f"{what}: column `{col}` ({what}.{role}) is missing in {shown}; it has columns "
                f"{schema.names}.{_close(col, schema.names)} Set {what}.{role} to one of them."
            )
        tp = schema.field(col).type
        if role == "label_column":
            ok = pa.types.is_integer(tp) or pa.types.is_boolean(tp) or pa.types.is_null(tp)
            want = "an integer or boolean"
        else:
            ok = pa.types.is_string(tp) or pa.types.is_large_string(tp) or pa.types.is_null(tp)
            if role == "id_column":
                ok = ok or pa.types.is_integer(tp)
            want = "a string" + (" or integer" if role == "id_column" else "")
        if not ok:
            raise InputDataError(
                f"{what}: column `{col}` ({what}.{role}) in {shown} has type {tp}; expected {want} column. "
                f"Convert the column or map {what}.{role} to another column."
            )


JSONL_SAMPLE_BYTES = 1 << 20  # the head of a JSONL file read to check its columns before any work
JSONL_SAMPLE_RECORDS = 200  # records of that head looked at (a cheap sample)
# Every row needs its text columns, so the first record must have them; writers often leave id, label
# and encoder-text keys out of some records (no label on negatives), so one sampled record is enough.
_TEXT_ROLES = ("prompt_column", "response_column", "text_column")


def _close(col: str, names: list[str]) -> str:
    import difflib

    match = difflib.get_close_matches(col, names, n=1, cutoff=0.6)
    return f" Did you mean `{match[0]}`?" if match else ""


def _check_jsonl(
    fs: pafs.FileSystem,
    path: str,
    shown: str,
    mapped: dict[str, str],
    partitions: dict[str, str],
    what: str,
    size: int | None,
) -> int | None:
    """Check every mapped column on the first records; returns the row count when the head read is
    the whole file (a free count), else None."""
    if not size:
        return 0  # an empty file holds no rows; nothing to check
    try:
        with fs.open_input_stream(path) as f:
            head = f.read(JSONL_SAMPLE_BYTES)
    except Exception as e:  # noqa: BLE001
        raise InputDataError(f"{what}: cannot read {shown} ({type(e).__name__}: {e}).") from None
    whole = len(head) < JSONL_SAMPLE_BYTES
    lines = head.split(b"\n") if whole else head.split(b"\n")[:-1]  # the last line may be cut
    records: list[dict[str, Any]] = []
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # a bad line is a row-level reject; check the schema on the good records
        if not isinstance(record, dict):
            if records:
                continue  # after a good record, a non-object line is a row-level reject (bad_json)
            raise InputDataError(
                f"{what}: {shown} is not JSON Lines of objects (first record: {str(record)[:80]}). Write one "
                f"JSON object per line (for a JSON array: jq -c '.[]' in.json > out.jsonl)."
            )
        records.append(record)
        if len(records) >= JSONL_SAMPLE_RECORDS:
            break
    if not records:
        if _is_json_document(head, whole):
            raise InputDataError(
                f"{what}: {shown} is one JSON document, not JSON Lines (one object per line). Convert it, e.g. "
                f"jq -c '.[]' in.json > out.jsonl for an array of objects, and point {what}.path at the result."
            )
        return sum(1 for line in lines if line.strip()) if whole else None
    keys = sorted({k for r in records for k in r})
    for role, col in mapped.items():
        if col in partitions:
            continue
        present = col in records[0] if role in _TEXT_ROLES else any(col in r for r in records)
        if not present:
            where = "its first record" if role in _TEXT_ROLES else f"its first {len(records)} records"
            raise InputDataError(
                f"{what}: column `{col}` ({what}.{role}) is missing in {shown} (keys of {where}: "
                f"{keys}).{_close(col, keys)} Set {what}.{role} to one of them."
            )
        if role == "label_column":
            # A column of non-integers (like a Parquet string column) is a mapping problem; a stray bad
            # value among integer labels is a row-level reject (bad_label).
            values = [r[col] for r in records if r.get(col) is not None]
            bad = sorted({repr(v) for v in values if not _is_label(v)})
            if values and all(not _is_label(v) for v in values):
                raise InputDataError(
                    f"{what}: column `{col}` ({what}.{role}) in {shown} holds {', '.join(bad[:5])} in its first "
                    f"records; expected integers (1 = a row to find, 0 = not) or booleans. Map the values with "
                    f"`influcoder prepare --input ... --label-column {col} --positive-label VALUE`."
                )
    return sum(1 for line in lines if line.strip()) if whole else None


def _is_label(value: Any) -> bool:
    """What the reader accepts as a label (see canonical_row): an integer, a boolean or null."""
    return value is None or isinstance(value, (bool, int))


def _is_json_document(head: bytes, whole: bool) -> bool:
    """A pretty-printed JSON array or object: its first line alone does not parse."""
    if whole:
        try:
            return isinstance(json.loads(head), (list, dict))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
    return head.lstrip().split(b"\n", 1)[0].strip() in (b"[", b"{")


# --------------------------------------------------------------------------- canonical rows


def _as_text(value: Any, col: str) -> tuple[str | None, str | None]:
    """(text, reject reason)."""
    if value is None:
        return None, f"null_value: column `{col}` is null"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None, f"invalid_utf8: column `{col}` is not valid UTF-8"
    if not isinstance(value, str):
        return None, f"non_string_value: column `{col}` holds {type(value).__name__}, expected a string"
    return value, None


def _missing(col: str | None) -> str:
    # A key absent from the record is a mapping problem (a misspelled column), not a null value.
    return f"missing_column: the record has no `{col}` key"


def canonical_row(record: dict[str, Any], cfg: DatasetConfig, file: FileInfo, row: int) -> dict[str, Any]:
    """Map one input record to the canonical columns (+ reject_reason)."""
    out: dict[str, Any] = {
        SOURCE: file.path,
        ROW: row,
        PROMPT: None,
        RESPONSE: None,
        TEXT: None,
        LABEL: None,
        REJECT_REASON: None,
    }
    record = {**dict(file.partitions), **record}
    reason = None
    if cfg.id_column:
        raw = record.get(cfg.id_column)
        if cfg.id_column not in record:
            out[ID] = f"{file.rel}#{row}"
            reason = _missing(cfg.id_column)
        elif raw is None or (isinstance(raw, str) and not raw.strip()):
            out[ID] = f"{file.rel}#{row}"
            reason = f"null_id: column `{cfg.id_column}` is empty"
        elif isinstance(raw, (str, int)) and not isinstance(raw, bool):
            out[ID] = str(raw)
        else:
            out[ID] = f"{file.rel}#{row}"
            reason = f"bad_id: column `{cfg.id_column}` holds {type(raw).__name__}"
    else:
        out[ID] = f"{file.rel}#{row}"
    if cfg.text_column:
        prompt, response = "", None
        response, r = _as_text(record.get(cfg.text_column), cfg.text_column)
        reason = reason or (_missing(cfg.text_column) if cfg.text_column not in record else r)
    else:
        prompt = ""
        if cfg.prompt_column:
            value = record.get(cfg.prompt_column)
            if value is not None:
                prompt, r = _as_text(value, cfg.prompt_column)
                reason = reason or r
        response, r = _as_text(record.get(cfg.response_column), cfg.response_column)  # type: ignore[arg-type]
        reason = reason or (_missing(cfg.response_column) if cfg.response_column not in record else r)
    if reason is None and not (response or "").strip():
        col = cfg.text_column or cfg.response_column
        reason = f"empty_text: column `{col}` is empty"
    text = None
    if cfg.encoder_text_column and record.get(cfg.encoder_text_column) is not None:
        text, r = _as_text(record.get(cfg.encoder_text_column), cfg.encoder_text_column)
        reason = reason or r
    if text is None and response is not None:
        text = f"{prompt}\n{response}" if prompt else response
    if cfg.label_column:
        label = record.get(cfg.label_column)
        if isinstance(label, bool):
            out[LABEL] = int(label)
        elif isinstance(label, int):
            out[LABEL] = label
        elif label is None:
            pass
        else:
            reason = reason or f"bad_label: column `{cfg.label_column}` holds {label!r}, expected an integer"
    out.update({PROMPT: prompt or "", RESPONSE: response, TEXT: text, REJECT_REASON: reason})
    return out


def _rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=READ_SCHEMA)


def iter_file(
    file: FileInfo, cfg: DatasetConfig, row_group: int | None = None, batch_rows: int = BATCH_ROWS
) -> Iterator[pa.Table]:
    """Canonical batches of one file (or one Parquet row group), with exact row numbers."""
    fs, path = storage.filesystem(file.path)
    if file.format == "parquet":
        yield from _iter_parquet(fs, path, file, cfg, row_group, batch_rows)
    elif file.format == "arrow":
        yield from _iter_arrow(fs, path, file, cfg, batch_rows)
    else:
        yield from _iter_jsonl(fs, path, file, cfg, batch_rows)


def _iter_parquet(fs, path, file, cfg, row_group, batch_rows) -> Iterator[pa.Table]:
    wanted = [c for c in _mapped_columns(cfg).values() if c not in dict(file.partitions)]
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        groups = [row_group] if row_group is not None else list(range(pf.metadata.num_row_groups))
        for g in groups:
            start = sum(pf.metadata.row_group(i).num_rows for i in range(g))
            try:
                table = pf.read_row_group(g, columns=sorted(set(wanted)))
            except Exception as e:  # noqa: BLE001
                raise InputDataError(
                    f"cannot read row group {g} of {storage.redact(file.path)} ({type(e).__name__}: {e}); "
                    f"the file is corrupt: re-export it or remove it."
                ) from None
            for off in range(0, table.num_rows, batch_rows):
                chunk = table.slice(off, batch_rows).to_pylist()
                yield _rows_to_table([canonical_row(r, cfg, file, start + off + i) for i, r in enumerate(chunk)])


def _iter_arrow(fs, path, file, cfg, batch_rows) -> Iterator[pa.Table]:
    wanted = sorted({c for c in _mapped_columns(cfg).values() if c not in dict(file.partitions)})
    start = 0
    with open_arrow(fs, path) as reader:
        for batch in reader:
            table = pa.Table.from_batches([batch]).select(wanted)
            for off in range(0, table.num_rows, batch_rows):
                chunk = table.slice(off, batch_rows).to_pylist()
                yield _rows_to_table([canonical_row(r, cfg, file, start + off + i) for i, r in enumerate(chunk)])
            start += batch.num_rows


def iter_lines(fs, path: str, block_bytes: int = 1 << 20) -> Iterator[bytes]:
    """The lines of a JSON Lines file, streamed in blocks (never the whole file in memory); a last line
    without its newline counts when it holds more than whitespace. Line i is row i of the file."""
    with fs.open_input_stream(path) as f:
        buf = b""
        while True:
            block = f.read(block_bytes)
            if not block:
                break
            buf += block
            *lines, buf = buf.split(b"\n")
            yield from lines
        if buf.strip():
            yield buf


def _iter_jsonl(fs, path, file, cfg, batch_rows) -> Iterator[pa.Table]:
    rows: list[dict[str, Any]] = []
    for line_no, line in enumerate(iter_lines(fs, path)):
        rows.append(_jsonl_record(line, cfg, file, line_no))
        if len(rows) >= batch_rows:
            yield _rows_to_table([r for r in rows if r is not None])
            rows = []
    rows = [r for r in rows if r is not None]
    if rows:
        yield _rows_to_table(rows)


def _jsonl_record(line: bytes, cfg: DatasetConfig, file: FileInfo, line_no: int) -> dict[str, Any] | None:
    """Row numbers of JSONL are 0-based line numbers; blank lines are skipped (not rows)."""
    if not line.strip():
        return None
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return _reject_stub(file, line_no, "invalid_utf8: the line is not valid UTF-8")
    except json.JSONDecodeError as e:
        return _reject_stub(file, line_no, f"bad_json: {e.msg} at column {e.colno}")
    if not isinstance(record, dict):
        return _reject_stub(file, line_no, f"bad_json: expected an object, got {type(record).__name__}")
    return canonical_row(record, cfg, file, line_no)


def _reject_stub(file: FileInfo, row: int, reason: str) -> dict[str, Any]:
    return {
        ID: f"{file.rel}#{row}",
        PROMPT: None,
        RESPONSE: None,
        TEXT: None,
        LABEL: None,
        SOURCE: file.path,
        ROW: row,
        REJECT_REASON: reason,
    }


def read_pieces(files: list[FileInfo]) -> list[dict[str, Any]]:
    """Units of parallel reading: one per Parquet row group, one per JSONL or Arrow file."""
    pieces = []
    for i, f in enumerate(files):
        if f.format == "parquet":
            pieces.extend({"file": i, "row_group": g} for g in range(max(f.row_groups, 0)))
        else:
            pieces.append({"file": i, "row_group": -1})
    return pieces


def read_local(cfg: DatasetConfig, files: list[FileInfo]) -> pa.Table:
    """Read a small dataset (queries, anchors) in-process. Use `read_dataset` for corpora."""
    tables = [t for f in files for t in iter_file(f, cfg)]
    return pa.concat_tables(tables) if tables else READ_SCHEMA.empty_table()


def read_dataset(cfg: DatasetConfig, files: list[FileInfo]):
    """A Ray Dataset of canonical rows (+ reject_reason), streamed, one read task per piece."""
    import ray.data

    pieces = read_pieces(files)
    if not pieces:
        return ray.data.from_arrow(READ_SCHEMA.empty_table())
    files_ref = list(files)

    def read_piece(batch: dict[str, Any]) -> Iterator[pa.Table]:
        for fi, rg in zip(batch["file"], batch["row_group"]):
            file = files_ref[int(fi)]
            yield from iter_file(file, cfg, None if int(rg) < 0 else int(rg))

    ds = ray.data.from_items(pieces, override_num_blocks=len(pieces))
    # num_cpus=0.5 keeps reads schedulable next to compute actors on small nodes.
    return ds.map_batches(read_piece, batch_size=1, batch_format="numpy", num_cpus=0.5)


def files_fingerprint(files: list[FileInfo]) -> list[dict[str, Any]]:
    """What identifies the input files (for manifests and incremental reruns)."""
    return [{"path": storage.redact(f.path), "size": f.size, "mtime": round(f.mtime, 3)} for f in files]


def split_rejects(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(good rows without reject_reason, rejects with source/row/id/reason)."""
    return split_by_reason(table, REJECT_REASON)
