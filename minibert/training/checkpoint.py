"""Resumable training state: tensors as safetensors, everything else as JSON, written durably.

Layout: `<root>/<fingerprint>/step-00000025/{state.safetensors,state.json}`. A step folder is
built under a temp name, its files fsynced, renamed into place and the parent folder fsynced, so a
folder that exists is complete even after a power cut; a `kill -9` mid-write leaves only a temp
folder, which is ignored and cleaned up. `state.json` records the size and sha256 of
`state.safetensors`, so a file damaged afterwards (a full disk, a filesystem without data
journaling) is detected on resume and the previous step folder is used instead. The fingerprint
hashes everything that changes the numbers (model and train settings, data and vocabulary hashes),
so a rerun with other params never resumes from a foreign state. Checkpoints live outside the DVC
outputs (DVC deletes a stage's outputs before running it) and are removed once a run completes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from minibert.artifacts import atomic_dir, sha256_file

KEEP = 2  # step folders kept per fingerprint: when the newest is found damaged, the one before it resumes
TENSORS, META = "state.safetensors", "state.json"


def fingerprint(settings: dict[str, Any]) -> str:
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk (Linux/macOS allow opening folders)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(root: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
         extra: dict[str, Any], scaler_state: dict[str, Any] | None = None) -> Path:
    """Write step `step` durably; keep the newest `KEEP` step folders. `extra` must be JSON-able.
    Raises `WriteError` (one line: where, free space, room needed) when the folder has no room or
    rights; nothing of the step is left then.

    Only what resume needs is saved: weights, Adam state, the fp16 GradScaler state. No RNG state:
    `fit` reseeds torch (and with it every CUDA device) from (seed, rank, step) before each step and
    draws batches from (seed, epoch), and nothing draws from numpy's or python's global generators."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_tensors(opt)
    tensors.update({k: v.detach().cpu().contiguous() for k, v in opt_tensors.items()})
    final = root / f"step-{step:08d}"
    need = sum(t.numel() * t.element_size() for t in tensors.values())  # the safetensors file, about
    with atomic_dir(final, need) as tmp:  # no room: WriteError, the temp folder removed
        save_file(tensors, str(tmp / TENSORS))
        files = {TENSORS: {"bytes": (tmp / TENSORS).stat().st_size, "sha256": sha256_file(tmp / TENSORS)}}
        meta = {"step": step, "files": files, "optimizer": opt_meta, "scaler": scaler_state, **extra}
        (tmp / META).write_text(json.dumps(meta, indent=1))
        for f in (TENSORS, META):
            _fsync(tmp / f)
        _fsync(tmp)
    _fsync(root)  # the rename itself
    for newer in root.glob("step-*"):  # a damaged checkpoint this run resumed before: superseded
        if newer.name > final.name:
            shutil.rmtree(newer, ignore_errors=True)
    for old in sorted(root.glob("step-*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp"):  # a temp folder left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    return final


def verify(path: Path) -> str | None:
    """None when the step folder is intact, else why not (one short phrase)."""
    try:
        meta = json.loads((path / META).read_text())
        files = meta["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{META} unreadable ({type(e).__name__})"
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} missing"
        if f.stat().st_size != want["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, {want['bytes']} recorded"
        if sha256_file(f) != want["sha256"]:
            return f"{name} sha256 differs from the recorded one"
    return None


def latest(root: Path) -> tuple[Path | None, list[str]]:
    """The newest intact step folder (None if there is none) and one warning per damaged newer one."""
    warnings = []
    steps = sorted(root.glob("step-*"), reverse=True)
    for path in steps:
        problem = verify(path)
        if problem is None:
            return path, warnings
        warnings.append(f"checkpoint {path} is damaged ({problem}); skipped")
    if steps:
        warnings.append(f"no intact checkpoint left in {root}; starting from step 0")
    return None, warnings


def load(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model and optimizer states in place; return the JSON part (step, history, scaler, …)."""
    tensors = load_file(str(path / TENSORS))
    meta = json.loads((path / META).read_text())
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt.load_state_dict(_optimizer_state(tensors, meta["optimizer"]))
    return meta
