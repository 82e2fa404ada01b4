"""The pretrain stage on a shared machine: pairs/s quiet, beside 1 and beside 3 busy processes, per setting.

    python -m bench.contention [--steps 20] [--warmup 3] [--busy 0,1,3] [--settings before,default,passive,threads=1]
                               [--rounds 1] [--cpus 0,1] [--pairs DIR] [--data PATH] [--out FILE] [--smoke]

Each run is the real stage, `python -m stages.pretrain`, in a temporary workspace: the pipeline's pairs
(`--pairs`, default data/pairs, else built from WikiText-2 as bench.outage does), the repository's
params.yaml (the book's recipe, bf16 where the CPU has it) with `max_steps` = warmup + steps, no
checkpoints, no held-out curve, tracking on (an sqlite store in the workspace, so MLflow's sender and the
`system/*` sampler threads run as in a real stage). The rate is the timed steps' pairs over their time
(from plots/train_loss.csv, the first `--warmup` steps left out): a mean, so stalls count.

A busy process is a plain CPU spinner (`python -c` looping), started by the bench before the runs of its
level and always killed after them (they also exit on their own within a second when the bench dies).
Within one level the settings run in turn, `--rounds` times, so drift hits them alike. The fair share
beside B busy processes is the quiet rate x cores / (cores + B): what the stage gets if the cores are
shared evenly by runnable processes. `vs fair` divides by the fair share of the best quiet rate of any
setting (the machine's speed), `vs own` by the setting's own quiet rate; the issue's bar: `vs fair` >= 0.5
beside 3 busy.

A setting is `default` (what a user gets from a clean environment) or `+`-joined items:
  before      GOMP_SPINCOUNT=300000: libgomp's own spin when no wait policy is set, what minibert ran with
              before it set its own default (minibert/__init__.py)
  passive     OMP_WAIT_POLICY=PASSIVE: OpenMP workers sleep at once instead of spinning
  spin=N      GOMP_SPINCOUNT=N
  threads=X   train.threads=X (0, auto or a number)
  sampler=S   tracking.system_metrics_every_s=S (0: no system/* sampler thread)
  tracking=off   no MLflow run at all (no sender, no sampler)
The children get OMP_WAIT_POLICY, GOMP_SPINCOUNT, OMP_NUM_THREADS and KMP_BLOCKTIME only from the setting.

`--cpus 0,1` pins the bench, its spinners and its stages to those CPUs (a 2-core figure on a larger
machine). Run it on an otherwise quiet machine: the background load (runnable tasks not the bench's) is
sampled before each level and printed; figures taken beside other work are not the levels they claim.
Results: one JSON line per run, a table, and a markdown file (`--out`, default
`bench/results/<date>-contention-<commit>.md`). `--smoke`: a tiny model on synthetic pairs, 1 + 2
steps, levels 0 and 1 and settings before and default unless given, the file in a temp folder unless
`--out` is given.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OMP_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "KMP_BLOCKTIME")
LIBGOMP_DEFAULT_SPIN = "300000"  # libgomp's GOMP_SPINCOUNT when OMP_WAIT_POLICY is unset (its env.c)
DEFAULT_SETTINGS = "before,default,passive,threads=1"
BUSY_MARK = "minibert-contention-busy"
# A spinner that stops when its parent (the bench) is gone, even after a SIGKILL of the bench.
SPINNER = ("import os\nparent = {ppid}  # " + BUSY_MARK + "\n"
           "while os.getppid() == parent:\n    for _ in range(200000):\n        pass\n")


# ---------------------------------------------------------------------------- settings


def parse_setting(name: str) -> dict:
    """A setting's environment (the OpenMP keys) and params overrides; SystemExit on an unknown item."""
    env: dict[str, str] = {}
    train: dict = {}
    tracking: dict = {}
    if name != "default":
        for item in name.split("+"):
            key, _, value = item.partition("=")
            if key == "before" and not value:
                env["GOMP_SPINCOUNT"] = LIBGOMP_DEFAULT_SPIN
            elif key == "passive" and not value:
                env["OMP_WAIT_POLICY"] = "PASSIVE"
            elif key == "spin" and value.isdigit():
                env["GOMP_SPINCOUNT"] = value
            elif key == "threads" and (value == "auto" or value.isdigit()):
                train["threads"] = value if value == "auto" else int(value)
            elif key == "sampler" and value.replace(".", "", 1).isdigit():
                tracking["system_metrics_every_s"] = float(value)
            elif key == "tracking" and value == "off":
                tracking["enabled"] = False
            else:
                raise SystemExit(f"bench.contention: setting {name!r}: {item!r} is not one of default, before, "
                                 "passive, spin=N, threads=X, sampler=S, tracking=off (join items with +)")
    return {"name": name, "env": env, "train": train, "tracking": tracking}


