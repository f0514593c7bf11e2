"""Process-group setup for runs started by torchrun / deepspeed (env:// rendezvous) or alone."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    initialized_here: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(backend: str = "auto", need_group: bool = False) -> DistInfo:
    """Initialises torch.distributed from the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT), or a 1-process group when ``need_group`` (DeepSpeed wants one). gloo on CPU,
    NCCL on GPU unless ``backend`` says otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if gpu else torch.device("cpu")
    here = False
    if (world > 1 or need_group) and not dist.is_initialized():
        if world == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
        be = backend if backend != "auto" else ("nccl" if gpu else "gloo")
        dist.init_process_group(be, rank=rank, world_size=world,
                                device_id=device if be == "nccl" else None)
        here = True
    return DistInfo(rank, world, local_rank, device, here)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def teardown(info: DistInfo, failed: bool = False) -> None:
    """barrier + destroy: without it rank 0 sometimes aborts at exit (ENVIRONMENT.md). ``failed``: this rank
    is leaving on an exception: no barrier, which the other ranks may never reach (they can be waiting in a
    collective this rank left); the launcher stops them when this process exits with the error."""
    if info.initialized_here and dist.is_initialized() and not failed:
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_mean(values: dict[str, float], world: int) -> dict[str, float]:
    """Means of scalar metrics over ranks (keys must be the same on every rank; missing ones are 0)."""
    if world == 1 or not dist.is_initialized() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return {k: v / world for k, v in zip(keys, t.tolist())}


def all_reduce_sum(x: float) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item())


def union_keys(keys: list[str]) -> list[str]:
    """The sorted union of metric names across ranks (so all_reduce sees the same keys everywhere)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return sorted(keys)
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, sorted(keys))
    return sorted(set().union(*out))
