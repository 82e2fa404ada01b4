"""Progress: plain periodic lines off a terminal, a rich bar on one; both real, driven by a fake clock."""
from __future__ import annotations

import io
import re

from rich.console import Console

from minibert.progress import Progress, clock


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def plain(total, **kw):
    out, now = io.StringIO(), Clock()
    return Progress("job", total, "items", console=Console(file=out), now=now, **kw), out, now


def test_plain_lines_every_tenth_not_every_step():
    bar, out, now = plain(137)
    for i in range(137):
        now.t += 0.5
        bar.advance(info=f"loss {i / 7:.2f}")
    lines = out.getvalue().splitlines()
    assert len(lines) == 10  # 10 %, 20 %, ... 100 %: one per decile crossed, nothing in between
    counts = [int(re.match(r"job: (\d+)/137 items", line).group(1)) for line in lines]
    assert counts == [14, 28, 42, 55, 69, 83, 96, 110, 124, 137]  # first step past each 10 % mark
    assert "ETA 1:02" in lines[0]  # 123 left at 2 per second
    assert lines[-1].startswith("job: 137/137 items (100%)") and "in 1:08" in lines[-1]
    assert "loss 19.43" in lines[-1] and bar.closed


def test_plain_lines_every_30_s_when_slow():
    bar, out, now = plain(1000)
    for _ in range(7):
        now.t += 31.0
        bar.advance()
    assert len(out.getvalue().splitlines()) == 7  # well under 10 % done, but time keeps it visible
    bar.close()
    bar.advance()
    assert len(out.getvalue().splitlines()) == 7  # closed: silent


def test_resume_start_and_disabled():
    bar, out, now = plain(20, start=10)
    now.t += 10.0
    bar.update(12)  # 2 steps in 10 s since the resume: ETA from that rate, not from step 0
    assert out.getvalue().splitlines() == ["job: 12/20 items (60%)  ETA 0:40"]
    off, out, _ = plain(5, enabled=False)
    for _ in range(5):
        off.advance()
    assert out.getvalue() == ""


def test_rich_bar_on_a_terminal():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    with Progress("job", 13, "steps", console=console) as bar:
        assert bar._bar is not None
        for i in range(13):
            bar.update(i + 1, info=f"mlm {i:.3f}")
    assert bar.closed
    text = out.getvalue()
    assert "job" in text and "13/13" in text and "mlm 12.000" in text


def test_rich_bar_closes_on_error_and_unknown_total():
    console = Console(file=io.StringIO(), force_terminal=True)
    try:
        with Progress("job", 0, console=console) as bar:  # total unknown: an indeterminate bar
            bar.advance()
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert bar.closed and not bar._bar.live.is_started


def test_clock():
    assert [clock(s) for s in (0, 59.6, 61, 3599, 3600, 7384)] == ["0:00", "1:00", "1:01", "59:59", "1:00:00",
                                                                   "2:03:04"]