def child_env(setting: dict, ws: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OMP_KEYS}
    env.update(setting["env"])
    env.update(PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=f"sqlite:///{ws}/mlflow.db", MLFLOW_DISABLE_TELEMETRY="true",
               MINIBERT_TRAININGS_DIR=str(ws / "trainings"))  # `auto` counts this bench's trainings only
    return env


# ---------------------------------------------------------------------------- busy processes


class Busy:
    """`n` CPU spinners for the life of a `with` block; killed (and reaped) on the way out, whatever happens."""

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self):
        code = SPINNER.format(ppid=os.getpid())
        self.procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(self.n)]
        time.sleep(0.5 if self.n else 0)  # running before the stage starts
        return self

    def running(self) -> int:
        """Spinners still running (all of them, unless something killed one during the run)."""
        return sum(p.poll() is None for p in self.procs)

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        self.procs = []
        return False


def background_runnable(samples: int = 20, every_s: float = 0.05) -> float:
    """Mean runnable tasks on the machine other than this (sampling) process: /proc/loadavg's 4th field."""
    counts = []
    for _ in range(samples):
        running = Path("/proc/loadavg").read_text().split()[3].split("/")[0]
        counts.append(int(running) - 1)
        time.sleep(every_s)
    return statistics.mean(counts)


# ---------------------------------------------------------------------------- workspace and one run


def workspace(ws: Path, pairs_dir: Path, data: str, smoke: bool) -> str:
    """data/pairs/train.safetensors, data/tokens/vocab.txt and the base params.yaml; returns the pairs' source."""
    from minibert import layout

    (ws / layout.PAIRS).mkdir(parents=True)
    (ws / layout.TOKENS).mkdir(parents=True)
    if smoke:
        import numpy as np

        from minibert.artifacts import save_arrays
        from minibert.config import PairsConfig
        from minibert.data.pairs import make_pairs
        from minibert.data.vocab import SPECIALS, Vocab

        vocab = Vocab(SPECIALS + tuple(f"w{i}" for i in range(99 - len(SPECIALS))))
        vocab.save(ws / layout.VOCAB)
        rng = np.random.default_rng(7)
        n_sent = rng.integers(2, 8, 99)
        lens = rng.integers(1, 14, n_sent.sum())
        split = {"ids": rng.integers(len(SPECIALS), 99, lens.sum()).astype(np.int32),
                 "sentence_offsets": np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
                 "paragraph_offsets": np.concatenate([[0], np.cumsum(n_sent)]).astype(np.int64)}
        pairs = make_pairs(split, PairsConfig(max_len=29), len(vocab), rng)
        save_arrays(ws / layout.TRAIN_PAIRS, pairs, {"vocab_sha256": vocab.sha256})
        source = "synthetic (smoke)"
    elif (pairs_dir / "train.safetensors").is_file() and (pairs_dir.parent / "tokens/vocab.txt").is_file():
        os.symlink((pairs_dir / "train.safetensors").resolve(), ws / layout.TRAIN_PAIRS)
        os.symlink((pairs_dir.parent / "tokens/vocab.txt").resolve(), ws / layout.VOCAB)
        source = str(pairs_dir)
    else:
        from bench.outage import workspace as build  # WikiText-2's train pairs with the pipeline's functions

        tmp = ws.parent / "built"
        build(tmp, data, 1)
        shutil.move(str(tmp / layout.TRAIN_PAIRS), ws / layout.TRAIN_PAIRS)
        shutil.move(str(tmp / layout.VOCAB), ws / layout.VOCAB)
        source = f"built from {data}"
    params = yaml.safe_load((ROOT / layout.PARAMS).read_text())
    if smoke:
        params["pairs"]["max_len"] = 29
        params["model"].update(num_layers=1, hidden=12, heads=3, ffn_hidden=37, max_len=29)
        params["train"].update(batch_size=16)
    params["train"].update(checkpoint_every=0, eval_every=0, log_every=1, device="cpu")
    params["tracking"].update(enabled=True, experiment="bench-contention", registered_model="")
    (ws / "base.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return source


def run_stage(ws: Path, setting: dict, steps: int, warmup: int, timeout_s: float) -> dict:
    from minibert import layout

    params = yaml.safe_load((ws / "base.yaml").read_text())
    params["train"].update(max_steps=warmup + steps, **setting["train"])
    params["tracking"].update(setting["tracking"])
    (ws / layout.PARAMS).write_text(yaml.safe_dump(params, sort_keys=False))
    for out in (layout.MODELS, layout.METRICS, layout.PLOTS, layout.CHECKPOINTS):
        shutil.rmtree(ws / out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "stages.pretrain"], cwd=ws, env=child_env(setting, ws),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"timed_out": True, "stage_wall_s": round(time.perf_counter() - t0, 1)}
    finally:  # timed out, or the bench is being stopped: the stage goes too
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    if proc.returncode:
        raise SystemExit(f"bench.contention: the stage failed under {setting['name']!r}:\n{err[-2000:]}")
    rows = (ws / layout.TRAIN_CURVE_CSV).read_text().splitlines()
    header = rows[0].split(",")
    step_i, pps_i = header.index("step"), header.index("pairs_per_sec")
    timed = [float(r.split(",")[pps_i]) for r in rows[1:] if int(r.split(",")[step_i]) > warmup]
    if len(timed) != steps or not all(x > 0 for x in timed):
        raise SystemExit(f"bench.contention: expected {steps} timed steps with a rate, read {timed}")
    rate = len(timed) / sum(1 / x for x in timed)  # equal batches: total pairs over total time
    return {"pairs_per_s": round(rate, 1), "slowest_step_pairs_per_s": round(min(timed), 1),
            "stage_wall_s": round(time.perf_counter() - t0, 1)}


