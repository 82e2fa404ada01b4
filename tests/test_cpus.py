"""train.threads: auto — counting the minibert trainings on the machine with real processes."""
import os
import subprocess
import sys

import pytest
import torch

from minibert.training.cpus import ThreadShare, auto_threads, running_trainings

# A real training-like process: registers in the folder given, then waits until killed.
HOLDER = ("import sys, time; from minibert.training.cpus import ThreadShare; "
          "t = ThreadShare(1, folder=sys.argv[1]); t.start(); print('ready', flush=True); time.sleep(600)")


def _holders(folder, n):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    procs = [subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(n)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    return procs


def _stop(procs):
    for p in procs:
        p.kill()
        p.wait()


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_two_live_holders_get_half_the_cores_each(tmp_path):
    procs = _holders(tmp_path, 2)
    try:
        assert running_trainings(tmp_path) == 2
        assert auto_threads(tmp_path, cores=8) == 4
        assert auto_threads(tmp_path, cores=7) == 3  # floor: never more threads than cores in all
        assert auto_threads(tmp_path, cores=1) == 1  # at least one
        assert auto_threads(tmp_path) == max(1, len(os.sched_getaffinity(0)) // 2)
    finally:
        _stop(procs)
    assert running_trainings(tmp_path) == 0  # killed without cleaning up: both files are stale now
    assert auto_threads(tmp_path, cores=8) == 8


def test_stale_and_reused_pids_are_ignored(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / f"{gone.pid}.pid").write_text(f"{gone.pid} 12345")  # its process has exited
    # A live pid (ours) with another start time: the pid was reused after its training died.
    (tmp_path / f"{os.getpid()}.pid").write_text(f"{os.getpid()} 1")
    (tmp_path / "garbage.pid").write_text("not a pid file")
    assert running_trainings(tmp_path) == 0
    assert auto_threads(tmp_path, cores=6) == 6
    assert not (tmp_path / f"{gone.pid}.pid").exists() and not (tmp_path / f"{os.getpid()}.pid").exists()


def test_thread_share_registers_applies_and_unregisters(tmp_path, restore_threads):
    cores = len(os.sched_getaffinity(0))
    t = ThreadShare("auto", folder=tmp_path, every_s=0.0)
    t.start()
    assert running_trainings(tmp_path) == 1 and torch.get_num_threads() == cores
    procs = _holders(tmp_path, 1)  # a second training starts: the next refresh halves ours
    try:
        t.refresh()
        assert torch.get_num_threads() == max(1, cores // 2)
    finally:
        _stop(procs)
    t.refresh()  # it ended: ours gets every core back
    assert torch.get_num_threads() == cores
    t.close()
    assert list(tmp_path.glob("*.pid")) == []


def test_fixed_threads_and_gpu_trainings(tmp_path, restore_threads):
    t = ThreadShare(1, folder=tmp_path)
    t.start()
    assert torch.get_num_threads() == 1 and running_trainings(tmp_path) == 1  # counted: it uses a core
    t.close()
    g = ThreadShare(0, folder=tmp_path, count_me=False)
    g.start()
    assert running_trainings(tmp_path) == 0
    g.close()
