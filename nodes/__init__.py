"""ComfyUI glue: the InDomain nodes (V3 schema). The maths lives in ../guidance."""
from __future__ import annotations

import os

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from ..pack import DOMAIN_UNET_FOLDER


def register_model_folder() -> str:
    """Register ComfyUI/models/domain_unets (created if missing); .safetensors only, never pickle."""
    import folder_paths

    path = os.path.join(folder_paths.models_dir, DOMAIN_UNET_FOLDER)
    os.makedirs(path, exist_ok=True)
    if DOMAIN_UNET_FOLDER in folder_paths.folder_names_and_paths:
        paths, _ = folder_paths.folder_names_and_paths[DOMAIN_UNET_FOLDER]
        if path not in paths:
            paths.append(path)
        folder_paths.folder_names_and_paths[DOMAIN_UNET_FOLDER] = (paths, {".safetensors"})
    else:
        folder_paths.folder_names_and_paths[DOMAIN_UNET_FOLDER] = ([path], {".safetensors"})
    return path


def node_list() -> list[type[io.ComfyNode]]:
    from .guidance_nodes import (ApplyDomainGuidance, DomainGuider, DomainKSampler, GuidanceTerm,
                                 MultiTermGuider)
    from .loader import LoadDomainUNet

    from .train_node import TrainDomainUNet

    return [LoadDomainUNet, DomainKSampler, DomainGuider, ApplyDomainGuidance, GuidanceTerm, MultiTermGuider,
            TrainDomainUNet]


class InDomainExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_list()
