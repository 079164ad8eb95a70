"""The process group of a job started by ``torchrun`` (NCCL on GPUs, gloo on CPUs).

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; with ``WORLD_SIZE > 1`` training wraps
the model in DDP (``cpl_cert.train``) and certify and attack split their points over the processes
(``cpl_cert.shards``). Only rank 0 logs and writes files.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import CplCertError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """The rank layout from torchrun's environment variables (a single process when absent)."""
    try:
        return DistInfo(int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise CplCertError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (they are set by torchrun)") from None


def setup(info: DistInfo, device: torch.device, timeout: datetime.timedelta = datetime.timedelta(minutes=60)) -> torch.device:
    """Join the process group (NCCL for CUDA, gloo otherwise; collectives give up after ``timeout``); returns this rank's device."""
    if not info.enabled:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timeout)
    return device


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place (a no-op for one process)."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def weights_match(tensors: list[torch.Tensor], info: DistInfo) -> bool:
    """True when every rank holds bit-identical ``tensors`` (compared with rank 0's copy)."""
    if not info.enabled:
        return True
    flat = torch.cat([t.detach().float().flatten() for t in tensors])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    mismatch = torch.tensor([0.0 if torch.equal(flat, reference) else 1.0], device=flat.device)
    dist.all_reduce(mismatch, op=dist.ReduceOp.MAX)
    return bool(mismatch.item() == 0)
