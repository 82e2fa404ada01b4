#!/usr/bin/env bash
# minibert GPU readiness check, for a lent NVIDIA H200 (16 cores, ~8 min wall). Run it from the
# repository root: `bash bench/gpu_check.sh` (copied from ../shared/device/gpu-check.sh and adapted to
# issue 29: the portable path, micro_batches auto, eval.device, the host-side batch cut). Results go under $OUT (the device tool's folder), else ./gpu-audit-out:
#   summary.md / summary.json  what ran, pairs/s, losses, held-out MLM vs the committed CPU run, checks
#   log.txt   the whole console log          steps.tsv  per step: rc, seconds, timeout
#   env.txt   nvidia-smi, python, torch      nvsmi.csv  GPU util / memory sampled every 0.5 s
#   runs.tar.gz  per-run metrics, plots, params, stage logs (no weights)
#
# Getting it there: the device tool copies only the checkout (tracked + untracked-not-ignored files,
# carried paths); ../shared does NOT travel. From the repository root of a session that has a device:
#   mkdir -p .gpu-audit-data && cp ../shared/data/wikitext-2-v1.zip .gpu-audit-data/
#   echo '/.gpu-audit-data/' >> .git/info/exclude
#   run(command="bash bench/gpu_check.sh", carry=[".gpu-audit-data"], timeout_s=520)
# then give_back. The budget (GPU_AUDIT_BUDGET_S, default 450 s) is checked before each optional step,
# so a shorter timeout_s needs a smaller budget, e.g. GPU_AUDIT_BUDGET_S=300 bash ...
#
# Python: the H200 image's python3 already holds a CUDA torch (2.11.0+cu130 when last seen) and most
# of the project's dependencies but not dvc or mlflow, and the machine may reach no package registry.
# So: a venv on top of that python3 (its packages made visible with a .pth file, since python3 there
# is itself a venv and --system-site-packages alone would skip them), the project on PYTHONPATH (plus
# an offline `pip install --no-deps -e .`), the stages run directly (no dvc), tracking off.
# `pip install torch==2.13.0` (the Makefile's pin) is only the fallback: on the project machines it
# resolves to the +cpu wheel of their local wheel folder, on PyPI to a multi-GB CUDA build, offline to
# nothing; the script stops (summary says why) if the torch it ends with sees no GPU.
#
# Runs (in priority order; optional ones skipped when the budget is short):
#   data stages (download with MINIBERT_DATA, tokenize, pairs; compared with committed metrics)
#   book:    the committed params with train.device=cuda (precision auto -> bf16 on H200), 50 steps,
#            then the evaluate and probe stages on its weights; held-out MLM vs metrics/eval.json
#   diag:    per-step host syncs (torch.cuda.set_sync_debug_mode; the step, and fit with its loss read-back),
#            kernel dispatch on CUDA tensors,
#            checkpoint save/load/resume on CUDA (bit-exact or not)
#   weights: CUDA-trained weights on CPU: load_pretrained, encode cpu vs cuda, pyfunc encode_rows, cli
#   big:     batch 4096, micro_batches 1 (throughput; issue 29's goal: >= 50k pairs/s)
#   nccl1:   the stage under torch.distributed.run, 1 process: NCCL init, barrier, destroy
#   fp16:    precision fp16 (GradScaler on CUDA), 50 steps
#   compile: train.compile true, 30 steps (TORCH_LOGS=recompiles,graph_breaks)
#   mb4:     book batch with micro_batches 4 (auto is 1 on CUDA);  fp32: book with precision fp32 (+ evaluate)
# GPU_AUDIT_DEVICE=cpu GPU_AUDIT_SMOKE=1 runs the same plumbing on a CPU machine, tiny (a dry run);
# GPU_AUDIT_PYTHON names the python to build on (default python3; on the project machines, whose python3
# has no torch: GPU_AUDIT_PYTHON=.venv/bin/python). With GPU_AUDIT_DEVICE=cpu the runs also set
# MINIBERT_PORTABLE=1 unless GPU_AUDIT_PORTABLE=0: the dry run then takes the code a GPU would.

set -x
set -o pipefail

