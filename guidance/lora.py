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
    diffusion_model.<module>.diff_b             [out]   (only from extraction: bias difference)
    diffusion_model.<block>.attn2.constant      [dim]   (ours; a LoRA loader skips it)

At sampling time the adapter is a forward injection (`DomainInjection`): hooks add the
low-rank term to the layer outputs of the rows that belong to the domain pass, and the
blocks' `attn2` is swapped for a module that returns the constant on those rows, for the
duration of one forward call. The base weights are never rewritten, so one set of weights
serves u, the control term and the domain term, batched in one forward if the caller likes.

Plain torch; no ComfyUI import.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .nulltext import CONSTANT_NAME, NullTextConstant

KEY_PREFIX = "diffusion_model."
DOWN, UP, ALPHA, DIFF_B = "lora_down.weight", "lora_up.weight", "alpha", "diff_b"
CROSS_ATTENTION = "attn2"
ADAPTED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LoRAFormatError(ValueError):
    """A LoRA-form domain file or adapter does not fit. The message names the fix."""


def is_adapted(name: str, module: nn.Module) -> bool:
    """Every Linear/Conv outside cross-attention (its weights are replaced by the constants)."""
    return isinstance(module, ADAPTED_TYPES) and CROSS_ATTENTION not in name.split(".")


def adapted_modules(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in unet.named_modules() if n and is_adapted(n, m)]


@dataclass
class LayerAdapter:
    down: torch.Tensor              # [r, in, *kernel] (Linear: [r, in])
    up: torch.Tensor                # [out, r, 1, ...] (Linear: [out, r])
    alpha: float
    diff_b: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta_weight(self, shape) -> torch.Tensor:
        """(alpha / rank) * up @ down in the layer's weight shape (float32), as ComfyUI's LoRA merge computes it."""
        return (self.up.float().flatten(1) @ self.down.float().flatten(1)).reshape(shape) * self.scale


@dataclass
class DomainLoRA:
    """The adapter of a LoRA-form domain model: per-layer low-rank terms + the null-text constants."""

    layers: dict[str, LayerAdapter]
    constants: dict[str, torch.Tensor]            # transformer block name -> constant vector
    rank: int = 0
    alpha: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        def cast(t):
            return t.detach().to("cpu", dtype or t.dtype).contiguous()

        sd = {}
        for name, a in self.layers.items():
            sd[f"{KEY_PREFIX}{name}.{DOWN}"] = cast(a.down)
            sd[f"{KEY_PREFIX}{name}.{UP}"] = cast(a.up)
            sd[f"{KEY_PREFIX}{name}.{ALPHA}"] = torch.tensor(float(a.alpha))
            if a.diff_b is not None:
                sd[f"{KEY_PREFIX}{name}.{DIFF_B}"] = cast(a.diff_b)
        for block, c in self.constants.items():
            sd[f"{KEY_PREFIX}{block}.{CROSS_ATTENTION}.{CONSTANT_NAME}"] = c.detach().float().cpu().contiguous()
        return sd

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
            for part in (DOWN, UP, ALPHA, DIFF_B):
                if k.endswith("." + part):
                    layers.setdefault(k[:-len(part) - 1], {})[part] = t
                    break
            else:
                raise LoRAFormatError(f"{where}: unexpected key {key!r} in a LoRA-form domain file.")
        out = {}
        for name, parts in layers.items():
            if DOWN not in parts or UP not in parts:
                raise LoRAFormatError(f"{where}: layer {name} lacks lora_down or lora_up; the file is incomplete.")
            down, up = parts[DOWN], parts[UP]
            if up.shape[1] != down.shape[0]:
                raise LoRAFormatError(f"{where}: layer {name}: lora_up rank {up.shape[1]} != lora_down rank {down.shape[0]}.")
            alpha = float(parts[ALPHA]) if ALPHA in parts else float(down.shape[0])
            out[name] = LayerAdapter(down, up, alpha, parts.get(DIFF_B))
        if not constants:
            raise LoRAFormatError(f"{where}: no '<block>.attn2.{CONSTANT_NAME}' tensors: not a null-text domain adapter.")
        ranks = {a.rank for a in out.values()}
        alphas = {a.alpha for a in out.values()}
        return cls(out, constants, rank=max(ranks) if ranks else 0, alpha=alphas.pop() if len(alphas) == 1 else 0.0)

    def check_fits(self, unet: nn.Module, where: str = "") -> None:
        """Raise LoRAFormatError unless every adapted layer and constant matches a module of `unet` (the base)."""
        modules = dict(unet.named_modules())
        problems = []
        for name, a in self.layers.items():
            m = modules.get(name)
            if m is None or not is_adapted(name, m):
                problems.append(f"no adaptable layer {name}")
                continue
            w = m.weight
            if a.up.shape[0] != w.shape[0] or tuple(a.down.shape[1:]) != tuple(w.shape[1:]):
                problems.append(f"{name}: adapter {tuple(a.up.shape[:1]) + tuple(a.down.shape[1:])} vs weight {tuple(w.shape)}")
            if a.diff_b is not None and (m.bias is None or m.bias.shape != a.diff_b.shape):
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