# ---------------------------------------------------------------------------- report


def summarise(rows: list[dict], cores: int) -> list[dict]:
    """Per (busy, setting): the median rate over rounds, and its ratios to the fair shares."""
    out, settings = [], list(dict.fromkeys(r["setting"] for r in rows))
    quiet = {s: statistics.median([r["pairs_per_s"] for r in rows if r["busy"] == 0 and r["setting"] == s
                                   and "pairs_per_s" in r] or [0.0]) for s in settings}
    best = max(quiet.values(), default=0.0)
    for busy in sorted({r["busy"] for r in rows}):
        for s in settings:
            mine = [r for r in rows if r["busy"] == busy and r["setting"] == s]
            rates = [r["pairs_per_s"] for r in mine if "pairs_per_s" in r]
            rate = statistics.median(rates) if rates else None
            share = cores / (cores + busy)
            out.append({"busy": busy, "setting": s, "pairs_per_s": rate, "runs": len(mine),
                        "timed_out": sum(1 for r in mine if r.get("timed_out")),
                        "fair_pairs_per_s": round(best * share, 1),
                        "vs_fair": round(rate / (best * share), 3) if rate and best else None,
                        "vs_own": round(rate / (quiet[s] * share), 3) if rate and quiet[s] else None,
                        "slowdown": round(quiet[s] / rate, 2) if rate and quiet[s] else None})
    return out


def table(summary: list[dict]) -> str:
    lines = ["| busy | setting | pairs/s | fair share | vs fair | vs own quiet | slower than own quiet |",
             "|---:|---|---:|---:|---:|---:|---:|"]

    def f(x, fmt):
        return fmt.format(x) if x is not None else "timed out"
    for s in summary:
        lines.append(f"| {s['busy']} | {s['setting']} | {f(s['pairs_per_s'], '{:.0f}')} | {s['fair_pairs_per_s']:.0f} | "
                     f"{f(s['vs_fair'], '{:.2f}')} | {f(s['vs_own'], '{:.2f}')} | {f(s['slowdown'], '{:.1f}×')} |")
    return "\n".join(lines)


def commit() -> str:
    p = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "minibert", "stages"],
                           capture_output=True, text=True).stdout.strip()
    return (p.stdout.strip() or "nogit") + ("-dirty" if dirty else "")


