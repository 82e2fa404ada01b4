"""How many intra-op threads a CPU training gets.

`train.threads: auto` shares the cores this process may use (its affinity mask) among the minibert
trainings running on the machine, so queued experiments (`dvc queue start -j 2`) do not each start
one thread per core and fight over them. Every CPU training holds a pid file in `lock_dir()` while it
runs; the count is the files whose process is still alive. A file left behind by a killed run is
ignored (and removed): its pid is gone, or was reused by a process that started at another time.
The folder is per user and machine-wide, not per repository, because trainings started from two
checkouts (or DVC's temp copies of a repository) share the same cores.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch


def lock_dir() -> Path:
    """`MINIBERT_TRAININGS_DIR`, else `<tmp>/minibert-trainings-<uid>`."""
    return Path(os.environ.get("MINIBERT_TRAININGS_DIR")
                or Path(tempfile.gettempdir()) / f"minibert-trainings-{os.getuid()}")


def _start_time(pid: int) -> str | None:
    """Process start time in clock ticks since boot (/proc/PID/stat field 22); None when no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after "comm)" start at field 3


def _identity(pid: int) -> str:
    return f"{pid} {_start_time(pid) or '-'}"


def _alive(identity: str) -> bool:
    pid, start = identity.split()
    if Path("/proc/self/stat").is_file():
        return _start_time(int(pid)) == start  # a reused pid has another start time
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_trainings(folder: Path) -> int:
    """Trainings holding a pid file in `folder` whose process still runs; stale files are removed."""
    n = 0
    for f in Path(folder).glob("*.pid"):
        try:
            identity = f.read_text()
            live = _alive(identity)
        except (OSError, ValueError):
            continue  # being written or removed right now
        if live:
            n += 1
        else:
            f.unlink(missing_ok=True)
    return n


def auto_threads(folder: Path, cores: int | None = None) -> int:
    """This process's cores divided by the running trainings (this one included once registered), >= 1."""
    cores = cores or len(os.sched_getaffinity(0))
    return max(1, cores // max(1, running_trainings(folder)))


class ThreadShare:
    """Applies `train.threads`: a number, 0 (torch's default), or `auto` (re-shared as trainings come and go).

    `start()` registers this training and sets the threads; `refresh()` (cheap, call it every step)
    re-counts at most every `every_s` seconds; `close()` unregisters. Changing the thread count can
    change float summation order, so `auto` runs are reproducible only at equal concurrency.
    """

    def __init__(self, setting: int | str, folder: Path | None = None, every_s: float = 5.0, count_me: bool = True):
        self.setting, self.folder, self.every_s = setting, Path(folder or lock_dir()), every_s
        self.count_me = count_me  # False for a GPU training: it does not compete for the cores
        self._file: Path | None = None
        self._last = 0.0

    def start(self) -> None:
        try:
            if not self.count_me:
                raise OSError("not counted")
            self.folder.mkdir(parents=True, exist_ok=True)
            me = self.folder / f"{os.getpid()}.pid"
            me.write_text(_identity(os.getpid()))
            self._file = me
        except OSError:
            pass  # no writable temp folder: count without us; threads still get set below
        if self.setting == "auto":
            self._apply()
        elif self.setting:
            torch.set_num_threads(int(self.setting))

    def refresh(self) -> None:
        if self.setting == "auto" and time.monotonic() - self._last >= self.every_s:
            self._apply()

    def close(self) -> None:
        if self._file is not None:
            self._file.unlink(missing_ok=True)
            self._file = None

    def _apply(self) -> None:
        self._last = time.monotonic()
        n = auto_threads(self.folder)
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
