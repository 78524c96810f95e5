"""Thin Ray adapters, one module per stage. Each exposes `run(ctx: artifacts.StageRun) -> None`
and may expose `input_fingerprint(job) -> dict` (what besides config makes its output change)."""
