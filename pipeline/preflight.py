"""Checks that run before any Ray work: datasets exist and have the mapped columns, models resolve,
the run directory is writable. Each failure is a UsageError naming the key and the fix."""

from __future__ import annotations

from pipeline import corpus, storage
from pipeline.config import JobConfig
from pipeline.errors import ConfigError, InputDataError


def datasets_for(job: JobConfig, stages: list[str]) -> dict[str, object]:
    """Config section name -> DatasetConfig for every dataset the stages will read."""
    needed: dict[str, object] = {}
    if "sketch" in stages:
        needed["anchors"] = job.anchors
        needed["pool" if job.pool is not None else "corpus"] = job.pool_dataset
    if {"encode", "filter", "eval"} & set(stages):
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
    from pipeline.models import check_model as _check

    _check(name, key)


def _known_rows(files: list[corpus.FileInfo]) -> int | None:
    """Rows in a dataset when cheap to know (every file a Parquet footer or a counted JSONL): else None."""
    counts = [f.num_rows for f in files]
    return None if any(c is None for c in counts) else sum(counts)  # type: ignore[misc]


def check_split_sizes(job: JobConfig, files: dict[str, list[corpus.FileInfo]]) -> None:
    """The sketch's eval + train sizes against the rows the anchors and pool have, before Ray starts
    (the stage itself finds out only after reading everything). Rows counted here include rows the
    reader will reject, so passing this check is necessary, not sufficient."""
    s = job.sketch
    pool_section = "pool" if job.pool is not None else "corpus"
    anchors_n = _known_rows(files.get("anchors", []))
    pool_n = _known_rows(files.get(pool_section, []))
    same = job.anchors.same_location(job.pool_dataset)
    needs = [
        ("anchors", anchors_n, s.eval_anchors, s.train_anchors, "anchors", "anchor"),
        (pool_section, pool_n, s.eval_pool, s.train_pool, "pool", "pool"),
    ]
    for section, have, n_eval, n_train, suffix, noun in needs:
        if have is None:
            continue
        need = n_eval + n_train
        if suffix == "pool" and same:
            # The pool excludes the rows chosen as anchors when both read the same files.
            have -= s.eval_anchors + s.train_anchors
        if have < need:
            ds = job.anchors if suffix == "anchors" else job.pool_dataset
            extra = (
                " after the anchors are taken out (anchors and pool read the same files)"
                if suffix == "pool" and same
                else ""
            )
            raise InputDataError(
                f"{section}.path: the sketch needs {need} {noun} rows (sketch.eval_{suffix}={n_eval} + "
                f"sketch.train_{suffix}={n_train}) but {storage.redact(ds.path)} has {max(have, 0)} rows{extra}. "
                f"Lower them, e.g. --set sketch.eval_{suffix}={max(have, 0) // 4} "
                f"--set sketch.train_{suffix}={max(have, 0) - max(have, 0) // 4}, or add rows."
            )


def preflight(job: JobConfig, stages: list[str]) -> dict[str, list[corpus.FileInfo]]:
    files = {section: corpus.discover(ds, section) for section, ds in datasets_for(job, stages).items()}  # type: ignore[arg-type]
    if "sketch" in stages:
        check_split_sizes(job, files)
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
