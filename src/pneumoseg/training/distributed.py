"""The process's place in a distributed run: rank, world size, device, and the few collectives training needs.

Under ``torchrun --nproc_per_node=N`` (or SageMaker's ``torch_distributed`` launcher, which runs torchrun) the
environment holds ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; :func:`distributed` then joins the process group
(nccl on GPUs, gloo on the CPU) and leaves it afterwards. Started plainly, the process is a world of one and
every collective is a no-op.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pneumoseg.modeling.device import resolve_device


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) writes files and logs progress."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def sum(self, values: Sequence[float] | np.ndarray) -> np.ndarray:
        """Element-wise sum of ``values`` over all ranks (float64)."""
        values = np.asarray(values, dtype=np.float64)
        if not self.is_distributed:
            return values
        tensor = torch.as_tensor(values, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.cpu().numpy()

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

        DistributedDataParallel does this at the start of each training forward pass, but the last pass of an
        epoch leaves each rank with statistics of its own batch; validation and checkpoints need one model.
        """
        if self.is_distributed:
            for buffer in module.buffers():
                dist.broadcast(buffer.data, src=0)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a decision taken once, from files only rank 0 should judge)."""
        if not self.is_distributed:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]


@contextlib.contextmanager
def distributed(device_setting: str = "auto") -> Iterator[DistContext]:
    """The :class:`DistContext` of this process, joining (and finally leaving) the process group under torchrun.

    A process group that is already initialised (by a caller) is used as it is and left open.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_setting, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    joined = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        joined = True
    try:
        yield DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)
    finally:
        if joined:
            dist.destroy_process_group()
