"""Data parallel training under torchrun: every rank trains the same heads on its own samples and
the gradients are averaged."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Rank:
    index: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.index == 0


def join(device: str) -> tuple[str, Rank]:
    """Under torchrun, join the process group, each rank on its own GPU -> (device, rank); alone,
    (device, rank 0 of 1)."""
    if "WORLD_SIZE" not in os.environ:
        return device, Rank()
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device, Rank(dist.get_rank(), dist.get_world_size())


def average_gradients(params: list[torch.nn.Parameter], rank: Rank) -> None:
    if rank.world > 1:
        for p in params:
            dist.all_reduce(p.grad)
            p.grad /= rank.world


def leave(rank: Rank) -> None:
    """Leave together: a rank that tears its gloo connections down while another still saves can
    abort that one."""
    if rank.world > 1:
        dist.barrier()
        dist.destroy_process_group()