ROOT=$(pwd)
OUT=${OUT:-$ROOT/gpu-audit-out}
W=$ROOT/.gpu-audit-work
DEV=${GPU_AUDIT_DEVICE:-cuda}
SMOKE=${GPU_AUDIT_SMOKE:-0}
BUDGET=${GPU_AUDIT_BUDGET_S:-450}
T0=$(date +%s)
mkdir -p "$OUT"
EXCLUDE=$(git rev-parse --git-path info/exclude 2>/dev/null || echo .git/info/exclude)   # a worktree's too
[ -d "$(dirname "$EXCLUDE")" ] && ! grep -qs '^/.gpu-audit-work/$' "$EXCLUDE" \
  && printf '/.gpu-audit-work/\n/gpu-audit-out/\n' >> "$EXCLUDE"   # scratch folders stay out of git status
rm -rf "$W"
mkdir -p "$W/runs"
STEPS=$W/steps.tsv
printf 'step\trc\tseconds\ttimeout_s\tstart_epoch\n' > "$STEPS"
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1
export MINIBERT_KERNEL_CACHE=$W/kernel-cache   # a CUDA run should never build the CPU kernels: checked at the end
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PIP_DISABLE_PIP_VERSION_CHECK=1
SMI_PID=
PY=$(command -v "${GPU_AUDIT_PYTHON:-python3}")   # replaced below by the venv's python
[ "$DEV" = cpu ] && [ "${GPU_AUDIT_PORTABLE:-1}" = 1 ] && export MINIBERT_PORTABLE=1  # the GPU's code on the CPU

left() { echo $(( BUDGET - ($(date +%s) - T0) )); }

# run_step NAME TIMEOUT_S MODE CMD...   MODE: must (runs with what is left) | opt (skipped unless TIMEOUT_S fits)
run_step() {
  local name=$1 tmo=$2 mode=$3; shift 3
  local l s rc
  [ "$SMOKE" = 1 ] && tmo=$(( tmo * ${GPU_AUDIT_SMOKE_SLOWDOWN:-4} ))  # a shared CPU is slow; the dry run checks plumbing
  l=$(left)
  if [ "$mode" = opt ] && [ "$l" -lt "$tmo" ]; then
    printf '%s\tskipped\t0\t%s\t%s\n' "$name" "$tmo" "$(date +%s)" >> "$STEPS"; echo "SKIP $name (${l}s left)"; return 99
  fi
  if [ "$l" -lt 10 ]; then
    printf '%s\tskipped\t0\t%s\t%s\n' "$name" "$tmo" "$(date +%s)" >> "$STEPS"; echo "SKIP $name (no time)"; return 99
  fi
  [ "$tmo" -gt "$l" ] && tmo=$l
  s=$(date +%s)
  timeout -k 10 "$tmo" "$@" > "$W/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - s ))" "$tmo" "$s" >> "$STEPS"
  tail -n 15 "$W/$name.log"
  echo "== $name: rc=$rc in $(( $(date +%s) - s ))s (left $(left)s)"
  return $rc
}

# mkparams NAME key=value...: params.yaml with those keys set, as $W/params-NAME.yaml
mkparams() {
  local name=$1; shift
  "$PY" - "$W/params-$name.yaml" "$@" <<'EOF'
import sys, yaml
out, sets = sys.argv[1], sys.argv[2:]
p = yaml.safe_load(open("params.yaml"))
for kv in sets:
    key, value = kv.split("=", 1)
    section, leaf = key.split(".", 1)
    p.setdefault(section, {})[leaf] = yaml.safe_load(value)
yaml.safe_dump(p, open(out, "w"), sort_keys=False)
EOF
}

# pretrain NAME TIMEOUT_S MODE key=value...: the pretrain stage, outputs under $W/runs/NAME
pretrain() {
  local name=$1 tmo=$2 mode=$3; shift 3
  local d=$W/runs/$name
  mkdir -p "$d"
  local extra=()
  [ "$SMOKE" = 1 ] && extra=(train.max_steps=2 train.batch_size=32 train.eval_every=1 eval.subset_pairs=64)
  mkparams "$name" "train.device=$DEV" "eval.device=$DEV" tracking.enabled=false "$@" "${extra[@]}" || return 98
  run_step "pretrain-$name" "$tmo" "$mode" "$PY" -m stages.pretrain --params "$W/params-$name.yaml" \
    --models "$d/models" --metrics "$d/metrics" --plots "$d/plots" --checkpoints "$d/checkpoints"
}

