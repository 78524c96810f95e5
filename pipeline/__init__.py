"""influcoder: find the training samples that shape a model's behaviour, at corpus scale.

The import package is ``pipeline``; the distribution and the command are ``influcoder``.
Pure maths (gradients, sketching, losses, metrics, scoring) lives in plain torch/numpy
modules; ``pipeline.stages`` holds the thin Ray adapters.
"""

__version__ = "0.1.0"
