"""Machine metrics per run: `system/*` points every `tracking.system_metrics_every_s` seconds.

What people check first when a run is slow: machine CPU %, the training process's CPU % and resident
memory, machine memory, and on a GPU its utilisation and memory. The samples come from MLflow's own
collectors (`mlflow.system_metrics`: psutil for CPU and memory, NVML for GPUs when `nvidia-ml-py` is
installed) plus the process's own figures, and go out through the run's buffered tracker, so a server
outage delays them like any other metric instead of ending the sampling: MLflow's monitor thread logs
directly and stops at its first failed call. Step = sample index (0, 1, ...), as MLflow's monitor does.
"""
from __future__ import annotations

import logging
import threading

import psutil

log = logging.getLogger(__name__)

PREFIX = "system/"


class _Collectors:
    """MLflow's CPU (and, where NVML works, GPU) collectors, plus this process's CPU % and RSS."""

    def __init__(self, gpu: bool):
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor

        self.monitors = [CPUMonitor()]
        self.cuda = False
        if gpu:
            try:
                from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

                self.monitors.append(GPUMonitor())
            except Exception as e:  # no NVML: torch's own view of the memory it holds, no utilisation
                log.info("system metrics: NVML unavailable (%s); GPU memory from torch only", e)
                self.cuda = True
        self.proc = psutil.Process()
        self.proc.cpu_percent()  # the first call only sets the reference point
        psutil.cpu_percent()

    def sample(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for m in self.monitors:
            m.collect_metrics()
            out.update(m.aggregate_metrics())
            m.clear_metrics()
        out["process_cpu_percentage"] = round(self.proc.cpu_percent(), 1)  # 100 = one core busy
        out["process_rss_megabytes"] = round(self.proc.memory_info().rss / 1e6, 1)
        if self.cuda:
            import torch

            for i in range(torch.cuda.device_count()):
                out[f"gpu_{i}_memory_usage_megabytes"] = round(torch.cuda.memory_reserved(i) / 1e6, 1)
        return {PREFIX + k: float(v) for k, v in out.items()}


class SystemSampler:
    """A daemon thread logging one sample every `every_s` seconds until `stop()`; `every_s` 0: nothing."""

    def __init__(self, tracker, every_s: float, gpu: bool = False):
        self.tracker, self.every_s, self.gpu = tracker, every_s, gpu
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "SystemSampler":
        if self.every_s > 0 and getattr(self.tracker, "run_id", None) is not None:
            self._thread = threading.Thread(target=self._loop, name="minibert-system-metrics", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        try:
            collectors = _Collectors(self.gpu)
        except Exception as e:
            log.warning("system metrics off for this run: %s", " ".join(str(e).split())[:200])
            return
        while not self._stop.wait(self.every_s):
            try:
                points = collectors.sample()
            except Exception as e:  # one bad reading (a GPU gone away) costs that sample, not the rest
                log.warning("system metrics: sample %d failed: %s", self.samples, e)
                continue
            self.tracker.log_metrics(points, step=self.samples)  # queued: never blocks on the server
            self.samples += 1

    def stop(self) -> None:
        """Stop sampling (waits for a sample in progress); safe to call twice or when never started."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
