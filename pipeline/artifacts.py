"""Run directories: every stage writes `run_dir/<stage>/` atomically, with a manifest.

Lifecycle of a stage run (see `run_stage`):
1. If `run_dir/<stage>/manifest.json` exists with the same identity (config hash, upstream
   manifests, input fingerprint), the stage is skipped (`--overwrite` forces a recompute). A different config hash is refused
   unless `--overwrite` is given. The same config over changed upstream artifacts or inputs is
   recomputed (the stage is a function of them), and the log says why.
2. The stage writes into a temporary directory `run_dir/.<stage>.tmp-<id>/`. Resumable work
   (finished shards) lives in `run_dir/.work/<stage>-<identity>/`, which survives a crash and is
   keyed by the identity, so partial work of another config can never be mixed in.
3. The manifest is written last, then the temporary directory is renamed to `run_dir/<stage>/`.
   On object stores (no atomic rename) the manifest is the completion marker and is written
   after everything else.
"""

from __future__ import annotations

import datetime as dt
import importlib
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
    stable_hash,
    stage_config_hash,
    stage_inputs,
    to_dict,
)
from pipeline.errors import ArtifactMismatchError, ArtifactMissingError, InputDataError
from pipeline.schema import REJECTS

log = logging.getLogger("influcoder")

