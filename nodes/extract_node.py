"""Extract Domain LoRA: base MODEL + a full-form domain UNet file -> a LoRA-form file in models/domain_unets.
Wiring only: the extraction is ../training/extract.py (maths in ../guidance/lora.py). It writes under the same
output lock as training (a run writing that name refuses it, and the other way round)."""
from __future__ import annotations

import json

import folder_paths
from comfy_api.latest import io

from ..pack import DOMAIN_UNET_FOLDER
from .search import search_aliases


class ExtractDomainLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InDomainExtractDomainLoRA",
            display_name="Extract Domain LoRA",
            category="InDomain",
            description="Turns a full-form domain UNet into a small LoRA-form file: the best rank-R approximation (SVD) "
                        "of its difference from the base, with the relative reconstruction error per rank. "
                        "Load the result with 'Load Domain UNet' like any domain model.",
            is_output_node=True,
            **search_aliases("InDomainExtractDomainLoRA"),
            inputs=[
                io.Model.Input("model", tooltip="The BASE model (from Load Checkpoint) the domain UNet was trained from: "
                               "the difference is taken against its weights."),
                io.Combo.Input("domain_unet_name", options=folder_paths.get_filename_list(DOMAIN_UNET_FOLDER),
                               tooltip="A full-form domain UNet in ComfyUI/models/domain_unets."),
                io.Int.Input("rank", default=32, min=1, max=1024, tooltip="Rank of the adapter written. Higher keeps "
                             "more of the difference and makes a bigger file; the report shows the error per rank."),
                io.String.Input("report_ranks", default="4,8,16,64", tooltip="Other ranks whose reconstruction error to "
                                "report (comma-separated), to choose a rank."),
                io.String.Input("save_name", default="", tooltip="File name in models/domain_unets; empty = "
                                "<domain name>_lora<rank>. An existing file of that name is replaced."),
            ],
            outputs=[io.String.Output("report", tooltip="JSON: relative error per rank, the share of the difference "
                                      "the LoRA form does not carry (normalisation layers), file sizes, output name.")],
        )

    @classmethod
    def execute(cls, model, domain_unet_name, rank, report_ranks="4,8,16,64", save_name="") -> io.NodeOutput:
        from ..training.extract import extract_domain_lora
        from ..forms.model import unpatched_unet_state
        from .train_node import domain_unet_output_path

        try:
            ranks = [int(r) for r in str(report_ranks).split(",") if r.strip()]
        except ValueError:
            raise ValueError(f"report_ranks takes comma-separated integers such as 4,8,16 (got {report_ranks!r}).") from None
        source = folder_paths.get_full_path_or_raise(DOMAIN_UNET_FOLDER, domain_unet_name)
        stem = domain_unet_name.rsplit(".", 1)[0]
        out_path, out_name = domain_unet_output_path(save_name or f"{stem}_lora{rank}")
        # the base's own weights on the CPU, not the live module (maybe on the GPU, maybe carrying the weight
        # patches of a clone loaded earlier): the result does not depend on what was sampled before
        report = extract_domain_lora(unpatched_unet_state(model), source, out_path, rank, ranks)
        report["output"] = out_name
        errors = ", ".join(f"rank {r}: {e:.4f}" for r, e in report["relative_error"].items())
        return io.NodeOutput(json.dumps(report), ui={"text": [f"{out_name}: relative error {errors}; "
                                                              f"not carried {report['not_carried']:.4f}"]})
