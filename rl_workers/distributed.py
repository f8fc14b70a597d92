"""Many workers under torchrun: one process per GPU, gradients averaged, statistics reduced.

Every worker calls the reward service itself; ranks exchange only LoRA weights (once, at the
start), LoRA gradients and the sums behind the logged figures. A single process (no WORLD_SIZE)
runs without a process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env(device: torch.device) -> Ranks:
    """Join the process group torchrun describes in the environment: nccl for CUDA devices, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(rank=dist.get_rank(), world=dist.get_world_size())


def _reduce(values: dict[str, float], ranks: Ranks, device: torch.device, op: str) -> dict[str, float]:
    if ranks.world == 1:
        return dict(values)
    import torch.distributed as dist

    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return dict(zip(keys, tensor.tolist(), strict=True))


def sum_across(values: dict[str, float], ranks: Ranks, device: torch.device) -> dict[str, float]:
    """Element-wise sum of `values` over all ranks (same keys everywhere)."""
    return _reduce(values, ranks, device, "sum")


def max_across(values: dict[str, float], ranks: Ranks, device: torch.device) -> dict[str, float]:
    return _reduce(values, ranks, device, "max")


def broadcast_from_main(params: list[torch.nn.Parameter], ranks: Ranks) -> None:
    """Every rank starts from rank 0's weights."""
    if ranks.world == 1:
        return
    import torch.distributed as dist

    for p in params:
        dist.broadcast(p.data, src=0)


def average_gradients(params: list[torch.nn.Parameter], ranks: Ranks) -> None:
    """Average the LoRA gradients over ranks in one all-reduce (many small ones are latency-bound)."""
    if ranks.world == 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= ranks.world
    for p, part in zip(params, flat.split([g.numel() for g in grads]), strict=True):
        p.grad = part.view_as(p)


def shutdown(ranks: Ranks) -> None:
    if ranks.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
