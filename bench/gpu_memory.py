"""Computed GPU memory of domain-model training, per form and family: which card sizes it fits.

COMPUTED, not measured: parameter counts come from ComfyUI's own model classes built on the meta device (no
weights, no downloads) at each family's full size; memory is bytes per parameter times those counts:

  form                                      frozen base        trained weights (per parameter)
  LoRA form, half base (this pack, default) 2 B (bf16/fp16)    adapter: 4 weight + 4 grad + 8 AdamW + 4 EMA = 20 B
  LoRA form, fp32 base (base_precision fp32, the pack before issue 24)   4 B   adapter: 20 B
  full form (the paper's null-text UNet)    -                  every weight: 4 + 4 + 8 + 4 = 20 B
  core Train LoRA node (defaults, bf16)     2 B                adapter in bf16: 2 weight + 2 grad + 4 AdamW = 8 B

The adapter is rank 32 (the pack's default) on the layers each form adapts: SD1.5 / SDXL every Linear/Conv
outside cross-attention (the null-text form has none), DiTs every Linear/Conv. Core's node adapts every
Linear/Conv too (cross-attention included); its count here uses the same rank. Activations are EXCLUDED (they
depend on resolution, batch and gradient checkpointing): a form "fits" a card when these weights take at most
70% of it, leaving the rest for activations, the CUDA context and the allocator. Cards: 8/12/16/24/48/80 GiB.

    python -m indomain.bench.gpu_memory            # SD1.5, SDXL, Wan 2.1 14B, Qwen-Image
    python -m indomain.bench.gpu_memory --fast     # SD1.5 and SDXL only (the test suite)
"""
from __future__ import annotations

import sys
import time

import torch

from . import common

RANK = 32
CARDS_GIB = (8, 12, 16, 24, 48, 80)
FIT_FRACTION = 0.70
GIB = 2 ** 30

FORMS = {
    # name: (bytes per frozen base parameter, bytes per trained parameter, what is trained)
    "lora_half": (2, 20, "adapter"),
    "lora_fp32_base": (4, 20, "adapter"),
    "full": (0, 20, "all"),
    "core_train_lora": (2, 8, "adapter_all"),
}
FORM_LABELS = {
    "lora_half": "InDomain LoRA form, bf16/fp16 base (default)",
    "lora_fp32_base": "InDomain LoRA form, fp32 base (before issue 24)",
    "full": "InDomain full form (null-text UNet)",
    "core_train_lora": "core Train LoRA node (bf16 defaults)",
}

SDXL_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4],
    transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
    transformer_depth_middle=10, context_dim=2048, num_head_channels=64, num_heads=-1, adm_in_channels=2816,
    num_classes="sequential", use_linear_in_transformer=True, use_spatial_transformer=True, legacy=False,
    use_temporal_attention=False, dims=2, use_checkpoint=False,
)


