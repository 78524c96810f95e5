"""Thin Ray adapters, one module per stage, and the one registry of them (`stage`).

Each stage is a `run(ctx: artifacts.StageRun) -> None`, an `input_fingerprint(job) -> dict` (what
besides config makes its output change: input files, model weights; empty when nothing does) and a
`method_version`: raised when the stage's code computes something else from the same config and inputs,
so that finished outputs are recomputed instead of kept with old figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


def _no_inputs(job: Any) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Stage:
    run: Callable[[Any], None]
    input_fingerprint: Callable[[Any], dict[str, Any]] = _no_inputs
    method_version: int = 0
    """0 adds nothing to the fingerprint (no finished output is invalidated by introducing it)."""

    def fingerprint(self, job: Any) -> dict[str, Any]:
        """The stage's inputs, and its method version once it has one."""
        version = {"method_version": self.method_version} if self.method_version else {}
        return {**self.input_fingerprint(job), **version}


def stage(name: str) -> Stage:
    """The stage called `name`. Imported here, on use: the stage modules import Ray-side helpers, and
    the CLI's help and config checks should not pay for them."""
    from pipeline.stages import encode, filter as filter_stage, fit, score, sketch
    from pipeline.stages import eval as eval_stage

    registry = {
        "sketch": Stage(sketch.run, sketch.input_fingerprint),
        "fit": Stage(fit.run, fit.input_fingerprint),
        "encode": Stage(encode.run, encode.input_fingerprint),
        "score": Stage(score.run, score.input_fingerprint),
        # 2: rows that entered distillation are left out of the metrics. 3: influcoder's Recall@k and MRR
        # are compared with every method's through paired CIs (`vs`). 4: influcoder is scored with the codes
        # encode stored; every encoder method is timed on a sample of the rows (eval_encoders.timing_sample).
        "eval": Stage(eval_stage.run, eval_stage.input_fingerprint, method_version=4),
        # 2: the filtered corpus moved to filter/corpus/ (the output layout changed).
        "filter": Stage(filter_stage.run, filter_stage.input_fingerprint, method_version=2),
    }
    return registry[name]
