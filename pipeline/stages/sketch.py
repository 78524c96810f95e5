"""The sketch stage (not implemented yet)."""

from pipeline.errors import UsageError


def run(ctx) -> None:
    raise UsageError("the `sketch` stage is not available yet: it arrives with issue #2.")
