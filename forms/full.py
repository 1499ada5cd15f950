"""The full form: the paper's null-text UNet, a full copy of the base UNet whose cross-attention is
replaced by constants calibrated on the domain (guidance/nulltext.py). Sampled as a model of its own."""
from __future__ import annotations

import torch

from ..guidance.nulltext import convert_to_null_text, expected_null_text_shapes
from .base import DomainModelForm, DomainRecord, Trainable, separate_unet_model


class FullForm(DomainModelForm):
    name = "full"
    description = "null-text UNet (full copy of the base UNet, cross-attention replaced by calibrated constants)"

    def build_trainable(self, base_patcher, clip, calib_latents, seed, device) -> Trainable:
        from .model import make_null_text_unet

        unet, _constants, prompt, record = make_null_text_unet(base_patcher, clip, calib_latents, seed, device=device)
        return Trainable(unet, prompt, record)

    def restore_trainable(self, base_patcher, clip, latent_hw, record) -> Trainable:
        from .model import detached_unet_copy, empty_prompt

        unet = convert_to_null_text(detached_unet_copy(base_patcher))  # zero constants: the state holds the values
        return Trainable(unet, empty_prompt(base_patcher, clip, latent_hw), record)

    def expected_shapes(self, base_unet: torch.nn.Module, meta) -> dict[str, tuple]:
        return expected_null_text_shapes(base_unet)

    def domain_model(self, base_patcher, state_dict, meta, source=""):
        # zero constants first; the file's values load next
        return separate_unet_model(base_patcher, state_dict, DomainRecord(self, meta, source), convert_to_null_text)
