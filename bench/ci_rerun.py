"""CI-rerun wall time of the real default pipeline: `python -m ci.pipeline`'s pull + repro steps, each
in a fresh clone of HEAD. `python -m bench.ci_rerun` (MINIBERT_DATA set; commit first).

1. cold remote: an empty bucket; the script computes every stage and pushes (`--push`);
2. after CI's push only: the committed dvc.lock names this workspace's pretrain outputs, which CI did
   not reproduce byte for byte (models/bert.json and metrics/train.json hold the MLflow run id and
   timings), so pretrain, evaluate and probe run again;
3. warm remote: this workspace's outputs pushed too (`dvc push` after `make repro`, the habit).

The remote is a real S3 server (moto_server) on 127.0.0.1. Prints one line per run.
"""
from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

from tests.git_project import ROOT, sh
from tests.s3_server import start_s3_server, stop_s3_server


def ci_run(clone: Path, env: dict[str, str], *args: str) -> dict[str, float]:
    t0 = time.monotonic()
    proc = sh(clone, sys.executable, "-m", "ci.pipeline", "--skip-install", "--skip-test", "--base", "HEAD",
              *args, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    steps: dict[str, float] = {}
    for step, seconds in re.findall(r"^(pull|repro|push): ([\d.]+) s$", proc.stdout, re.M):
        steps[step] = steps.get(step, 0.0) + float(seconds)  # push: dvc push, then ci.runcache
    steps["total"] = time.monotonic() - t0
    steps["stages_run"] = len(re.findall(r"^Running stage", proc.stdout, re.M))
    return steps


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="ci-rerun-") as tmp:
        tmp = Path(tmp)
        s3 = start_s3_server(tmp)
        try:
            env = {**s3.env(), "DVC_REMOTE_URL": s3.make_bucket("minibert") + "/dvc",
                   "DVC_REMOTE_ENDPOINT": s3.endpoint}
            sh(tmp, "git", "clone", "-q", "--bare", str(ROOT), str(tmp / "origin.git"))
            results = {}
            for name, extra in (("cold remote", ("--push",)), ("after CI's push only", ()), ("warm remote", ())):
                if name == "warm remote":  # what `make repro` + `dvc push` on the developer's machine leaves
                    sh(ROOT, "dvc", "remote", "add", "--local", "-f", "bench", env["DVC_REMOTE_URL"])
                    sh(ROOT, "dvc", "remote", "modify", "--local", "bench", "endpointurl", s3.endpoint)
                    try:
                        sh(ROOT, "dvc", "push", "-r", "bench", "--run-cache", env=env)
                        sh(ROOT, sys.executable, "-m", "ci.runcache", "--remote", "bench", env=env)
                    finally:
                        sh(ROOT, "dvc", "remote", "remove", "--local", "bench")
                clone = tmp / re.sub(r"\W+", "-", name)
                sh(tmp, "git", "clone", "-q", str(tmp / "origin.git"), str(clone))
                results[name] = r = ci_run(clone, env, *extra)
                print(f"{name}: pull {r.get('pull', 0):.1f} s + repro {r['repro']:.1f} s "
                      f"= {r.get('pull', 0) + r['repro']:.1f} s ({r['stages_run']} stages run; "
                      f"push {r.get('push', 0):.1f} s)", flush=True)
        finally:
            stop_s3_server(s3.proc)


if __name__ == "__main__":
    main()
