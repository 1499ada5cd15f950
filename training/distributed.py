"""Data-parallel training under torchrun (NCCL on GPUs, gloo on CPU): set-up and the few collectives."""
from __future__ import annotations

import hashlib
import os

import torch


def dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_distributed() -> tuple[int, int, int]:
    """Initialise torch.distributed when launched by torchrun (NCCL on GPUs, gloo on CPU).

    Returns (rank, world_size, local_rank). Call before ComfyUI picks its device.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1:
        return 0, 1, 0
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and os.environ.get("INDOMAIN_FORCE_CPU") != "1"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank


def wrap_data_parallel(module: torch.nn.Module, world: int, device) -> torch.nn.Module:
    if world <= 1:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)


def all_reduce_mean(value: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value = value / world
    return value


def any_rank(flag: bool, world: int, device) -> bool:
    if world <= 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def finish_distributed(timeout_s: float = 120.0) -> None:
    """Leave the process group on the success path: every rank waits for the others first, because a gloo rank
    that tears down while its peer is still talking to it can die with "terminate called without an active
    exception" (seen on CPU under torchrun). The wait is bounded, so a peer that already left cannot hang this one."""
    import datetime

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
        else:
            dist.barrier()
    except Exception:  # a peer gone or timed out: still leave the group
        pass
    dist.destroy_process_group()


def gather_from_ranks(value, world: int) -> list:
    if world <= 1:
        return [value]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, value)
    return out


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over every byte of every tensor (exact identity, for the cross-rank check)."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
