"""Process-group setup for ``torchrun`` (DDP) and the single-process default.

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK; when WORLD_SIZE > 1 we join the group with gloo on CPU
and nccl on CUDA. Only rank 0 writes files (checkpoints, logs, exports).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fluxmusic.errors import FluxMusicError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we created the process group, so we destroy it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise FluxMusicError(f"unknown device {name!r}; allowed: auto, cpu, cuda, cuda:N") from e


def init(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    owns = False
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return DistInfo(rank, world, local, dev, owns)


def shutdown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, info: DistInfo) -> nn.Module:
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def mean(values: Tensor, info: DistInfo) -> Tensor:
    """Average a tensor over ranks (identity in a single process)."""
    if info.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= info.world_size
    return values


def sum_(values: Tensor, info: DistInfo) -> Tensor:
    if info.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather(tensor: Tensor, info: DistInfo) -> list[Tensor]:
    """Every rank's copy of a same-shaped tensor, on CPU, in rank order."""
    if not info.enabled:
        return [tensor.cpu()]
    comm = tensor.to(info.device) if info.device.type == "cuda" else tensor
    out = [torch.empty_like(comm) for _ in range(info.world_size)]
    dist.all_gather(out, comm)
    return [t.cpu() for t in out]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
