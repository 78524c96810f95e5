"""The console: one progress line per pass (rows done, rate, time left), and a summary table that says
which stages were skipped and never cuts its columns. The whole-job console budget is asserted in
test_e2e.py, on a real `influcoder run` process."""

from __future__ import annotations

import io
import logging

import pytest

from pipeline import cli
from pipeline.progress import Progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_logs_at_most_every_interval_and_always_at_the_end(caplog):
    clock = FakeClock()
    p = Progress("encode: corpus rows", 2000, every_s=10, stream=io.StringIO(), clock=clock)
    with caplog.at_level(logging.INFO, logger="influcoder.progress"):
        for _ in range(20):  # 100 rows a second: one line when 10 s have passed; none at 100 %
            clock.now += 1.0
            p.update(100)
        assert [r.getMessage() for r in caplog.records] == [
            "encode: corpus rows: 1,000/2,000 rows (50 %), 100.0 rows/s, ~10 s left"
        ]
        p.close()  # the last rows are reported once, by close
    assert len(caplog.records) == 2
    assert caplog.records[1].getMessage() == "encode: corpus rows: 2,000/2,000 rows (100 %), 100.0 rows/s, done in 20 s"


def test_progress_says_time_left_and_handles_an_unknown_total():
    clock = FakeClock()
    p = Progress("sketch: teacher gradients", 300, stream=io.StringIO(), clock=clock)
    clock.now = 30.0
    p.update(100)  # 100 rows in 30 s: 200 rows left at 3.3 rows/s
    assert p.line() == "sketch: teacher gradients: 100/300 rows (33 %), 3.3 rows/s, ~60 s left"
    q = Progress("score: code rows", None, stream=io.StringIO(), clock=clock)
    q.update(5)
    assert "5 rows," in q.line() and "left" not in q.line() and "%" not in q.line()


def test_progress_redraws_in_place_on_a_terminal(caplog):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    clock, out = FakeClock(), Tty()
    p = Progress("encode: corpus rows", 10, stream=out, clock=clock)
    with caplog.at_level(logging.INFO, logger="influcoder.progress"):
        for _ in range(5):
            clock.now += 0.1
            p.update(2)
        assert caplog.records == []  # the bar, not log lines, while it runs
        p.close()
    assert out.getvalue().count("\r") >= 5 and "10/10 rows" in out.getvalue()
    assert len(caplog.records) == 1  # the final line stays in the log


def test_summary_marks_skipped_stages_and_keeps_whole_rows(capsys):
    class Job:
        run_dir = "/tmp/run"

    rows = {"anchors": {"eval": 32, "train": 64}, "pool": {"eval": 256, "train": 256}, "extra": "x" * 80}
    results = {
        "sketch": {"manifest": {"rows": rows}, "seconds": 0.01, "skipped": True},
        "fit": {"manifest": {"rows": {"epochs": 8}, "rejects": {"rows": 3}}, "seconds": 12.34, "skipped": False},
    }
    cli._print_summary(Job(), results)
    out = capsys.readouterr().out.splitlines()
    sketch = next(line for line in out if line.startswith("sketch"))
    fit = next(line for line in out if line.startswith("fit"))
    assert sketch.split()[1] == "skipped" and sketch.split()[2] == "-"
    assert "pool=eval=256 train=256" in sketch and "x" * 80 in sketch  # nothing cut
    assert fit.split()[1:4] == ["ran", "12.3", "3"]


def _load_encoder_in_a_new_process(model_dir: str, quiet: bool) -> str:
    """stderr of a fresh Python that loads an encoder as a stage run on its own does, with or without
    the CLI's environment defaults applied first (they must precede the Hugging Face imports)."""
    import os
    import subprocess
    import sys

    code = (
        "from pipeline.api import offline_defaults; offline_defaults()\n" if quiet else ""
    ) + f"from pipeline.encoder import TextEncoder\nTextEncoder({model_dir!r}, max_len=16)\n"
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    env["HF_HUB_OFFLINE"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr


@pytest.mark.slow  # two fresh Python processes that import transformers
def test_a_stage_run_alone_draws_no_model_loading_bars(tiny_encoder_dir):
    """`influcoder eval JOB` (no stage before it to start Ray) drew a "Loading weights" bar per model:
    the CLI's defaults now include the workers' quiet settings, set before any model library loads."""
    assert "Loading weights" in _load_encoder_in_a_new_process(tiny_encoder_dir, quiet=False)  # the bar exists
    assert "Loading weights" not in _load_encoder_in_a_new_process(tiny_encoder_dir, quiet=True)
