"""The plain form: the unmodified UNet fine-tuned on the empty prompt (the benchmarks' naive baseline).

Its file is a plain UNet state dict (core 'Load Diffusion Model' loads it too); as a domain model it
is sampled like the full form, on the empty/negative conditioning, cross-attention and all."""
from __future__ import annotations

import torch

from .base import DomainModelForm, DomainRecord, Trainable, separate_unet_model

RECORD = {"kind": "plain_finetune", "prompt": ""}


class PlainFineTuneForm(DomainModelForm):
    name = "plain"
    description = "plain fine-tune of the unmodified UNet on the empty prompt (baseline)"

    def build_trainable(self, base_patcher, clip, calib_latents, seed, device) -> Trainable:
        return self.restore_trainable(base_patcher, clip, tuple(calib_latents.shape[-2:]), dict(RECORD))

    def restore_trainable(self, base_patcher, clip, latent_hw, record) -> Trainable:
        from .model import detached_unet_copy, empty_prompt

        return Trainable(detached_unet_copy(base_patcher), empty_prompt(base_patcher, clip, latent_hw), record)

    def expected_shapes(self, base_unet: torch.nn.Module, meta) -> dict[str, tuple]:
        return {k: tuple(v.shape) for k, v in base_unet.state_dict().items()}

    def domain_model(self, base_patcher, state_dict, meta, source=""):
        return separate_unet_model(base_patcher, state_dict, DomainRecord(self, meta, source))
