"""Training throughput on the real WikiText-2 train pairs at the book's config, per precision.

    python -m bench.train [--steps 20] [--precision fp32,bf16] [--micro-batches auto,4,1] [--reference] [--data PATH] [--pairs DIR]

The book's config: ModelConfig() defaults, batch 512, Adam 1e-3. Each precision runs in its own
subprocess (so `ru_maxrss`, which is process-wide, is that precision's peak): tune_cpu_malloc(), a
fresh model, 2 warm-up steps, then N timed steps of the real `minibert.training.loop.train_step` on the
batches `fit` would draw (seed 0). Per step we time data (index + `take`), forward (+ loss),
backward and optimizer; the split comes from hooks on the real step (the Tensor.backward calls, one
per micro-batch, and the optimizer's step pre-hook), so no copy of train_step can drift from it.

Model FLOPs are counted analytically (what the book's model must compute, not what a padded
implementation spends): encoder matmuls on the real tokens, attention on the padded (B, T, T),
MLM head on the real slots only, NSP head; forward x 3 for a training step. MFU divides the achieved
rate by a torch.matmul peak measured once per precision by the parent (best of 3 rounds x 3 repeats
over 1024^3, 2048^3 and 3072^3 in the precision's dtype, printed with its spread), so every row of one
run divides by the same figure. The CPU's ISA flags (avx512_bf16, amx_bf16, ...) are printed too.
`ceiling` is pairs/s / MFU: the rate if all of the step's FLOPs ran at that peak and nothing else
took time, so `ceil x d2l` bounds what any implementation of the book's FLOPs can reach on this CPU.
`RSS +MB` is resident memory after the last timed step minus at the end of warm-up: a run whose memory
keeps growing (oneDNN's per-shape primitives on the bf16 kinds, heap fragmentation) shows it there;
`distinct_widths` (JSON) counts the micro-batch widths T the timed steps used.

Data: `--pairs DIR` (default data/pairs, the pipeline's output, with data/tokens/vocab.txt) when it
holds train.safetensors; otherwise the pairs are built in-process from `--data` (MINIBERT_DATA or
../shared/data/wikitext-2) with the pipeline's functions and default params.
`--reference` also runs d2l 1.0.3's own code (../shared/bench/d2l_reference.py, in the venv
$D2L_VENV or /tmp/d2l-venv) on the same raw data for the same number of steps.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from bench import gemms
from bench.common import DEFAULT_DATA, DEVICE, load_splits, micro_batch_settings
from bench.data import SHARED, data_dir
from minibert import layout
from minibert.artifacts import load_arrays, save_arrays
from minibert.config import ModelConfig, TrainConfig
from minibert.data.batches import batch_indices, gather_batch, split_batch, to_tensors
from minibert.model.bert import build_model
from minibert.training.heap import tune_cpu_malloc
from minibert.training.loop import (
    cpu_has_fast_bf16,
    make_optimizer,
    resolve_micro_batches,
    resolve_precision,
    step_seed,
    train_step,
)

# ---------------------------------------------------------------------------- FLOPs and peak


def forward_flops(batch: dict[str, torch.Tensor], cfg: ModelConfig, vocab_size: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of the book's model's forward on one (trimmed) batch."""
    B, T = batch["token_ids"].shape
    N = float(batch["valid_lens"].sum())  # real tokens
    M = float((batch["mlm_weights"] > 0).sum())  # real MLM slots
    H, F = cfg.hidden, cfg.ffn_hidden
    per_token = 2 * H * (3 * H + H + 2 * F)  # W_q/W_k/W_v, W_o, FFN in and out
    attention = 2 * (2 * B * T * T * H)  # QK^T and weights @ V over padded (B, h, T, T), all heads
    mlm = M * 2 * H * (H + vocab_size)  # MLP hidden layer + decoder, real slots only
    nsp = B * 2 * H * (H + 2)
    return cfg.num_layers * (N * per_token + attention) + mlm + nsp


