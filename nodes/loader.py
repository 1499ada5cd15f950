"""Load Domain UNet: base MODEL + a file from models/domain_unets -> domain MODEL."""
from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..pack import DOMAIN_UNET_FOLDER
from ..sampling.domain_model import load_domain_model
from .search import search_aliases
from .validation import combo_problem


class LoadDomainUNet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InDomainLoadDomainUNet", **search_aliases("InDomainLoadDomainUNet"),
            display_name="Load Domain UNet",
            category="InDomain",
            description="Loads a text-free domain UNet trained by InDomain and pairs it with its base model. "
                        "Also reads a text-free LoRA in core's key format (e.g. core's Train LoRA node with empty "
                        "captions) for DiT bases; it is refused if it does not fit the base. "
                        "Connect the result to 'domain_model' of Domain KSampler / Domain Guider / Apply Domain Guidance.",
            inputs=[
                io.Model.Input("model", tooltip="The BASE model (from Load Checkpoint) the domain UNet was trained from. "
                               "It supplies the architecture and noise schedule; it is not modified."),
                io.Combo.Input("domain_unet_name", options=folder_paths.get_filename_list(DOMAIN_UNET_FOLDER),
                               tooltip="A .safetensors file in ComfyUI/models/domain_unets (written by the trainer)."),
            ],
            outputs=[io.Model.Output("domain_model", display_name="domain_model",
                                     tooltip="The domain UNet as a ComfyUI model (memory-managed like any other).")],
        )

    @classmethod
    def validate_inputs(cls, domain_unet_name=None) -> bool | str:
        problem = combo_problem("domain_unet_name", domain_unet_name, folder_paths.get_filename_list(DOMAIN_UNET_FOLDER))
        if problem:
            return problem + " Put trained files in ComfyUI/models/domain_unets (and refresh the page)."
        return True

    @classmethod
    def execute(cls, model, domain_unet_name) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(DOMAIN_UNET_FOLDER, domain_unet_name)
        return io.NodeOutput(load_domain_model(model, path))
