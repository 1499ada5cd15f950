"""The LoRA form of the domain model: a low-rank adapter on the base's own weights.

A LoRA-form domain model is the base UNet with
- a LoCon-style low-rank adapter on every Linear and Conv outside cross-attention
  (W' = W + (alpha / rank) * up @ down; convolutions get a down conv with the layer's kernel
  and a 1x1 up conv), optional bias differences (`diff_b`), and
- every cross-attention replaced by its calibrated constant, exactly as in the full form.

Key layout (what ComfyUI's LoRA loader, comfy/lora.py, reads as a LoRA of the diffusion model):

    diffusion_model.<module>.lora_down.weight   [rank, in, (kh, kw)]
    diffusion_model.<module>.lora_up.weight     [out, rank, (1, 1)]
    diffusion_model.<module>.alpha              scalar
    diffusion_model.<module>.diff_b             [out]   (bias difference: extraction, core's trainer)
    diffusion_model.<module>.diff               [weight shape]  (a full weight difference: core's trainer writes
                                                these for 1-D weights such as norm scales)
    diffusion_model.<block>.attn2.constant      [dim]   (ours; a LoRA loader skips it)

The constants exist only where the base has separate cross-attention blocks that the SD null-text
conversion replaces (SD1.x/2.x/SDXL). A LoRA without them (every DiT family: SD3, Flux, Chroma, Flux.2,
Lumina 2 / Z-Image, Qwen-Image, Wan; or a LoRA core's Train LoRA node wrote with empty captions) is
text-free by its training prompt: the domain pass feeds it the encoded empty prompt (sampling/conditioning.py).

At sampling time the adapter is a forward injection (`lora_modules.DomainInjection`): hooks add the
low-rank term to the layer outputs of the rows that belong to the domain pass, and the
blocks' `attn2` is swapped for a module that returns the constant on those rows, for the
duration of one forward call. The base weights are never rewritten, so one set of weights
serves u, the control term and the domain term, batched in one forward if the caller likes.

Plain torch; no ComfyUI import.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .nulltext import CONSTANT_NAME

KEY_PREFIX = "diffusion_model."
DOWN, UP, ALPHA, DIFF_B, DIFF = "lora_down.weight", "lora_up.weight", "alpha", "diff_b", "diff"
CROSS_ATTENTION = "attn2"
ADAPTED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LoRAFormatError(ValueError):
    """A LoRA-form domain file or adapter does not fit. The message names the fix."""


def is_adapted(name: str, module: nn.Module) -> bool:
    """Every Linear/Conv outside cross-attention (its weights are replaced by the constants)."""
    return isinstance(module, ADAPTED_TYPES) and CROSS_ATTENTION not in name.split(".")


def fits_module(name: str, module: nn.Module | None, a: "LayerAdapter") -> bool:
    """Whether an adapter can sit on `module`: a low-rank term needs an adapted Linear/Conv; a layer with only a
    full weight/bias difference (core's trainer: norm scales, biases) needs a module with that weight/bias."""
    if module is None:
        return False
    if a.down is not None:
        return is_adapted(name, module)
    return isinstance(getattr(module, "weight", None), torch.Tensor) or a.diff is None


def adapted_modules(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in unet.named_modules() if n and is_adapted(n, m)]


@dataclass
class LayerAdapter:
    down: torch.Tensor | None       # [r, in, *kernel] (Linear: [r, in]); None: no low-rank term (diff / diff_b only)
    up: torch.Tensor | None         # [out, r, 1, ...] (Linear: [out, r])
    alpha: float
    diff_b: torch.Tensor | None = None
    diff: torch.Tensor | None = None    # a full weight difference (core's trainer: 1-D weights such as norm scales)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0]) if self.down is not None else 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    def delta_weight(self, shape) -> torch.Tensor:
        """(alpha / rank) * up @ down (+ diff) in the layer's weight shape (float32), as ComfyUI's LoRA merge computes it."""
        out = torch.zeros(shape, dtype=torch.float32)
        if self.down is not None:
            out = out + (self.up.float().flatten(1) @ self.down.float().flatten(1)).reshape(shape) * self.scale
        if self.diff is not None:
            out = out + self.diff.float().reshape(shape)
        return out


@dataclass
class DomainLoRA:
    """The adapter of a LoRA-form domain model: per-layer low-rank terms + the null-text constants."""

    layers: dict[str, LayerAdapter]
    constants: dict[str, torch.Tensor]            # transformer block name -> constant vector
    rank: int = 0
    alpha: float = 0.0

    def to_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        def cast(t):
            return t.detach().to("cpu", dtype or t.dtype).contiguous()

        sd = {}
        for name, a in self.layers.items():
            if a.down is not None:
                sd[f"{KEY_PREFIX}{name}.{DOWN}"] = cast(a.down)
                sd[f"{KEY_PREFIX}{name}.{UP}"] = cast(a.up)
                sd[f"{KEY_PREFIX}{name}.{ALPHA}"] = torch.tensor(float(a.alpha))
            if a.diff is not None:
                sd[f"{KEY_PREFIX}{name}.{DIFF}"] = cast(a.diff)
            if a.diff_b is not None:
                sd[f"{KEY_PREFIX}{name}.{DIFF_B}"] = cast(a.diff_b)
        for block, c in self.constants.items():
            sd[f"{KEY_PREFIX}{block}.{CROSS_ATTENTION}.{CONSTANT_NAME}"] = c.detach().float().cpu().contiguous()
        return sd

    @property
    def text_free_by_constants(self) -> bool:
        """True: null-text constants replace cross-attention (SD); False: text-free by the empty prompt (DiTs)."""
        return bool(self.constants)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], where: str = "") -> "DomainLoRA":
        layers: dict[str, dict] = {}
        constants = {}
        const_suffix = f".{CROSS_ATTENTION}.{CONSTANT_NAME}"
        for key, t in sd.items():
            if not key.startswith(KEY_PREFIX):
                raise LoRAFormatError(f"{where}: unexpected key {key!r} (LoRA-form keys start with {KEY_PREFIX!r}).")
            k = key[len(KEY_PREFIX):]
            if k.endswith(const_suffix):
                constants[k[:-len(const_suffix)]] = t.float()
                continue
            for part in (DOWN, UP, ALPHA, DIFF_B, DIFF):
                if k.endswith("." + part):
                    layers.setdefault(k[:-len(part) - 1], {})[part] = t
                    break
            else:
                raise LoRAFormatError(f"{where}: unexpected key {key!r} in a LoRA-form domain file.")
        out = {}
        for name, parts in layers.items():
            if (DOWN in parts) != (UP in parts) or (ALPHA in parts and DOWN not in parts):
                raise LoRAFormatError(f"{where}: layer {name} lacks lora_down or lora_up; the file is incomplete.")
            down, up = parts.get(DOWN), parts.get(UP)
            if down is not None and up.shape[1] != down.shape[0]:
                raise LoRAFormatError(f"{where}: layer {name}: lora_up rank {up.shape[1]} != lora_down rank {down.shape[0]}.")
            alpha = float(parts[ALPHA]) if ALPHA in parts else float(down.shape[0]) if down is not None else 0.0
            out[name] = LayerAdapter(down, up, alpha, parts.get(DIFF_B), parts.get(DIFF))
        if not out and not constants:
            raise LoRAFormatError(f"{where}: no LoRA layers and no null-text constants: not a domain adapter.")
        ranks = {a.rank for a in out.values() if a.rank}
        alphas = {a.alpha for a in out.values() if a.rank}
        return cls(out, constants, rank=max(ranks) if ranks else 0, alpha=alphas.pop() if len(alphas) == 1 else 0.0)

    def check_fits(self, unet: nn.Module, where: str = "") -> None:
        """Raise LoRAFormatError unless every adapted layer and constant matches a module of `unet` (the base)."""
        modules = dict(unet.named_modules())
        problems = []
        for name, a in self.layers.items():
            m = modules.get(name)
            if not fits_module(name, m, a):
                problems.append(f"no adaptable layer {name}")
                continue
            w = getattr(m, "weight", None)
            if a.down is not None and (a.up.shape[0] != w.shape[0] or tuple(a.down.shape[1:]) != tuple(w.shape[1:])):
                problems.append(f"{name}: adapter {tuple(a.up.shape[:1]) + tuple(a.down.shape[1:])} vs weight {tuple(w.shape)}")
            if a.diff is not None and (w is None or tuple(a.diff.shape) != tuple(w.shape)):
                problems.append(f"{name}: weight difference {tuple(a.diff.shape)} vs weight "
                                f"{None if w is None else tuple(w.shape)}")
            if a.diff_b is not None and (getattr(m, "bias", None) is None or m.bias.shape != a.diff_b.shape):
                problems.append(f"{name}: bias difference does not fit")
        for block, c in self.constants.items():
            b = modules.get(block)
            attn2 = getattr(b, CROSS_ATTENTION, None)
            if b is None or attn2 is None:
                problems.append(f"no transformer block {block}")
            elif getattr(getattr(attn2, "to_out", [None])[0], "out_features", c.shape[0]) != c.shape[0]:
                problems.append(f"{block}: constant of size {c.shape[0]}")
        if problems:
            raise LoRAFormatError(f"{where} does not fit the connected base UNet ({'; '.join(problems[:3])}). "
                                  "Connect the checkpoint it was trained from.")


