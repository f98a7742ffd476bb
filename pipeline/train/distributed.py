"""Data-parallel pretraining on several processes (one per GPU, or gloo processes on CPU).

torchrun starts the processes and sets RANK, LOCAL_RANK and WORLD_SIZE; `Distributed.from_env`
reads them. A single process is the same object with world 1, so the training code has one
path. `torchrun_command` is how `kiln pretrain` and the base_model asset start the processes
when the profile asks for more than one device.
"""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> Distributed:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        return torch.device(f"cuda:{self.local_rank}") if torch.cuda.is_available() else torch.device("cpu")

    def start(self, device: torch.device) -> None:
        """Bind this process to its GPU, then join the group (NCCL on GPUs, gloo on CPU)."""
        if self.world == 1 or dist.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)  # before the group, so NCCL and every later kernel use this GPU
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def stop(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over all ranks (itself on one process)."""
        if self.world == 1:
            return value
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world

    def share(self, obj):
        """Rank 0's value of `obj` on every rank (what only rank 0 computed)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def no_sync(self, module, last_micro_batch: bool):
        """DDP's gradient all-reduce only on the last micro-batch of an accumulation."""
        if self.world > 1 and not last_micro_batch:
            return module.no_sync()
        return nullcontext()


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ


def torchrun_command(devices: int, module_args: list[str]) -> list[str]:
    """`python -m torch.distributed.run` on this machine with one process per device, running
    `python -m <module_args...>` in each."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}",
        "-m", *module_args,
    ]  # fmt: skip