PEAK_SIZES = (1024, 2048, 3072)  # square GEMMs: large enough to reach the units' rate, small enough to be quick


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...] = PEAK_SIZES, rounds: int = 3, repeats: int = 3) -> dict:
    """The torch.matmul peak of `dtype` with this process's threads, and its spread.

    Each round times every size `repeats` times (interleaved, so a burst of load elsewhere hits one
    round, not one size); a size's figure in a round is its best repeat. The peak is the best figure
    of any size and round; the spread is that size's per-round figures (min and median), which say
    how far one measurement could have been off on this machine at this moment."""
    g = torch.Generator().manual_seed(0)
    mats = {n: tuple(torch.randn(n, n, generator=g).to(dtype) for _ in range(2)) for n in sizes}
    for a, b in mats.values():
        torch.matmul(a, b)  # warm-up: thread pool, packing buffers
    per_round: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(rounds):
        for n, (a, b) in mats.items():
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                torch.matmul(a, b)
                best = min(best, time.perf_counter() - t0)
            per_round[n].append(2 * n**3 / best / 1e9)
    n_best = max(sizes, key=lambda n: max(per_round[n]))
    figures = sorted(per_round[n_best])
    return {"dtype": str(dtype).replace("torch.", ""), "gflops": gflops_figure(figures[-1]), "size": n_best,
            "median_gflops": gflops_figure(figures[len(figures) // 2]), "min_gflops": gflops_figure(figures[0]),
            "rounds": rounds, "repeats": repeats, "sizes": list(sizes), "threads": torch.get_num_threads(),
            "by_size": {n: gflops_figure(max(v)) for n, v in per_round.items()}}


def gflops_figure(x: float) -> float:
    """One decimal from 10 GFLOP/s up, three significant digits below: a small GEMM on a loaded machine
    (0.04 GFLOP/s) stays positive instead of rounding to 0.0. Monotonic, so min <= median <= peak holds."""
    return round(x, 1) if x >= 10 else float(f"{x:.3g}")


# ---------------------------------------------------------------------------- one precision


@contextmanager
def phase_marks(opt: torch.optim.Optimizer):
    """Inside the real train_step: summed Tensor.backward time ('bwd', one call per micro-batch) and the
    optimizer's start ('opt'); forward (+ loss) is the rest of the time before the optimizer."""
    marks: dict[str, float] = {}
    original = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            marks["bwd"] = marks.get("bwd", 0.0) + time.perf_counter() - t0

    handle = opt.register_step_pre_hook(lambda *_: marks.__setitem__("opt", time.perf_counter()))
    torch.Tensor.backward = backward
    try:
        yield marks
    finally:
        torch.Tensor.backward = original
        handle.remove()


def resident_mb() -> float:
    """This process's resident memory now (not the peak): /proc/self/statm's second field, in pages."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


RSS_FROM = 20  # resident memory is compared from this step (warm-up included) to the last


def run_precision(precision: str, pairs_file: Path, vocab_size: int, steps: int, warmup: int,
                  micro_batches: int | str, peak_gflops: float | None = None) -> dict:
    tuned = tune_cpu_malloc()  # first, before any big allocation (as the pretrain stage does)
    amp_dtype = resolve_precision(precision, DEVICE)
    micro_batches = resolve_micro_batches(micro_batches, DEVICE, amp_dtype)  # "auto": what fit would use
    model_cfg, cfg = ModelConfig(), TrainConfig(precision=precision, micro_batches=micro_batches)
    # One peak per precision for the whole bench run (measured by the parent): every row's MFU divides
    # by the same figure. A child run on its own measures it here.
    peak = 1e9 * (peak_gflops or matmul_peak(amp_dtype or torch.float32)["gflops"])
    data = to_tensors(load_arrays(pairs_file), DEVICE)
    n = len(data["nsp_labels"])
    model = build_model(model_cfg, vocab_size, seed=cfg.seed).to(DEVICE).train()
    opt = make_optimizer(model.parameters(), cfg)
    rows, widths, rss = [], set(), {}

    def one_step(step: int, batch: dict):
        torch.manual_seed(step_seed(cfg.seed, 0, step))
        return train_step(model, opt, None, batch, 1.0, 1.0, amp_dtype, DEVICE, cfg.micro_batches)

    with phase_marks(opt) as marks:
        for step in range(warmup + steps):
            if step == warmup:
                rss_warm = resident_mb()
            t0 = time.perf_counter()
            batch = gather_batch(data, batch_indices(step, n, cfg.batch_size, cfg.seed))
            marks.clear()
            t1 = time.perf_counter()
            mlm, nsp = one_step(step, batch)
            t2 = time.perf_counter()
            if step + 1 in (RSS_FROM, warmup + steps):
                rss[step + 1] = resident_mb()
            if step >= warmup:
                widths.update(p["token_ids"].shape[1] for p in split_batch(batch, cfg.micro_batches))
            if set(marks) != {"bwd", "opt"}:
                raise RuntimeError("train_step no longer calls Tensor.backward and optimizer.step; update phase_marks")
            rows.append({"data": t1 - t0, "forward": marks["opt"] - t1 - marks["bwd"], "backward": marks["bwd"],
                         "optimizer": t2 - marks["opt"], "pairs": len(batch["nsp_labels"]),
                         "tokens": int(batch["valid_lens"].sum()),
                         "flops": 3 * forward_flops(batch, model_cfg, vocab_size),  # fwd + bwd (2x fwd)
                         "mlm": float(mlm.detach()), "nsp": float(nsp.detach())})
    timed = rows[warmup:]
    # one more step, not timed: its GEMMs captured and replayed alone (bench/gemms.py)
    step = warmup + steps
    extra = gather_batch(data, batch_indices(step, n, cfg.batch_size, cfg.seed))
    floor = gemms.replay(gemms.capture(lambda: one_step(step, extra)))
    extra_flops = 3 * forward_flops(extra, model_cfg, vocab_size)  # that step's analytic count
    total_s = sum(r["data"] + r["forward"] + r["backward"] + r["optimizer"] for r in timed)
    phases = ("data", "forward", "backward", "optimizer")
    ms = {f"ms_{k}": round(1e3 * sum(r[k] for r in timed) / steps, 1) for k in phases}  # mean per step
    achieved = sum(r["flops"] for r in timed) / total_s
    return {"impl": "minibert", "precision": precision, "micro_batches": micro_batches, "steps": steps,
            "batch_size": cfg.batch_size,
            "pairs_per_s": round(sum(r["pairs"] for r in timed) / total_s, 1),
            "tokens_per_s": round(sum(r["tokens"] for r in timed) / total_s, 1),
            **ms, "ms_step": round(1e3 * total_s / steps, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            # Memory still growing over the timed steps: oneDNN (the bf16 GEMMs) caches a primitive per
            # matmul shape, and the micro-batches' widths (the attention's T) vary from step to step.
            "rss_growth_mb": round(rss[warmup + steps] - rss_warm, 1), "distinct_widths": len(widths),
            # the flatness figure: resident memory from step RSS_FROM to the last (None: too few steps)
            "rss_drift_mb": round(rss[warmup + steps] - rss[RSS_FROM], 1) if warmup + steps > RSS_FROM else None,
            "gflop_per_step": round(sum(r["flops"] for r in timed) / steps / 1e9, 2),
            "achieved_gflops": round(achieved / 1e9, 2), "matmul_peak_gflops": round(peak / 1e9, 1),
            "mfu": round(achieved / peak, 4),
            # the step's GEMMs alone, each at its own shape: the MFU if nothing but them took time
            "gemm_ms": floor["gemm_ms"], "gemm_gflop": floor["gemm_gflop"], "gemm_step_gflop": round(extra_flops / 1e9, 2),
            "gemm_bound_mfu": round(extra_flops / (floor["gemm_ms"] / 1e3) / peak, 4),
            "gemm_shapes": floor["by_shape"],
            # the most this row could reach: every FLOP at the measured matmul peak, nothing else
            "ceiling_pairs_per_s": round(sum(r["pairs"] for r in timed) / (sum(r["flops"] for r in timed) / peak), 1),
            "mlm_loss_last": round(timed[-1]["mlm"], 4),
            "nsp_loss_last": round(timed[-1]["nsp"], 4), "malloc_tuned": tuned, "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------- orchestration


ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
             "amx_bf16", "amx_int8", "amx_fp16")


def cpu_kind(cpuinfo: str) -> str:
    """The microarchitecture from /proc/cpuinfo's vendor, family and model, e.g. "AMD Zen 4 (family 25
    model 17)": the model name of a cloud VM is often just "AMD EPYC", and Zen 4 and Zen 5 both have
    AVX512-BF16 but differ 2x in bf16 matmul rate (Zen 5 has full-width 512-bit units). A chip whose silicon
    has AVX-512 but whose flags lack avx512f gets ", AVX-512 hidden": a hypervisor masked it, so torch (and
    `precision: auto`) sees an AVX2 CPU, and its figures belong to that kind, not to the chip's name."""
    first = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        first.setdefault(key.strip(), value.strip())
    vendor, family, model = first.get("vendor_id", ""), first.get("cpu family", ""), first.get("model", "")
    if not (family.isdigit() and model.isdigit()):
        return platform.processor() or "unknown"
    f, m = int(family), int(model)
    if vendor == "AuthenticAMD":
        name = {23: "Zen 2" if m >= 0x30 else "Zen/Zen+", 26: "Zen 5"}.get(f)
        if f == 25:
            name = "Zen 4" if 0x10 <= m <= 0x1F or 0x60 <= m <= 0xAF else "Zen 3"
        label = f"AMD {name}" if name else "AMD"
    elif vendor == "GenuineIntel":
        name = {0x8F: "Sapphire Rapids", 0xCF: "Emerald Rapids", 0xAD: "Granite Rapids", 0xAE: "Granite Rapids",
                0x6A: "Ice Lake", 0x55: "Skylake/Cascade Lake"}.get(m) if f == 6 else None
        label = f"Intel {name}" if name else "Intel"
    else:
        name, label = None, vendor or "unknown"
    masked = "flags" in first and "avx512f" not in first["flags"].split()
    hidden = ", AVX-512 hidden" if masked and name in AVX512_SILICON else ""
    return f"{label} (family {f} model {m}{hidden})"


# microarchitectures whose every part executes AVX-512 (Zen 4 double-pumps it, Zen 5 runs it full width)
AVX512_SILICON = {"Zen 4", "Zen 5", "Sapphire Rapids", "Emerald Rapids", "Granite Rapids", "Ice Lake",
                  "Skylake/Cascade Lake"}


def runnable_precisions(precisions: list[str], fast_bf16: bool) -> tuple[list[str], list[str]]:
    """(run, skip): bf16 only where the CPU multiplies bf16 natively (`fast_bf16`: the same probe as
    `train.precision: auto`), since its emulation on an AVX2 CPU (Zen 3) takes minutes for the matmul
    peak alone and measures nothing a user would run."""
    skip = [p for p in precisions if p == "bf16" and not fast_bf16]
    return [p for p in precisions if p not in skip], skip


def machine_info() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor() or "unknown")
    flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "").split()
    return {"cpu": model, "cpu_kind": cpu_kind(cpuinfo), "cores": len(os.sched_getaffinity(0)),
            "threads": torch.get_num_threads(),
            "bf16_isa": [f for f in ("avx512_bf16", "amx_bf16") if f in flags],
            "flags": [f for f in ISA_FLAGS if f in flags], "torch": torch.__version__,
            "python": platform.python_version(), "loadavg_1m": round(os.getloadavg()[0], 2),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def run_child(args: list[str]) -> tuple[str, float]:
    """(stdout, peak RSS MB) of a subprocess; stderr passes through. wait4 gives this child's own peak."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"bench.train: {' '.join(args[:3])}… exited with {proc.returncode}")
    return out, usage.ru_maxrss / 1024


def reference(raw: Path, steps: int) -> dict:
    venv = Path(os.environ.get("D2L_VENV", "/tmp/d2l-venv"))
    if not (venv / "bin/python").is_file():
        subprocess.run(["bash", str(SHARED / "bench/d2l-venv.sh"), str(venv)], check=True)
    out, rss = run_child([str(venv / "bin/python"), str(SHARED / "bench/d2l_reference.py"), str(raw),
                          "--steps", str(steps)])
    ref = json.loads(out.strip().splitlines()[-1])
    return {"impl": ref["impl"], "precision": "fp32", "steps": ref["steps"], "batch_size": 512,
            "pairs_per_s": ref["pairs_per_s"], "peak_rss_mb": round(rss, 1), "prep_s": ref["prep_s"],
            "mlm_loss_avg": ref["mlm_loss_avg"], "nsp_loss_avg": ref["nsp_loss_avg"], "threads": ref["threads"]}


def table(rows: list[dict]) -> str:
    cols = [("impl", "impl", "{}"), ("precision", "prec", "{}"), ("micro_batches", "micro", "{}"),
            ("pairs_per_s", "pairs/s", "{:.0f}"),
            ("tokens_per_s", "tokens/s", "{:.0f}"), ("ms_data", "data ms", "{:.1f}"),
            ("ms_forward", "fwd ms", "{:.1f}"),
            ("ms_backward", "bwd ms", "{:.1f}"), ("ms_optimizer", "opt ms", "{:.1f}"), ("ms_step", "step ms", "{:.1f}"),
            ("peak_rss_mb", "RSS MB", "{:.0f}"), ("rss_growth_mb", "RSS +MB", "{:.0f}"),
            ("rss_drift_mb", f"RSS {RSS_FROM}→end", "{:+.0f}"),
            ("achieved_gflops", "GFLOP/s", "{:.1f}"), ("mfu", "MFU", "{:.1%}"), ("gemm_ms", "GEMM ms", "{:.1f}"),
            ("gemm_bound_mfu", "GEMM-bound MFU", "{:.1%}"),
            ("vs_d2l", "x d2l", "{:.2f}"), ("ceiling_pairs_per_s", "ceiling", "{:.0f}"),
            ("ceiling_vs_d2l", "ceil x d2l", "{:.2f}")]
    cells = [[h for _, h, _ in cols]] + [[f.format(r[k]) if r.get(k) is not None else "-" for k, _, f in cols]
                                         for r in rows]
    for r, row in zip(rows, cells[1:]):
        row[2] += "*" if r.get("default") else ""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.rjust(w) if i > 2 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in cells)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per precision (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--micro-batches", default="auto",
                    help="comma-separated train.micro_batches values to run: integers or auto (the default: "
                         "what train.micro_batches: auto picks for each precision, the default row)")
    ap.add_argument("--reference", action="store_true", help="also run d2l 1.0.3's code for --steps steps")
    ap.add_argument("--data", default=DEFAULT_DATA, help="WikiText-2 folder or zip (pairs built in-process)")
    ap.add_argument("--pairs", type=Path, default=layout.PAIRS, help="pipeline pairs folder, used if present")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: one precision, JSON on stdout
    ap.add_argument("--pairs-file", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--vocab-size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--peak-gflops", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.steps < 1 or a.warmup < 0:
        raise SystemExit("bench.train: --steps must be >= 1 and --warmup >= 0")
    micro = micro_batch_settings(a.micro_batches, "bench.train")
    if a.child:
        print(json.dumps(run_precision(a.child, a.pairs_file, a.vocab_size, a.steps, a.warmup, micro[0],
                                       a.peak_gflops)))
        return
    precisions = a.precision.split(",")
    if bad := [p for p in precisions if p not in ("fp32", "bf16")]:
        raise SystemExit(f"bench.train: --precision {','.join(bad)} unknown; use fp32, bf16 or fp32,bf16")
    machine = machine_info()
    print(json.dumps({"bench": "train", "machine": machine}))
    print(f"CPU flags: {' '.join(machine['flags']) or 'none of ' + ' '.join(ISA_FLAGS)}", file=sys.stderr)
    precisions, skipped = runnable_precisions(precisions, cpu_has_fast_bf16())
    for p in skipped:
        print(json.dumps({"bench": "skipped", "precision": p, "why": "no bf16 instructions"}))
        print(f"{p} skipped: this CPU has no bf16 instructions (avx512_bf16, amx_bf16); torch emulates bf16 matmuls"
              " far slower than fp32 (Zen 3: 1.3 vs 101 GFLOP/s), and train.precision auto picks fp32", file=sys.stderr)
    if not precisions:
        raise SystemExit("bench.train: nothing to run on this CPU; use --precision fp32")
    peaks = {p: matmul_peak(resolve_precision(p, DEVICE) or torch.float32) for p in precisions}
    for p, pk in peaks.items():
        print(json.dumps({"bench": "matmul_peak", "precision": p, **pk}))
        print(f"matmul peak {pk['dtype']}: {pk['gflops']:.0f} GFLOP/s ({pk['size']}^3, best of {pk['rounds']} rounds"
              f" x {pk['repeats']} repeats over sizes {pk['sizes']}; that size's rounds: median "
              f"{pk['median_gflops']:.0f}, min {pk['min_gflops']:.0f})", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="minibert-bench-") as tmp:
        splits, vocab_size, source = load_splits(("train",), a.data, a.pairs)
        pairs_file = Path(tmp) / "train.safetensors"  # children load only the arrays: their RSS is training's
        save_arrays(pairs_file, splits["train"])
        n_pairs = len(splits["train"]["nsp_labels"])
        del splits
        print(f"train pairs: {n_pairs} ({source}); vocab {vocab_size}; batch 512; {a.warmup} warm-up + {a.steps} timed "
              f"steps; {machine['cpu']}, {machine['cpu_kind']}, {machine['cores']} cores, torch {machine['torch']}", file=sys.stderr)
        rows = []
        for p in precisions:
            # "auto" and the number it resolves to are one setting: run it once, marked as the default row
            auto = resolve_micro_batches("auto", DEVICE, resolve_precision(p, DEVICE))
            runs = list(dict.fromkeys(auto if k == "auto" else k for k in micro))
            for k in runs:
                out, _ = run_child([sys.executable, "-m", "bench.train", "--child", p, "--pairs-file", str(pairs_file),
                                    "--vocab-size", str(vocab_size), "--steps", str(a.steps), "--warmup",
                                    str(a.warmup), "--micro-batches", str(k),
                                    "--peak-gflops", str(peaks[p]["gflops"])])
                rows.append({**json.loads(out.strip().splitlines()[-1]), "train_pairs": n_pairs, "vocab": vocab_size,
                             "default": k == auto})
    if a.reference:
        ref = reference(data_dir(a.data), a.steps)
        for r in rows:
            r["vs_d2l"] = round(r["pairs_per_s"] / ref["pairs_per_s"], 2)
            r["ceiling_vs_d2l"] = round(r["ceiling_pairs_per_s"] / ref["pairs_per_s"], 2)
        rows.append(ref)
    print(table(rows))
    print("*: the default (train.micro_batches: auto for that precision). GEMM-bound MFU: the step's FLOPs over "
          "its GEMMs' time alone, each replayed at its own shape (bench/gemms.py), over the peak: the most "
          "MFU these shapes allow with this oneDNN", file=sys.stderr)
    print("ceiling: pairs/s if every FLOP of the step ran at the matmul peak above and nothing else took "
          "time (achieved pairs/s / MFU); 'ceil x d2l' is the most any implementation of these FLOPs "
          "could beat d2l by on this CPU", file=sys.stderr)
    for r in rows:
        print(json.dumps({"bench": "train", **r, "cpu": machine["cpu"], "cpu_kind": machine["cpu_kind"],
                          "date": machine["date"]}))


if __name__ == "__main__":
    main()
