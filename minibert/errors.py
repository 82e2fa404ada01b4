"""The one exception family stages turn into a one-line error and a non-zero exit."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator


class MinibertError(Exception):
    """Bad input or environment: the message says what, where, and how to fix it, on one line."""


class DataError(MinibertError):
    """Missing, corrupt or unsafe data files."""


class WriteError(MinibertError):
    """An output could not be written: no space, quota, a read-only filesystem or no permission."""


class Interrupted(MinibertError):
    """Stopped on request (SIGTERM/SIGINT) after a checkpoint: not a failure, rerunning resumes."""


@contextmanager
def stage_errors(stage: str) -> Iterator[None]:
    """Print `error: <stage>: <message>` on stderr and exit 1 for expected failures."""
    try:
        yield
    except MinibertError as e:
        print(f"error: {stage}: {e}", file=sys.stderr)
        raise SystemExit(1) from None
