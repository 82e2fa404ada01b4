"""Time the training thread spends inside `Tracker.log_metrics`, with the MLflow server up and killed.

    python -m bench.tracker_calls [--calls 40] [--every 0.25] [--code DIR]

A tracker-only companion to bench.outage that the machine's load barely touches: a real `mlflow
server` on 127.0.0.1, `start_run`, then --calls log_metrics calls (the pretrain stage's four metrics)
spaced --every seconds like training steps; the server is SIGKILLed and the same again; close() is
timed too. `--code DIR` imports minibert from another checkout (e.g. main, for a before figure).
Prints JSON: total and worst call time per phase, and close()'s time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, signal, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[4])
from mlflow_server import start_mlflow_server, stop_mlflow_server
from minibert.config import TrackingConfig
from minibert.tracking.runs import start_run
calls, every, tmp = int(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])
uri, proc = start_mlflow_server(tmp)
os.environ["MLFLOW_TRACKING_URI"] = uri
import minibert.tracking.tracker; print("code:", minibert.tracking.tracker.__file__, file=sys.stderr)
t = start_run(TrackingConfig(experiment="calls"), tmp)
def phase(first):
    times = []
    for s in range(first, first + calls):
        t0 = time.perf_counter()
        t.log_metrics({"mlm_loss": 7.0, "nsp_loss": 0.7, "pairs_per_sec": 1000.0 + s, "lr": 1e-3}, step=s)
        times.append(time.perf_counter() - t0)
        time.sleep(every)
    return {"total_s": round(sum(times), 4), "worst_s": round(max(times), 4)}
up = phase(0)
stop_mlflow_server(proc, signal.SIGKILL)
down = phase(calls)
t0 = time.perf_counter()
t.close()
print(json.dumps({"up": up, "down": down, "close_s": round(time.perf_counter() - t0, 2)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--every", type=float, default=0.25)
    ap.add_argument("--code", type=Path, default=ROOT)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="minibert-calls-") as tmp:
        env = {**os.environ, "PYTHONPATH": str(a.code), "MLFLOW_DISABLE_TELEMETRY": "true"}
        out = subprocess.run([sys.executable, "-c", CHILD, str(a.calls), str(a.every), tmp, str(ROOT / "tests")],
                             env=env, cwd=tmp, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"bench.tracker_calls: failed:\n{out.stderr[-2000:]}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps({"bench": "tracker_calls", "code": str(a.code), "calls": a.calls, "every_s": a.every, **res,
                      "loadavg_1m": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
