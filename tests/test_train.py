"""`train_model`, the one in-memory training entry point: the same run as the pieces assembled by hand,
and hooks that see the model and optimizer being trained (a held-out hook, a resumed start)."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from tiny_project import TINY_MODEL, make_workspace

from minibert.artifacts import load_arrays
from minibert.config import ModelConfig, TrainConfig
from minibert.data.batches import to_tensors
from minibert.model.bert import build_model
from minibert.training import checkpoint, distributed
from minibert.training.loop import fit, make_optimizer
from minibert.training.train import train_model

CPU = torch.device("cpu")
MODEL = ModelConfig(**TINY_MODEL)
CFG = TrainConfig(batch_size=8, max_steps=6, lr=3e-3, device="cpu", checkpoint_every=0, threads=1, seed=4,
                  optimizer="adamw", weight_decay=0.01)


def pairs(tmp_path) -> dict[str, np.ndarray]:
    return load_arrays(make_workspace(tmp_path) / "data/pairs/train.safetensors")


def test_train_model_is_the_run_assembled_by_hand(tmp_path):
    """The expectation comes from the pieces themselves: build_model seeded by train.seed, the config's
    optimizer, the arrays on the device, fit. Bit for bit on CPU, with dynamic masks (they need the vocab)."""
    data = pairs(tmp_path)
    cfg = dataclasses.replace(CFG, masking="dynamic")
    hand = build_model(MODEL, 99, seed=cfg.seed)
    want = fit(hand, make_optimizer(hand.parameters(), cfg), cfg, to_tensors(data, CPU), CPU, distributed.Dist(),
               vocab_size=99)
    model, got = train_model(MODEL, cfg, data, 99, device="cpu")
    assert [r["mlm_loss"] for r in got.history] == [r["mlm_loss"] for r in want.history]
    assert len(got.history) == cfg.max_steps
    for (name, a), b in zip(hand.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_hooks_score_the_model_being_trained(tmp_path):
    seen = []

    def hooks(model, opt):
        seen.append((model, opt))
        return {"on_eval": lambda step: {"valid_norm": float(model.nsp.weight.norm())}}

    cfg = dataclasses.replace(CFG, eval_every=3)
    model, result = train_model(MODEL, cfg, pairs(tmp_path), 99, device="cpu", hooks=hooks)
    assert len(seen) == 1 and seen[0][0] is model
    assert [r["step"] for r in result.history if "valid_norm" in r] == [3, 6]
    assert result.history[-1]["valid_norm"] == float(model.nsp.weight.norm())  # the trained weights at the end


def test_a_start_loaded_by_the_hooks_resumes_bit_exact(tmp_path):
    """6 steps straight == 3 steps with a checkpoint, then a fresh train_model whose hooks load it and start
    from its step: the resume path the GPU check takes."""
    data = to_tensors(pairs(tmp_path), CPU)  # tensors already on the device are taken as they are
    cfg = dataclasses.replace(CFG, checkpoint_every=3)
    saved = []

    def saving(model, opt):
        return {"on_checkpoint": lambda s, h, sc: saved.append(checkpoint.save(tmp_path / "ck", s, model, opt,
                                                                               {"history": h}, sc)) or saved[-1]}

    straight, full = train_model(MODEL, cfg, data, 99, device="cpu", hooks=saving)

    def resuming(model, opt):
        meta = checkpoint.load(saved[0], model, opt)
        return {"start_step": meta["step"], "history": meta["history"], "scaler_state": meta["scaler"]}

    resumed, part = train_model(MODEL, cfg, data, 99, device="cpu", hooks=resuming)
    assert [r["mlm_loss"] for r in part.history] == [r["mlm_loss"] for r in full.history]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
