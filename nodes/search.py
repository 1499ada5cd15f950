"""Other words people type into the node search, per node (V3 `search_aliases`).

ComfyUI 0.33's io.Schema has a `search_aliases` field and its frontend searches it. ComfyUI 0.3.75's Schema has
no such field (passing it would fail) and its frontend (1.32.9) searches node ids and display names only, so there
the aliases are left out and the display names carry the search.
"""
from __future__ import annotations

import dataclasses

from comfy_api.latest import io

ALIASES: dict[str, list[str]] = {
    "InDomainLoadDomainUNet": ["domain unet", "null text unet", "load domain model", "in-domain model"],
    "InDomainKSampler": ["domain guidance", "decoupled cfg", "decoupled guidance", "null text", "in-domain sampler"],
    "InDomainGuider": ["domain guidance", "decoupled cfg", "dual model guider", "null text"],
    "InDomainApplyGuidance": ["domain guidance", "decoupled cfg", "ksampler patch", "null text"],
    "InDomainGuidanceTerm": ["guidance term", "multi guidance", "multi cfg", "domain guidance", "decoupled cfg"],
    "InDomainMultiGuider": ["multi guidance", "composable guidance", "multi cfg", "domain guidance", "decoupled cfg"],
    "InDomainTrainDomainUNet": ["train domain", "null text training", "captionless fine-tune", "fine tune unet"],
    "InDomainExtractDomainLoRA": ["extract lora", "svd lora", "domain lora", "lora from domain unet"],
    "InDomainWeightGrid": ["xy plot", "weight grid", "cfg grid", "domain guidance", "choose weights"],
}


def host_supports_aliases() -> bool:
    return any(f.name == "search_aliases" for f in dataclasses.fields(io.Schema))


def search_aliases(node_id: str) -> dict:
    """Keyword arguments for io.Schema: {"search_aliases": [...]} where the host supports them, else {}."""
    return {"search_aliases": list(ALIASES[node_id])} if host_supports_aliases() else {}
