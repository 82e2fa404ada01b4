"""The GPU check's report: `python -m bench.gpu_summary W OUT DEV` writes OUT/summary.json and OUT/summary.md.

Read from what `bench/gpu_check.sh` left under W: each run's metrics and plots (W/runs/NAME), the
step table (W/steps.tsv) and logs, the committed CPU metrics copied before any stage ran
(W/committed-metrics), `bench.gpu_check`'s diag.json and weights.json, and env.json. Every file may be
missing (a step skipped or killed): the report says what there is. Standard library only, except yaml
for the batch column (when it is absent the column reads `?`).
"""
from __future__ import annotations

import csv
import glob
import json
import os
import re
import statistics
import sys

# 50-step held-out MLM on CPU: 6.744 +- 0.004 over seeds and precisions (README, bench.quality)
HELDOUT_TOLERANCE = 0.03


def load(p: str):
    try:
        with open(p) as f:
            return json.load(f)
    except Exception:  # noqa: BLE001 - absent or half-written: nothing to report
        return None


def rows(p: str, delimiter: str = ",") -> list[dict]:
    try:
        with open(p) as f:
            return list(csv.DictReader(f, delimiter=delimiter))
    except Exception:  # noqa: BLE001
        return []


def run_figures(d: str, cpu_heldout: float | None) -> dict:
    """One run's train/eval metrics, probe shapes, throughput and held-out verdict against the CPU run."""
    probes = (load(f"{d}/metrics/probe.json") or {}).get("probes") or {}
    r = {"train": load(f"{d}/metrics/train.json"), "eval": load(f"{d}/metrics/eval.json"),
         "probe_shapes": {k: v.get("shape") for k, v in probes.items()}}
    hist = rows(f"{d}/plots/train_loss.csv")
    rates = [float(x["pairs_per_sec"]) for x in hist if int(x["step"]) > 5]
    r["steady_pairs_per_sec_median"] = round(statistics.median(rates), 1) if rates else None
    r["first_step_pairs_per_sec"] = float(hist[0]["pairs_per_sec"]) if hist else None
    curve = rows(f"{d}/plots/valid_curve.csv")
    r["valid_curve_last"] = curve[-1] if curve else None
    if r["eval"] and cpu_heldout is not None:
        delta = r["eval"]["mlm_loss"] - cpu_heldout
        r["heldout_mlm_delta_vs_committed_cpu"] = round(delta, 6)
        r["heldout_verdict"] = "ok" if abs(delta) <= HELDOUT_TOLERANCE else f"CHECK: |delta| > {HELDOUT_TOLERANCE}"
    return r


def step_notes(w: str, steps: list[dict]) -> dict:
    """Per step: the last lines of a failed one, its warnings, recompiles and graph breaks."""
    notes = {}
    for s in steps:
        try:
            lines = open(f"{w}/{s['step']}.log", errors="replace").read().splitlines()
        except Exception:  # noqa: BLE001
            continue
        n = {}
        if s["rc"] not in ("0", "skipped"):
            n["last_lines"] = lines[-3:]
        warn = [] if s["step"].startswith("install") else \
            list(dict.fromkeys(line.strip()[:200] for line in lines if re.search(r"warn", line, re.I)))
        if warn:
            n["warnings"] = warn[:6]
        for key, pat in (("recompiles", "Recompiling function"), ("graph_breaks", "Graph break")):
            c = sum(pat in line for line in lines)
            if c:
                n[key] = c
        if n:
            notes[s["step"]] = n
    return notes


def batch_column(w: str, name: str) -> str:
    try:
        import yaml

        p = yaml.safe_load(open(f"{w}/params-{name}.yaml"))["train"]
        return f"{p.get('batch_size', 'default')}/{p.get('micro_batches', 'default')}"  # unset: the config's default
    except Exception:  # noqa: BLE001
        return "?"


def summarize(w: str, out: str, dev: str) -> dict:
    committed = {k: load(f"{w}/committed-metrics/{k}.json") for k in ("train", "eval", "corpus", "pairs")}
    cpu_heldout = (committed["eval"] or {}).get("mlm_loss")
    runs = {os.path.basename(d): run_figures(d, cpu_heldout) for d in sorted(glob.glob(f"{w}/runs/*"))}
    steps = rows(f"{w}/steps.tsv", delimiter="\t")
    fresh = {k: load(f"metrics/{k}.json") for k in ("corpus", "pairs")}
    data_same = {k: (fresh[k] == committed[k]) if fresh[k] is not None else None for k in fresh}
    notes = step_notes(w, steps)
    summary = {"device": dev, "step_notes": notes, "env": load(f"{w}/env.json"), "steps": steps,
               "data_metrics_equal_committed": data_same,
               "committed_cpu": {"train": committed["train"], "eval": committed["eval"]}, "runs": runs,
               "diag": load(f"{w}/diag.json"), "weights": load(f"{w}/weights.json"),
               "cpu_kernels_built_during_gpu_runs": os.path.isdir(f"{w}/kernel-cache")}
    with open(f"{out}/summary.json", "w") as f:
        json.dump(summary, f, indent=1, default=str)
    lines = ["# minibert GPU check", "", f"device {dev}; env: {json.dumps(summary['env'])}", "",
             "| step | rc | s |", "|---|---|---|", *(f"| {s['step']} | {s['rc']} | {s['seconds']} |" for s in steps), "",
             f"data metrics equal to the committed ones: {data_same}", "",
             "| run | device | precision | batch/mb | steps | mlm_avg | nsp_avg | pairs/s (train.json) | steady median "
             "pairs/s | held-out MLM (eval) | delta vs CPU | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ct, ce = committed["train"] or {}, committed["eval"] or {}
    lines.append(f"| committed CPU | {ct.get('device')} | {ct.get('precision')} | 512/4 | {ct.get('steps')} | "
                 f"{ct.get('mlm_loss_avg')} | {ct.get('nsp_loss_avg')} | {ct.get('pairs_per_sec')} | | {ce.get('mlm_loss')} | | |")
    for name, r in runs.items():
        t, e = r["train"] or {}, r["eval"] or {}
        lines.append(f"| {name} | {t.get('device')} | {t.get('precision')} | {batch_column(w, name)} | {t.get('steps')} | "
                     f"{t.get('mlm_loss_avg')} | {t.get('nsp_loss_avg')} | {t.get('pairs_per_sec')} | "
                     f"{r['steady_pairs_per_sec_median']} | {e.get('mlm_loss')} | "
                     f"{r.get('heldout_mlm_delta_vs_committed_cpu', '')} | {r.get('heldout_verdict', '')} |")
    lines += ["", "step notes: " + json.dumps(notes, default=str)[:4000],
              "", "diag: " + json.dumps(summary["diag"], default=str), "",
              "weights: " + json.dumps(summary["weights"], default=str), "",
              "CPU kernel cache created during the run (should be False on CUDA): "
              f"{summary['cpu_kernels_built_during_gpu_runs']}"]
    with open(f"{out}/summary.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:40]))
    return summary


if __name__ == "__main__":
    summarize(*sys.argv[1:4])
