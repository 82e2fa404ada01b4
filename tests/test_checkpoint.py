"""Checkpoints: integrity records, durable writes, fallback past a damaged one, exact resume per precision."""
import hashlib
import json
import os
import time

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from tiny_project import TINY_MODEL, make_workspace, popen_stage, stage

from minibert.artifacts import load_arrays
from minibert.config import ModelConfig, TrainConfig
from minibert.data.batches import to_tensors
from minibert.model.bert import build_model
from minibert.training import checkpoint, distributed
from minibert.training.loop import fit, make_optimizer

CPU = torch.device("cpu")
STEPS = {"max_steps": 90, "checkpoint_every": 10}


def weights(root):
    return load_file(str(root / "models/bert.safetensors"))


def assert_same_run(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # bit for bit
    cols = ["step", "mlm_loss", "nsp_loss"]
    pd.testing.assert_frame_equal(pd.read_csv(a / "plots/train_loss.csv")[cols],
                                  pd.read_csv(b / "plots/train_loss.csv")[cols], check_exact=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = make_workspace(tmp_path_factory.mktemp("full"), train=STEPS)
    stage(root, "pretrain")
    return root


def killed_after_two_checkpoints(root):
    """Start the stage, kill -9 it once two step folders exist; return them, oldest first."""
    proc = popen_stage(root, "pretrain")
    t0 = time.time()
    while len(list(root.glob("checkpoints/*/step-*/state.json"))) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < 120, "no second checkpoint"
        time.sleep(0.01)
    proc.kill()  # SIGKILL: no handler runs
    proc.communicate()
    assert not (root / "models/bert.safetensors").exists()
    return sorted(root.glob("checkpoints/*/step-*"))


def truncate(path):
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def test_truncated_newest_checkpoint_resumes_from_the_older_bit_for_bit(uninterrupted, tmp_path):
    root = make_workspace(tmp_path, train=STEPS)
    *_, older, newest = killed_after_two_checkpoints(root)
    truncate(newest / "state.safetensors")  # as a crash mid-write or a full disk leaves it
    out = stage(root, "pretrain")
    warnings = [line for line in out.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(newest.relative_to(root)) in warnings[0] and "damaged" in warnings[0]
    assert f"resuming from {older.relative_to(root)}" in out.stdout
    assert_same_run(uninterrupted, root)


def test_no_intact_checkpoint_left_starts_from_step_0(uninterrupted, tmp_path):
    root = make_workspace(tmp_path, train=STEPS)
    kept = killed_after_two_checkpoints(root)
    for step in kept:
        (step / "state.json").write_text('{"step": 1')  # torn JSON
    out = stage(root, "pretrain")
    assert "starting from step 0" in out.stderr and "resuming" not in out.stdout
    assert "training steps 1.." in out.stdout
    assert_same_run(uninterrupted, root)


def tiny_state(precision="fp32"):
    # batch_size 1: fp16 overflows its first step at the initial loss scale 2**16 and backs off to 2**15
    cfg = TrainConfig(batch_size=1, max_steps=7, lr=3e-3, device="cpu", precision=precision, checkpoint_every=3,
                      threads=1)
    model = build_model(ModelConfig(**TINY_MODEL), 99, seed=5)
    return cfg, model, make_optimizer(model.parameters(), cfg)


def test_json_records_size_and_sha256_of_the_tensors(tmp_path):
    _, model, opt = tiny_state()
    path = checkpoint.save(tmp_path, 3, model, opt, {"history": []})
    blob = (path / "state.safetensors").read_bytes()
    meta = json.loads((path / "state.json").read_text())
    assert meta["files"] == {"state.safetensors": {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}}
    assert checkpoint.verify(path) is None
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 1  # one bit, same size
    (path / "state.safetensors").write_bytes(bytes(flipped))
    assert "sha256" in checkpoint.verify(path)


def test_checkpoint_holds_only_what_resume_needs(tmp_path):
    _, model, opt = tiny_state()
    path = checkpoint.save(tmp_path, 3, model, opt, {"history": []})
    keys = load_file(str(path / "state.safetensors")).keys()
    assert keys and all(k.startswith(("model.", "optim.")) for k in keys)  # no RNG states
    meta = json.loads((path / "state.json").read_text())
    assert set(meta) == {"step", "files", "optimizer", "scaler", "history"}


def test_writes_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    _, model, opt = tiny_state()
    checkpoint.save(tmp_path / "ck", 3, model, opt, {})
    rename = events.index(("rename", "step-00000003"))
    before = {name for kind, name in events[:rename] if kind == "fsync"}
    assert {"state.safetensors", "state.json"} <= before  # data on disk before it is visible
    assert any(n.startswith(".step-00000003.") for n in before)  # the folder's entries too
    assert ("fsync", "ck") in events[rename + 1:]  # the rename itself


def test_older_checkpoints_beyond_two_and_superseded_newer_ones_go(tmp_path):
    _, model, opt = tiny_state()
    for step in (3, 6, 9, 12):
        checkpoint.save(tmp_path, step, model, opt, {})
    assert [p.name for p in sorted(tmp_path.glob("step-*"))] == ["step-00000009", "step-00000012"]
    checkpoint.save(tmp_path, 6, model, opt, {})  # a run resumed from step 3 after 9 and 12 were damaged
    assert [p.name for p in sorted(tmp_path.glob("step-*"))] == ["step-00000006"]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_resume_is_bit_exact_in_every_precision(tmp_path, precision):
    """7 steps straight == 3 steps, checkpoint, fresh model/optimizer loaded from it, 4 more steps."""
    data = to_tensors(load_arrays(make_workspace(tmp_path) / "data/pairs/train.safetensors"), CPU)
    cfg, model, opt = tiny_state(precision)
    saved = []
    full = fit(model, opt, cfg, data, CPU, distributed.Dist(),
               on_checkpoint=lambda s, h, sc: saved.append(checkpoint.save(tmp_path / "ck", s, model, opt,
                                                                            {"history": h}, sc)))
    assert [p.name for p in saved] == ["step-00000003", "step-00000006"]
    if precision == "fp16":
        assert json.loads((saved[0] / "state.json").read_text())["scaler"]["scale"] < 2.0 ** 16  # it backed off
    _, model2, opt2 = tiny_state(precision)
    torch.manual_seed(12345)  # whatever the global generators hold: resume must not depend on it
    np.random.seed(12345)
    meta = checkpoint.load(saved[0], model2, opt2)
    resumed = fit(model2, opt2, cfg, data, CPU, distributed.Dist(), start_step=meta["step"],
                  history=meta["history"], scaler_state=meta["scaler"])
    assert [r["mlm_loss"] for r in resumed.history] == [r["mlm_loss"] for r in full.history]
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_checkpoint_without_room_costs_only_itself(small_fs):
    """A real filesystem (32 kB) with room for one checkpoint (~20 kB) but not two: the second save is one
    WriteError line (where, free space, room needed), leaves no temp folder, and the first step folder
    stays intact."""
    from minibert.errors import WriteError

    fs = small_fs("32k")
    _, model, opt = tiny_state()
    first = checkpoint.save(fs / "ck", 3, model, opt, {"history": []})
    with pytest.raises(WriteError) as err:
        checkpoint.save(fs / "ck", 6, model, opt, {"history": []})
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"cannot write {fs / 'ck' / 'step-00000006'}: No space left on device")
    assert "free there, 19.3 kB needed" in msg  # 4818 fp32 weights; no Adam moments before a step
    assert sorted(p.name for p in (fs / "ck").iterdir()) == ["step-00000003"]
    assert checkpoint.verify(first) is None and checkpoint.latest(fs / "ck") == (first, [])


def test_injected_enospc_at_the_checkpoint_writer(tmp_path, monkeypatch):
    from minibert.errors import WriteError

    _, model, opt = tiny_state()
    first = checkpoint.save(tmp_path, 3, model, opt, {})

    def full(tensors, path, metadata=None):
        open(path, "wb").write(b"torn")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(WriteError, match="step-00000006: No space left on device"):
        checkpoint.save(tmp_path, 6, model, opt, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003"] and checkpoint.verify(first) is None
