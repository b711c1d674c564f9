"""Multi-process training on PyTorch's own engine: set up from torchrun's environment.

Under ``torchrun --nproc_per_node=N`` (``WORLD_SIZE`` > 1) the default process group is created
(gloo on CPU, nccl on CUDA); a trainer asked to (``Trainer(ddp=True)``, as the command line does
under torchrun) wraps models in DistributedDataParallel and shards the training data, and only
rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

__all__ = ["Dist", "setup", "active", "is_main", "training_step", "shard", "set_epoch"]


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


class _Step(torch.nn.Module):
    """One training step's loss as a module, so DistributedDataParallel wraps model and objective alike.

    The objective receives the plain model (it may inspect it, e.g. run an ExitNet's heads one by
    one); DDP sees every trainable parameter through this wrapper and averages their gradients.
    """

    def __init__(self, model: torch.nn.Module, objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, x, y, index=None):
        return self.objective(self.model, x, y, index)


def training_step(model: torch.nn.Module, objective, ddp: bool = False) -> torch.nn.Module:
    """``step(x, y, index) -> loss``: wrapped in DistributedDataParallel when ``ddp`` is asked for
    inside a process group."""
    step = _Step(model, objective)
    if not (ddp and active()):
        return step
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [next(model.parameters()).device.index] if next(model.parameters()).is_cuda else None
    return DistributedDataParallel(step, device_ids=device_ids, find_unused_parameters=True)


def shard(loader, seed: int):
    """The loader over this process's share of the data (a DistributedSampler; the global batch
    size is kept by giving each of the N processes batches of ``batch_size // N``)."""
    if not active():
        return loader
    from torch.utils.data import DataLoader, RandomSampler
    from torch.utils.data.distributed import DistributedSampler

    world = torch_dist.get_world_size()
    sampler = DistributedSampler(loader.dataset, shuffle=isinstance(loader.sampler, RandomSampler), seed=seed)
    return DataLoader(loader.dataset, batch_size=max(1, (loader.batch_size or 1) // world), sampler=sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      drop_last=loader.drop_last)


def set_epoch(loader, epoch: int) -> None:
    """Reshuffles a sharded loader for ``epoch`` (the same permutation on every process)."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
