"""Total wall time of two queued experiments under `dvc queue start -j 1` and `-j 2`, per `train.threads`.

    python -m bench.queue [--steps 5] [--configs 0:1,0:2,auto:2] [--data PATH]

Copies this commit of the project (`git archive HEAD`) into a temp git repository, runs `dvc repro`
once (data stages, then a first pretrain with `--steps` steps), commits, and then for each
`threads:jobs` config queues two experiments (`dvc exp run --queue -S train.seed=N -S train.threads=T`,
fresh seeds each time so DVC's run cache never restores a result) and times `dvc queue start -j J`
until the queue is empty. Prints one JSON line per config: total wall seconds, and each experiment's
pretrain pairs/s from its metrics.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import DEFAULT_DATA
from minibert import layout

ROOT = Path(__file__).resolve().parents[1]


def sh(cwd: Path, *cmd: str, env: dict | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"bench.queue: {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-1500:]}\n"
                         f"{proc.stderr[-1500:]}")
    return proc.stdout


def project(repo: Path, steps: int, env: dict) -> None:
    repo.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(repo)], input=archive, check=True)
    params = yaml.safe_load((repo / layout.PARAMS).read_text())
    params["train"].update(max_steps=steps, checkpoint_every=0)
    (repo / layout.PARAMS).write_text(yaml.safe_dump(params, sort_keys=False))
    git = ("git", "-c", "user.name=bench", "-c", "user.email=bench@minibert.invalid")
    sh(repo, "git", "init", "-q")
    sh(repo, *git, "add", "-A")
    sh(repo, *git, "commit", "-qm", "bench copy")
    sh(repo, "dvc", "repro", env=env)
    sh(repo, *git, "add", "-A")
    sh(repo, *git, "commit", "-qm", "reproduced")


def run_queue(repo: Path, threads: str, jobs: int, seeds: tuple[int, int], env: dict) -> dict:
    for seed in seeds:
        sh(repo, "dvc", "exp", "run", "--queue", "-S", f"train.seed={seed}", "-S", f"train.threads={threads}",
           env=env)
    t0 = time.perf_counter()
    sh(repo, "dvc", "queue", "start", "-j", str(jobs), env=env)
    while True:
        time.sleep(5)
        status = sh(repo, "dvc", "queue", "status", env=env)
        if "Queued" not in status and "Running" not in status:
            break
    wall = time.perf_counter() - t0
    if "Failed" in status:
        raise SystemExit(f"bench.queue: an experiment failed:\n{status}")
    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json", env=env))
    rates = []
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                p = ((data.get("params") or {}).get(str(layout.PARAMS)) or {}).get("data", {}).get("train", {})
                m = ((data.get("metrics") or {}).get(layout.TRAIN_METRICS.as_posix()) or {}).get("data", {})
                if p.get("seed") in seeds and m:
                    rates.append(round(m["pairs_per_sec"], 1))
    return {"threads": threads, "jobs": jobs, "wall_s": round(wall, 1), "pairs_per_s": rates}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--configs", default="0:1,0:2,auto:2", help="comma-separated threads:jobs")
    ap.add_argument("--data", default=DEFAULT_DATA)
    a = ap.parse_args()
    env = {**os.environ, "MINIBERT_DATA": a.data, "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with tempfile.TemporaryDirectory(prefix="minibert-queue-") as tmp:
        repo = Path(tmp) / "repo"
        project(repo, a.steps, env)
        print(json.dumps({"bench": "queue", "setup": "done", "cores": len(os.sched_getaffinity(0))}), flush=True)
        for i, cfg in enumerate(a.configs.split(",")):
            threads, jobs = cfg.split(":")
            r = run_queue(repo, threads, int(jobs), (100 + 2 * i, 101 + 2 * i), env)
            print(json.dumps({"bench": "queue", "steps": a.steps, **r, "loadavg_1m": round(os.getloadavg()[0], 2)}),
                  flush=True)


if __name__ == "__main__":
    main()
