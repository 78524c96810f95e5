"""influcoder: find the training samples that shape a model's behaviour, at corpus scale.

The import package is ``pipeline``; the distribution and the command are ``influcoder``.
Pure maths (gradients, sketching, losses, metrics, scoring) lives in plain torch/numpy
modules; ``pipeline.stages`` holds the thin Ray adapters.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`pipeline.run` (pipeline/api.py), imported on first use: `import pipeline` stays light (no Ray)."""
    if name == "run":
        from pipeline.api import run

        return run
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
