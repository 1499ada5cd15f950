"""InDomain: in-domain generation with decoupled guidance for ComfyUI.

ComfyUI entry point only: registers the nodes, the `domain_unets` model folder and the help pages (web/).
Importing this package outside ComfyUI (e.g. `indomain.guidance` from the trainer or
tests) must not need ComfyUI, so everything ComfyUI-specific is imported lazily.
"""

__version__ = "0.1.0"

# Node help pages: ComfyUI serves this folder as /extensions/<custom node folder name>/ and the frontend's help
# panel reads docs/<NodeId>.md from it (keyed by the folder name, so any clone name works).
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import InDomainExtension, register_model_folder

    register_model_folder()
    return InDomainExtension()
