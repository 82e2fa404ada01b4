"""Progress of long loops: a rich bar on a terminal, a plain line now and then everywhere else.

    with Progress("evaluate", total=len(batches), unit="batches") as bar:
        for batch in batches:
            ...
            bar.advance()                       # or bar.update(done, info="mlm 7.1")

Plain lines (CI logs, `dvc repro > log`, pytest) come every 10 % and at least every 30 s, so a
log shows both that a job is alive and how far it got, without a line per step.
"""
from __future__ import annotations

import atexit
import time
from typing import Callable

from rich.console import Console


def clock(seconds: float) -> str:
    """`m:ss`, or `h:mm:ss` past an hour."""
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """Report `done` of `total` units of one task; every method is a no-op when `enabled` is False.

    Plain lines come when `done` passes each of `marks` equal steps (10: every 10 %), when
    `every_s` seconds have passed since the last line, and at the end."""

    def __init__(self, label: str, total: int, unit: str = "", *, start: int = 0, enabled: bool = True,
                 console: Console | None = None, marks: int = 10, every_s: float = 30.0,
                 now: Callable[[], float] = time.monotonic):
        self.label, self.total, self.unit = label, max(0, int(total)), unit
        self.done, self.start, self.enabled = start, start, enabled
        self.console = console or Console(stderr=True)
        self.marks, self.every_s, self.now = marks, every_s, now
        self.t0 = self.last_t = now()
        self.last_bucket = self._bucket(start)
        self.closed = not enabled
        self._bar = None
        if enabled and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                            TextColumn(unit), TextColumn("ETA"), TimeRemainingColumn(),
                            TextColumn("{task.fields[info]}"), console=self.console)
            self._task = self._bar.add_task(label, total=self.total or None, completed=start, info="")
            self._bar.start()
            atexit.register(self.close)  # a crash must not leave the cursor hidden and stdout redirected

    def _bucket(self, done: int) -> int:
        return done * self.marks // self.total if self.total else 0  # integers: 6/20 is 30 %, not 29.99…

    def update(self, done: int, info: str = "") -> None:
        """Set the count to `done` (absolute); `info` is shown beside it (losses, rates)."""
        if self.closed:
            return
        self.done = done
        if self._bar is not None:
            self._bar.update(self._task, completed=done, info=info)
        else:
            t, bucket = self.now(), self._bucket(done)
            finished = self.total and done >= self.total
            if bucket > self.last_bucket or t - self.last_t >= self.every_s or finished:
                self.last_bucket, self.last_t = bucket, t
                self.console.file.write(self.line(info, t) + "\n")
                self.console.file.flush()
        if self.total and done >= self.total:
            self.close()

    def advance(self, n: int = 1, info: str = "") -> None:
        self.update(self.done + n, info)

    def line(self, info: str = "", t: float | None = None) -> str:
        """`label: done/total unit (pct %)  info  ETA m:ss` from the rate since the start."""
        t = self.now() if t is None else t
        parts = [f"{self.label}: {self.done}/{self.total}" + (f" {self.unit}" if self.unit else "")]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        if info:
            parts.append(info)
        rate = (self.done - self.start) / (t - self.t0) if t > self.t0 else 0.0
        if self.total and self.done < self.total and rate > 0:
            parts.append(f"ETA {clock((self.total - self.done) / rate)}")
        elif self.total and self.done >= self.total:
            parts.append(f"in {clock(t - self.t0)}")
        return "  ".join(parts)

    def close(self) -> None:
        """Stop the bar (idempotent); the rich bar stays on screen as a record."""
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.stop()
            atexit.unregister(self.close)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

