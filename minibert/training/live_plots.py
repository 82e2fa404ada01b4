"""The DVC plot CSVs while training runs: `plots/train_loss.csv` and `plots/valid_curve.csv` grow by
the rows of every logged step, so `dvc plots show` and `dvc exp show` of a running (or queued) pretrain
show its progress instead of nothing until the end.

Each CSV is (re)written whole at the start (a header, or on resume the rows the checkpoint holds), then
every logged step appends its rows with one `write` to a file opened `O_APPEND` and flushed by the
close. A reader never sees a torn row: Linux makes appended bytes visible one page at a time (the file
size grows after each page is copied), so a row that would straddle a 4096-byte boundary could be seen
half; such an append rewrites the file instead (temp file, then an atomic rename), about once per
hundred rows. The rows are formatted by the same pandas call as the end-of-run writer
(`pretrain.write_outputs`), which still writes the final files: they are the same bytes.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd

from minibert.artifacts import atomic_path
from minibert.evaluation.heldout import CURVE

TRAIN_COLUMNS = ["step", "mlm_loss", "nsp_loss", "pairs_per_sec"]
VALID_COLUMNS = ["step", *(f"valid_{k}" for k in CURVE), "valid_wall_s"]  # x against steps, and seconds
_PAGE = 4096  # the unit Linux publishes appended bytes in (the file size moves after each page)


def _csv(rows: Sequence[dict], columns: list[str], header: bool) -> bytes:
    """What `pd.DataFrame(rows, columns).to_csv(index=False)` writes, header optional."""
    return pd.DataFrame(list(rows), columns=columns).to_csv(index=False, header=header).encode()


class LiveCurve:
    """One plot CSV that grows row by row; `rows_of` picks the history rows it holds."""

    def __init__(self, path: Path, columns: list[str], heldout: bool = False):
        self.path, self.columns, self.heldout = Path(path), columns, heldout
        self.before: bytes | None = None

    def _mine(self, rows: Sequence[dict]) -> list[dict]:
        return [r for r in rows if "valid_mlm_loss" in r] if self.heldout else list(rows)

    def start(self, history: Sequence[dict]) -> None:
        """Rewrite the file from `history` (empty: the header alone) before training goes on; what was
        there before is kept (in memory: a CSV of a few thousand rows) for `restore`."""
        self.before = self.path.read_bytes() if self.path.is_file() else None
        with atomic_path(self.path) as tmp:
            tmp.write_bytes(_csv(self._mine(history), self.columns, header=True))

    def restore(self) -> None:
        """Put back the file as `start` found it (none: remove it)."""
        if self.before is None:
            self.path.unlink(missing_ok=True)
            return
        with atomic_path(self.path) as tmp:
            tmp.write_bytes(self.before)

    def append(self, rows: Sequence[dict]) -> None:
        mine = self._mine(rows)
        if not mine:
            return
        data = _csv(mine, self.columns, header=False)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:  # removed under us (a `dvc` checkout): start over with a header
            size = None
        if size is None or size // _PAGE != (size + len(data) - 1) // _PAGE:
            old = self.path.read_bytes() if size is not None else _csv([], self.columns, header=True)
            with atomic_path(self.path) as tmp:  # crosses a page: the whole file, renamed in one step
                tmp.write_bytes(old + data)
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, data)  # one call: the row lands within one page, so it is seen whole or not at all
        finally:
            os.close(fd)


class LiveCurves:
    """The pretrain stage's two plot CSVs; a no-op for ranks other than 0 (`enabled=False`)."""

    def __init__(self, train_csv: Path, valid_csv: Path, enabled: bool = True):
        self.enabled = enabled
        self.curves = (LiveCurve(train_csv, TRAIN_COLUMNS), LiveCurve(valid_csv, VALID_COLUMNS, heldout=True))

    def start(self, history: Sequence[dict] | None) -> None:
        if self.enabled:
            for c in self.curves:
                c.start(history or [])

    def append(self, rows: Sequence[dict]) -> None:
        if self.enabled:
            for c in self.curves:
                c.append(rows)

    def restore(self) -> None:
        """A run that stops with an error puts back the CSVs it started from, so that every pretrain
        output stays the previous run's (the final writer's all-or-nothing promise). A full disk that
        refuses even that leaves the failed run's rows, with one warning."""
        if not self.enabled:
            return
        for c in self.curves:
            try:
                c.restore()
            except OSError as e:
                print(f"warning: pretrain: could not put back {c.path} ({e.strerror or e}); it holds this "
                      "failed run's rows", file=sys.stderr, flush=True)
