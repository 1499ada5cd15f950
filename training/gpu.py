"""The trainer's GPU and multi-process paths, kept apart so each can be tested on a CPU:

- which autocast dtype "auto" picks (native bf16 only; cards that emulate bf16 get fp16),
- the fp16 GradScaler's state in the resume file (types kept, so a resumed run can update it),
- rank 0 writing files while the other ranks wait without hitting the collective timeout.
"""
from __future__ import annotations

import datetime
import logging
import os

import torch

from ..forms.precision import auto_amp_dtype, native_bf16_supported  # noqa: F401  (re-exported)

log = logging.getLogger("indomain")

# How long the other ranks wait for rank 0 to write a checkpoint + resume file. The resume file holds the
# UNet, its EMA and AdamW's two moments (about 4x the UNet): on slow disks that outlasts NCCL's collective
# timeout, so the wait happens on a separate gloo group with this much longer limit.
RANK0_IO_TIMEOUT = datetime.timedelta(minutes=float(os.environ.get("INDOMAIN_RANK0_IO_TIMEOUT_MIN", "240")))


# ----------------------------------------------------------------------------- mixed precision


# ----------------------------------------------------------------------------- GradScaler state

# GradScaler.state_dict() entries that torch's update kernel needs as Python ints
_SCALER_INT_KEYS = ("growth_interval", "_growth_tracker")


def scaler_state_for_json(scaler) -> dict:
    """GradScaler state as JSON-safe values with their types kept (ints stay ints)."""
    out = {}
    for k, v in scaler.state_dict().items():
        if isinstance(v, torch.Tensor):
            v = v.item()
        out[k] = int(v) if k in _SCALER_INT_KEYS else (float(v) if isinstance(v, (int, float)) else v)
    return out


def load_scaler_state(scaler, saved: dict) -> None:
    """Restore a GradScaler from scaler_state_for_json() output, also from resume files written before the
    types were kept (growth_interval saved as a float makes the first scaler.update() raise TypeError)."""
    state = dict(saved)
    for k in _SCALER_INT_KEYS:
        if k in state and state[k] is not None:
            state[k] = int(state[k])
    scaler.load_state_dict(state)


# ----------------------------------------------------------------------------- rank 0 file writes

_io_group = None


def _rank0_io_group():
    """A gloo process group with a long timeout, created collectively on first use (all ranks reach the same
    save at the same step). Waiting on gloo holds no NCCL collective open, so NCCL's watchdog stays quiet."""
    global _io_group
    import torch.distributed as dist

    if _io_group is None:
        _io_group = dist.new_group(backend="gloo", timeout=RANK0_IO_TIMEOUT)
    return _io_group


def on_rank0_others_wait(fn, rank: int, world: int):
    """Run fn() on rank 0 only; every rank returns when it is done (up to RANK0_IO_TIMEOUT), and when it
    failed every rank raises, so none is left waiting at the next collective."""
    if world <= 1:
        return fn()
    import torch.distributed as dist

    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as e:  # reported to the other ranks, then re-raised here
            error = e
    status = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(status, src=0, group=_rank0_io_group(), device=torch.device("cpu"))
    if error is not None:
        raise error
    if status[0] is not None:
        raise RuntimeError(f"rank 0 failed while writing files: {status[0]}")
    return result
