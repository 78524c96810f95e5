"""Reading corpora: Parquet and JSONL, local or on pyarrow filesystems, streamed, never loaded whole.

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
from pipeline.schema import CANONICAL, ID, LABEL, PROMPT, RESPONSE, ROW, SOURCE, TEXT

REJECT_REASON = "reject_reason"
READ_SCHEMA = pa.schema([*CANONICAL, pa.field(REJECT_REASON, pa.string())])
PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
BATCH_ROWS = 4096  # rows per yielded batch: bounds a read task's memory


@dataclass(frozen=True)
class FileInfo:
    path: str  # as given (URI-preserving)
    rel: str  # relative to the dataset root: used in derived ids and `source`
    format: str  # "parquet" | "jsonl"
    size: int
    mtime: float
    num_rows: int | None  # known for Parquet from the footer
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


def discover(cfg: DatasetConfig, what: str) -> list[FileInfo]:
    """List and validate a dataset's files before any work starts. `what` names the config section."""
    fs, root, infos = _list(cfg, what)
    files: list[FileInfo] = []
    mapped = _mapped_columns(cfg)
    for info in sorted(infos, key=lambda i: i.path):
        base = posixpath.basename(info.path)
        if base.startswith((".", "_")):  # _SUCCESS, .crc, hidden files
            continue
        fmt = _format_of(info.path, cfg)
        if fmt is None:
            continue
        rel = posixpath.relpath(info.path, root) if root else base
        shown = storage.redact(_uri_for(cfg, info.path))
        partitions = _hive_partitions(rel)
        if fmt == "parquet":
            num_rows, row_groups = _check_parquet(fs, info.path, shown, mapped, dict(partitions), what)
        else:
            num_rows, row_groups = None, 1
            _check_jsonl(fs, info.path, shown, mapped, dict(partitions), what, info.size)
        mtime = info.mtime.timestamp() if info.mtime else 0.0
        files.append(
            FileInfo(_uri_for(cfg, info.path), rel, fmt, int(info.size or 0), mtime, num_rows, row_groups, partitions)
        )
    if not files:
        raise InputDataError(
            f"{what}.path: no Parquet (.parquet/.pq) or JSONL (.jsonl/.json) files under "
            f"{storage.redact(cfg.path)}; point it at your data or set {what}.format."
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
    for role, col in mapped.items():
        if col in partitions:
            continue
        if col not in schema.names:
            raise InputDataError(
                f"{what}: column `{col}` ({what}.{role}) is missing in {shown}; it has columns "
                f"{schema.names}. Set {what}.{role} to one of them."
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
    return meta.num_rows, meta.num_row_groups


def _check_jsonl(
    fs: pafs.FileSystem,
    path: str,
    shown: str,
    mapped: dict[str, str],
    partitions: dict[str, str],
    what: str,
    size: int | None,
) -> None:
    if not size:
        return  # an empty file holds no rows; nothing to check
    try:
        with fs.open_input_stream(path) as f:
            head = f.read(1 << 20)
    except Exception as e:  # noqa: BLE001
        raise InputDataError(f"{what}: cannot read {shown} ({type(e).__name__}: {e}).") from None
    for line in head.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # a bad line is a row-level reject; check the schema on the first good record
        if not isinstance(record, dict):
            raise InputDataError(f"{what}: {shown} is not JSON Lines of objects (first record: {str(record)[:80]}).")
        for role, col in mapped.items():
            if role in ("label_column", "encoder_text_column", "id_column") or col in partitions:
                continue
            if col not in record:
                raise InputDataError(
                    f"{what}: column `{col}` ({what}.{role}) is missing in {shown} (first record has keys "
                    f"{sorted(record)}). Set {what}.{role} to one of them."
                )
        return


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
        if raw is None or (isinstance(raw, str) and not raw.strip()):
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
        reason = reason or r
    else:
        prompt = ""
        if cfg.prompt_column:
            value = record.get(cfg.prompt_column)
            if value is not None:
                prompt, r = _as_text(value, cfg.prompt_column)
                reason = reason or r
        response, r = _as_text(record.get(cfg.response_column), cfg.response_column)  # type: ignore[arg-type]
        reason = reason or r
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


def _iter_jsonl(fs, path, file, cfg, batch_rows) -> Iterator[pa.Table]:
    rows: list[dict[str, Any]] = []
    with fs.open_input_stream(path) as f:
        buf = b""
        line_no = 0
        while True:
            block = f.read(1 << 20)
            if not block:
                break
            buf += block
            *lines, buf = buf.split(b"\n")
            for line in lines:
                rows.append(_jsonl_record(line, cfg, file, line_no))
                line_no += 1
                if len(rows) >= batch_rows:
                    yield _rows_to_table([r for r in rows if r is not None])
                    rows = []
        if buf.strip():
            rows.append(_jsonl_record(buf, cfg, file, line_no))
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
    """Units of parallel reading: one per Parquet row group, one per JSONL file."""
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
    import pyarrow.compute as pc

    bad_mask = pc.is_valid(table.column(REJECT_REASON))
    good = table.filter(pc.invert(bad_mask)).drop_columns([REJECT_REASON])
    bad = table.filter(bad_mask)
    rejects = pa.table(
        {SOURCE: bad.column(SOURCE), ROW: bad.column(ROW), ID: bad.column(ID), "reason": bad.column(REJECT_REASON)}
    )
    return good, rejects
