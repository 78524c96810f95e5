"""Checks that run before any Ray work: datasets exist and have the mapped columns, models resolve,
the run directory is writable. Each failure is a UsageError naming the key and the fix."""

from __future__ import annotations

import os

from pipeline import corpus, storage
from pipeline.config import JobConfig
from pipeline.errors import ConfigError


def datasets_for(job: JobConfig, stages: list[str]) -> dict[str, object]:
    """Config section name -> DatasetConfig for every dataset the stages will read."""
    needed: dict[str, object] = {}
    if "sketch" in stages:
        needed["anchors"] = job.anchors
        needed["pool" if job.pool is not None else "corpus"] = job.pool_dataset
    if {"encode", "eval"} & set(stages):
        needed["corpus"] = job.corpus
    if {"score", "eval"} & set(stages):
        if job.score.queries is None:
            raise ConfigError(
                "missing config key `score.queries.path`: the score stage needs the queries to "
                "rank the corpus against (same column mapping as corpus)."
            )
        needed["score.queries"] = job.score.queries
    return needed


def check_model(name: str, key: str) -> None:
    from pipeline.models import ENCODER_ALIASES, TEACHER_ALIASES, _package_dir

    aliases = {**TEACHER_ALIASES, **ENCODER_ALIASES}
    if name in aliases:
        _package_dir(aliases[name][0], name)  # raises with the install hint
    elif name.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(name)):
        raise ConfigError(f"`{key}`: model directory {name} does not exist.")


def preflight(job: JobConfig, stages: list[str]) -> dict[str, list[corpus.FileInfo]]:
    files = {section: corpus.discover(ds, section) for section, ds in datasets_for(job, stages).items()}  # type: ignore[arg-type]
    if "sketch" in stages or "eval" in stages:
        check_model(job.teacher.model, "teacher.model")
    if {"fit", "eval"} & set(stages):
        check_model(job.encoder.model, "encoder.model")
    try:
        storage.makedirs(job.run_dir)
    except OSError as e:
        raise ConfigError(
            f"`run_dir`: cannot create {storage.redact(job.run_dir)} ({e}); choose a writable path."
        ) from None
    return files
