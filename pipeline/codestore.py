"""The LanceDB table of corpus codes. The only module that imports lancedb.

Table (default name `codes`, one row per corpus id):
    id                   string                       corpus row id (unique: `CodeStore.id_audit`)
    code                 fixed_size_list<T>[dim]      T = float16 | int8 | float32 (codes.py)
    source               string                       input file of the row
    row                  int64                        row number within that file
    encoder_fingerprint  string                       model fingerprint + max_len of the encoder
    code_dtype           string
    code_scale           float32                      int8 de-quantisation scale, else 1.0
    encoded_utc          string

What the codes *are* (`CodeSpec`: encoder fingerprint, dim, dtype) is also kept in the Arrow
schema metadata. Codes of different encoders never mix: opening the table for a different spec
replaces it with a new Lance version (`mode="overwrite"`): the contract's table name keeps
meaning "the codes of the current encoder", and the previous codes stay readable as an older
version (recorded in the encode manifest as `replaced`) until versions are cleaned up.

Alongside the table lives `<table>.ledger.json`, the list of input files whose rows are all in
the table (see `Ledger`); it is reset whenever the table is replaced.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.codes import dequantize, numpy_dtype
from pipeline.errors import ArtifactMissingError, InputDataError
from pipeline.schema import CODE, ID, ROW, SOURCE

log = logging.getLogger("influcoder.codestore")

ENCODER_FINGERPRINT = "encoder_fingerprint"
CODE_DTYPE = "code_dtype"
CODE_SCALE = "code_scale"
ENCODED_UTC = "encoded_utc"
_META = b"influcoder.code_spec"
_ARROW_TYPES = {"float16": pa.float16(), "int8": pa.int8(), "float32": pa.float32()}
INDEX_KINDS = ("ivf_hnsw_sq", "ivf_pq")


@dataclass(frozen=True)
class CodeSpec:
    """What a table's codes are; two specs must be equal for codes to share a table."""

    encoder_fingerprint: str
    dim: int
    code_dtype: str

    def to_json(self) -> str:
        return json.dumps(
            {"encoder_fingerprint": self.encoder_fingerprint, "dim": self.dim, "code_dtype": self.code_dtype},
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> "CodeSpec":
        d = json.loads(text)
        return cls(d["encoder_fingerprint"], int(d["dim"]), d["code_dtype"])


def code_schema(spec: CodeSpec) -> pa.Schema:
    return pa.schema(
        [
            pa.field(ID, pa.string(), nullable=False),
            pa.field(CODE, pa.list_(_ARROW_TYPES[spec.code_dtype], spec.dim)),
            pa.field(SOURCE, pa.string()),
            pa.field(ROW, pa.int64()),
            pa.field(ENCODER_FINGERPRINT, pa.string()),
            pa.field(CODE_DTYPE, pa.string()),
            pa.field(CODE_SCALE, pa.float32()),
            pa.field(ENCODED_UTC, pa.string()),
        ],
        metadata={_META: spec.to_json().encode()},
    )


def code_array(codes: np.ndarray) -> pa.FixedSizeListArray:
    """[n, d] numpy codes -> FixedSizeListArray (what LanceDB indexes as a vector; STACK pitfall 7)."""
    codes = np.ascontiguousarray(codes)
    return pa.FixedSizeListArray.from_arrays(pa.array(codes.reshape(-1)), codes.shape[1])


def codes_from_arrow(col: pa.Array | pa.ChunkedArray, code_dtype: str) -> np.ndarray:
    """FixedSizeList column -> [n, d] numpy view (zero-copy for a single chunk without nulls)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    d = col.type.list_size
    values = col.values.slice(col.offset * d, len(col) * d)
    return values.to_numpy(zero_copy_only=False).astype(numpy_dtype(code_dtype), copy=False).reshape(len(col), d)


# Lance file format of the codes table. Scoring is a full scan of fixed-size float16 vectors, and the
# v1 ("legacy") layout decodes them ~5x faster than v2.x on this stack (pylance 4.0.2, 200k x 384
# float16: 4.8-5.3 GB/s vs 0.7-1.1 GB/s). Fragment writes, delete, compaction and the IVF indexes all
# work on it (tests/test_encode_score.py).
STORAGE_VERSION = "legacy"
ROWS_PER_GROUP = 8192  # rows per Lance row group after compaction = rows per scanned batch
SCAN_READAHEAD = 4  # batches decoded ahead of the scorer (Lance's threads overlap with the matmul)
# Rows per Lance data file written by an encode worker (`write_code_fragments`): large fragments
# scan fast and keep the manifest small (lance issues #3635, #5194: thousands of small fragments
# slow every scan and commit), and compaction leaves fragments of this size alone.
FRAGMENT_ROWS = 131072
COMPACT_BELOW_ROWS = FRAGMENT_ROWS // 8


def write_code_fragments(dataset_uri: str, rows: pa.Table, spec: CodeSpec) -> list[str]:
    """Write code rows as new Lance data files of the table at `dataset_uri` and return their
    fragment metadata (JSON). Nothing is visible until `CodeStore.commit_fragments` commits them; the
    files of fragments never committed (a crash in between) hold no rows of any version.

    Runs where the rows are (an encode worker), so codes never pass through the driver."""
    from lance.fragment import write_fragments

    schema = code_schema(spec)
    frags = write_fragments(
        rows.select(schema.names).cast(schema),
        dataset_uri,
        schema=schema,
        max_rows_per_file=FRAGMENT_ROWS,
        max_rows_per_group=ROWS_PER_GROUP,
        data_storage_version=STORAGE_VERSION,
        storage_options=storage.lance_storage_options(dataset_uri) or None,
    )
    return [json.dumps(f.to_json()) for f in frags]


def open_dataset(dataset_uri: str, version: int):
    """The codes table's Lance dataset at `version`, opened where this code runs (a scan worker)."""
    import lance

    return lance.dataset(
        dataset_uri, version=version, storage_options=storage.lance_storage_options(dataset_uri) or None
    )


def fragment_rows(dataset) -> list[tuple[int, int]]:
    """(fragment id, live rows) of each fragment of a dataset version, in table order."""
    return [(f.fragment_id, f.count_rows()) for f in dataset.get_fragments()]


def iter_fragment_batches(
    dataset, fragment_ids: list[int], columns: list[str], batch_rows: int
) -> Iterator[pa.RecordBatch]:
    """Stream some fragments of a dataset version, in order, in Arrow batches of at most `batch_rows`."""
    fragments = [dataset.get_fragment(i) for i in fragment_ids]
    # `scanner`, not `to_batches`: pylance 4.0.2's to_batches swallows `fragments` and scans everything.
    scanner = dataset.scanner(
        columns=columns,
        batch_size=batch_rows,
        batch_readahead=SCAN_READAHEAD,
        fragments=fragments,
        scan_in_order=True,
    )
    for batch in scanner.to_batches():
        if batch.num_rows:
            yield batch


class CodeStore:
    """A LanceDB table of codes: create/replace by spec, atomic appends of worker-written fragments, scans, index."""

    def __init__(self, uri: str, table: str):
        import lancedb

        self.uri = uri
        self.name = table
        # Credentials and endpoint: Lance's own AWS_* environment chain (storage.lance_storage_options).
        self.db = lancedb.connect(uri, storage_options=storage.lance_storage_options(uri) or None)
        self._tbl = None

    # ------------------------------------------------------------------ open / create

    def exists(self) -> bool:
        return self.name in self.db.table_names()

    @property
    def table(self):
        if self._tbl is None:
            if not self.exists():
                raise ArtifactMissingError(
                    f"LanceDB table `{self.name}` does not exist in {storage.redact(self.uri)}; run the "
                    f"encode stage first (`influcoder encode JOB.yaml`)."
                )
            self._tbl = self.db.open_table(self.name)
        return self._tbl

    def stored_spec(self) -> Optional[CodeSpec]:
        if not self.exists():
            return None
        meta = self.table.schema.metadata or {}
        return CodeSpec.from_json(meta[_META].decode()) if _META in meta else None

    def prepare(self, spec: CodeSpec) -> dict[str, Any]:
        """Open the table for writing codes of `spec`; create it, or replace it if its codes differ.

        Returns what happened: {"action": "created" | "reused" | "replaced", ...}.
        """
        if not self.exists():
            self._tbl = self.db.create_table(self.name, schema=code_schema(spec), data_storage_version=STORAGE_VERSION)
            return {"action": "created"}
        old = self.stored_spec()
        if old == spec:
            return {"action": "reused"}
        previous = {"previous_version": self.table.version, "previous_spec": None if old is None else old.__dict__}
        log.warning(
            "LanceDB table `%s` holds codes of another encoder/dtype (%s, now %s); replacing it "
            "with a new version (the old codes stay readable as version %s).",
            self.name,
            old,
            spec,
            previous["previous_version"],
        )
        self._tbl = self.db.create_table(
            self.name, schema=code_schema(spec), mode="overwrite", data_storage_version=STORAGE_VERSION
        )
        return {"action": "replaced", **previous}

    def check_spec(self, spec_dim: Optional[int] = None) -> CodeSpec:
        """The stored spec, failing clearly when the table is missing or was not written by encode."""
        spec = self.stored_spec()
        if spec is None:
            raise InputDataError(
                f"LanceDB table `{self.name}` in {storage.redact(self.uri)} has no influcoder code spec; it was "
                f"not written by the encode stage. Rerun `influcoder encode JOB.yaml --overwrite`."
            )
        if spec_dim is not None and spec.dim != spec_dim:
            raise InputDataError(f"table `{self.name}` holds {spec.dim}-dim codes, the encoder gives {spec_dim}.")
        return spec

    # ------------------------------------------------------------------ writes

    @property
    def dataset_uri(self) -> str:
        """Where the table's Lance dataset is: what workers write fragments to and scan."""
        return self.dataset().uri

    def commit_fragments(self, fragments: list[str]) -> int:
        """Make fragments written by `write_code_fragments` part of the table in one atomic commit (a
        Lance Append on top of the version this store has open); returns the new version."""
        import lance
        from lance.fragment import FragmentMetadata

        if not fragments:
            return self.version
        op = lance.LanceOperation.Append([FragmentMetadata.from_json(f) for f in fragments])
        lance.LanceDataset.commit(
            self.dataset_uri,
            op,
            read_version=self.version,
            storage_options=storage.lance_storage_options(self.uri) or None,
        )
        self.table.checkout_latest()
        return self.version

    def delete_sources(self, sources: list[str]) -> int:
        """Delete every row that came from one of `sources`; returns how many rows went."""
        if not sources or not self.exists():
            return 0
        before = self.count_rows()
        for i in range(0, len(sources), 256):
            quoted = ", ".join("'" + s.replace("'", "''") + "'" for s in sources[i : i + 256])
            self.table.delete(f"{SOURCE} IN ({quoted})")
        return before - self.count_rows()

    def optimize(self) -> None:
        """Compact the small fragments (wave tails, deletions) and fold new rows into the indices."""
        # Only fragments far below FRAGMENT_ROWS are merged (and those with many deleted rows, i.e.
        # re-encoded files, rewritten): compaction runs in this process, and rewriting the workers'
        # large fragments would funnel every code through it after all.
        # Lance's own compaction would write 1,024-row groups, and a scan yields one batch per
        # group: 1,000 Python round trips per 1M rows. 8,192-row groups scan ~2x faster end to
        # end (bench/bench_encode_score.py); much larger groups fall out of cache and are slower.
        ds = self.dataset()
        ds.optimize.compact_files(target_rows_per_fragment=COMPACT_BELOW_ROWS, max_rows_per_group=ROWS_PER_GROUP)
        self.table.checkout_latest()
        if self.table.list_indices():
            self.dataset().optimize.optimize_indices()
            self.table.checkout_latest()
        # As LanceDB's own optimize does: versions older than a week go, and with them the data files
        # no kept version references (replaced codes, and files a crash wrote but never committed).
        self.dataset().cleanup_old_versions(older_than=datetime.timedelta(days=7))

    # ------------------------------------------------------------------ reads

    def count_rows(self) -> int:
        return int(self.table.count_rows()) if self.exists() else 0

    @property
    def version(self) -> int:
        return int(self.table.version)

    def dataset(self):
        """A Lance dataset pinned at the current version (a consistent snapshot for a whole scan)."""
        return self.table.to_lance()

    def iter_batches(self, columns: list[str], batch_rows: int, dataset=None) -> Iterator[pa.RecordBatch]:
        """Stream the table in Arrow batches of at most `batch_rows` rows (bounded memory)."""
        ds = dataset if dataset is not None else self.dataset()
        for batch in ds.to_batches(
            columns=columns, batch_size=batch_rows, batch_readahead=SCAN_READAHEAD, fragment_readahead=2
        ):
            if batch.num_rows:
                yield batch

    def sources_of(self, ids: pa.Array, dataset=None) -> dict[str, list[str]]:
        """Input file (`source`) -> the given ids whose rows came from it. Streams (id, source) and keeps
        only the wanted rows, so memory follows `ids` (a selection, some top-k hits), not the table."""
        out: dict[str, list[str]] = {}
        if len(ids) == 0:
            return out
        for batch in self.iter_batches([ID, SOURCE], 65536, dataset=dataset):
            t = pa.Table.from_batches([batch])
            t = t.filter(pc.is_in(t.column(ID), value_set=ids))
            for i, src in zip(t.column(ID).to_pylist(), t.column(SOURCE).to_pylist()):
                out.setdefault(src, []).append(i)
        return out

    def codes_of(self, ids: Sequence[str], batch_rows: int = 65536, dataset=None) -> tuple[list[str], np.ndarray]:
        """The stored codes of those of `ids` the table (or the `dataset` snapshot of it) holds, de-quantised
        to float32 [found, dim], with their ids (in table order). Streams (id, code[, scale]) and keeps only
        the wanted rows, so memory follows `ids`, not the table."""
        spec = self.check_spec()
        columns = [ID, CODE, CODE_SCALE] if spec.code_dtype == "int8" else [ID, CODE]
        found: list[str] = []
        blocks = [np.zeros((0, spec.dim), np.float32)]
        wanted = pa.array(list(ids), pa.string())
        if len(wanted) == 0:
            return found, blocks[0]
        for batch in self.iter_batches(columns, batch_rows, dataset=dataset):
            t = pa.Table.from_batches([batch])
            t = t.filter(pc.is_in(t.column(ID), value_set=wanted))
            if t.num_rows:
                codes = codes_from_arrow(t.column(CODE), spec.code_dtype)
                scales = t.column(CODE_SCALE).to_numpy() if spec.code_dtype == "int8" else None
                blocks.append(dequantize(codes, scales))
                found += t.column(ID).to_pylist()
        return found, np.concatenate(blocks)

    def id_audit(self, max_rows: int = 2_000_000) -> Optional[dict[str, Any]]:
        """{"distinct": number of distinct ids, "duplicates": [(id, [sources]), ...] (at most 20)};
        None (not checked) above `max_rows` rows, to keep this process's memory bounded."""
        n = self.count_rows()
        if n > max_rows:
            return None
        t = self.dataset().to_table(columns=[ID, SOURCE])
        counts = t.group_by(ID).aggregate([(SOURCE, "count")])
        repeated = counts.filter(pc.greater(counts.column(f"{SOURCE}_count"), 1)).column(ID)
        dup = t.filter(pc.is_in(t.column(ID), value_set=repeated.slice(0, 20)))
        by_id: dict[str, list[str]] = {}
        for i, src in zip(dup.column(ID).to_pylist(), dup.column(SOURCE).to_pylist()):
            by_id.setdefault(i, []).append(src)
        return {"distinct": counts.num_rows, "duplicates": sorted((i, sorted(s)) for i, s in by_id.items())}

    def sample(self, n: int, columns: list[str], seed: int = 0) -> pa.Table:
        total = self.count_rows()
        idx = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
        return self.dataset().take(idx.tolist(), columns=columns)

    # ------------------------------------------------------------------ vector index

    def index_params(self, kind: str, num_rows: int, dim: int) -> dict[str, int]:
        """Index parameters derived from the table size.

        IVF partitions ~ sqrt(N) (the usual IVF rule), but at least ~4k rows per partition for
        HNSW (a graph per partition does the fine search; small partitions only add overhead).
        PQ: sub-vectors of 8 dims (dim/8 of them), the finest split LanceDB trains quickly; PQ
        alone loses recall (STACK 3.4: 0.37 at recall@10), which `refine_factor` wins back.
        """
        sqrt_n = int(math.sqrt(max(num_rows, 1)))
        if kind == "ivf_hnsw_sq":
            return {"num_partitions": max(1, min(sqrt_n, num_rows // 4096))}
        sub = dim // 8 if dim % 8 == 0 else max(d for d in range(1, dim + 1) if dim % d == 0 and d <= dim // 4)
        return {"num_partitions": max(1, min(sqrt_n, num_rows // 256)), "num_sub_vectors": sub}

    def build_index(self, kind: str, dim: int) -> dict[str, Any]:
        from lancedb.index import IvfHnswSq, IvfPq

        if kind not in INDEX_KINDS:
            raise ValueError(f"index kind {kind!r}: expected one of {INDEX_KINDS}")
        n = self.count_rows()
        params = self.index_params(kind, n, dim)
        cls = IvfHnswSq if kind == "ivf_hnsw_sq" else IvfPq
        import time

        t0 = time.perf_counter()
        self.table.create_index(CODE, config=cls(distance_type="cosine", **params), replace=True)
        return {
            "type": kind,
            "metric": "cosine",
            "params": params,
            "rows": n,
            "build_s": round(time.perf_counter() - t0, 3),
        }

    def has_vector_index(self) -> bool:
        return any(CODE in ix.columns for ix in self.table.list_indices())

    def search(
        self, queries: np.ndarray, k: int, *, exact: bool, nprobes: int = 20, refine_factor: Optional[int] = None
    ) -> pa.Table:
        """Top-k rows per query (batched): columns query_index, id, score (cosine)."""
        q = self.table.search(np.asarray(queries, np.float32), vector_column_name=CODE)
        q = q.distance_type("cosine").limit(k).select([ID, "_distance"])
        if exact:
            q = q.bypass_vector_index()
        else:
            q = q.nprobes(nprobes)
            if refine_factor:
                q = q.refine_factor(refine_factor)
        res = q.to_arrow()
        if "query_index" not in res.column_names:  # a single query comes back without it
            res = res.append_column("query_index", pa.array(np.zeros(res.num_rows, np.int32)))
        score = pc.subtract(pa.scalar(1.0, pa.float32()), pc.cast(res.column("_distance"), pa.float32()))
        return pa.table({"query_index": res.column("query_index"), ID: res.column(ID), "score": score})

    def index_recall(
        self, k: int, num_queries: int, nprobes: int, refine_factor: int, code_dtype: str, seed: int = 0
    ) -> dict[str, Any]:
        """recall@k of the index against exact (flat) search, with real codes of the table as queries."""
        from pipeline.codes import dequantize

        sample = self.sample(num_queries, [CODE, CODE_SCALE], seed=seed)
        queries = dequantize(codes_from_arrow(sample.column(CODE), code_dtype), sample.column(CODE_SCALE).to_numpy())
        k = min(k, self.count_rows())
        exact = _ids_per_query(self.search(queries, k, exact=True), len(queries))
        out: dict[str, Any] = {"k": k, "queries": len(queries), "nprobes": nprobes}
        for name, rf in (("recall", None), ("recall_refined", refine_factor)):
            approx = _ids_per_query(
                self.search(queries, k, exact=False, nprobes=nprobes, refine_factor=rf), len(queries)
            )
            out[name] = float(np.mean([len(exact[i] & approx[i]) / max(1, len(exact[i])) for i in range(len(queries))]))
        out["refine_factor"] = refine_factor
        return out


def _ids_per_query(res: pa.Table, n: int) -> list[set]:
    out: list[set] = [set() for _ in range(n)]
    for qi, i in zip(res.column("query_index").to_pylist(), res.column(ID).to_pylist()):
        out[qi].add(i)
    return out


class Ledger:
    """Input files whose rows are all in the table: `{path: {size, mtime, rows, rejects}}`.

    Stored as `<lancedb_uri>/<table>.ledger.json` (LanceDB ignores non-table files), written
    atomically after each group of files is committed, so after a crash the ledger never
    claims a file whose rows are missing. `spec` and `text_key` (how texts are built from the
    corpus columns) guard it: a ledger for other codes or other texts is discarded.
    """

    def __init__(self, uri: str, table: str):
        self.path = storage.join(uri, f"{table}.ledger.json")
        self.files: dict[str, dict[str, Any]] = {}
        self.key: dict[str, Any] = {}

    def load(self, key: dict[str, Any]) -> "Ledger":
        self.key = key
        if storage.exists(self.path):
            data = storage.read_json(self.path)
            if data.get("key") == key:
                self.files = data.get("files", {})
            else:
                log.info("encode ledger %s is for other codes or texts; starting over.", storage.redact(self.path))
        return self

    def reset(self) -> None:
        self.files = {}
        self.save()

    def is_done(self, path: str, size: int, mtime: float) -> bool:
        e = self.files.get(path)
        return e is not None and e["size"] == size and abs(e["mtime"] - mtime) < 1e-3

    def mark_done(self, entries: dict[str, dict[str, Any]]) -> None:
        self.files.update(entries)
        self.save()

    def forget(self, paths: list[str]) -> None:
        for p in paths:
            self.files.pop(p, None)
        self.save()

    def save(self) -> None:
        storage.write_json_atomic(self.path, {"key": self.key, "files": self.files})

    @property
    def rows(self) -> int:
        return sum(int(e.get("rows", 0)) for e in self.files.values())
