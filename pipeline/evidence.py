"""Evidence per query: why a row was flagged, readable without opening Parquet files.

For each query (the first MAX_QUERIES, or one chosen), its top hits from `score/topk.parquet` (the
encoder's exact per-query top-k) with the row's text snippet, the encoder score, the label when the
corpus has one and, when the cascade ran (`score.rerank_top`), the teacher's score from
`score/scores.parquet` (its mean cosine over all queries; null for rows outside the re-ranked block).

`build`, `to_markdown` and `to_text` are pure (tables and dicts in, text out); `for_job` and `load`
read the artifacts and the corpus text (in-process, no Ray: only the few hit rows are kept). The eval
report's "Evidence per query" section and `influcoder show RUN_DIR` both come from here.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Any, Optional

import pyarrow as pa

from pipeline.schema import ID, QUERY_ID, RANK, RERANKED, SCORE, TEACHER_SCORE

MAX_QUERIES = 10  # queries shown by default (report and `show`)
DEFAULT_K = 5  # hits per query


@dataclass(frozen=True)
class Hit:
    rank: int
    id: str
    score: float
    text: Optional[str] = None
    label: Optional[int] = None
    teacher_score: Optional[float] = None
    reranked: Optional[bool] = None


@dataclass(frozen=True)
class QueryHits:
    query_id: str
    query_text: Optional[str]
    hits: list[Hit]


@dataclass(frozen=True)
class Evidence:
    queries: list[QueryHits]
    total_queries: int  # queries in topk.parquet
    k: int  # hits shown per query
    top_k: int  # hits stored per query (score.top_k)
    has_labels: bool
    has_teacher: bool  # the cascade ran: scores.parquet has teacher_score
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- pure


def query_order(topk: pa.Table) -> list[str]:
    """Query ids in the order topk.parquet lists them (the score stage writes them sorted by id)."""
    seen: dict[str, None] = {}
    for q in topk.column(QUERY_ID).to_pylist():
        seen.setdefault(q, None)
    return list(seen)


def pick_queries(topk: pa.Table, query: Optional[str], max_queries: int) -> list[str]:
    """The queries to show: `query` alone, or the first `max_queries`. KeyError for an unknown id."""
    order = query_order(topk)
    if query is None:
        return order[:max_queries]
    if query not in order:
        raise KeyError(query)
    return [query]


def build(
    topk: pa.Table,
    rows: dict[str, dict[str, Any]],
    query_texts: dict[str, str],
    queries: list[str],
    k: int,
    teacher: Optional[dict[str, tuple[Optional[float], Optional[bool]]]] = None,
    has_labels: bool = False,
    notes: Optional[list[str]] = None,
) -> Evidence:
    """Per query in `queries`: its hits of rank <= k, with text/label from `rows` (id -> {"text",
    "label"}) and, when given, the teacher's score and the re-ranked flag (id -> (score, reranked))."""
    by_query: dict[str, list[dict[str, Any]]] = {q: [] for q in queries}
    for r in topk.select([QUERY_ID, ID, SCORE, RANK]).to_pylist():
        if r[QUERY_ID] in by_query and r[RANK] <= k:
            by_query[r[QUERY_ID]].append(r)
    out = []
    for q in queries:
        hits = []
        for r in sorted(by_query[q], key=lambda r: r[RANK]):
            row = rows.get(r[ID]) or {}
            t_score, t_flag = (teacher or {}).get(r[ID], (None, None))
            hits.append(
                Hit(
                    rank=int(r[RANK]),
                    id=r[ID],
                    score=float(r[SCORE]),
                    text=row.get("text"),
                    label=row.get("label"),
                    teacher_score=t_score,
                    reranked=t_flag,
                )
            )
        out.append(QueryHits(q, query_texts.get(q), hits))
    counts = topk.group_by(QUERY_ID).aggregate([(ID, "count")]).column(f"{ID}_count").to_pylist()
    return Evidence(
        queries=out,
        total_queries=len(query_order(topk)),
        k=k,
        top_k=max(counts) if counts else 0,
        has_labels=has_labels,
        has_teacher=teacher is not None,
        notes=list(notes or []),
    )


def snippet(text: Optional[str], chars: int) -> str:
    """One line: whitespace collapsed, cut at `chars` with an ellipsis."""
    if text is None:
        return "(text not available)"
    flat = " ".join(text.split())
    return flat if len(flat) <= chars else flat[: max(chars - 1, 0)].rstrip() + "…"


