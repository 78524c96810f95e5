"""One progress line per stage: rows done of the total, the rate and the time left.

Ray Data's own progress output is off (see `ray_runtime.quiet_ray_data`): on a terminal it draws
one bar per operator, and without one it logs a multi-line block every 10 s that reads `0/?`
while a stateful actor pool warms up. What a user needs is how far the stage is, in rows, so each
stage reports that itself: a bar that redraws in place where stderr is a terminal, a log line at
most every `every_s` seconds elsewhere (CI, `ray job submit`, a log file).
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("influcoder.progress")


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Counts rows of one stage's pass and reports them. `total` may be None when unknown."""

    def __init__(
        self,
        label: str,
        total: int | None,
        unit: str = "rows",
        every_s: float = 10.0,
        stream=None,
        clock=time.monotonic,
    ) -> None:
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self._stream = stream if stream is not None else sys.stderr
        self._tty = bool(getattr(self._stream, "isatty", lambda: False)())
        self._clock = clock
        self._start = self._last = clock()
        self.done = 0

    def line(self) -> str:
        elapsed = max(self._clock() - self._start, 1e-9)
        rate = self.done / elapsed
        of = f"/{self.total:,}" if self.total is not None else ""
        pct = f" ({100 * self.done / self.total:.0f} %)" if self.total else ""
        left = ""
        if self.total and rate > 0 and self.done < self.total:
            left = f", ~{_duration((self.total - self.done) / rate)} left"
        return f"{self.label}: {self.done:,}{of} {self.unit}{pct}, {rate:,.1f} {self.unit}/s{left}"

    def update(self, n: int) -> None:
        self.done += int(n)
        now = self._clock()
        if self._tty:
            self._stream.write("\r" + self.line()[:119].ljust(119))
            self._stream.flush()
        elif now - self._last >= self.every_s and (self.total is None or self.done < self.total):
            log.info(self.line())  # (the last rows are reported by `close`, once)
        else:
            return
        self._last = now

    def track(self, batches):
        """Yield each batch (anything with `num_rows`), counting it; the final line when they end."""
        for batch in batches:
            self.update(batch.num_rows)
            yield batch
        self.close()

    def close(self) -> None:
        """The final line, always written once, so a log shows how the pass ended."""
        if self._tty:
            self._stream.write("\r" + " " * 119 + "\r")
            self._stream.flush()
        log.info(f"{self.line()}, done in {_duration(self._clock() - self._start)}")
