"""The dtypes training runs in: bf16 where the CUDA device runs it natively, fp16 on older cards, and the dtype the LoRA
form's frozen base trains in (forms build the base in it; the trainer's mixed precision uses the same probe).
Plain torch: forms/ and training/ both import it."""
from __future__ import annotations

import inspect

import torch


def native_bf16_supported(probe=None) -> bool:
    """True when the CUDA device runs bf16 natively (Ampere or newer).

    torch.cuda.is_bf16_supported() also answers True where bf16 is only emulated (pre-Ampere cards, much
    slower than fp16); torch >= 2.3 can be asked to leave emulation out. `probe` defaults to that torch
    function (a parameter only so the choice can be checked without a GPU).
    """
    probe = probe or torch.cuda.is_bf16_supported
    try:
        params = inspect.signature(probe).parameters
    except (TypeError, ValueError):
        params = {}
    if "including_emulation" in params:
        return bool(probe(including_emulation=False))
    # older torch: no way to exclude emulation; require compute capability 8.0+ ourselves
    if not probe():
        return False
    major, _minor = torch.cuda.get_device_capability()
    return major >= 8


def auto_amp_dtype(probe=None) -> torch.dtype:
    """The autocast dtype "auto" mixed precision uses on CUDA: bf16 where native, else fp16 (with a GradScaler)."""
    return torch.bfloat16 if native_bf16_supported(probe) else torch.float16


HALF = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def base_dtype(base_precision: str, device: torch.device, weights_dtype=None, probe=None) -> torch.dtype:
    """The dtype the LoRA form's frozen base trains in (`base_precision`: auto | bf16 | fp16 | fp32).

    auto: the base's own dtype when it is already bf16/fp16 and the device runs it (no cast, no copy); else bf16
    where the device runs it natively (Ampere or newer; the CPU), fp16 on older GPUs (with a GradScaler).
    `weights_dtype`: the dtype the base is loaded in; `probe`: torch.cuda.is_bf16_supported (see gpu.py)."""
    if base_precision != "auto":
        return HALF[base_precision]
    if device.type == "cuda":
        native_bf16 = auto_amp_dtype(probe) == torch.bfloat16
        if weights_dtype == torch.float16 or (weights_dtype == torch.bfloat16 and native_bf16):
            return weights_dtype
        return torch.bfloat16 if native_bf16 else torch.float16
    if weights_dtype in (torch.bfloat16, torch.float16) and device.type != "cpu":
        return weights_dtype
    return torch.bfloat16  # CPU: bf16 matmuls have native kernels; fp16 ones are slow there
