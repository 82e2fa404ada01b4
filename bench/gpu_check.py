"""The GPU readiness check's Python: the steps `bench/gpu_check.sh` runs in-process between its shell steps.

    python -m bench.gpu_check params OUT key=value...   params.yaml with those keys set, written to OUT
    python -m bench.gpu_check env DEV                    python, torch, the GPU and the packages: one JSON line
    python -m bench.gpu_check missing                    pip names of the stages' dependencies not importable
    python -m bench.gpu_check diag W DEV SMOKE           host syncs, kernel dispatch, checkpoint resume: W/diag.json
    python -m bench.gpu_check weights W MODELS DEV       device-trained weights used on the CPU: W/weights.json

Run from the repository root (the shell script puts it on PYTHONPATH). `env` and `missing` run before the
project's dependencies are installed, so this module imports only the standard library at the top.
Training goes through `minibert.training.train.train_model` and each step's batch through the batch plan
(`minibert.data.batches`), as the pretrain stage's are. The summary is `bench/gpu_summary.py`'s.
"""
from __future__ import annotations

import collections
import dataclasses
import importlib.util
import json
import os
import platform
import sys
import tempfile
import warnings
from pathlib import Path

NEEDED = {"numpy": "numpy", "pandas": "pandas", "pyarrow": "pyarrow", "safetensors": "safetensors", "typer": "typer",
          "rich": "rich", "yaml": "pyyaml", "matplotlib": "matplotlib"}  # module -> pip name


def params(out: str, *sets: str) -> None:
    """params.yaml with each `section.key=value` (value in YAML) set, written to `out`."""
    import yaml

    from minibert import layout

    p = yaml.safe_load(layout.PARAMS.read_text())
    for kv in sets:
        key, value = kv.split("=", 1)
        section, leaf = key.split(".", 1)
        p.setdefault(section, {})[leaf] = yaml.safe_load(value)
    Path(out).write_text(yaml.safe_dump(p, sort_keys=False))


def env(dev: str) -> None:
    import torch

    d = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
         "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "device_asked": dev}
    for mod in ("numpy", "pandas", "safetensors", "typer", "pyarrow", "triton", "mlflow", "dvc"):
        try:
            d[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - absent or broken: either is worth a line
            d[mod] = f"absent ({type(e).__name__})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        d.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_mem_gib=round(p.total_memory / 2**30, 1),
                 devices=torch.cuda.device_count(), bf16_supported=torch.cuda.is_bf16_supported(),
                 nccl=torch.cuda.nccl.version() if hasattr(torch.cuda, "nccl") else None,
                 matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    print(json.dumps(d))


def missing() -> None:
    print(" ".join(pkg for mod, pkg in NEEDED.items() if importlib.util.find_spec(mod) is None))


class Results:
    """Named results, each written to `path` as soon as it is known (a killed step keeps the earlier ones)."""

    def __init__(self, path: Path):
        self.path, self.res = path, {}

    def guard(self, name: str, f) -> None:
        try:
            self.res[name] = f()
        except Exception as e:  # noqa: BLE001 - the check reports a failure and goes on
            first = str(e).splitlines()[0][:200] if str(e) else ""
            self.res[name] = f"FAILED {type(e).__name__}: {first}"
        print(name, "->", self.res[name], flush=True)
        self.path.write_text(json.dumps(self.res, indent=1, default=str))


def sync_lines(caught, per: int) -> dict:
    """CUDA synchronisations recorded by `torch.cuda.set_sync_debug_mode("warn")`, per step and by line."""
    where = collections.Counter(f"{os.path.relpath(w.filename)}:{w.lineno}" for w in caught
                                if "synchroniz" in str(w.message))
    return {"per_step": round(sum(where.values()) / per, 2), "by_line_per_step": {k: v / per for k, v in where.most_common(20)}}


def diag(w: str, dev_name: str, smoke: str) -> None:
    """Host syncs per step (the step alone, and `fit` with its loss read back every step), each kernel entry
    point called with device tensors, and a checkpoint resume on the device: bit-exact or not."""
    import torch

    from minibert.config import ModelConfig, TrainConfig
    from minibert.data.batches import BatchPlan, to_tensors
    from minibert.data.pairs import load_pairs
    from minibert.data.vocab import Vocab
    from minibert.device import resolve_device
    from minibert.model.bert import build_model
    from minibert.training import checkpoint
    from minibert.training.distributed import Dist
    from minibert.training.loop import make_optimizer, resolve_precision, train_step
    from minibert.training.train import train_model

    batch = 32 if smoke == "1" else 512  # the dry run: tiny batches
    out = Results(Path(w) / "diag.json")
    dev = resolve_device(dev_name)
    from minibert import layout

    pairs, _ = load_pairs(layout.TRAIN_PAIRS)
    vocab_size = len(Vocab.load(layout.VOCAB))
    data = to_tensors(pairs, dev)
    out.res["data_devices"] = sorted({str(v.device) for v in data.values()})
    amp = resolve_precision("auto", dev)
    out.res["precision_auto"] = str(amp)
    cfg = TrainConfig(device=dev_name, max_steps=6, checkpoint_every=0, eval_every=0, log_every=1, batch_size=batch)

    def step_syncs(micro_batches: int):
        """Synchronising CUDA calls per training step (the plan's cut + train_step, no loss read-back)."""
        plan = BatchPlan(data, cfg, dev, Dist(), micro_batches)
        model = build_model(ModelConfig(), vocab_size, seed=0).to(dev)
        opt = make_optimizer(model.parameters(), cfg)

        def step(s):
            return train_step(model, opt, None, plan.step(s).parts, 1.0, 1.0, amp, dev)
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
        return sync_lines(caught, 5)
    out.guard("host_syncs_mb4", lambda: step_syncs(4))
    out.guard("host_syncs_mb1", lambda: step_syncs(1))

    def fit_syncs():
        """Syncs per step of fit itself after 2 warm-up steps (log_every 1: the loss read back every step)."""
        if dev.type != "cuda":
            return "cuda only"

        def watch_from_step_3(model, opt):
            def on_log(rows):
                if rows[-1]["step"] == 2:
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("warn")
            return {"on_log": on_log}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                train_model(ModelConfig(), cfg, data, vocab_size, device=dev, hooks=watch_from_step_3)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sync_lines(caught, cfg.max_steps - 2)
    out.guard("host_syncs_fit_log_every_1", fit_syncs)
    dispatch(out, dev)

    def resume():
        """6 steps straight vs 3 + checkpoint + load into a fresh model + 3: the same weights?"""
        ckpt_cfg = dataclasses.replace(cfg, checkpoint_every=3)
        root = Path(tempfile.mkdtemp(dir=w))
        saved, opts, resumed_steps = [], [], []

        def hooks(start_from):
            def make(model, opt):
                opts.append(opt)
                kw = {"on_checkpoint": lambda step, hist, sc: saved.append(
                    checkpoint.save(root, step, model, opt, {"history": hist}, sc)) or saved[-1]}
                if start_from:
                    meta = checkpoint.load(start_from, model, opt)
                    kw.update(start_step=meta["step"], history=meta["history"], scaler_state=meta["scaler"],
                              on_log=lambda rows: resumed_steps.extend(r["step"] for r in rows))
                return kw
            return make
        a, _ = train_model(ModelConfig(), ckpt_cfg, data, vocab_size, device=dev, hooks=hooks(None))
        b, _ = train_model(ModelConfig(), ckpt_cfg, data, vocab_size, device=dev, hooks=hooks(saved[0]))
        diffs = [float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters())]
        opt_devices = {f"{k}:{t.device}" for st in opts[-1].state.values() for k, t in st.items() if torch.is_tensor(t)}
        return {"bit_exact": max(diffs) == 0.0, "max_abs_diff": max(diffs), "resumed_run_steps": resumed_steps,
                "resumed_optimizer_state": sorted(opt_devices)}
    out.guard("checkpoint_resume", resume)
    out.guard("peak_gpu_mem_gib", lambda: round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None)


