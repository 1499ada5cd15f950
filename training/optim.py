"""What the loop wraps around the trainable module: EMA of the trained parameters, mixed precision,
gradient checkpointing, and turning ComfyUI's inference tensors into trainable ones."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from ..forms.precision import HALF, base_dtype  # noqa: F401  (re-exported)
from .gpu import auto_amp_dtype

log = logging.getLogger("indomain.training")


def materialise_(module: torch.nn.Module) -> torch.nn.Module:
    """Replace inference-mode tensors (ComfyUI executes nodes under torch.inference_mode) by ordinary
    ones, so autograd can use them. Ordinary tensors are kept as they are (the LoRA form's frozen base is the
    base's own storage, forms/model.shared_unet: copying it here would be the second copy it avoids)."""
    with torch.inference_mode(False):
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and p.is_inference():
                    m._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            for name, b in list(m._buffers.items()):
                if b is not None and b.is_inference():
                    m._buffers[name] = b.detach().clone()
    return module


def _on_copies(fn, *args, **kwargs):
    """fn on copies of its tensor arguments: a block that adds to its input in place (Flux's `img += ...`) must
    not change the input the checkpoint saved for recomputation."""
    def copy(v):
        return v.clone() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    return fn(*(copy(a) for a in args), **{k: copy(v) for k, v in kwargs.items()})


def enable_grad_checkpointing(unet: torch.nn.Module) -> int:
    """Recompute each UNet block's activations in the backward pass (less memory, ~30% slower)."""
    from torch.utils.checkpoint import checkpoint

    blocks = []
    # SD UNets: input/middle/output blocks; DiTs: their transformer block lists (SD3 joint_blocks, Flux
    # double/single_blocks, Wan blocks, Lumina layers/refiners, Qwen-Image transformer_blocks)
    for attr in ("joint_blocks", "double_blocks", "single_blocks", "blocks", "layers", "noise_refiner",
                 "context_refiner", "transformer_blocks"):
        lst = getattr(unet, attr, None)
        if isinstance(lst, torch.nn.ModuleList):
            blocks += list(lst)
    for attr in ("input_blocks", "output_blocks"):
        blocks += list(getattr(unet, attr, []) or [])
    mid = getattr(unet, "middle_block", None)
    if isinstance(mid, torch.nn.Module):
        blocks.append(mid)
    for b in blocks:
        inner = b.forward

        def fwd(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_on_copies, _inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        b.forward = fwd
    return len(blocks)


@contextmanager
def core_training_mode():
    """ComfyUI's own training flag for the duration of a run (newer cores, 0.33: `model_management.in_training`,
    which core's Train LoRA node sets): with it the DiTs' rotary embeddings run as differentiable torch code
    instead of comfy_kitchen kernels that have no backward. Cores without the flag: nothing to do."""
    import comfy.model_management as mm

    if not hasattr(mm, "in_training"):
        yield
        return
    before = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = before


def adds_in_place(model: torch.nn.Module) -> bool:
    """Diffusion models whose blocks add to their inputs in place (Flux, Chroma, Flux.2: `img += ...`), which
    autograd refuses to differentiate; their blocks are always checkpointed (recomputed in the backward pass),
    as core's Train LoRA node does for them."""
    return type(model).__module__.startswith(("comfy.ldm.flux", "comfy.ldm.chroma"))


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 dot products natively (x86 AVX512-BF16 or AMX-BF16, read from Linux's
    /proc/cpuinfo; oneDNN's own check also says yes for plain AVX-512, where bf16 is emulated). False elsewhere."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(mixed_precision: str, device: torch.device):
    """The autocast dtype for a `mixed_precision` setting on `device` (None: fp32)."""
    mp = mixed_precision
    if device.type != "cuda":
        # "auto" stays fp32 off CUDA. An explicit bf16 is honoured on a CPU with native bf16 (AVX512-BF16 / AMX:
        # about 2x faster than fp32 for the toy UNet); an earlier CPU without it ran bf16 autocast 15x slower than fp32
        if mp == "bf16" and device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        if mp in ("bf16", "fp16"):
            log.warning("InDomain training: %s autocast requested on %s, which has no native %s; training in fp32 "
                        "(emulated autocast runs many times slower)", mp, device.type, mp)
        return None
    if mp == "no":
        return None
    if mp == "auto":
        return auto_amp_dtype()  # bf16 only where the card runs it natively (training/gpu.py)
    return torch.bfloat16 if mp == "bf16" else torch.float16


def frozen_dtype(module: torch.nn.Module):
    """The dtype of a module's frozen floating-point weights when they are all bf16 or all fp16 (the LoRA form's
    half-precision base), else None."""
    dtypes = {p.dtype for p in module.parameters() if not p.requires_grad and p.is_floating_point()}
    if len(dtypes) == 1 and next(iter(dtypes)) in (torch.bfloat16, torch.float16):
        return next(iter(dtypes))
    return None


def grad_scaler(amp_dtype, device: torch.device):
    """fp16 needs loss scaling (its gradients underflow); bf16 and fp32 do not. On the CPU too (torch.amp)."""
    if amp_dtype != torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


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

    def state_dict(self, module: torch.nn.Module, keeps_key=None) -> dict[str, torch.Tensor]:
        """The module's state dict (buffers such as the null-text constants included) with EMA weights;
        only the keys `keeps_key` accepts (all by default), so frozen weights are never copied."""
        out = {}
        for k, v in module.state_dict().items():
            if keeps_key is not None and not keeps_key(k):
                continue
            out[k] = (self.shadow[k] if k in self.shadow else v).detach().float().cpu().clone()
        return out


def ema_decay_at(step: int, decay: float) -> float:
    return min(decay, (1.0 + step) / (10.0 + step))
