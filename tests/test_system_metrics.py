"""system/* metrics: sampled through the buffered tracker into a real (sqlite) run; off with 0."""
import time

import mlflow
import pytest

from minibert.config import ConfigError, TrackingConfig, load_config
from minibert.tracking.runs import start_run
from minibert.tracking.system_metrics import SystemSampler


def vm_rss_mb():
    """Resident memory as the kernel reports it (independent of psutil)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise AssertionError("no VmRSS")


def history(root, run_id, key):
    return mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_metric_history(run_id, key)


def test_samples_reach_the_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = start_run(TrackingConfig(experiment="sys"), tmp_path)
    sampler = SystemSampler(tracker, 0.2).start()
    time.sleep(1.5)
    sampler.stop()
    n = sampler.samples
    rss_now = vm_rss_mb()
    tracker.close()
    rss = history(tmp_path, tracker.run_id, "system/process_rss_megabytes")
    cpu = history(tmp_path, tracker.run_id, "system/cpu_utilization_percentage")
    assert 3 <= n <= 8 and len(rss) == len(cpu) == n  # every 0.2 s for 1.5 s, on a busy machine
    assert sorted(m.step for m in rss) == list(range(n))
    assert all(0.0 <= m.value <= 100.0 for m in cpu)
    assert abs(rss[-1].value - rss_now) < 0.3 * rss_now  # the process's own RSS, not the machine's
    assert history(tmp_path, tracker.run_id, "system/system_memory_usage_megabytes")


def test_zero_is_off(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = start_run(TrackingConfig(experiment="sys"), tmp_path)
    sampler = SystemSampler(tracker, 0).start()
    time.sleep(0.5)
    sampler.stop()
    tracker.close()
    assert sampler.samples == 0 and history(tmp_path, tracker.run_id, "system/process_rss_megabytes") == []


@pytest.mark.parametrize("bad", [-1, 0.01, 7200, "often"])
def test_config_check_names_the_key(tmp_path, bad):
    (tmp_path / "params.yaml").write_text(f"tracking:\n  system_metrics_every_s: {bad}\n")
    with pytest.raises(ConfigError, match="system_metrics_every_s"):
        load_config(tmp_path / "params.yaml")
