"""Multi-GPU set-up, checked without GPUs: torch.cuda and the process group are replaced by recorders.

What is checked is the order and the arguments of the calls a rank makes (torch's documented recipe:
`torch.cuda.set_device(local_rank)` before any CUDA work, NCCL bound to that device with `device_id`),
the one-GPU-per-local-rank mapping, and the launcher command.
"""
import sys

import pytest
import torch

from minibert.config import TrainConfig
from minibert.device import resolve_device
from minibert.errors import MinibertError
from minibert.training import distributed


@pytest.fixture
def launcher(monkeypatch):
    """A rank under torchrun (local rank 1 of 2) whose torch.cuda / init_process_group only record."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    calls = []
    state = {"init": False}
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: state["init"])

    def init_process_group(**kw):
        calls.append(("init_process_group", kw))
        state["init"] = True
    monkeypatch.setattr(distributed.dist, "init_process_group", init_process_group)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    return calls


def test_cuda_rank_sets_its_device_then_joins_nccl_bound_to_it(launcher):
    d = distributed.init(torch.device("cuda:1"))
    assert d == distributed.Dist(1, 2, 1)
    assert launcher == [("set_device", torch.device("cuda:1")),
                        ("init_process_group", {"backend": "nccl", "device_id": torch.device("cuda:1")})]


def test_cpu_rank_joins_gloo_and_touches_no_gpu(launcher):
    distributed.init(torch.device("cpu"))
    assert launcher == [("init_process_group", {"backend": "gloo", "device_id": None})]


def test_one_process_joins_no_group(monkeypatch, launcher):
    monkeypatch.delenv("LOCAL_RANK")
    assert distributed.init(torch.device("cuda:0")) == distributed.Dist() and launcher == []


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_each_local_rank_takes_its_own_gpu(two_gpus):
    assert [resolve_device("cuda", r) for r in (0, 1)] == [torch.device("cuda:0"), torch.device("cuda:1")]
    assert resolve_device("auto", 1) == torch.device("cuda:1")
    assert resolve_device("cuda:0", 1) == torch.device("cuda:0")  # a named GPU (one process: config rule)
    with pytest.raises(MinibertError, match=r"train.device = 'cuda': GPU 2 \(local rank 2\) but only 2 GPU\(s\) visible"):
        resolve_device("cuda", 2)  # a third process on a 2-GPU node


def test_no_gpu_names_the_setting(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MinibertError, match="eval.device = 'cuda' but no CUDA device is visible; set eval.device"):
        resolve_device("cuda", key="eval.device")
    assert resolve_device("auto") == torch.device("cpu")


def test_launch_command_wires_max_restarts(two_gpus, monkeypatch):
    for v in ("LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(v, raising=False)
    cmd = distributed.launch_command(TrainConfig(devices="auto", max_restarts=3), "stages.pretrain", ["--params", "p.yaml"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=2" in cmd and "--max-restarts=3" in cmd and cmd[-3:] == ["stages.pretrain", "--params", "p.yaml"]
    assert "--max-restarts=0" in distributed.launch_command(TrainConfig(devices=2), "stages.pretrain", [])
    assert distributed.launch_command(TrainConfig(devices=1), "stages.pretrain", []) is None
