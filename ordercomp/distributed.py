"""Multi-process training on PyTorch's own engine: set up from torchrun's environment.

Under ``torchrun --nproc_per_node=N`` (``WORLD_SIZE`` > 1) the default process group is created
(gloo on CPU, nccl on CUDA), the trainer wraps models in DistributedDataParallel and shards the
training data, and only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

__all__ = ["Dist", "setup", "active", "is_main"]


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def is_main() -> bool:
    return not active() or torch_dist.get_rank() == 0


def setup() -> Dist:
    """Joins the process group torchrun describes (once); a single process gets ``Dist()``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not torch_dist.is_available():
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return Dist(torch_dist.get_rank(), torch_dist.get_world_size(), local_rank, device)
