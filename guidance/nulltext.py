"""The text-free ("null-text") domain UNet.

A copy of the base UNet in which every cross-attention `attn2` is replaced by a constant
per-layer vector and the LayerNorm feeding it (`norm2`) is dropped. The constant of a layer
is the mean, over batch and positions, of that layer's cross-attention output when the base
model sees the empty-prompt embedding on calibration inputs (noisy latents at several noise
levels). So at initialisation the domain UNet reproduces the base model's average response
to "no text", and it never needs a text encoder afterwards.

Works on any module tree whose transformer blocks have `attn1`, `attn2`, `norm2` (ComfyUI's
BasicTransformerBlock; diffusers' blocks have the same names). No ComfyUI import here.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

CONSTANT_NAME = "constant"


class NullTextConstant(nn.Module):
    """Stands in for a cross-attention layer: returns a fixed vector at every position.

    Accepts (and ignores) the cross-attention call signature (context, value, mask,
    transformer_options) so the surrounding block runs unchanged.
    """

    def __init__(self, dim: int, value: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer(CONSTANT_NAME, torch.zeros(dim) if value is None else value.detach().clone().reshape(dim))

    def forward(self, x, context=None, value=None, mask=None, transformer_options=None, **kwargs):
        return self.constant.to(device=x.device, dtype=x.dtype).expand(*x.shape[:-1], self.constant.shape[0])

    def extra_repr(self) -> str:
        return f"dim={self.constant.shape[0]}"


def is_cross_attention_block(module: nn.Module) -> bool:
    attn2 = getattr(module, "attn2", None)
    return (
        hasattr(module, "attn1")
        and isinstance(attn2, nn.Module)
        and not isinstance(attn2, NullTextConstant)
        and isinstance(getattr(module, "norm2", None), nn.Module)
        and not getattr(module, "switch_temporal_ca_to_sa", False)
    )


def cross_attention_blocks(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) for every transformer block with a real cross-attention, in module order."""
    return [(name, m) for name, m in unet.named_modules() if is_cross_attention_block(m)]


def null_text_blocks(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in unet.named_modules() if isinstance(getattr(m, "attn2", None), NullTextConstant)]


def is_null_text(unet: nn.Module) -> bool:
    return len(null_text_blocks(unet)) > 0 and len(cross_attention_blocks(unet)) == 0


def _block_dim(block: nn.Module) -> int:
    w = getattr(block.norm2, "weight", None)
    if w is not None:
        return int(w.shape[0])
    return int(block.norm2.normalized_shape[0])


@torch.no_grad()
def calibrate_constants(unet: nn.Module, run: Callable[[object], object], batches: Iterable[object]) -> dict[str, torch.Tensor]:
    """Mean cross-attention output per block over all calibration batches (float32, on CPU).

    `run(batch)` must call the base UNet forward on one calibration batch with the
    empty-prompt context (the caller owns timesteps, conditioning and dtype). Hooks on every
    `attn2` record the output; the mean is over batch and positions, weighted by element count.
    """
    blocks = cross_attention_blocks(unet)
    if not blocks:
        raise ValueError("calibrate_constants: this UNet has no cross-attention blocks (already null-text?)")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    def make_hook(name):
        def hook(_module, _inputs, output):
            out = output.detach().float()
            flat = out.reshape(-1, out.shape[-1])
            sums[name] = sums.get(name, 0) + flat.sum(dim=0).cpu()
            counts[name] = counts.get(name, 0) + flat.shape[0]
        return hook

    for name, block in blocks:
        handles.append(block.attn2.register_forward_hook(make_hook(name)))
    try:
        n = 0
        for batch in batches:
            run(batch)
            n += 1
    finally:
        for h in handles:
            h.remove()
    if n == 0:
        raise ValueError("calibrate_constants: no calibration batches were given")
    missing = [name for name, _ in blocks if name not in sums]
    if missing:
        raise RuntimeError(f"calibration never reached these cross-attention layers: {missing[:5]} "
                           "(the run function must call the UNet's forward)")
    constants = {name: sums[name] / counts[name] for name, _ in blocks}
    for name, value in constants.items():
        if not torch.isfinite(value).all():
            raise FloatingPointError(f"calibration produced non-finite constants for {name}; check the base weights")
    return constants


def convert_to_null_text(unet: nn.Module, constants: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Replace attn2 by NullTextConstant and norm2 by Identity in every cross-attention block (in place).

    With `constants=None` the constants start at zero (use when a state dict will be loaded
    next). Otherwise every block must have a calibrated constant: a missing one is an error,
    never a silent zero (the reference implementation's bug).
    """
    blocks = cross_attention_blocks(unet)
    if constants is not None:
        missing = [name for name, _ in blocks if name not in constants]
        if missing:
            raise KeyError(f"no calibrated constant for blocks {missing[:5]}")
    for name, block in blocks:
        dim = _block_dim(block)
        ref = next(block.attn2.parameters(), None)
        value = None if constants is None else constants[name].float()
        const = NullTextConstant(dim, value)
        if ref is not None:
            const = const.to(device=ref.device)
        block.attn2 = const
        block.norm2 = nn.Identity()
    return unet


def null_text_key_shapes(base_shapes: dict[str, tuple], block_names: Iterable[str], dims: dict[str, int]) -> dict[str, tuple]:
    """The state-dict layout (key -> shape) of the null-text version of a UNet with `base_shapes`."""
    out = dict(base_shapes)
    for name in block_names:
        prefix = f"{name}." if name else ""
        for k in list(out):
            if k.startswith(prefix + "attn2.") or k.startswith(prefix + "norm2."):
                del out[k]
        out[f"{prefix}attn2.{CONSTANT_NAME}"] = (dims[name],)
    return out


def expected_null_text_shapes(base_unet: nn.Module) -> dict[str, tuple]:
    """Key -> shape a domain UNet made from `base_unet` must have (no tensor data touched)."""
    shapes = {k: tuple(v.shape) for k, v in base_unet.state_dict().items()}
    blocks = cross_attention_blocks(base_unet)
    return null_text_key_shapes(shapes, [n for n, _ in blocks], {n: _block_dim(b) for n, b in blocks})
