"""The LoRA form's modules (plain torch, no ComfyUI import): the trainable `LoRALayer`s the trainer
optimises, and `DomainInjection`, the forward injection that runs the adapter and the constants on
the domain rows of one forward call of the base's own UNet. The file format and the maths of
adapters (merge, SVD extraction) are in lora.py.
"""
from __future__ import annotations

import copy
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
    """The index of `rows` (batch rows: None, a slice or a 1-D index tensor on x's device) in a layer input `x`.
    Most layers see the batch as dim 0; some see it flattened batch-major with k entries per row (Wan 2.2's
    per-token timesteps: [B * T] -> k = T): the rows expand to their k entries. A layer whose input is neither
    (e.g. something computed once for the whole batch) cannot carry a per-row adapter: refused by name instead of
    adapting the wrong rows. Shapes only: nothing here reads a tensor's values (no host sync)."""
    if rows is None or batch is None or x.shape[0] == batch:
        return rows
    n = x.shape[0]
    if n % batch:
        raise RuntimeError(f"InDomain: the domain adapter's layer {name} sees an input of {n} rows in a batch of "
                           f"{batch}; it cannot tell the domain rows apart there. Turn off the one-batched-forward "
                           "path for this model (guider.one_forward = False) and report the model family.")
    k = n // batch
    if isinstance(rows, slice):
        start, stop, _ = rows.indices(batch)
        return slice(start * k, stop * k)
    return (rows.reshape(-1, 1) * k + torch.arange(k, device=rows.device)).reshape(-1)


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


class NestedInjectionError(RuntimeError):
    """A domain LoRA injection applied inside another on the same model: one forward call carries one injection
    (its rows are indices into that call's whole batch, which a second one would not see)."""


