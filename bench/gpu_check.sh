#!/usr/bin/env bash
# minibert GPU readiness check, for a lent NVIDIA H200 (16 cores, ~8 min wall). Run it from the
# repository root: `bash bench/gpu_check.sh` (copied from ../shared/device/gpu-check.sh and adapted to
# issue 29: the portable path, micro_batches auto, eval.device, the host-side batch cut). The shell runs the
# steps with their timeouts; what runs in-process is Python that ruff and the tests see: bench/gpu_check.py
# (params, env, diag, weights) and bench/gpu_summary.py (the report). Results go under $OUT, else ./gpu-audit-out:
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
  "$PY" -m bench.gpu_check params "$W/params-$name.yaml" "$@"
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
  "$PY" -m bench.gpu_summary "$W" "$OUT" "$DEV" || echo "summary failed"
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
  "$PY" -m bench.gpu_check env "$DEV" > "$W/env.json"
  cat "$W/env.json"
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if (torch.cuda.is_available() or sys.argv[1] == "cpu") else 1)' "$DEV"; then
    echo "STOP: the torch in use sees no CUDA device"; return 3
  fi
  MISSING=$("$PY" -m bench.gpu_check missing)
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
  run_step diag 120 opt "$PY" -m bench.gpu_check diag "$W" "$DEV" "$SMOKE"

  # ---------------------------------------------------------------- CUDA-trained weights elsewhere
  if [ -f "$W/runs/book/models/bert.safetensors" ]; then
    run_step weights 90 opt "$PY" -m bench.gpu_check weights "$W" "$W/runs/book/models" "$DEV"
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
