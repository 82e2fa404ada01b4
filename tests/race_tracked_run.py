"""One process of tests/test_tracking.py's fresh-store race: wait for the go file, then open a
tracked run in `root` and log one metric (argv: root, go file, ready file, index)."""
import sys
import time
from pathlib import Path

from minibert.config import TrackingConfig
from minibert.tracking.runs import start_run

root, go, ready, i = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
import mlflow  # noqa: E402,F401 - imported before the barrier, so all start their store at the same instant

ready.touch()
while not go.exists():
    time.sleep(0.001)
with start_run(TrackingConfig(experiment="race"), root, run_name=f"racer-{i}") as tracker:
    tracker.log_metrics({"x": float(i)}, step=1)