def row_spec(rows):
    """Batch rows as the injection keeps them, in Python: None (every row), a slice (consecutive rows) or a sorted
    tuple of ints. Ints, lists, tuples and slices are taken as they are; a tensor is read on the host once, here
    (the sampling path passes Python rows: forms/lora.py's rows_of)."""
    if rows is None or isinstance(rows, slice):
        return rows
    if isinstance(rows, torch.Tensor):
        rows = rows.reshape(-1).tolist()
    rows = tuple(sorted({int(r) for r in rows}))
    if not rows:
        return slice(0, 0)
    if rows == tuple(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return rows


def other_rows(rows, batch: int):
    """The rows of a batch of `batch` that are not in `rows` (a row_spec), as a row_spec. Python only."""
    if rows is None:
        return slice(0, 0)
    if isinstance(rows, slice):
        start, stop, _ = rows.indices(batch)
        if start >= stop:
            return slice(0, batch)
        if start == 0:
            return slice(stop, batch)
        if stop == batch:
            return slice(0, start)
        rows = range(start, stop)
    taken = set(rows)
    return row_spec(i for i in range(batch) if i not in taken)


def count_of(rows, batch: int) -> int:
    """How many rows a row_spec holds in a batch of `batch`."""
    if rows is None:
        return batch
    if isinstance(rows, slice):
        return len(range(*rows.indices(batch)))
    return len(rows)


class _RowConstantAttention(nn.Module):
    """Stands in for a block's attn2 for one forward call: the constant on the domain rows, the real
    cross-attention (computed on the other rows only) elsewhere.

    The text-free domain model has no cross-attention, so neither does anything that replaces or feeds it
    there: core's attn2 "replace" patch (IP-Adapter and the like) computes q/k/v with `to_q/to_k/to_v`,
    calls the patch and projects with `to_out`; here those run on the other rows only (`to_q` etc. return
    just those rows, `to_out` puts the constant back on the domain rows), so the patch acts on the text
    branch exactly as without the domain pass and never on D. The caller hands the patch the other rows'
    `cond_or_uncond` (forms/lora.py), so a patch that splits the batch by it sees a consistent batch.

    One instance per block and injection, kept across calls (a compiled graph sees the same module every step);
    the rows are Python (a slice or a tuple of ints, with the index tensor the injection built for a tuple), so
    the forward reads no tensor value on the host."""

    def __init__(self, attn2: nn.Module, constant: torch.Tensor, owner: "DomainInjection"):
        super().__init__()
        self.attn2 = attn2
        self.constant = constant
        self.rows = None
        self.owner = owner
        self._batch = None  # the batch size the replace-patch route (to_q ... to_out) started with

    def _keep(self, batch: int, device):
        """The other (non-domain) rows: a slice, or an index tensor (built once per rows and device)."""
        return self.owner.index(other_rows(self.rows, batch), device)

    def _constant(self, shape, like: torch.Tensor) -> torch.Tensor:
        c = self.constant.to(device=like.device, dtype=like.dtype)
        return c.expand(*shape, c.shape[0])

    def forward(self, x, context=None, value=None, mask=None, transformer_options=None, **kwargs):
        batch = x.shape[0]
        if count_of(other_rows(self.rows, batch), batch) == 0:  # every row is a domain row
            return self._constant(x.shape[:-1], x)
        idx = self._keep(batch, x.device)

        def pick(t):
            return t[idx] if isinstance(t, torch.Tensor) and t.shape[0] == batch else t

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
    """Consecutive row indices as a slice (indexing with it is a view, not a copy); anything else unchanged.
    Reads a tensor on the host: not for the sampling path (see row_spec)."""
    if not isinstance(rows, torch.Tensor) or rows.numel() == 0:
        return rows
    r = rows.reshape(-1).tolist()
    if r == list(range(r[0], r[0] + len(r))):
        return slice(r[0], r[0] + len(r))
    return rows


class _LayerState:
    """What an adapted layer needs during one forward call (kept per layer and injection across calls, so a
    compiled graph sees the same objects every step): the adapter tensors cast for the call's device and dtype,
    the rows (None, a slice, or an index tensor on the device) and the batch size."""

    def __init__(self, owner: "DomainInjection", name: str, adapter: LayerAdapter, module: nn.Module):
        self.owner, self.name, self.adapter = owner, name, adapter
        self.rows = None
        self.batch = None
        self.tensors = None       # (down, up, diff_b, diff) on the device/dtype the call was prepared for
        self.twin = None          # a full weight difference on another kind of module (a norm): its own-class copy
        if adapter.diff is not None and not isinstance(module, ADAPTED):
            twin = copy.copy(module)
            twin.__class__ = getattr(module, "_indomain_original_class", type(module))
            twin.__dict__.pop("_indomain", None)
            twin.__dict__["_parameters"] = dict(module._parameters)  # its own: functional_call swaps the twin's only
            self.twin = twin

    def tensors_for(self, x: torch.Tensor):
        """The adapter tensors for input `x`: those prepared for the call when they match its device and dtype
        (the usual case), else a cast of their own (cached by the injection)."""
        t = self.tensors
        if t is not None:
            for v in t:
                if v is not None:
                    if v.dtype == x.dtype and v.device == x.device:
                        return t
                    break
        return self.owner._tensors(self.name, self.adapter, x.device, x.dtype)

    def apply(self, module: nn.Module, inputs: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        a = self.adapter
        x = inputs[0] if inputs else next(iter(kwargs.values()))
        down, up, diff_b, diff = self.tensors_for(x)
        sel = rows_for(x, self.rows, self.batch, self.name)
        xs = x if sel is None else x[sel]
        if self.twin is not None:
            # a full weight difference on another kind of module (a norm's scale): recompute those rows with it
            params = dict(module._parameters)
            params["weight"] = module.weight + diff.to(module.weight.dtype)
            if diff_b is not None:
                params["bias"] = module.bias + diff_b.to(module.bias.dtype)
            args = tuple(pick_rows(v, sel, x.shape[0]) for v in inputs)
            new = torch.func.functional_call(self.twin, params, args,
                                             {k: pick_rows(v, sel, x.shape[0]) for k, v in kwargs.items()})
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


def _adapted_forward(self, *args, **kwargs):
    output = self._indomain_original_class.forward(self, *args, **kwargs)
    return self._indomain.apply(self, args, kwargs, output)


_ADAPTED_CLASSES: dict[type, type] = {}


def adapted_class(cls: type) -> type:
    """`cls` with the domain adapter added to its forward's output (one subclass per layer class, made once). An
    adapted layer's `__class__` is this class for the duration of one forward call: no hook, and a compiled graph
    traces the adapter with the layer."""
    sub = _ADAPTED_CLASSES.get(cls)
    if sub is None:
        sub = _ADAPTED_CLASSES[cls] = type(f"InDomainAdapted{cls.__name__}", (cls,),
                                           {"forward": _adapted_forward, "_indomain_original_class": cls,
                                            "__module__": __name__})
    return sub


class DomainInjection:
    """Applies a DomainLoRA to some rows of a base UNet's forward, weights untouched.

    `with injection.applied(unet, rows, batch):` — rows are the batch rows that belong to the domain pass (a
    slice, a sequence of ints, or None for all rows; a tensor is read once). Inside, every adapted layer's class
    is swapped for its `adapted_class` (the layer's forward plus the low-rank term and bias difference on those
    rows' outputs), and every transformer block's attn2 for a module that answers with its constant on those
    rows. Everything is put back on exit. Nothing in the forward reads a tensor's value on the host, and the
    per-layer objects are kept across calls, so the forward has no host sync and a compiled graph (core's
    TorchCompileModel) is traced once with the adapter in it.
    """

    def __init__(self, lora: DomainLoRA):
        self.lora = lora
        self._cast: dict = {}
        self._states: dict = {}     # id(unet) -> (unet, {name: (module, _LayerState)}, {block: (module, attention)})
        self._indices: dict = {}    # (rows tuple, device) -> index tensor
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

    def index(self, rows, device):
        """A row_spec as something to index with: a slice or None as it is, a tuple of ints as an index tensor on
        `device` (built once per rows and device, outside any per-layer path)."""
        if not isinstance(rows, tuple):
            return rows
        key = (rows, torch.device(device))
        t = self._indices.get(key)
        if t is None:
            t = self._indices[key] = torch.tensor(rows, dtype=torch.long, device=device)
        return t

    def clear_cache(self) -> None:
        """Drop the adapter copies cast to the sampling device/dtype (kept for one sampling run)."""
        self._cast.clear()
        self._states.clear()
        self._indices.clear()

    def _prepared(self, unet: nn.Module):
        entry = self._states.get(id(unet))
        if entry is None or entry[0] is not unet:
            modules = dict(unet.named_modules())
            layers = {}
            for name, a in self.lora.layers.items():
                m = modules[name]
                layers[name] = (m, _LayerState(self, name, a, m))
            blocks = {block: (modules[block], _RowConstantAttention(modules[block].attn2, c, self))
                      for block, c in self.lora.constants.items()}
            entry = self._states[id(unet)] = (unet, layers, blocks)
        return entry

    @contextmanager
    def applied(self, unet: nn.Module, rows=None, batch: int | None = None, device=None, dtype=None):
        """`batch`: the forward's batch size, with `rows` (see rows_for: a layer whose input's first dimension is
        neither the batch nor a multiple of it cannot be split by rows, and is refused instead of mixed up).
        `device`, `dtype`: what the layers will see (the adapter is cast to them here, once per run; a layer that
        sees another dtype gets its own cast). A unet that already carries an injection raises
        NestedInjectionError."""
        rows = row_spec(rows)
        _unet, layers, blocks = self._prepared(unet)
        for name, (m, _state) in layers.items():
            if hasattr(m, "_indomain"):
                raise NestedInjectionError(
                    f"InDomain: a domain LoRA injection is already applied to this model (layer {name}); one forward "
                    "call carries one. Sample the second LoRA-form domain model in its own call "
                    "(guider.one_forward = False) and report the workflow.")
        for block, (b, attention) in blocks.items():
            if isinstance(b.attn2, _RowConstantAttention):
                raise NestedInjectionError(
                    f"InDomain: a domain LoRA injection is already applied to this model (block {block}); one "
                    "forward call carries one.")
        if isinstance(rows, tuple):  # an index tensor, built once per rows and device
            where = device if device is not None else next(unet.parameters()).device
            index = self.index(rows, where)
        else:
            index = rows
        self.applications += 1
        done, swapped = [], []
        try:
            for name, (m, state) in layers.items():
                state.rows = index
                state.batch = batch
                state.tensors = (self._tensors(name, state.adapter, device, dtype)
                                 if device is not None and dtype is not None else None)
                m._indomain = state
                m.__class__ = adapted_class(type(m))
                done.append(m)
            for block, (b, attention) in blocks.items():
                attention.attn2 = b.attn2
                attention.rows = rows
                swapped.append((b, b.attn2))
                b.attn2 = attention
            yield
        finally:
            for m in done:
                m.__class__ = m._indomain_original_class
                del m._indomain
            for b, attn2 in swapped:
                b.attn2 = attn2