def log(msg: str) -> None:
    print(f"[gpu_memory {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_meta(family: str) -> torch.nn.Module:
    """The family's diffusion model at full size on the meta device (shapes only)."""
    from ..devkit import host

    host.import_comfy()
    import comfy.ops

    ops = comfy.ops.disable_weight_init
    with torch.device("meta"):
        if family == "SD1.5":
            from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

            from .sampling import SD15_FULL_UNET

            return UNetModel(**SD15_FULL_UNET, device="meta", operations=ops)
        if family == "SDXL":
            from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

            return UNetModel(**SDXL_UNET, device="meta", operations=ops)
        if family == "Wan 2.1 14B":
            from comfy.ldm.wan.model import WanModel

            return WanModel(model_type="t2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=16,
                            out_dim=16, text_dim=4096, freq_dim=256, device="meta", operations=ops)
        if family == "Qwen-Image":
            from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

            return QwenImageTransformer2DModel(device="meta", operations=ops)
    raise ValueError(family)


def adapter_params(layers, rank: int) -> int:
    """Parameters of a rank-`rank` LoCon adapter (down: rank x in*k, up: out x rank) on these Linear/Conv layers."""
    n = 0
    for m in layers:
        w = m.weight
        fan_in = w[0].numel() if isinstance(m, torch.nn.Linear) else w[0].numel()
        n += rank * fan_in + w.shape[0] * rank
    return n


def counts(family: str, rank: int = RANK) -> dict:
    from ..guidance.lora import adapted_modules
    from ..guidance.nulltext import cross_attention_blocks

    unet = build_meta(family)
    base = sum(p.numel() for p in unet.parameters())
    matmul = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    every_layer = [m for m in unet.modules() if isinstance(m, matmul)]
    sd_unet = family in ("SD1.5", "SDXL")
    if sd_unet:
        # the null-text form: cross-attention (attn2) and its norm are replaced by a constant
        removed = sum(p.numel() for _n, b in cross_attention_blocks(unet)
                      for p in list(b.attn2.parameters()) + list(b.norm2.parameters()))
        null_text = base - removed
    else:
        null_text = None
    ours = [m for _n, m in adapted_modules(unet)]
    return {"family": family, "base_params": base, "null_text_params": null_text,
            "adapter_params": adapter_params(ours, rank), "core_adapter_params": adapter_params(every_layer, rank),
            "rank": rank}


def form_bytes(c: dict, form: str) -> int | None:
    base_b, trained_b, what = FORMS[form]
    if what == "all":
        if c["null_text_params"] is None:
            return None  # the DiTs have only the LoRA form
        return c["null_text_params"] * trained_b
    adapter = c["core_adapter_params"] if what == "adapter_all" else c["adapter_params"]
    return c["base_params"] * base_b + adapter * trained_b


def fits(nbytes: int) -> list[int]:
    return [card for card in CARDS_GIB if nbytes <= FIT_FRACTION * card * GIB]


def main(argv=None) -> dict:
    p = common.parser("gpu_memory", __doc__.split("\n\n")[0])
    args = p.parse_args(argv)
    families = ["SD1.5", "SDXL"] if args.fast else ["SD1.5", "SDXL", "Wan 2.1 14B", "Qwen-Image"]
    rows = []
    for fam in families:
        log(f"counting {fam} (meta device)")
        c = counts(fam)
        for form in FORMS:
            b = form_bytes(c, form)
            if b is None:
                continue
            rows.append({"family": fam, "form": form, "bytes": b, "gib": b / GIB, "fits_gib": fits(b),
                         "smallest_card_gib": (fits(b) or [None])[0], **{k: c[k] for k in
                                                                           ("base_params", "adapter_params",
                                                                            "core_adapter_params",
                                                                            "null_text_params")}})
    sdxl = next(r for r in rows if r["family"] == "SDXL" and r["form"] == "lora_half")
    payload = {"bench": "gpu_memory", "kind": "computed", "mode": "fast" if args.fast else "default",
               "rule": f"weights + gradients + optimiser + EMA <= {FIT_FRACTION:.0%} of the card; activations "
                       "excluded", "rank": RANK, "cards_gib": list(CARDS_GIB),
               "bytes_per_parameter": {k: {"frozen_base": v[0], "trained": v[1]} for k, v in FORMS.items()},
               "rows": rows, "goal": {"sdxl_lora_fits_12gb": 12 in sdxl["fits_gib"]},
               "environment": common.environment()}
    common.write_json(args.out, payload)
    print(report(payload))
    print(f"\nJSON: {args.out}")
    return payload


def report(payload: dict) -> str:
    rows = []
    for r in payload["rows"]:
        rows.append([r["family"], FORM_LABELS[r["form"]], f"{r['base_params'] / 1e6:.0f}M",
                     f"{(r['core_adapter_params'] if r['form'] == 'core_train_lora' else r['adapter_params']) / 1e6:.1f}M"
                     if r["form"] != "full" else f"{r['null_text_params'] / 1e6:.0f}M (all)",
                     f"{r['gib']:.2f}", ", ".join(str(c) for c in r["fits_gib"]) or "none (> 80 GiB x 70%)"])
    return common.table(["family", "form", "base", "trained (rank 32)", "GiB (computed)", "fits cards (GiB)"],
                        rows, "Training memory, COMPUTED from bytes per parameter (activations excluded; fits = "
                              "at most 70% of the card)") + (
        f"\n\ngoal SDXL domain LoRA training fits a 12 GB card: {payload['goal']['sdxl_lora_fits_12gb']}")


if __name__ == "__main__":
    main(sys.argv[1:])