# ----------------------------------------------------------------------------- training modules


class LoRALayer(nn.Module):
    """base(x) + (alpha / rank) * up(down(x)) with the base frozen: what the trainer optimises."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.rank, self.alpha = int(rank), float(alpha)
        w = base.weight
        if isinstance(base, nn.Linear):
            down_shape, up_shape = (rank, w.shape[1]), (w.shape[0], rank)
        else:
            down_shape, up_shape = (rank, *w.shape[1:]), (w.shape[0], rank, *([1] * (w.ndim - 2)))
        down = torch.empty(down_shape, dtype=torch.float32)
        # kaiming-uniform (a=sqrt(5)) like nn.Linear's default, from the caller's generator; up starts at
        # zero so the adapted model equals the (null-text) base at step 0
        bound = 1.0 / math.sqrt(down[0].numel())
        down.uniform_(-bound, bound, generator=generator)
        self.lora_down = nn.Parameter(down.to(w.device))
        self.lora_up = nn.Parameter(torch.zeros(up_shape, device=w.device))
        for p in base.parameters():
            p.requires_grad_(False)

    def forward(self, x, *args, **kwargs):
        return self.base(x, *args, **kwargs) + low_rank_term(self.base, x, self.lora_down, self.lora_up,
                                                             self.alpha / self.rank)

    def adapter(self) -> LayerAdapter:
        return LayerAdapter(self.lora_down.detach().float().cpu(), self.lora_up.detach().float().cpu(), self.alpha)


def low_rank_term(module: nn.Module, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return F.linear(F.linear(x, down), up) * scale
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[down.ndim - 2]
    h = conv(x, down, None, module.stride, module.padding, module.dilation, module.groups)
    return conv(h, up) * scale


def add_lora_layers(unet: nn.Module, rank: int, alpha: float | None = None, seed: int = 0) -> list[str]:
    """Wrap every adaptable layer of `unet` (in place) in a LoRALayer; only the adapters require grad.

    Returns the adapted layer names (the names in `unet` before wrapping, which are the file's names).
    """
    if rank < 1:
        raise LoRAFormatError(f"rank must be >= 1 (got {rank}).")
    alpha = float(rank if alpha is None else alpha)
    for p in unet.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(int(seed))
    names = [n for n, _ in adapted_modules(unet)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        setattr(parent, child, LoRALayer(getattr(parent, child), rank, alpha, gen))
    return names


def lora_layers(unet: nn.Module) -> dict[str, LoRALayer]:
    return {n: m for n, m in unet.named_modules() if isinstance(m, LoRALayer)}


def collect_adapter(unet: nn.Module, constants: dict[str, torch.Tensor] | None = None) -> DomainLoRA:
    """The DomainLoRA of a UNet wrapped by add_lora_layers (constants read from its NullTextConstants)."""
    layers = {n: m.adapter() for n, m in lora_layers(unet).items()}
    if constants is None:
        constants = {n: m.attn2.constant.detach().float().cpu() for n, m in unet.named_modules()
                     if isinstance(getattr(m, CROSS_ATTENTION, None), NullTextConstant)}
    any_layer = next(iter(lora_layers(unet).values()), None)
    return DomainLoRA(layers, constants, rank=any_layer.rank if any_layer else 0,
                      alpha=any_layer.alpha if any_layer else 0.0)


# ----------------------------------------------------------------------------- sampling-time injection


class _RowConstantAttention(nn.Module):
    """Stands in for a block's attn2 for one forward call: the constant on the domain rows, the real
    cross-attention (computed on the other rows only) elsewhere."""

    def __init__(self, attn2: nn.Module, constant: torch.Tensor, rows: torch.Tensor | None):
        super().__init__()
        self.attn2 = attn2
        self.constant = constant
        self.rows = rows

    def forward(self, x, context=None, value=None, mask=None, transformer_options=None, **kwargs):
        c = self.constant.to(device=x.device, dtype=x.dtype)
        if self.rows is None:
            return c.expand(*x.shape[:-1], c.shape[0])
        keep = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        keep[self.rows] = False
        idx = keep.nonzero().reshape(-1)

        def pick(t):
            return t[idx] if isinstance(t, torch.Tensor) and t.shape[0] == x.shape[0] else t

        kw = dict(kwargs)
        if transformer_options is not None:
            kw["transformer_options"] = transformer_options
        real = self.attn2(x[idx], context=pick(context), value=pick(value), mask=pick(mask), **kw)
        out = c.expand(*x.shape[:-1], c.shape[0]).clone()
        out[idx] = real.to(out.dtype)
        return out


class DomainInjection:
    """Applies a DomainLoRA to some rows of a base UNet's forward, weights untouched.

    `with injection.applied(unet, rows):` — rows is a 1-D index tensor of batch rows that belong to
    the domain pass, or None for all rows. Inside, forward hooks add the low-rank term (and bias
    difference) to those rows' outputs of every adapted layer, and every transformer block's attn2
    answers with its constant on those rows. Everything is removed on exit.
    """

    def __init__(self, lora: DomainLoRA):
        self.lora = lora
        self._cast: dict = {}

    def _tensors(self, name: str, a: LayerAdapter, device, dtype):
        key = (name, device, dtype)
        t = self._cast.get(key)
        if t is None:
            t = (a.down.to(device=device, dtype=dtype), a.up.to(device=device, dtype=dtype),
                 None if a.diff_b is None else a.diff_b.to(device=device, dtype=dtype))
            self._cast[key] = t
        return t

    def _hook(self, name: str, a: LayerAdapter, rows):
        def hook(module, inputs, output):
            x = inputs[0]
            down, up, diff_b = self._tensors(name, a, x.device, x.dtype)
            xs = x if rows is None else x[rows]
            delta = low_rank_term(module, xs, down, up, a.scale)
            if diff_b is not None:  # Linear: [..., out]; Conv: [B, out, *spatial]
                delta = delta + (diff_b if isinstance(module, nn.Linear) else diff_b.reshape(-1, *([1] * (delta.ndim - 2))))
            if rows is None:
                return output + delta.to(output.dtype)
            out = output.clone()
            out[rows] = out[rows] + delta.to(out.dtype)
            return out
        return hook

    def clear_cache(self) -> None:
        """Drop the adapter copies cast to the sampling device/dtype (kept for one sampling run)."""
        self._cast.clear()

    @contextmanager
    def applied(self, unet: nn.Module, rows: torch.Tensor | None = None):
        modules = dict(unet.named_modules())
        handles, swapped = [], []
        try:
            for name, a in self.lora.layers.items():
                handles.append(modules[name].register_forward_hook(self._hook(name, a, rows)))
            for block, c in self.lora.constants.items():
                b = modules[block]
                swapped.append((b, b.attn2))
                b.attn2 = _RowConstantAttention(b.attn2, c, rows)
            yield
        finally:
            for h in handles:
                h.remove()
            for b, attn2 in swapped:
                b.attn2 = attn2


def adapted_names_from_state(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """The adaptable layers of a UNet state dict, from names and shapes alone (Linear: 2-D weight,
    Conv: 3- to 5-D), cross-attention excluded: what `adapted_modules` finds on the module."""
    return [k[:-len(".weight")] for k, v in state_dict.items()
            if k.endswith(".weight") and 2 <= v.ndim <= 5 and CROSS_ATTENTION not in k.split(".")]
