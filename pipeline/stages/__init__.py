"""Thin Ray adapters, one module per stage, and the one registry of them (`stage`).

Each stage is a `run(ctx: artifacts.StageRun) -> None` and an `input_fingerprint(job) -> dict`
(what besides config makes its output change: input files, model weights; empty when nothing does).
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
        "eval": Stage(eval_stage.run, eval_stage.input_fingerprint),
        "filter": Stage(filter_stage.run, filter_stage.input_fingerprint),
    }
    return registry[name]
