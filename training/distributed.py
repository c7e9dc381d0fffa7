"""Process set-up for one training process, alone or one of a `torchrun` group (DistributedDataParallel).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them the process trains alone. GPUs use nccl, CPUs
gloo. Every collective here is called by every process, in the same order, or the group hangs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    """This process's place in the group: rank 0 (`main`) logs, validates and writes files."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_finite(self, loss: torch.Tensor, device: torch.device) -> bool:
        """Whether the loss is finite on every process: one process's NaN skips the update everywhere, so
        the weights stay identical across the group."""
        finite = torch.tensor([float(torch.isfinite(loss.detach()).all())], device=device)
        if self.world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return finite.item() >= 1

    def checksums(self, params: list[torch.Tensor]) -> list[float]:
        """Every process's sum of `params` (float64), for a cheap end-of-run check that DDP kept the weights
        identical."""
        checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1).cpu()
        gathered = [torch.zeros_like(checksum) for _ in range(self.world)]
        dist.all_gather(gathered, checksum)
        return [float(g) for g in gathered]

    def close(self) -> None:
        """Leave the group after a last barrier (no-op for a lone process)."""
        self.barrier()
        if self.world > 1:
            dist.destroy_process_group()


def setup_distributed(device_flag: str, threads: int = 0) -> tuple[Dist, torch.device]:
    """Join the torchrun group if there is one and pick this process's device (`--device`: cpu, cuda,
    cuda:N or auto). `threads`: torch CPU threads, 0 for the cores shared evenly among the processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = device_flag.startswith("cuda") or (device_flag == "auto" and torch.cuda.is_available())
    if world > 1:
        d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if want_cuda else "gloo")
        device = torch.device("cuda", d.local_rank) if want_cuda else torch.device("cpu")
    else:
        d = Dist()
        device = torch.device(("cuda" if want_cuda else "cpu") if device_flag == "auto" else device_flag)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // d.world))
    return d, device


def wrap_ddp(module: torch.nn.Module, d: Dist, device: torch.device, **kw) -> torch.nn.Module:
    """`module` wrapped in DistributedDataParallel when the group has several processes, else itself."""
    if d.world == 1:
        return module
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None, **kw
    )
