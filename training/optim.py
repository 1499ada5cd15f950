"""What the loop wraps around the trainable module: EMA of the trained parameters, mixed precision,
gradient checkpointing, and turning ComfyUI's inference tensors into trainable ones."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("indomain.training")


def materialise_(module: torch.nn.Module) -> torch.nn.Module:
    """Replace inference-mode tensors (ComfyUI executes nodes under torch.inference_mode) by ordinary
    ones, so autograd can use them."""
    with torch.inference_mode(False):
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None:
                    m._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            for name, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[name] = b.detach().clone()
    return module


def enable_grad_checkpointing(unet: torch.nn.Module) -> int:
    """Recompute each UNet block's activations in the backward pass (less memory, ~30% slower)."""
    from torch.utils.checkpoint import checkpoint

    blocks = []
    for attr in ("input_blocks", "output_blocks"):
        blocks += list(getattr(unet, attr, []) or [])
    mid = getattr(unet, "middle_block", None)
    if isinstance(mid, torch.nn.Module):
        blocks.append(mid)
    for b in blocks:
        inner = b.forward

        def fwd(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        b.forward = fwd
    return len(blocks)


def autocast_dtype(mixed_precision: str, device: torch.device):
    """The autocast dtype for a `mixed_precision` setting on `device` (None: fp32)."""
    mp = mixed_precision
    if device.type != "cuda":
        if mp in ("bf16", "fp16"):
            log.warning("InDomain training: %s autocast requested on %s; training in fp32 (CPU autocast was "
                        "15x slower here)", mp, device.type)
        return None
    if mp == "no":
        return None
    if mp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mp == "bf16" else torch.float16


class EMA:
    """Exponential moving average of a module's trained parameters (what is saved)."""

    def __init__(self, module: torch.nn.Module):
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, decay: float) -> None:
        for n, p in module.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1.0 - decay)

    def state_dict(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The module's full state dict (buffers such as the null-text constants included) with EMA weights."""
        out = {}
        for k, v in module.state_dict().items():
            out[k] = (self.shadow[k] if k in self.shadow else v).detach().float().cpu().clone()
        return out


def ema_decay_at(step: int, decay: float) -> float:
    return min(decay, (1.0 + step) / (10.0 + step))