def dispatch(out: Results, dev) -> None:
    """Each kernel entry point called directly with device tensors, the C++ build switched off: its
    references are what a non-CPU tensor reaches, and they build their masks on the input's device."""
    import torch

    from minibert.model import ops
    from minibert.model.bert import token_layout
    from minibert.model.kernels import addnorm, attention, build, softmax_xent
    from minibert.model.kernels import dropout as kdrop

    build._state.update(ok=False, why="switched off by the GPU check", warned=True)
    try:
        x = torch.randn(64, 128, device=dev)
        valid = torch.tensor([13, 4, 9], device=dev)
        idx = token_layout(valid, 13)
        zeros = torch.zeros(99, device=dev)
        out.guard("dispatch ops.dropout (expect: the device; F.dropout)", lambda: str(ops.dropout(x, 0.2, True).device))
        out.guard("dispatch softmax_xent_ (expect: the device; torch reference)", lambda: str(softmax_xent.softmax_xent_(
            torch.randn(8, 99, device=dev), torch.zeros(8, dtype=torch.long, device=dev), 5, zeros, zeros).device))
        out.guard("dispatch addnorm.add_norm (expect: the device; torch reference)", lambda: str(addnorm.add_norm(
            x, x, torch.ones(128, device=dev), torch.zeros(128, device=dev), 0.2).device))
        out.guard("dispatch attention.attention_rows (expect: the device; torch reference)", lambda: str(
            attention.attention_rows(torch.randn(len(idx), 48, device=dev), idx, valid, 13, 2, 0.2).device))
        out.guard("dispatch kernels.dropout.dropout (expect: the device; torch reference)",
                  lambda: str(kdrop.dropout(x, 0.2).device))
    finally:
        build._state.clear()


def weights(w: str, models: str, dev: str) -> None:
    """Weights trained on the device, loaded on the CPU and on the device: the same encodings, and the
    served text model's rows built where its model is."""
    from minibert.config import ProbeSpec
    from minibert.data.vocab import Vocab
    from minibert.evaluation.probes import encode_probe
    from minibert.model.bert import load_pretrained
    from minibert.tracking.serving import encode_rows

    out = Results(Path(w) / "weights.json")
    from minibert import layout

    vocab = Vocab.load(layout.VOCAB)
    cpu, _ = load_pretrained(models, "cpu")
    gpu, _ = load_pretrained(models, dev)
    spec = ProbeSpec("p", "a crane is flying", "he just left")
    out.guard("encode_cpu_vs_device_max_abs", lambda: float((encode_probe(cpu, vocab, spec, "cpu")[2]
                                                             - encode_probe(gpu, vocab, spec, dev)[2]).abs().max()))
    out.guard("pyfunc_fill_mask_on_cpu_model", lambda: encode_rows(
        cpu, vocab, [("the <mask> is flying", None)], "fill-mask", 3)[0]["masks"][0]["words"])
    out.guard("pyfunc_encode_on_device_model (expect: 4 tokens; inputs built on the model's device)", lambda: len(
        encode_rows(gpu, vocab, [("a crane is flying", None)], "encode", 1)[0]["encoding"]))


COMMANDS = {"params": params, "env": env, "missing": missing, "diag": diag, "weights": weights}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m bench.gpu_check {{{','.join(COMMANDS)}}} ARGS... (see the docstring)")
    COMMANDS[argv[0]](*argv[1:])


if __name__ == "__main__":
    main()