def write_report(path: Path, argv: list[str], machine: dict, source: str, levels: list[dict], rows: list[dict],
                 summary: list[dict], settings: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    envs = "\n".join(f"- `{s['name']}`: env {s['env'] or '(none of ' + ', '.join(OMP_KEYS) + ')'}, "
                     f"train {s['train'] or '(params.yaml)'}, tracking {s['tracking'] or '(params.yaml)'}"
                     for s in settings)
    background = ", ".join(f"{lv['busy']} busy: {lv['background_runnable']:.2f}" for lv in levels)
    path.write_text(
        f"# Contention: the pretrain stage beside busy processes ({machine['date'][:10]})\n\n"
        f"Command: `python -m bench.contention {' '.join(argv)}` at commit `{machine['commit']}`.\n\n"
        f"Machine: {machine['cpu']}, {machine['cpu_kind']}, {machine['cores']} cores used "
        f"(affinity {machine['cpus']}), torch {machine['torch']}, threads by default {machine['threads']}. "
        f"Pairs: {source}. Background runnable tasks before each level (should be ~0): {background}.\n\n"
        f"Settings:\n{envs}\n\n"
        "Fair share = best quiet rate × cores / (cores + busy). `vs fair` >= 0.5 beside 3 busy is the issue's "
        "bar. Rates are medians over rounds of the timed steps' mean rate.\n\n"
        f"{table(summary)}\n\n<details><summary>Every run (JSON)</summary>\n\n```\n"
        + "\n".join(json.dumps(r) for r in rows) + "\n```\n</details>\n")


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=3, help="steps before the timed ones (left out of the rate)")
    ap.add_argument("--busy", help="comma-separated numbers of busy processes, 0 = quiet (default 0,1,3)")
    ap.add_argument("--settings", help=f"comma-separated settings (default {DEFAULT_SETTINGS})")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--cpus", help="comma-separated CPU ids to pin everything to (default: this process's)")
    from minibert import layout

    ap.add_argument("--pairs", type=Path, default=ROOT / layout.PAIRS)
    ap.add_argument("--data", default=os.environ.get("MINIBERT_DATA", str(ROOT.parent / "shared/data/wikitext-2")))
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per stage run before it counts as timed out")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, synthetic pairs, 2 timed steps; busy 0,1 and settings before,default unless given")
    args = sys.argv[1:] if argv is None else argv
    a = ap.parse_args(args)
    if a.smoke:
        a.steps, a.warmup = 2, 1
    a.busy = a.busy or ("0,1" if a.smoke else "0,1,3")
    a.settings = a.settings or ("before,default" if a.smoke else DEFAULT_SETTINGS)
    if a.steps < 1 or a.warmup < 0 or a.rounds < 1:
        raise SystemExit("bench.contention: --steps and --rounds must be >= 1, --warmup >= 0")
    try:
        busy_levels = [int(b) for b in a.busy.split(",")]
    except ValueError:
        raise SystemExit(f"bench.contention: --busy {a.busy!r} is not a comma-separated list of integers") from None
    if 0 not in busy_levels:
        raise SystemExit("bench.contention: --busy needs 0 (the quiet rate the fair shares are made of)")
    settings = [parse_setting(s) for s in a.settings.split(",")]
    if a.cpus:
        os.sched_setaffinity(0, {int(c) for c in a.cpus.split(",")})  # spinners and stages inherit it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the spinners' `finally` runs

    from bench.train import machine_info
    machine = {**machine_info(), "commit": commit(), "cpus": sorted(os.sched_getaffinity(0))}
    cores = machine["cores"]
    stamp = datetime.date.today().isoformat()
    out = a.out or (Path(tempfile.mkdtemp(prefix="minibert-contention-")) / "contention.md" if a.smoke else
                    ROOT / "bench/results" / f"{stamp}-contention-{machine['commit']}.md")
    print(json.dumps({"bench": "contention", "machine": {k: machine[k] for k in
                      ("cpu_kind", "cores", "cpus", "threads", "torch", "commit", "loadavg_1m")}}), flush=True)
    rows, levels = [], []
    with tempfile.TemporaryDirectory(prefix="minibert-contention-") as tmp:
        ws = Path(tmp) / "ws"
        ws.mkdir()
        source = workspace(ws, a.pairs, a.data, a.smoke)
        for busy in busy_levels:
            level = {"busy": busy, "background_runnable": round(background_runnable(), 2)}
            levels.append(level)
            print(json.dumps({"level": busy, **level}), flush=True)
            with Busy(busy) as spinners:
                for r in range(a.rounds):
                    for s in settings:
                        res = run_stage(ws, s, a.steps, a.warmup, a.timeout)
                        row = {"busy": busy, "setting": s["name"], "round": r, **res,
                               "busy_running": spinners.running(), "loadavg_1m": round(os.getloadavg()[0], 2)}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    summary = summarise(rows, cores)
    for s in summary:
        print(json.dumps({"summary": True, **s}), flush=True)
    print(table(summary), file=sys.stderr)
    write_report(out, args, machine, source, levels, rows, summary, settings)
    print(json.dumps({"bench": "contention", "report": str(out)}), flush=True)
    return out


if __name__ == "__main__":
    main()