# ----------------------------------------------------------------------------- merging and extraction


def merge_into(state_dict: dict[str, torch.Tensor], lora: DomainLoRA) -> dict[str, torch.Tensor]:
    """Full-form null-text weights = a null-text state dict of the base + the adapter merged in (float32)."""
    out = {k: v.float().clone() for k, v in state_dict.items()}
    for name, a in lora.layers.items():
        if a.down is not None or a.diff is not None:
            w = out[f"{name}.weight"]
            out[f"{name}.weight"] = w + a.delta_weight(w.shape)
        if a.diff_b is not None:
            out[f"{name}.bias"] = out[f"{name}.bias"] + a.diff_b.float()
    for block, c in lora.constants.items():
        out[f"{block}.{CROSS_ATTENTION}.{CONSTANT_NAME}"] = c.float().clone()
    return out


@dataclass
class Extraction:
    lora: DomainLoRA
    relative_error: dict[int, float]      # rank -> ||ΔW - ΔW_r||_F / ||ΔW||_F over all adapted weights
    not_carried: float                    # ||Δ of parameters the LoRA form cannot hold|| / ||Δ of all parameters||
    not_carried_keys: list[str]


@torch.no_grad()
def extract(base_sd: dict[str, torch.Tensor], domain_sd: dict[str, torch.Tensor], adapted_names: Iterable[str],
            rank: int, report_ranks: Iterable[int] = (), alpha: float | None = None) -> Extraction:
    """Low-rank (SVD) approximation of a full-form domain UNet's difference from its base.

    `base_sd` is the base UNet's state dict, `domain_sd` the full-form null-text one, `adapted_names`
    the layers to adapt (see `adapted_modules`). Weight differences become rank-`rank` adapters (the
    optimum in Frobenius norm, per layer), bias differences are kept exactly (`diff_b`), the constants
    are copied. The relative error of the weight differences is reported for `rank` and every rank in
    `report_ranks` (one SVD serves them all).
    """
    alpha = float(rank if alpha is None else alpha)
    ranks = sorted({int(rank), *[int(r) for r in report_ranks]})
    if ranks[0] < 1:
        raise LoRAFormatError(f"rank must be >= 1 (got {ranks[0]}).")
    layers = {}
    residual = {r: 0.0 for r in ranks}
    total = 0.0
    used = set()
    for name in adapted_names:
        wkey, bkey = f"{name}.weight", f"{name}.bias"
        if wkey not in domain_sd or wkey not in base_sd:
            raise LoRAFormatError(f"layer {name} is missing from the base or the domain UNet; they do not match.")
        used.add(wkey)
        diff = (domain_sd[wkey].float() - base_sd[wkey].float())
        mat = diff.flatten(1)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        s2 = s.double() ** 2
        total += float(s2.sum())
        for r in ranks:
            residual[r] += float(s2[r:].sum())
        r = min(int(rank), s.shape[0])
        up = (u[:, :r] * s[:r]).contiguous()
        down = vh[:r].contiguous()
        if r < rank:  # keep one rank in the file: pad with zero directions
            up = torch.cat([up, up.new_zeros(up.shape[0], rank - r)], 1)
            down = torch.cat([down, down.new_zeros(rank - r, down.shape[1])], 0)
        up = up * (rank / alpha)  # the file's scale is alpha / rank
        kernel = tuple(diff.shape[2:])
        if kernel:
            down = down.reshape(rank, *diff.shape[1:])
            up = up.reshape(up.shape[0], rank, *([1] * len(kernel)))
        diff_b = None
        if bkey in domain_sd and bkey in base_sd:
            used.add(bkey)
            db = domain_sd[bkey].float() - base_sd[bkey].float()
            if float(db.abs().max()) > 0:
                diff_b = db
        layers[name] = LayerAdapter(down, up, alpha, diff_b)
    const_suffix = f".{CROSS_ATTENTION}.{CONSTANT_NAME}"
    constants = {k[:-len(const_suffix)]: v.float() for k, v in domain_sd.items() if k.endswith(const_suffix)}
    if not constants:
        raise LoRAFormatError("the domain UNet has no null-text constants: not a full-form domain UNet.")
    used.update(k for k in domain_sd if k.endswith(const_suffix))
    # what the LoRA form leaves at the base's values (norm layers etc.)
    rest_keys, rest, all_sq = [], 0.0, total
    for k, v in domain_sd.items():
        if k in used:
            if k.endswith(".bias"):
                all_sq += float(((v.float() - base_sd[k].float()) ** 2).sum())
            continue
        if k not in base_sd or base_sd[k].shape != v.shape:
            raise LoRAFormatError(f"{k} of the domain UNet has no counterpart in the base; they do not match.")
        d = float(((v.float() - base_sd[k].float()) ** 2).sum())
        if d > 0:
            rest_keys.append(k)
            rest += d
            all_sq += d
    rel = {r: (math.sqrt(residual[r] / total) if total > 0 else 0.0) for r in ranks}
    return Extraction(DomainLoRA(layers, constants, rank=int(rank), alpha=alpha), rel,
                      math.sqrt(rest / all_sq) if all_sq > 0 else 0.0, rest_keys)


def adapted_names_from_state(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """The adaptable layers of a UNet state dict, from names and shapes alone (Linear: 2-D weight,
    Conv: 3- to 5-D), cross-attention excluded: what `adapted_modules` finds on the module."""
    return [k[:-len(".weight")] for k, v in state_dict.items()
            if k.endswith(".weight") and 2 <= v.ndim <= 5 and CROSS_ATTENTION not in k.split(".")]