evaluate() {  # evaluate NAME TIMEOUT_S MODE
  local d=$W/runs/$1
  [ -f "$d/models/bert.safetensors" ] || return 97
  run_step "evaluate-$1" "$2" "$3" "$PY" -m stages.evaluate --params "$W/params-$1.yaml" --models "$d/models" \
    --train-metrics "$d/metrics/train.json" --out "$d/metrics/eval.json"
}

summarize() {
  "$PY" - "$W" "$OUT" "$DEV" <<'EOF' || echo "summary failed"
import csv, glob, json, os, statistics, sys
W, OUT, DEV = sys.argv[1:4]
def load(p):
    try:
        with open(p) as f:
            return json.load(f)
    except Exception:
        return None
def rows(p):
    try:
        with open(p) as f:
            return list(csv.DictReader(f))
    except Exception:
        return []
committed = {k: load(f"{W}/committed-metrics/{k}.json") for k in ("train", "eval", "corpus", "pairs")}
cpu_heldout = (committed["eval"] or {}).get("mlm_loss")
runs = {}
for d in sorted(glob.glob(f"{W}/runs/*")):
    name = os.path.basename(d)
    r = {"train": load(f"{d}/metrics/train.json"), "eval": load(f"{d}/metrics/eval.json"),
         "probe_shapes": {k: v.get("shape") for k, v in ((load(f"{d}/metrics/probe.json") or {}).get("probes") or {}).items()}}
    hist = rows(f"{d}/plots/train_loss.csv")
    rates = [float(x["pairs_per_sec"]) for x in hist if int(x["step"]) > 5]
    r["steady_pairs_per_sec_median"] = round(statistics.median(rates), 1) if rates else None
    r["first_step_pairs_per_sec"] = float(hist[0]["pairs_per_sec"]) if hist else None
    curve = rows(f"{d}/plots/valid_curve.csv")
    r["valid_curve_last"] = curve[-1] if curve else None
    if r["eval"] and cpu_heldout is not None:
        delta = r["eval"]["mlm_loss"] - cpu_heldout
        r["heldout_mlm_delta_vs_committed_cpu"] = round(delta, 6)
        # 50-step held-out MLM on CPU: 6.744 +- 0.004 over seeds and precisions (README, bench.quality)
        r["heldout_verdict"] = "ok" if abs(delta) <= 0.03 else "CHECK: |delta| > 0.03"
    runs[name] = r
steps = []
try:
    with open(f"{W}/steps.tsv") as f:
        steps = list(csv.DictReader(f, delimiter="\t"))
except Exception:
    pass
fresh = {k: load(f"metrics/{k}.json") for k in ("corpus", "pairs")}
data_same = {k: (fresh[k] == committed[k]) if fresh[k] is not None else None for k in fresh}
import re
notes = {}
for s in steps:
    try:
        lines = open(f"{W}/{s['step']}.log", errors="replace").read().splitlines()
    except Exception:
        continue
    n = {}
    if s["rc"] not in ("0", "skipped"):
        n["last_lines"] = lines[-3:]
    warn = [] if s["step"].startswith("install") else \
        list(dict.fromkeys(l.strip()[:200] for l in lines if re.search(r"warn", l, re.I)))
    if warn:
        n["warnings"] = warn[:6]
    for key, pat in (("recompiles", "Recompiling function"), ("graph_breaks", "Graph break")):
        c = sum(pat in l for l in lines)
        if c:
            n[key] = c
    if n:
        notes[s["step"]] = n
summary = {"device": DEV, "step_notes": notes, "env": load(f"{W}/env.json"), "steps": steps, "data_metrics_equal_committed": data_same,
           "committed_cpu": {"train": committed["train"], "eval": committed["eval"]}, "runs": runs,
           "diag": load(f"{W}/diag.json"), "weights": load(f"{W}/weights.json"),
           "cpu_kernels_built_during_gpu_runs": os.path.isdir(f"{W}/kernel-cache")}
with open(f"{OUT}/summary.json", "w") as f:
    json.dump(summary, f, indent=1, default=str)
L = ["# minibert GPU check", "", f"device {DEV}; env: {json.dumps(summary['env'])}", "",
     "| step | rc | s |", "|---|---|---|", *(f"| {s['step']} | {s['rc']} | {s['seconds']} |" for s in steps), "",
     f"data metrics equal to the committed ones: {data_same}", "",
     "| run | device | precision | batch/mb | steps | mlm_avg | nsp_avg | pairs/s (train.json) | steady median pairs/s | held-out MLM (eval) | delta vs CPU | verdict |",
     "|---|---|---|---|---|---|---|---|---|---|---|---|"]
ct, ce = committed["train"] or {}, committed["eval"] or {}
L.append(f"| committed CPU | {ct.get('device')} | {ct.get('precision')} | 512/4 | {ct.get('steps')} | {ct.get('mlm_loss_avg')} | "
         f"{ct.get('nsp_loss_avg')} | {ct.get('pairs_per_sec')} | | {ce.get('mlm_loss')} | | |")
for name, r in runs.items():
    t, e = r["train"] or {}, r["eval"] or {}
    try:
        import yaml
        p = yaml.safe_load(open(f"{W}/params-{name}.yaml"))["train"]
        bm = f"{p['batch_size']}/{p['micro_batches']}"
    except Exception:
        bm = "?"
    L.append(f"| {name} | {t.get('device')} | {t.get('precision')} | {bm} | {t.get('steps')} | {t.get('mlm_loss_avg')} | "
             f"{t.get('nsp_loss_avg')} | {t.get('pairs_per_sec')} | {r['steady_pairs_per_sec_median']} | {e.get('mlm_loss')} | "
             f"{r.get('heldout_mlm_delta_vs_committed_cpu', '')} | {r.get('heldout_verdict', '')} |")
L += ["", "step notes: " + json.dumps(notes, default=str)[:4000]]
L += ["", "diag: " + json.dumps(summary["diag"], default=str), "", "weights: " + json.dumps(summary["weights"], default=str),
      "", f"CPU kernel cache created during the run (should be False on CUDA): {summary['cpu_kernels_built_during_gpu_runs']}"]
with open(f"{OUT}/summary.md", "w") as f:
    f.write("\n".join(L) + "\n")
print("\n".join(L[:40]))
EOF
}

