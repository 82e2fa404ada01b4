"""Resumable training state: tensors as safetensors, everything else as JSON, written atomically.

Layout: `<root>/<fingerprint>/step-00000025/{state.safetensors,state.json}`. A step folder is
built under a temp name and renamed into place, so a folder that exists is complete; a `kill -9`
mid-write leaves only a temp folder, which is ignored and cleaned up. The fingerprint hashes
everything that changes the numbers (model and train settings, data and vocabulary hashes), so a
rerun with other params never resumes from a foreign state. Checkpoints live outside the DVC
outputs (DVC deletes a stage's outputs before running it) and are removed once a run completes.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from minibert.artifacts import atomic_dir

KEEP = 2  # step folders kept per fingerprint: the newest may be mid-rename only as a temp folder


def fingerprint(settings: dict[str, Any]) -> str:
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch (CPU and every CUDA device), numpy legacy and python RNG states."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    meta = {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save(root: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
         extra: dict[str, Any], scaler_state: dict[str, Any] | None = None) -> Path:
    """Write step `step`; keep the newest `KEEP` step folders. `extra` must be JSON-able."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_tensors(opt)
    tensors.update({k: v.detach().cpu().contiguous() for k, v in opt_tensors.items()})
    rng_tensors, rng_meta = rng_state()
    tensors.update(rng_tensors)
    meta = {"step": step, "optimizer": opt_meta, "rng": rng_meta, "scaler": scaler_state, **extra}
    final = root / f"step-{step:08d}"
    with atomic_dir(final) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    for old in sorted(root.glob("step-*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp"):  # a temp folder left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest(root: Path) -> Path | None:
    steps = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return steps[-1] if steps else None


def load(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and RNG states in place; return the JSON part (step, history, …)."""
    tensors = load_file(str(path / "state.safetensors"))
    meta = json.loads((path / "state.json").read_text())
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt.load_state_dict(_optimizer_state(tensors, meta["optimizer"]))
    set_rng_state(tensors, meta["rng"])
    return meta
