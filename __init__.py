"""InDomain: in-domain generation with decoupled guidance for ComfyUI.

ComfyUI entry point only: registers the nodes and the `domain_unets` model folder.
Importing this package outside ComfyUI (e.g. `indomain.guidance` from the trainer or
tests) must not need ComfyUI, so everything ComfyUI-specific is imported lazily.
"""

__version__ = "0.1.0"


async def comfy_entrypoint():
    from .nodes import InDomainExtension, register_model_folder

    register_model_folder()
    return InDomainExtension()
