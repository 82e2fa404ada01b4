"""Data parallelism through torch's own launcher and DistributedDataParallel.

With one process the pretrain stage trains in-process. With more (`train.devices` > 1 or
`train.nodes` > 1) the stage re-executes itself under `python -m torch.distributed.run`, so
`dvc repro` stays one command; started by `torchrun` (or SLURM's `srun torchrun ...`) directly,
the environment already names the rank and the stage just joins the group.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from minibert.config import TrainConfig


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def int_env(name: str, default: int = 0) -> int:
    return int(os.environ.get(name, default))


def under_launcher() -> bool:
    """True inside a process started by torchrun / torch.distributed.run."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def procs_per_node(cfg: TrainConfig) -> int:
    if cfg.devices == "auto":
        return max(1, torch.cuda.device_count()) if cfg.device in ("auto", "cuda") else 1
    return cfg.devices


def launch_command(cfg: TrainConfig, module: str, argv: list[str]) -> list[str] | None:
    """The torch.distributed.run command that re-runs `python -m <module> <argv>` (the caller's own script)
    on every process, or None for one."""
    nproc = procs_per_node(cfg)
    if under_launcher() or (nproc == 1 and cfg.nodes == 1):
        return None
    # --max-restarts: a failed rank restarts the group, which resumes from the last checkpoint
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={cfg.nodes}", f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={cfg.rdzv_endpoint}", f"--rdzv-id={cfg.rdzv_id}",
            f"--max-restarts={cfg.max_restarts}", "-m", module, *argv]


def relaunch(cmd: list[str]) -> int:
    """Run the launcher in the foreground; its exit code is the stage's."""
    return subprocess.run(cmd, check=False).returncode


def init(device: torch.device) -> Dist:
    """Join the process group when under the launcher: NCCL on CUDA, gloo on CPU.

    On CUDA the process first makes its own GPU (`device`, the one of its local rank) the current one:
    otherwise pinned-memory copies open a context on GPU 0 in every rank, and NCCL has to guess the
    device of its barrier. `device_id` binds the group to that GPU (and creates the communicator now)."""
    if not under_launcher():
        return Dist()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"]))


def shutdown(clean: bool = True) -> None:
    """Leave the process group. After a clean run (called right after training, before rank 0 writes the
    outputs and logs to MLflow, so no rank waits for that work inside a collective) every rank first meets
    at a barrier: a rank destroying the group while another is still in it hung the 2-rank gloo test once
    in CI (pytorch#75097). After a failure the group is left
    as is (destroying it while another rank waits in a collective can deadlock; torchtitan does the
    same): the process exits and the launcher ends the rest."""
    if not dist.is_initialized() or not clean:
        return
    # Keep the barrier's work object alive until the process exits. Otherwise gloo's worker thread
    # destroys it once it completes, and with it the earlier collectives' tensors it holds: Python-owned
    # tensors, so that thread takes the GIL. If the main thread meanwhile drops the last reference to the
    # process group (DDP's Reducer is freed when `run_pretrain` returns), ~ProcessGroupGloo joins that
    # worker while holding the GIL: a deadlock, seen once in CI as a rank stuck in ~ProcessGroupGloo
    # (thread join) beside a gloo thread in ~AsyncBarrierWork waiting for the GIL. Held here, the work
    # is released by the main thread at exit.
    work = dist.barrier(async_op=True)
    work.wait()
    _FINISHED_WORK.append(work)
    dist.destroy_process_group()


_FINISHED_WORK: list = []  # see shutdown()


def all_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum a small tensor over ranks (identity with one process)."""
    if d.enabled:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def any_rank(flag: bool, d: Dist, device: torch.device) -> bool:
    """True if `flag` is set on any rank: all ranks stop at the same step."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_sum(t, d).item() > 0)
