"""The LoRA form's modules (plain torch, no ComfyUI import): the trainable `LoRALayer`s the trainer
optimises, and `DomainInjection`, the forward injection that runs the adapter and the constants on
the domain rows of one forward call of the base's own UNet. The file format and the maths of
adapters (merge, SVD extraction) are in lora.py.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .lora import CROSS_ATTENTION, LoRAFormatError, adapted_modules, LayerAdapter, DomainLoRA
from .nulltext import NullTextConstant


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

    # the wrapped layer's weight and bias, for model code that reads them from the layer it calls (0.33's
    # comfy.ops.linear_input_act in Wan's MLP reads `linear.weight` before calling it)
    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return getattr(self.base, "bias", None)

    def forward(self, x, *args, **kwargs):
        return self.base(x, *args, **kwargs) + low_rank_term(self.base, x, self.lora_down, self.lora_up,
                                                             self.alpha / self.rank)

    def adapter(self) -> LayerAdapter:
        return LayerAdapter(self.lora_down.detach().float().cpu(), self.lora_up.detach().float().cpu(), self.alpha)


ADAPTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def full_term(module: nn.Module, x: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """The output change of a Linear/Conv whose weight changes by `diff` (the layer is linear in its weight)."""
    if isinstance(module, nn.Linear):
        return F.linear(x, diff)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[diff.ndim - 2]
    return conv(x, diff, None, module.stride, module.padding, module.dilation, module.groups)


def rows_for(x: torch.Tensor, rows, batch: int | None, name: str = ""):
    """The index of `rows` (batch rows) in a layer input `x`. Most layers see the batch as dim 0; some see it
    flattened batch-major with k entries per row (Wan 2.2's per-token timesteps: [B * T] -> k = T): the rows
    expand to their k entries. A layer whose input is neither (e.g. something computed once for the whole batch)
    cannot carry a per-row adapter: refused by name instead of adapting the wrong rows."""
    if rows is None or batch is None or x.shape[0] == batch:
        return rows
    n = x.shape[0]
    if n % batch:
        raise RuntimeError(f"InDomain: the domain adapter's layer {name} sees an input of {n} rows in a batch of "
                           f"{batch}; it cannot tell the domain rows apart there. Turn off the one-batched-forward "
                           "path for this model (guider.one_forward = False) and report the model family.")
    k = n // batch
    idx = torch.arange(batch, device=x.device)[rows] if isinstance(rows, slice) else rows.to(x.device)
    return as_slice((idx.reshape(-1, 1) * k + torch.arange(k, device=x.device)).reshape(-1))


def pick_rows(v, sel, n: int):
    return v[sel] if sel is not None and isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n else v


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
    cross-attention (computed on the other rows only) elsewhere.

    The text-free domain model has no cross-attention, so neither does anything that replaces or feeds it
    there: core's attn2 "replace" patch (IP-Adapter and the like) computes q/k/v with `to_q/to_k/to_v`,
    calls the patch and projects with `to_out`; here those run on the other rows only (`to_q` etc. return
    just those rows, `to_out` puts the constant back on the domain rows), so the patch acts on the text
    branch exactly as without the domain pass and never on D. The caller hands the patch the other rows'
    `cond_or_uncond` (forms/lora.py), so a patch that splits the batch by it sees a consistent batch."""

    def __init__(self, attn2: nn.Module, constant: torch.Tensor, rows: torch.Tensor | slice | None):
        super().__init__()
        self.attn2 = attn2
        self.constant = constant
        self.rows = rows
        self._batch = None  # the batch size the replace-patch route (to_q ... to_out) started with
        self._kept = None

    def _keep(self, batch: int, device):
        """The other (non-domain) rows: a slice or an index tensor, possibly empty (computed once per batch size
        and device: the replace-patch route asks four times per block)."""
        key = (batch, device)
        if self._kept is not None and self._kept[0] == key:
            return self._kept[1]
        if self.rows is None:
            idx = slice(0, 0)
        else:
            keep = torch.ones(batch, dtype=torch.bool, device=device)
            keep[self.rows] = False
            idx = as_slice(keep.nonzero().reshape(-1))
            if isinstance(idx, torch.Tensor) and idx.numel() == 0:
                idx = slice(0, 0)
        self._kept = (key, idx)
        return idx

    def _constant(self, shape, like: torch.Tensor) -> torch.Tensor:
        c = self.constant.to(device=like.device, dtype=like.dtype)
        return c.expand(*shape, c.shape[0])

    def forward(self, x, context=None, value=None, mask=None, transformer_options=None, **kwargs):
        idx = self._keep(x.shape[0], x.device)
        if x[idx].shape[0] == 0:  # every row is a domain row
            return self._constant(x.shape[:-1], x)

        def pick(t):
            return t[idx] if isinstance(t, torch.Tensor) and t.shape[0] == x.shape[0] else t

        kw = dict(kwargs)
        if transformer_options is not None:
            kw["transformer_options"] = transformer_options
        real = self.attn2(x[idx], context=pick(context), value=pick(value), mask=pick(mask), **kw)
        out = self._constant(x.shape[:-1], x).clone()
        out[idx] = real.to(out.dtype)
        return out

    # -- core's attn2 replace-patch route: n = to_q(n); k = to_k(context); v = to_v(value); n = patch(...); to_out(n)
    def _pick(self, t: torch.Tensor, project) -> torch.Tensor:
        if self._batch is None or t.shape[0] != self._batch:
            return project(t)
        sub = t[self._keep(self._batch, t.device)]
        return project(sub) if sub.shape[0] else sub

    def to_q(self, x: torch.Tensor) -> torch.Tensor:
        self._batch = x.shape[0]
        return self._pick(x, self.attn2.to_q)

    def to_k(self, context: torch.Tensor) -> torch.Tensor:
        return self._pick(context, self.attn2.to_k)

    def to_v(self, value: torch.Tensor) -> torch.Tensor:
        return self._pick(value, self.attn2.to_v)

    def to_out(self, h: torch.Tensor) -> torch.Tensor:
        batch, self._batch = self._batch, None
        if batch is None or h.shape[0] == batch:  # not started by to_q here (or no domain rows): plain projection
            return self.attn2.to_out(h)
        if h.shape[0] == 0:  # every row is a domain row: the patch was not run
            return self._constant((batch, *h.shape[1:-1]), h).clone()
        real = self.attn2.to_out(h)
        out = self._constant((batch, *real.shape[1:-1]), real).clone()
        out[self._keep(batch, h.device)] = real
        return out


def as_slice(rows):
    """Consecutive row indices as a slice (indexing with it is a view, not a copy); anything else unchanged."""
    if not isinstance(rows, torch.Tensor) or rows.numel() == 0:
        return rows
    r = rows.reshape(-1).tolist()
    if r == list(range(r[0], r[0] + len(r))):
        return slice(r[0], r[0] + len(r))
    return rows


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
        self.applications = 0   # forward calls the adapter was applied to (a guard: a pass that saw none is refused)

    def _tensors(self, name: str, a: LayerAdapter, device, dtype):
        """The adapter of layer `name` on the sampling device and dtype: a copy cast once per sampling run and
        kept in this injection's cache; the file's tensors (`self.lora`, shared by every run of a cached loader
        output) are never changed."""
        key = (name, device, dtype)
        t = self._cast.get(key)
        if t is None:
            t = self._cast[key] = tuple(None if v is None else v.to(device=device, dtype=dtype)
                                        for v in (a.down, a.up, a.diff_b, a.diff))
        return t

    def _hook(self, name: str, a: LayerAdapter, rows, batch):
        busy = []  # set while the hook recomputes the layer itself (functional_call runs the hooks again)

        def hook(module, inputs, kwargs, output):
            if busy:
                return output
            x = inputs[0]
            down, up, diff_b, diff = self._tensors(name, a, x.device, x.dtype)
            sel = rows_for(x, rows, batch, name)
            xs = x if sel is None else x[sel]
            if diff is not None and not isinstance(module, ADAPTED):
                # a full weight difference on another kind of module (a norm's scale): recompute those rows with it
                params = {"weight": module.weight + diff.to(module.weight.dtype)}
                if diff_b is not None:
                    params["bias"] = module.bias + diff_b.to(module.bias.dtype)
                args = tuple(pick_rows(v, sel, x.shape[0]) for v in inputs)
                busy.append(True)
                try:
                    new = torch.func.functional_call(module, params, args, {k: pick_rows(v, sel, x.shape[0])
                                                                             for k, v in kwargs.items()})
                finally:
                    busy.clear()
                delta = new.to(output.dtype) - (output if sel is None else output[sel])
            else:
                delta = None
                if down is not None:
                    delta = low_rank_term(module, xs, down, up, a.scale)
                if diff is not None:
                    d = full_term(module, xs, diff)
                    delta = d if delta is None else delta + d
                if diff_b is not None:  # channels last (Linear, LayerNorm): [..., out]; Conv, GroupNorm: [B, out, *spatial]
                    channels_first = isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm))
                    b = diff_b.reshape(-1, *([1] * (output.ndim - 2))) if channels_first else diff_b
                    delta = b if delta is None else delta + b
                if delta is None:
                    return output
                delta = delta.to(output.dtype)
            if torch.is_grad_enabled():  # (sampling runs without grad; keep autograd's view of the output intact)
                if sel is None:
                    return output + delta
                out = output.clone()
                out[sel] = out[sel] + delta
                return out
            # the layer's output is a fresh tensor: add in place (no copy of the whole batch per layer)
            if sel is None:
                return output.add_(delta)
            output[sel] += delta
            return output
        return hook

    def clear_cache(self) -> None:
        """Drop the adapter copies cast to the sampling device/dtype (kept for one sampling run)."""
        self._cast.clear()

    @contextmanager
    def applied(self, unet: nn.Module, rows: torch.Tensor | None = None, batch: int | None = None):
        """`batch`: the forward's batch size, with `rows` (see rows_for: a layer whose input's first dimension is
        neither the batch nor a multiple of it cannot be split by rows, and is refused instead of mixed up)."""
        rows = as_slice(rows)
        modules = dict(unet.named_modules())
        handles, swapped = [], []
        self.applications += 1
        try:
            for name, a in self.lora.layers.items():
                handles.append(modules[name].register_forward_hook(self._hook(name, a, rows, batch), with_kwargs=True))
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