finish() {
  set +x
  [ -n "$SMI_PID" ] && kill "$SMI_PID" 2>/dev/null
  summarize
  cp "$STEPS" "$OUT/steps.tsv" 2>/dev/null
  tar -czf "$OUT/runs.tar.gz" -C "$W" --exclude='*.safetensors' --exclude=checkpoints --exclude=kernel-cache \
    --exclude=venv --exclude=ckpt . 2>/dev/null
  ls -la "$OUT"
  echo "elapsed $(( $(date +%s) - T0 ))s"
}

main() {
  trap finish EXIT
  cp -r metrics "$W/committed-metrics"   # the committed CPU run, before any stage overwrites metrics/

  # ---------------------------------------------------------------- environment and python
  { nvidia-smi; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; uname -a; nproc; free -g;
    command -v python3; python3 --version; } > "$OUT/env.txt" 2>&1
  SYS=$(command -v "${GPU_AUDIT_PYTHON:-python3}")
  if timeout 120 "$SYS" -c 'import sys, torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available());
sys.exit(0 if (torch.cuda.is_available() or sys.argv[1] == "cpu") else 1)' "$DEV" >> "$OUT/env.txt" 2>&1; then
    echo "python3 has a usable torch: venv on top of it"
    PY=$SYS
    if "$SYS" -m venv --system-site-packages "$W/venv" || "$SYS" -m venv --without-pip --system-site-packages "$W/venv"; then
      SP=$("$W/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
      "$SYS" -c 'import site; print("\n".join(site.getsitepackages()))' > "$SP/zz_gpu_audit_parent.pth"
      PY=$W/venv/bin/python
      if ! "$PY" -c 'import torch, sys; sys.exit(0 if (torch.cuda.is_available() or sys.argv[1] == "cpu") else 1)' "$DEV"; then
        echo "the venv does not see python3's torch: using python3 itself"; PY=$SYS
      fi
    fi
    run_step install-project 120 must "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . \
      || echo "editable install failed: the project is on PYTHONPATH anyway"
  else
    echo "python3 has no usable torch: plain venv + pip install torch==2.13.0 (see the header for the risk)"
    "$SYS" -m venv "$W/venv"; PY=$W/venv/bin/python
    run_step install-torch 300 must "$PY" -m pip install -q --timeout 20 torch==2.13.0
    # the stages need neither dvc nor mlflow: the project without its dependencies, the missing ones below
    run_step install-project 120 must "$PY" -m pip install -q --no-deps -e . \
      || echo "editable install failed: the project is on PYTHONPATH anyway"
  fi
  "$PY" - "$DEV" > "$W/env.json" <<'EOF'
import json, platform, sys
import torch
d = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
     "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
for mod in ("numpy", "pandas", "safetensors", "typer", "pyarrow", "triton", "mlflow", "dvc"):
    try:
        d[mod] = __import__(mod).__version__
    except Exception as e:
        d[mod] = f"absent ({type(e).__name__})"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    d.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_mem_gib=round(p.total_memory / 2**30, 1),
             devices=torch.cuda.device_count(), bf16_supported=torch.cuda.is_bf16_supported(),
             nccl=torch.cuda.nccl.version() if hasattr(torch.cuda, "nccl") else None,
             matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
print(json.dumps(d))
EOF
  cat "$W/env.json"
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if (torch.cuda.is_available() or sys.argv[1] == "cpu") else 1)' "$DEV"; then
    echo "STOP: the torch in use sees no CUDA device"; return 3
  fi
  MISSING=$("$PY" - <<'EOF'
import importlib.util
need = {"numpy": "numpy", "pandas": "pandas", "pyarrow": "pyarrow", "safetensors": "safetensors", "typer": "typer",
        "rich": "rich", "yaml": "pyyaml", "matplotlib": "matplotlib"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
  if [ -n "$MISSING" ]; then
    run_step install-deps 150 must "$PY" -m pip install -q --timeout 15 --retries 1 $MISSING
  fi
  if [ "$DEV" = cuda ]; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,utilization.memory,memory.used,power.draw --format=csv -lms 500 \
      > "$OUT/nvsmi.csv" 2>&1 &
    SMI_PID=$!
  fi

  # ---------------------------------------------------------------- data stages
  local data=""
  for c in "${MINIBERT_DATA:-}" .gpu-audit-data/wikitext-2-v1.zip shared/data/wikitext-2-v1.zip \
           ../shared/data/wikitext-2-v1.zip /work/shared/data/wikitext-2-v1.zip; do
    if [ -n "$c" ] && [ -e "$c" ]; then data=$(readlink -f "$c"); break; fi
  done
  if [ -z "$data" ]; then echo "STOP: no wikitext-2-v1.zip found (see the header: carry .gpu-audit-data)"; return 4; fi
  export MINIBERT_DATA=$data
  run_step download 90 must "$PY" -m stages.download --params params.yaml || return 5
  run_step tokenize 150 must "$PY" -m stages.tokenize --params params.yaml || return 5
  run_step pairs 150 must "$PY" -m stages.pairs --params params.yaml || return 5

  # ---------------------------------------------------------------- the book's run on the GPU
  pretrain book 180 must
  evaluate book 90 must
  if [ -f "$W/runs/book/models/bert.safetensors" ]; then
    run_step probe-book 60 opt "$PY" -m stages.probe --params "$W/params-book.yaml" --models "$W/runs/book/models" \
      --train-metrics "$W/runs/book/metrics/train.json" --table "$W/runs/book/probes/probe_table.parquet" \
      --heatmap "$W/runs/book/plots/probe_similarity.png" --out "$W/runs/book/metrics/probe.json"
  fi
  summarize

  # ---------------------------------------------------------------- diagnostics in-process
  run_step diag 120 opt "$PY" - "$W" "$DEV" "$SMOKE" <<'EOF'
import collections, json, os, sys, tempfile, time, warnings
from pathlib import Path
import numpy as np
import torch
W, DEV = sys.argv[1], sys.argv[2]
BATCH = 32 if sys.argv[3] == "1" else 512  # the dry run: tiny batches
res = {}
def guard(name, f):
    try:
        res[name] = f()
    except Exception as e:
        res[name] = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    print(name, "->", res[name], flush=True)
    json.dump(res, open(f"{W}/diag.json", "w"), indent=1, default=str)

from minibert.training import checkpoint, distributed
from minibert.model import ops
from minibert.data.batches import gather_batch, to_tensors
from minibert.device import resolve_device
from minibert.config import ModelConfig, TrainConfig
from minibert.model.bert import build_model, token_layout
from minibert.data.pairs import load_pairs
from minibert.training.loop import batch_indices, fit, make_optimizer, micro_batch_rows, resolve_precision, train_step
from minibert.model.kernels import addnorm, attention, build, softmax_xent
from minibert.model.kernels import dropout as kdrop

dev = resolve_device(DEV)
pairs, _ = load_pairs("data/pairs/train.safetensors")
data = to_tensors(pairs, dev)
n = len(pairs["nsp_labels"])
res["data_devices"] = sorted({str(v.device) for v in data.values()})
amp = resolve_precision("auto", dev)
res["precision_auto"] = str(amp)

lens_all = pairs["valid_lens"]
def cut(s, micro_batches):
    """fit's batch: rows and widths from the host's lengths (no device read)."""
    return [gather_batch(data, r, width=int(lens_all[r].max())) for r in micro_batch_rows(batch_indices(s, n, BATCH, 0), lens_all, micro_batches)]
def syncs(micro_batches):
    """Synchronising CUDA calls per training step (cut + train_step, no loss read-back), by source line
    (torch.cuda.set_sync_debug_mode)."""
    model = build_model(ModelConfig(), 20256, seed=0).to(dev)
    opt = make_optimizer(model.parameters(), TrainConfig(device=DEV))
    step = lambda s: train_step(model, opt, None, cut(s, micro_batches), 1.0, 1.0, amp, dev)
    for s in range(3):
        step(s)
    if dev.type != "cuda":
        return "cuda only"
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for s in range(3, 8):
                step(s)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    where = collections.Counter(f"{os.path.relpath(w.filename)}:{w.lineno}" for w in caught
                                if "synchroniz" in str(w.message))
    return {"per_step": round(sum(where.values()) / 5, 1), "by_line_per_step": {k: v / 5 for k, v in where.most_common(20)}}
guard("host_syncs_mb4", lambda: syncs(4))
guard("host_syncs_mb1", lambda: syncs(1))

def fit_syncs(steps=6):
    """Syncs per step of fit itself (log_every 1: the loss read back every step): issue 29 wants <= 2."""
    if dev.type != "cuda":
        return "cuda only"
    cfg = TrainConfig(device=DEV, max_steps=steps, checkpoint_every=0, eval_every=0, log_every=1, batch_size=BATCH)
    model = build_model(ModelConfig(), 20256, seed=0).to(dev)
    opt = make_optimizer(model.parameters(), cfg)
    fit(model, opt, TrainConfig(device=DEV, max_steps=2, checkpoint_every=0, eval_every=0, batch_size=BATCH), data, dev,
        distributed.Dist())
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fit(model, opt, cfg, data, dev, distributed.Dist(), start_step=2)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = collections.Counter(f"{os.path.relpath(w.filename)}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    return {"per_step": round(sum(where.values()) / (steps - 2), 2), "by_line": dict(where.most_common(10))}
guard("host_syncs_fit_log_every_1", fit_syncs)

# each kernel entry point called directly with device tensors (the C++ build switched off: its
# references are what a non-CPU tensor reaches; they build their masks on the input's device)
build._state.update(ok=False, why="switched off by the GPU check", warned=True)
x = torch.randn(64, 128, device=dev)
valid = torch.tensor([13, 4, 9], device=dev)
idx = token_layout(valid, 13)
guard("dispatch ops.dropout (expect: the device; F.dropout)", lambda: str(ops.dropout(x, 0.2, True).device))
guard("dispatch softmax_xent_ (expect: the device; torch reference)", lambda: str(softmax_xent.softmax_xent_(torch.randn(8, 99, device=dev), torch.zeros(
    8, dtype=torch.long, device=dev), 5, torch.zeros(99, device=dev), torch.zeros(99, device=dev)).device))
guard("dispatch addnorm.add_norm (expect: the device; torch reference)", lambda: str(addnorm.add_norm(x, x, torch.ones(128, device=dev), torch.zeros(128, device=dev), 0.2).device))
guard("dispatch attention.attention_rows (expect: the device; torch reference)", lambda: str(attention.attention_rows(torch.randn(len(idx), 48, device=dev), idx, valid, 13, 2, 0.2).device))
guard("dispatch kernels.dropout.dropout (expect: the device; torch reference)", lambda: str(kdrop.dropout(x, 0.2).device))
build._state.clear()

def resume():
    """fit 6 steps straight vs 3 + checkpoint + load into a fresh model + 3: same weights?"""
    cfg = TrainConfig(device=DEV, max_steps=6, checkpoint_every=3, eval_every=0, batch_size=BATCH)
    root = Path(tempfile.mkdtemp(dir=W))
    def run(start_from=None):
        model = build_model(ModelConfig(), 20256, seed=0).to(dev)
        opt = make_optimizer(model.parameters(), cfg)
        kw = {}
        if start_from:
            meta = checkpoint.load(start_from, model, opt)
            kw = dict(start_step=meta["step"], history=meta["history"], scaler_state=meta["scaler"])
        saved = []
        hook = lambda step, hist, sc: saved.append(checkpoint.save(root, step, model, opt, {"history": hist}, sc)) or saved[-1]
        fit(model, opt, cfg, data, dev, distributed.Dist(), on_checkpoint=hook, **kw)
        return model, opt, saved
    a, _, saved = run()
    b, opt_b, _ = run(saved[0])
    diffs = [float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters())]
    opt_devices = {f"{k}:{t.device}" for st in opt_b.state.values() for k, t in st.items() if torch.is_tensor(t)}
    return {"bit_exact": max(diffs) == 0.0, "max_abs_diff": max(diffs), "resumed_optimizer_state": sorted(opt_devices)}
guard("checkpoint_resume", resume)
guard("peak_gpu_mem_gib", lambda: round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None)
EOF

  # ---------------------------------------------------------------- CUDA-trained weights elsewhere
  if [ -f "$W/runs/book/models/bert.safetensors" ]; then
    run_step weights 90 opt "$PY" - "$W" "$W/runs/book/models" "$DEV" <<'EOF'
import json, sys
import torch
W, models, DEV = sys.argv[1:4]
res = {}
def guard(name, f):
    try:
        res[name] = f()
    except Exception as e:
        res[name] = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    print(name, "->", res[name], flush=True)
    json.dump(res, open(f"{W}/weights.json", "w"), indent=1, default=str)
from minibert.config import ProbeSpec
from minibert.model.bert import load_pretrained
from minibert.evaluation.probes import encode_probe
from minibert.tracking.serving import encode_rows
from minibert.data.vocab import Vocab
vocab = Vocab.load("data/tokens/vocab.txt")
cpu, meta = load_pretrained(models, "cpu")
gpu, _ = load_pretrained(models, DEV)
spec = ProbeSpec("p", "a crane is flying", "he just left")
guard("encode_cpu_vs_device_max_abs", lambda: float((encode_probe(cpu, vocab, spec, "cpu")[2]
                                                     - encode_probe(gpu, vocab, spec, DEV)[2]).abs().max()))
guard("pyfunc_fill_mask_on_cpu_model", lambda: encode_rows(cpu, vocab, [("the <mask> is flying", None)], "fill-mask", 3)[0]["masks"][0]["words"])
guard("pyfunc_encode_on_device_model (expect: 4 tokens; inputs built on the model's device)", lambda: len(encode_rows(gpu, vocab, [("a crane is flying", None)], "encode", 1)[0]["encoding"]))
EOF
    run_step cli-encode 60 opt "$PY" -m minibert.cli encode "a crane is flying" --checkpoint "$W/runs/book/models" \
      --device "$DEV"
  fi
  summarize

  # ---------------------------------------------------------------- more runs, as the budget allows
  pretrain big 150 opt train.batch_size=4096 train.micro_batches=1
  mkparams nccl1 "train.device=$DEV" tracking.enabled=false train.max_steps=10 train.eval_every=5 train.checkpoint_every=5
  [ "$SMOKE" = 1 ] && mkparams nccl1 "train.device=$DEV" tracking.enabled=false train.max_steps=2 train.batch_size=32 \
    train.eval_every=1 train.checkpoint_every=1
  mkdir -p "$W/runs/nccl1"
  NCCL_DEBUG=WARN run_step pretrain-nccl1 120 opt "$PY" -m torch.distributed.run --nnodes=1 --nproc-per-node=1 \
    --rdzv-backend=c10d --rdzv-endpoint=localhost:29517 --rdzv-id=gpuaudit -m stages.pretrain \
    --params "$W/params-nccl1.yaml" --models "$W/runs/nccl1/models" --metrics "$W/runs/nccl1/metrics" \
    --plots "$W/runs/nccl1/plots" --checkpoints "$W/runs/nccl1/checkpoints"
  pretrain fp16 120 opt train.precision=fp16 train.eval_every=50
  summarize
  TORCH_LOGS=recompiles,graph_breaks pretrain compile 240 opt train.compile=true train.max_steps=30 train.eval_every=30
  pretrain mb4 100 opt train.micro_batches=4   # auto is 1 on CUDA: the book's 4 passes, for comparison
  pretrain fp32 100 opt train.precision=fp32 && evaluate fp32 60 opt
  return 0
}

main 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
