"""Run directories: every stage writes `run_dir/<stage>/` atomically, with a manifest.

Lifecycle of a stage run (see `run_stage`):
1. If `run_dir/<stage>/manifest.json` exists with the same identity (config hash, upstream
   manifests, input fingerprint), the stage is skipped, with or without `--overwrite`: reruns do only
   what changed. A different config hash is refused unless `--overwrite` is given (the refusal names
   each changed job key); the same config over changed upstream artifacts or inputs is recomputed
   (the stage is a function of them). The log says which keys, upstream stages or inputs changed.
2. The stage writes into a temporary directory `run_dir/.<stage>.tmp-<id>/`. Resumable work
   (finished shards) lives in `run_dir/.work/<stage>-<identity>/`, which survives a crash and is
   keyed by the identity, so partial work of another config can never be mixed in.
3. The manifest is written last, then the temporary directory is renamed to `run_dir/<stage>/`.

On object stores (a URI run_dir: s3://, gs://, ...) there is no directory rename, so a stage writes
its files in place, into `run_dir/<stage>/`, and the manifest, written last (one PUT, atomic), is the
completion marker: a stage folder without a manifest is half-written, never read as finished, and is
deleted by the next run of that stage before it writes. Recomputing a finished stage deletes its
manifest first (so a crash in between leaves a half-written stage, not a stale "finished" one), then
its files. One job per URI run_dir at a time: object stores have no lock (`storage.exclusive_lock`).
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa

from pipeline import __version__, storage
from pipeline.config import (
    STAGE_UPSTREAM,
    JobConfig,
    key_changes,
    stable_hash,
    stage_config_hash,
    stage_inputs,
    to_dict,
)
from pipeline.errors import ArtifactMismatchError, ArtifactMissingError, InputDataError, UsageError
from pipeline.corpus import discovery_scope
from pipeline.schema import REJECTS

log = logging.getLogger("influcoder")

MANIFEST = "manifest.json"
REJECTS_FILE = "rejects.parquet"


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    """Installed versions of the libraries that shape results, for the manifest. Read from the
    packages' metadata, not by importing them: importing peft, transformers and lancedb costs a
    stage's driver seconds of CPU it otherwise never spends (a sketch driver never loads peft)."""
    out = {"influcoder": __version__, "python": platform.python_version()}
    for dist in ("torch", "ray", "transformers", "peft", "lancedb", "pyarrow", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:  # a missing optional package is just not recorded
            pass
    return out


def git_sha() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return (
            subprocess.run(
                ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or None
        )
    except Exception:  # noqa: BLE001
        return None


def stage_dir(job: JobConfig, stage: str) -> str:
    return storage.join(job.run_dir, stage)


def read_manifest(job: JobConfig, stage: str) -> dict[str, Any] | None:
    path = storage.join(stage_dir(job, stage), MANIFEST)
    return storage.read_json(path) if storage.exists(path) else None


def require_manifest(job: JobConfig, stage: str, needed_by: str) -> dict[str, Any]:
    m = read_manifest(job, stage)
    if m is None:
        raise ArtifactMissingError(
            f"{needed_by} needs the finished `{stage}` stage under {storage.redact(job.run_dir)}; "
            f"run `influcoder {stage} JOB.yaml` (or `influcoder run JOB.yaml`) first."
        )
    return m


@dataclass
class StageRun:
    """What a stage module's `run(ctx)` gets: where to write, what is upstream, what to record."""

    job: JobConfig
    stage: str
    config_hash: str
    identity: str
    upstream: dict[str, dict[str, Any]]
    out_dir: str
    work_dir: str
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def run_dir(self) -> str:
        return self.job.run_dir

    def upstream_dir(self, stage: str) -> str:
        return stage_dir(self.job, stage)

    def record(self, **fields: Any) -> None:
        """Add fields (row counts, metrics, table versions, seeds) to this stage's manifest."""
        self.manifest.update(fields)

    def write_rejects(
        self, rejects: pa.Table, total_rows: int, max_frac: float, what: str, limit_key: str | None = None
    ) -> None:
        """Write `<stage>/rejects.parquet` and fail when the rejected fraction passes `max_frac`.

        `limit_key` is the dotted job key holding `max_frac` (default `<stage>.max_reject_frac`). A failed
        stage's output directory is deleted, so its rejects are also kept at `run_dir/<stage>.rejects.parquet`
        (removed again by the next run that passes) and the message counts them by reason."""
        import math

        import pyarrow.parquet as pq

        rejects = rejects.select(REJECTS.names).cast(REJECTS)
        limit_key = limit_key or f"{self.stage}.max_reject_frac"
        fs, path = storage.filesystem(storage.join(self.out_dir, REJECTS_FILE))
        pq.write_table(rejects, path, filesystem=fs)
        counts: dict[str, int] = {}
        example: dict[str, dict[str, Any]] = {}
        for r in rejects.to_pylist():
            key = r["reason"].split(":")[0]
            counts[key] = counts.get(key, 0) + 1
            example.setdefault(key, r)
        self.record(rejects={"rows": rejects.num_rows, "by_reason": counts})
        frac = rejects.num_rows / max(total_rows, 1)
        kept = storage.join(self.job.run_dir, f"{self.stage}.{REJECTS_FILE}")
        if frac <= max_frac:
            if storage.exists(kept):  # a previous failure's copy: this run's rejects are in the stage dir
                fs_k, p_k = storage.filesystem(kept)
                fs_k.delete_file(p_k)
            if rejects.num_rows:
                log.warning(
                    "%s: %d of %d rows rejected (%s); see %s",
                    what,
                    rejects.num_rows,
                    total_rows,
                    counts,
                    storage.redact(storage.join(stage_dir(self.job, self.stage), REJECTS_FILE)),
                )
            return
        fs_k, p_k = storage.filesystem(kept)
        pq.write_table(rejects, p_k, filesystem=fs_k)
        by_reason = "; ".join(
            f"{n} {key} (e.g. {storage.redact(str(example[key]['source']))} row {example[key]['row']}: "
            f"{example[key]['reason']})"
            for key, n in sorted(counts.items(), key=lambda kv: -kv[1])[:5]
        )
        raise InputDataError(
            f"{what}: {rejects.num_rows} of {total_rows} rows ({frac:.1%}) were rejected, more than "
            f"{limit_key}={max_frac}. By reason: {by_reason}. Every reject: {storage.redact(kept)}. Fix the input "
            f"rows, or accept them with --set {limit_key}={min(1.0, math.ceil(frac * 100) / 100):g}."
        )


def input_fingerprint(job: JobConfig, stage: str) -> dict[str, Any]:
    """What besides the config makes a stage's output change (input files, model weights)."""
    from pipeline.stages import stage as stage_of

    return stage_of(stage).fingerprint(job)


def stage_identity(job: JobConfig, stage: str, upstream: dict[str, dict[str, Any]], input_fp: dict[str, Any]) -> str:
    return stable_hash(
        {
            "stage": stage,
            "config": stage_config_hash(job, stage),
            "upstream": {s: m.get("identity") for s, m in sorted(upstream.items())},
            "inputs": input_fp,
        }
    )


def _plain(data: Any) -> Any:
    """`data` as a manifest records it (redacted, JSON round-tripped), so it compares with a manifest's."""
    return json.loads(json.dumps(storage.redact_obj(data), default=str))


@dataclass
class Changes:
    """Why a finished stage no longer matches the job (what `run` would recompute, and why)."""

    config: list[str] = field(default_factory=list)
    """Changed job keys, `key: old -> new`; only these need --overwrite."""
    upstream: list[str] = field(default_factory=list)
    """Upstream stages recomputed since this stage ran."""
    inputs: list[str] = field(default_factory=list)
    """Entries of the input fingerprint (files, model weights) that changed."""
    notes: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.config or self.upstream or self.inputs or self.notes)

    def describe(self) -> str:
        parts = []
        if self.config:
            parts.append("config changed (" + "; ".join(self.config) + ")")
        if self.upstream:
            parts.append("upstream " + ", ".join(f"`{s}`" for s in self.upstream) + " recomputed since it ran")
        if self.inputs:
            parts.append("inputs changed (" + ", ".join(self.inputs) + ")")
        return "; ".join(parts + self.notes)


def config_changes(job: JobConfig, stage: str, manifest: dict[str, Any]) -> list[str]:
    """The job keys (`fit.epochs: 3 -> 5`) whose values differ from what a stage's manifest recorded;
    [] when the config hash matches."""
    if manifest.get("config_hash") == stage_config_hash(job, stage):
        return []
    changed = key_changes(job, manifest.get("stage_inputs") or {}, _plain(stage_inputs(job, stage)))
    return changed or ["(keys not recorded: the manifest was written by another version of influcoder)"]


def changes_since(
    job: JobConfig | None,
    stage: str,
    manifest: dict[str, Any],
    upstream: dict[str, dict[str, Any]],
    input_fp: dict[str, Any] | None,
) -> Changes:
    """Compare a finished stage's manifest with the job, the upstream manifests and the input fingerprint
    (None: not checked; without the job, only the upstream manifests are compared)."""
    why = Changes(config=config_changes(job, stage, manifest) if job is not None else [])
    recorded = manifest.get("upstream") or {}
    why.upstream = [
        s for s, m in sorted(upstream.items()) if (recorded.get(s) or {}).get("identity") != m.get("identity")
    ]
    if job is not None and input_fp is not None:
        was, now = manifest.get("inputs") or {}, _plain(input_fp)
        why.inputs = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
        complete = set(upstream) == set(STAGE_UPSTREAM[stage])
        if not why and complete and manifest.get("identity") != stage_identity(job, stage, upstream, input_fp):
            why.notes.append("its identity was recorded by another version of influcoder")
    return why


def refusal_message(job: JobConfig, changed: dict[str, list[str]], command: str | None = None) -> str:
    """The refusal to replace finished stages made with another config: every changed key, and the fix."""
    lines = [f"{storage.redact(job.run_dir)}: finished stages were made with a different config:"]
    width = max(len(s) for s in changed)
    lines += [f"  {stage:<{width}}  {'; '.join(keys)}" for stage, keys in changed.items()]
    if command:
        lines += [
            "To recompute only what changed (stages whose config and inputs are unchanged are kept):",
            f"  {command}",
            "or use another run_dir.",
        ]
    else:
        lines.append(
            "Rerun with --overwrite to recompute them (stages whose config and inputs are unchanged are kept), "
            "or use another run_dir."
        )
    return "\n".join(lines)


def refuse_config_changes(job: JobConfig, stages: list[str], rerun: Callable[[str], str] | None = None) -> None:
    """Before any stage runs: refuse when a finished stage among `stages` was made with another config,
    naming every changed key and `rerun(first changed stage)`, the command that recomputes only that."""
    changed = {}
    for stage in stages:
        m = read_manifest(job, stage)
        keys = config_changes(job, stage, m) if m is not None else []
        if keys:
            changed[stage] = keys
    if changed:
        raise ArtifactMismatchError(refusal_message(job, changed, rerun(next(iter(changed))) if rerun else None))


@discovery_scope()  # preflight, the input fingerprint and the run share one listing of each dataset
def run_stage(
    job: JobConfig, stage: str, overwrite: bool = False, runner: Callable[[StageRun], None] | None = None
) -> dict[str, Any]:
    """Run one stage with the skip/overwrite policy, atomic output and manifest. Returns the manifest.

    `overwrite` permits replacing a finished stage whose config changed; a stage whose config, upstream
    artifacts and inputs are unchanged is never recomputed (delete `run_dir/<stage>/` to force that)."""
    from pipeline.stages import stage as stage_of

    registered = stage_of(stage) if runner is None else None
    runner = runner or registered.run
    upstream = {s: require_manifest(job, s, f"`{stage}`") for s in STAGE_UPSTREAM[stage]}
    input_fp = registered.fingerprint(job) if registered else {}
    config_hash = stage_config_hash(job, stage)
    identity = stage_identity(job, stage, upstream, input_fp)

    storage.makedirs(job.run_dir)
    # One process per stage and run_dir: a second one waits, then usually finds the stage done.
    with storage.exclusive_lock(storage.join(job.run_dir, ".locks", f"{stage}.lock"), f"stage `{stage}`"):
        _remove_stale_tmp_dirs(job.run_dir, stage)
        existing = read_manifest(job, stage)
        if existing is not None:
            if existing.get("identity") == identity:
                log.info("%s: already finished with this config and inputs (%s); skipping.", stage, config_hash)
                return existing
            why = changes_since(job, stage, existing, upstream, input_fp)
            if why.config and not overwrite:
                raise ArtifactMismatchError(refusal_message(job, {stage: why.config}))
            log.info("%s: recomputing: %s%s.", stage, why.describe(), " (--overwrite)" if why.config else "")

        in_place = storage.is_uri(job.run_dir)  # object stores: no rename, the manifest marks completion
        if in_place:
            _clear_in_place(job, stage, finished=existing is not None)
            out_dir = stage_dir(job, stage)
        else:
            out_dir = storage.join(job.run_dir, f".{stage}.tmp-{uuid.uuid4().hex[:8]}")
        work_dir = storage.join(job.run_dir, ".work", f"{stage}-{identity}")
        storage.makedirs(out_dir)
        storage.makedirs(work_dir)
        ctx = StageRun(
            job=job,
            stage=stage,
            config_hash=config_hash,
            identity=identity,
            upstream=upstream,
            out_dir=out_dir,
            work_dir=work_dir,
        )
        started, t0 = utc_now(), time.perf_counter()
        log.info("%s: starting (run_dir %s)", stage, storage.redact(job.run_dir))
        try:
            runner(ctx)
        except BaseException:
            storage.delete_dir(out_dir)  # the work dir stays: it is what a rerun resumes from
            raise
        manifest = {
            "stage": stage,
            "identity": identity,
            "config_hash": config_hash,
            "stage_inputs": storage.redact_obj(stage_inputs(job, stage)),
            "config": storage.redact_obj(to_dict(job)),
            "inputs": storage.redact_obj(input_fp),
            "upstream": {
                s: {"identity": m.get("identity"), "config_hash": m.get("config_hash")} for s, m in upstream.items()
            },
            "versions": versions(),
            "git_sha": git_sha(),
            "started_utc": started,
            "finished_utc": utc_now(),
            "seconds": round(time.perf_counter() - t0, 3),
            **storage.redact_obj(ctx.manifest),
        }
        storage.write_json_atomic(storage.join(out_dir, MANIFEST), manifest)
        if not in_place:
            _commit(out_dir, stage_dir(job, stage))
        storage.delete_dir(work_dir)
        log.info("%s: done in %.1f s -> %s", stage, manifest["seconds"], storage.redact(stage_dir(job, stage)))
        return manifest


def _remove_stale_tmp_dirs(run_dir: str, stage: str) -> None:
    """Temporary outputs of a run that was killed (SIGKILL skips cleanup). Safe: we hold the lock (on
    object stores, where nothing writes them any more, they are leftovers of an older influcoder)."""
    import pyarrow.fs as pafs

    fs, root = storage.filesystem(run_dir)
    for info in fs.get_file_info(pafs.FileSelector(root)):
        if info.type == pafs.FileType.Directory and info.base_name.startswith(f".{stage}.tmp-"):
            fs.delete_dir(info.path)


def _clear_in_place(job: JobConfig, stage: str, finished: bool) -> None:
    """Before a stage writes in place (object stores): its folder must hold nothing of another run.
    A finished stage loses its manifest first, so that a crash while deleting the rest leaves a
    half-written stage (ignored, cleaned here next time), never a manifest over missing files."""
    out = stage_dir(job, stage)
    if finished:
        fs, p = storage.filesystem(storage.join(out, MANIFEST))
        fs.delete_file(p)
    elif storage.exists(out):
        log.info(
            "%s: removing a half-written %s (files without a manifest: an interrupted run)", stage, storage.redact(out)
        )
    storage.delete_dir(out)


def _commit(tmp: str, final: str) -> None:
    """Swap the finished temporary directory into place."""
    if storage.exists(final):
        trash = f"{final}.old-{uuid.uuid4().hex[:8]}"
        storage.move(final, trash)
        storage.move(tmp, final)
        storage.delete_dir(trash)
    else:
        storage.move(tmp, final)


def is_run_dir(path: str) -> bool:
    """A folder some stage has run in: a stage manifest, resumable work or a stage lock."""
    from pipeline.config import STAGES

    marks = [storage.join(path, s, MANIFEST) for s in STAGES] + [storage.join(path, d) for d in (".work", ".locks")]
    return storage.is_dir(path) and any(storage.exists(m) for m in marks)


def status(run_dir: str, job: JobConfig | None = None) -> list[dict[str, Any]]:
    """One entry per stage: `done`, `stale` (finished, but `run` would recompute it: an upstream stage was
    recomputed since or is stale itself, or, given the job, its config or inputs changed; `changed` and
    `why` say which), `partial (rerun resumes)` or `not run`."""
    from pipeline.config import STAGES

    import pyarrow.fs as pafs

    rows = []
    work = storage.join(run_dir, ".work")
    work_entries: list[str] = []
    if storage.is_dir(work):
        fs, p = storage.filesystem(work)
        work_entries = [i.base_name for i in fs.get_file_info(pafs.FileSelector(p))]
    manifests = {}
    for stage in STAGES:
        mpath = storage.join(run_dir, stage, MANIFEST)
        if storage.exists(mpath):
            manifests[stage] = storage.read_json(mpath)
    stale: set[str] = set()
    for stage in STAGES:
        m = manifests.get(stage)
        if m is None:
            partial = any(e.startswith(f"{stage}-") for e in work_entries)
            rows.append({"stage": stage, "state": "partial (rerun resumes)" if partial else "not run"})
            continue
        row = {
            "stage": stage,
            "state": "done",
            "finished_utc": m.get("finished_utc"),
            "seconds": m.get("seconds"),
            "config_hash": m.get("config_hash"),
            "rows": m.get("rows"),
            "rejects": (m.get("rejects") or {}).get("rows", 0),
        }
        upstream = {s: manifests[s] for s in STAGE_UPSTREAM[stage] if s in manifests}
        input_fp = None
        if job is not None:
            try:
                input_fp = input_fingerprint(job, stage)
            except UsageError as e:  # e.g. the corpus moved: say so, and judge the rest
                row["inputs_unchecked"] = str(e)
        why = changes_since(job, stage, m, upstream, input_fp)
        why.notes += [f"upstream `{s}` is missing" for s in STAGE_UPSTREAM[stage] if s not in manifests]
        why.notes += [f"upstream `{s}` is stale" for s in STAGE_UPSTREAM[stage] if s in stale and s not in why.upstream]
        if why:
            stale.add(stage)
            row.update(
                state="stale",
                why=why.describe(),
                changed={"config": why.config, "upstream": why.upstream, "inputs": why.inputs, "notes": why.notes},
            )
        rows.append(row)
    return rows
