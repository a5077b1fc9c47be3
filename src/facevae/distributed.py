"""Multi-process training with PyTorch DDP, launched by torchrun: ranks, reductions and BatchNorm across ranks.

A single process is world size 1 and everything here becomes a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class World:
    """This process's place among the training processes (torchrun's RANK, LOCAL_RANK, WORLD_SIZE)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files and prints."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "World":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                   int(os.environ.get("WORLD_SIZE", 1)))

    def init(self, device: torch.device) -> None:
        """Join the process group (NCCL on GPUs, gloo on CPUs) when there is more than one process."""
        if self.size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The tensor summed over ranks (in place; returned for chaining)."""
        if self.size > 1:
            dist.all_reduce(t)
        return t

    def min(self, t: torch.Tensor) -> torch.Tensor:
        """The elementwise minimum over ranks (in place; returned)."""
        if self.size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if `flag` is True on any (a signal may reach the ranks at different steps). A single
        process answers without touching the device; several exchange one number (a host sync)."""
        if self.size == 1:
            return flag
        t = torch.tensor(float(flag), device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()



class CrossRankBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch, all-reduced over ranks (gloo or NCCL).

    PyTorch's SyncBatchNorm runs only on GPUs; this one runs anywhere, so that k processes with batch B train exactly
    as one process with batch k * B. Same parameters and buffers as BatchNorm2d, so checkpoints are interchangeable.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not (dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        import warnings

        from torch.distributed.nn.functional import all_reduce  # differentiable all-reduce (gloo and NCCL)

        xf = x.float()
        local = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)),
                           torch.tensor([x.numel() / x.shape[1]], device=x.device)])
        with warnings.catch_warnings():  # its replacement, _functional_collectives, is private: keep the public one
            warnings.simplefilter("ignore", FutureWarning)
            total = all_reduce(local)
        c = x.shape[1]
        count = total[-1]
        mean = total[:c] / count
        var = total[c:2 * c] / count - mean * mean  # biased, as BatchNorm normalises with
        with torch.no_grad():
            self.num_batches_tracked += 1
            unbiased = var * count / (count - 1)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(unbiased, self.momentum)
        y = (xf - mean.view(1, c, 1, 1)) * torch.rsqrt(var.view(1, c, 1, 1) + self.eps)
        return (y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)).to(x.dtype)


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm2d by one that uses the global batch's statistics (SyncBatchNorm on CUDA)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = CrossRankBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats, device=child.weight.device)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            sync_batchnorm(child, device)
    return module