def _num(v: Optional[float], spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


def to_markdown(ev: Evidence, snippet_chars: int = 160) -> list[str]:
    """The report's "Evidence per query" section (markdown lines)."""
    lines = [
        "## Evidence per query",
        "",
        f"The top {ev.k} rows of {len(ev.queries)} of the {ev.total_queries} queries by the encoder's cosine "
        f"(`score/topk.parquet`, {ev.top_k} per query stored), with their text"
        + (", label" if ev.has_labels else "")
        + (
            " and the teacher's score (its mean cosine over all queries; – outside the re-ranked block)"
            if ev.has_teacher
            else ""
        )
        + ". `influcoder show RUN_DIR --query ID --k N` prints any query.",
        "",
    ]
    lines += [f"*{n}*" for n in ev.notes] + ([""] if ev.notes else [])
    head = ["rank", "score"] + (["label"] if ev.has_labels else []) + (["teacher"] if ev.has_teacher else [])
    head += ["id", "text"]
    for q in ev.queries:
        lines += [f"### Query `{q.query_id}`", ""]
        if q.query_text is not None:
            lines += [f"> {_md(snippet(q.query_text, snippet_chars))}", ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---:|" * (len(head) - 2) + "---|---|"]
        for h in q.hits:
            cells = [str(h.rank), _num(h.score)]
            cells += [("–" if h.label is None else str(h.label))] if ev.has_labels else []
            cells += [_num(h.teacher_score)] if ev.has_teacher else []
            cells += [f"`{h.id.replace('`', '')}`", _md(snippet(h.text, snippet_chars))]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _md(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")


def to_text(ev: Evidence, width: int = 80, snippet_lines: int = 3) -> str:
    """The terminal view: fits `width` columns (snippets wrapped, at most `snippet_lines` lines)."""
    indent = " " * 8
    wrap = textwrap.TextWrapper(width=width, initial_indent=indent, subsequent_indent=indent, max_lines=snippet_lines)
    out: list[str] = [f"{ev.total_queries} queries; showing {len(ev.queries)}, top {ev.k} of {ev.top_k} hits each"]
    out += [textwrap.fill(n, width) for n in ev.notes]
    if ev.has_teacher:
        out.append(textwrap.fill("teacher = the teacher's mean cosine over all queries (cascade block only)", width))
    for q in ev.queries:
        out += ["", _cut(f"query {q.query_id}", width)]
        if q.query_text is not None:
            out += textwrap.wrap(
                snippet(q.query_text, 10 * width),
                width=width,
                initial_indent="  > ",
                subsequent_indent="    ",
                max_lines=2,
            )
        head = f"  {'rank':>4}  {'score':>7}"
        head += f"  {'label':>5}" if ev.has_labels else ""
        head += f"  {'teacher':>7}" if ev.has_teacher else ""
        out.append(head + "  id")
        for h in q.hits:
            line = f"  {h.rank:>4}  {_num(h.score, '7.4f')}"
            line += f"  {('–' if h.label is None else str(h.label)):>5}" if ev.has_labels else ""
            line += f"  {_num(h.teacher_score, '7.4f'):>7}" if ev.has_teacher else ""
            out.append(_cut(f"{line}  {h.id}", width))
            out += wrap.wrap(snippet(h.text, 10 * width)) or [indent]
        if not q.hits:
            out.append("  (no hits)")
    return "\n".join(out)


def _cut(line: str, width: int) -> str:
    return line if len(line) <= width else line[: width - 1] + "…"


# --------------------------------------------------------------------------- I/O


def load(run_dir: str, query: Optional[str] = None, k: int = DEFAULT_K, max_queries: int = MAX_QUERIES) -> Evidence:
    """Evidence from a run directory alone: the job is the one recorded in score/manifest.json."""
    from pipeline import storage
    from pipeline.config import load_job
    from pipeline.errors import ArtifactMissingError, ConfigError, UsageError

    if not storage.exists(run_dir):
        raise UsageError(f"{storage.redact(run_dir)} does not exist; pass the run_dir of a job (its `run_dir:` key).")
    manifest_path = storage.join(run_dir, "score", "manifest.json")
    topk_path = storage.join(run_dir, "score", "topk.parquet")
    if not (storage.exists(manifest_path) and storage.exists(topk_path)):
        raise ArtifactMissingError(
            f"{storage.redact(run_dir)} has no finished score stage ({storage.redact(topk_path)} or its manifest "
            f"is missing). Run `influcoder score JOB.yaml` (or `influcoder run JOB.yaml`) for this run_dir first."
        )
    manifest = storage.read_json(manifest_path)
    try:
        job = load_job(data=manifest["config"])
    except (ConfigError, KeyError) as e:
        raise UsageError(
            f"{storage.redact(manifest_path)}: the job recorded there does not load with this influcoder ({e}); "
            f"rerun the score stage with it."
        ) from None
    return for_job(job, query=query, k=k, max_queries=max_queries)


def for_job(job, query: Optional[str] = None, k: int = DEFAULT_K, max_queries: int = MAX_QUERIES) -> Evidence:
    """Evidence from a job's score artifacts and corpus text."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline import storage
    from pipeline.errors import UsageError

    score_dir = storage.join(job.run_dir, "score")
    fs, p = storage.filesystem(storage.join(score_dir, "topk.parquet"))
    topk = pq.read_table(p, filesystem=fs)
    try:
        queries = pick_queries(topk, query, max_queries)
    except KeyError:
        known = query_order(topk)
        raise UsageError(
            f"--query {query}: no such query id in {storage.redact(score_dir)}/topk.parquet; it has "
            f"{len(known)} queries, e.g. {', '.join(known[:5])}."
        ) from None
    wanted = {
        r[ID] for r in topk.select([QUERY_ID, ID, RANK]).to_pylist() if r[QUERY_ID] in set(queries) and r[RANK] <= k
    }
    ids = pa.array(sorted(wanted), pa.string())
    teacher = None
    fs, p = storage.filesystem(storage.join(score_dir, "scores.parquet"))
    if (
        storage.exists(storage.join(score_dir, "scores.parquet"))
        and TEACHER_SCORE in pq.read_schema(p, filesystem=fs).names
    ):
        t = pq.read_table(p, columns=[ID, TEACHER_SCORE, RERANKED], filesystem=fs, filters=pc.field(ID).isin(ids))
        teacher = {
            i: (s, f)
            for i, s, f in zip(
                t.column(ID).to_pylist(), t.column(TEACHER_SCORE).to_pylist(), t.column(RERANKED).to_pylist()
            )
        }
    notes: list[str] = []
    rows: dict[str, dict[str, Any]] = {}
    query_texts: dict[str, str] = {}
    try:
        rows = _corpus_rows(job, ids)
        query_texts = _query_texts(job, set(queries))
    except UsageError as e:  # e.g. relative data paths seen from another working directory
        notes.append(f"Texts not shown: {e}")
    return build(topk, rows, query_texts, queries, k, teacher, job.corpus.label_column is not None, notes)


def _corpus_rows(job, ids: pa.Array) -> dict[str, dict[str, Any]]:
    """id -> {"text", "label"} of the wanted corpus rows: the files that hold them (LanceDB's `source`
    of each id, when the codes table is there) are streamed and only the wanted rows are kept."""
    import pyarrow.compute as pc

    from pipeline import corpus
    from pipeline.schema import LABEL, TEXT

    if len(ids) == 0:
        return {}
    files = corpus.discover(job.corpus, "corpus")
    try:
        from pipeline.codestore import CodeStore

        sources = CodeStore(job.lancedb_uri, job.encode.table).sources_of(ids)
        if sum(len(v) for v in sources.values()) >= len(ids):
            files = [f for f in files if f.path in sources]
    except Exception:  # noqa: BLE001 - no codes table here: read every file instead (slower, same rows)
        pass
    found: dict[str, dict[str, Any]] = {}
    for f in files:
        for batch in corpus.iter_file(f, job.corpus):
            hit = batch.filter(pc.is_in(batch.column(ID), value_set=ids))
            for r in hit.select([ID, TEXT, LABEL]).to_pylist():
                found.setdefault(r[ID], {"text": r[TEXT], "label": r[LABEL]})
        if len(found) == len(ids):
            break
    return found


def _query_texts(job, wanted: set[str]) -> dict[str, str]:
    from pipeline import corpus
    from pipeline.schema import TEXT

    cfg = job.score.queries
    table = corpus.read_local(cfg, corpus.discover(cfg, "score.queries"))
    return {r[ID]: r[TEXT] for r in table.select([ID, TEXT]).to_pylist() if r[ID] in wanted}
