"""A machine shared with other work (issue 42, part 2).

OpenMP workers that spin long at a barrier while their peer thread is descheduled made the pretrain
stage run far below its fair share of the cores beside busy processes. minibert sets a short spin
(`GOMP_SPINCOUNT`) before torch loads libgomp; these tests read what libgomp itself parsed
(`OMP_DISPLAY_ENV=VERBOSE`, printed when torch loads it) in fresh interpreters, so a stage that imports
torch before minibert, or a package that stops setting the default, fails here. The benchmark
(`bench/contention.py`) is run as a subprocess in its smoke mode: busy processes started, measured
beside and always killed, also when the bench is stopped halfway.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OMP_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "KMP_BLOCKTIME", "OMP_DISPLAY_ENV")
SHORT_SPIN = 10_000  # ~0.1 ms of PAUSE on current x86; libgomp's own 300,000 is ~3 ms


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OMP_KEYS}
    return {**env, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true", **extra}


def libgomp_settings(code: str, **env: str) -> dict[str, str]:
    """The ICVs libgomp prints when it loads (as torch loads it) in a fresh `python -c code`."""
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=clean_env(OMP_DISPLAY_ENV="VERBOSE", **env))
    assert p.returncode == 0, p.stderr[-2000:]
    block = re.search(r"OPENMP DISPLAY ENVIRONMENT BEGIN(.*?)OPENMP DISPLAY ENVIRONMENT END", p.stderr, re.S)
    if block is None:
        pytest.skip("torch's OpenMP runtime is not GNU libgomp here (nothing displayed)")
    return dict(re.findall(r"^\s*(\w+) = '([^']*)'", block.group(1), re.M))


@pytest.mark.parametrize("entry", ["stages.pretrain", "stages.finetune", "minibert.cli", "minibert.training.train",
                                   "bench.train", "bench.step"])
def test_training_entry_points_load_libgomp_with_a_short_spin(entry):
    """Every way a training starts imports minibert before torch, so libgomp starts with minibert's spin;
    the benches too (bench/__init__.py), so their speeds are the ones a stage gets."""
    icv = libgomp_settings(f"import {entry}, torch; torch.ones(4).sum()")
    spin = int(icv["GOMP_SPINCOUNT"])
    assert spin <= SHORT_SPIN, f"{entry}: libgomp spins {spin} times (its own default is 300000)"
    assert icv["OMP_WAIT_POLICY"] == "PASSIVE" or spin <= SHORT_SPIN


def test_torch_alone_spins_long_so_the_check_above_can_fail():
    """The counter-case: without minibert imported first, libgomp keeps its own long spin."""
    assert int(libgomp_settings("import torch; torch.ones(4).sum()")["GOMP_SPINCOUNT"]) > SHORT_SPIN


@pytest.mark.parametrize("env, key, expected", [
    ({"OMP_WAIT_POLICY": "ACTIVE"}, "OMP_WAIT_POLICY", "ACTIVE"),
    ({"GOMP_SPINCOUNT": "250000"}, "GOMP_SPINCOUNT", "250000"),
])
def test_a_users_own_wait_setting_is_kept(env, key, expected):
    icv = libgomp_settings("import minibert, torch; torch.ones(4).sum()", **env)
    assert icv[key] == expected
    if "OMP_WAIT_POLICY" in env:  # an ACTIVE policy keeps libgomp's active spin, not minibert's
        assert int(icv["GOMP_SPINCOUNT"]) > SHORT_SPIN


def spinners_of(pid: int) -> list[int]:
    """Live busy processes started by the bench process `pid` (their code names it)."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if "minibert-contention-busy" in cmd and f"parent = {pid} " in cmd and state != "Z":
            out.append(int(proc.name))
    return out


def test_smoke_run_measures_each_level_and_setting_and_kills_its_busy_processes(tmp_path):
    report = tmp_path / "contention.md"
    p = subprocess.Popen([sys.executable, "-m", "bench.contention", "--smoke", "--out", str(report)], cwd=ROOT,
                         env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    cores = lines[0]["machine"]["cores"]
    runs = [x for x in lines if "round" in x]
    assert {(r["busy"], r["setting"]) for r in runs} == {(b, s) for b in (0, 1) for s in ("before", "default")}
    for r in runs:
        assert r["pairs_per_s"] > 0 and r["busy_running"] == r["busy"], r  # the spinners ran the whole run
    summary = {(x["busy"], x["setting"]): x for x in lines if x.get("summary")}
    best = max(summary[(0, s)]["pairs_per_s"] for s in ("before", "default"))
    for (busy, _), x in summary.items():  # fair share = best quiet rate x cores / (cores + busy)
        assert x["fair_pairs_per_s"] == pytest.approx(best * cores / (cores + busy), abs=0.1)
        assert x["vs_fair"] == pytest.approx(x["pairs_per_s"] / (best * cores / (cores + busy)), abs=2e-3)
    text = report.read_text()
    assert "GOMP_SPINCOUNT" in text and text.count("\n| 1 | ") == 2 and text.count("\n| 0 | ") == 2
    assert spinners_of(p.pid) == []


def test_a_bench_stopped_beside_busy_processes_leaves_none_running(tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "bench.contention", "--smoke", "--busy", "0,3", "--out",
                          str(tmp_path / "c.md")], cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    try:
        for line in p.stdout:  # the quiet level's runs, then the busy level starts its spinners
            if line.startswith('{"level": 3'):
                break
        deadline = time.monotonic() + 60
        while len(spinners_of(p.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(spinners_of(p.pid)) == 3
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    deadline = time.monotonic() + 10
    while spinners_of(p.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert spinners_of(p.pid) == []