MANIFEST = "manifest.json"
REJECTS_FILE = "rejects.parquet"


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    out = {"influcoder": __version__, "python": platform.python_version()}
    for mod in ("torch", "ray", "transformers", "peft", "lancedb", "pyarrow", "numpy"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional module is just not recorded
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

    def write_rejects(self, rejects: pa.Table, total_rows: int, max_frac: float, what: str) -> None:
        """Write `<stage>/rejects.parquet` and fail when the rejected fraction passes `max_frac`."""
        rejects = rejects.select(REJECTS.names).cast(REJECTS)
        import pyarrow.parquet as pq

        fs, path = storage.filesystem(storage.join(self.out_dir, REJECTS_FILE))
        pq.write_table(rejects, path, filesystem=fs)
        counts: dict[str, int] = {}
        for reason in rejects.column("reason").to_pylist():
            key = reason.split(":")[0]
            counts[key] = counts.get(key, 0) + 1
        self.record(rejects={"rows": rejects.num_rows, "by_reason": counts})
        frac = rejects.num_rows / max(total_rows, 1)
        if rejects.num_rows:
            log.warning(
                "%s: %d of %d rows rejected (%s); see %s",
                what,
                rejects.num_rows,
                total_rows,
                counts,
                storage.redact(storage.join(stage_dir(self.job, self.stage), REJECTS_FILE)),
            )
        if frac > max_frac:
            first = rejects.slice(0, 3).to_pylist()
            raise InputDataError(
                f"{what}: {rejects.num_rows} of {total_rows} rows ({frac:.1%}) were rejected, more than "
                f"{self.stage}.max_reject_frac={max_frac}. First rejects: {first}. Fix the input rows or "
                f"raise the limit with --set {self.stage}.max_reject_frac=..."
            )


def _stage_module(stage: str):
    return importlib.import_module(f"pipeline.stages.{stage}")


def stage_identity(job: JobConfig, stage: str, upstream: dict[str, dict[str, Any]], input_fp: dict[str, Any]) -> str:
    return stable_hash(
        {
            "stage": stage,
            "config": stage_config_hash(job, stage),
            "upstream": {s: m.get("identity") for s, m in sorted(upstream.items())},
            "inputs": input_fp,
        }
    )


def run_stage(
    job: JobConfig, stage: str, overwrite: bool = False, runner: Callable[[StageRun], None] | None = None
) -> dict[str, Any]:
    """Run one stage with the skip/overwrite policy, atomic output and manifest. Returns the manifest."""
    module = _stage_module(stage) if runner is None else None
    runner = runner or module.run
    upstream = {s: require_manifest(job, s, f"`{stage}`") for s in STAGE_UPSTREAM[stage]}
    fingerprint = getattr(module, "input_fingerprint", None) if module else None
    input_fp = fingerprint(job) if fingerprint else {}
    config_hash = stage_config_hash(job, stage)
    identity = stage_identity(job, stage, upstream, input_fp)
    final = stage_dir(job, stage)

    storage.makedirs(job.run_dir)
    # One process per stage and run_dir: a second one waits, then usually finds the stage done.
    with storage.exclusive_lock(storage.join(job.run_dir, ".locks", f"{stage}.lock"), f"stage `{stage}`"):
        _remove_stale_tmp_dirs(job.run_dir, stage)
        existing = read_manifest(job, stage)
        if existing is not None:
            if existing.get("identity") == identity and not overwrite:
                log.info(
                    "%s: already finished with this config (%s); skipping. Use --overwrite to redo it.",
                    stage,
                    config_hash,
                )
                return existing
            if existing.get("config_hash") != config_hash and not overwrite:
                changed = sorted(
                    k
                    for k, v in storage.redact_obj(stage_inputs(job, stage)).items()
                    if existing.get("stage_inputs", {}).get(k) != v
                )
                raise ArtifactMismatchError(
                    f"{storage.redact(final)} was produced with a different config (changed: "
                    f"{', '.join(changed) or 'unknown'}). Rerun with --overwrite to replace it, or use "
                    f"another run_dir."
                )
            log.info(
                "%s: %s changed since the last run; recomputing.",
                stage,
                "config" if existing.get("config_hash") != config_hash else "upstream artifacts or inputs",
            )

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
        _commit(out_dir, final)
        storage.delete_dir(work_dir)
        log.info("%s: done in %.1f s -> %s", stage, manifest["seconds"], storage.redact(final))
        return manifest


def _remove_stale_tmp_dirs(run_dir: str, stage: str) -> None:
    """Temporary outputs of a run that was killed (SIGKILL skips cleanup). Safe: we hold the lock."""
    if storage.is_uri(run_dir):
        return  # no lock on object stores; leave them (they never look finished: no manifest)
    root = storage.local_path(run_dir)
    for name in os.listdir(root):
        if name.startswith(f".{stage}.tmp-"):
            storage.delete_dir(os.path.join(root, name))


def _commit(tmp: str, final: str) -> None:
    """Swap the finished temporary directory into place."""
    if storage.exists(final):
        trash = f"{final}.old-{uuid.uuid4().hex[:8]}"
        storage.move(final, trash)
        storage.move(tmp, final)
        storage.delete_dir(trash)
    else:
        storage.move(tmp, final)


def status(run_dir: str) -> list[dict[str, Any]]:
    """One entry per stage: finished (with its manifest summary), in progress, or missing."""
    from pipeline.config import STAGES

    import pyarrow.fs as pafs

    rows = []
    work = storage.join(run_dir, ".work")
    work_entries: list[str] = []
    if storage.is_dir(work):
        fs, p = storage.filesystem(work)
        work_entries = [i.base_name for i in fs.get_file_info(pafs.FileSelector(p))]
    for stage in STAGES:
        mpath = storage.join(run_dir, stage, MANIFEST)
        if storage.exists(mpath):
            m = storage.read_json(mpath)
            rows.append(
                {
                    "stage": stage,
                    "state": "done",
                    "finished_utc": m.get("finished_utc"),
                    "seconds": m.get("seconds"),
                    "config_hash": m.get("config_hash"),
                    "rows": m.get("rows"),
                    "rejects": (m.get("rejects") or {}).get("rows", 0),
                }
            )
        elif any(e.startswith(f"{stage}-") for e in work_entries):
            rows.append({"stage": stage, "state": "partial (rerun resumes)"})
        else:
            rows.append({"stage": stage, "state": "not run"})
    return rows
