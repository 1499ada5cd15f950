"""TEST-ONLY ComfyUI custom nodes (never shipped in the pack): stand-ins for the full-size text encoders, VAEs and
CLIP vision models of the DiT families, which cannot be built on a CPU test machine, and a loader for the tiny DiT
families that core's UNETLoader cannot detect at tiny size (Qwen-Image, Z-Image / Lumina 2: detection fills
heads / rope axes from the full-size constants).

tests/test_dit_workflows.py links this folder into the test server's custom_nodes and swaps these nodes into the
API twins in place of core's LOADERS only (listed there, in SUBSTITUTIONS). Everything downstream is core's real
node: CLIPTextEncode / TextEncodeQwenImageEdit call this CLIP's tokenize + encode_from_tokens_scheduled,
VAEEncode / VAEDecode / WanImageToVideo / TextEncodeQwenImageEdit call this VAE's encode / decode,
CLIPVisionEncode calls this clip vision's encode_image. Every output is deterministic.

The conditioning is devkit/tiny_families' text_cond / empty_cond for the family (the family's text width, its
pooled / guidance extras); the empty text gives empty_cond (the encoded empty prompt's stand-in).
"""
from __future__ import annotations

import zlib

import torch

import comfy.clip_vision
import folder_paths

from indomain.devkit import tiny_families as tf

# family -> (latent channels, spatial factor, temporal factor or None for image VAEs, 5-D image latents)
VAE_LAYOUT = {"qwen_image": (16, 8, None, True), "wan21": (16, 8, 4, True), "wan21_i2v": (16, 8, 4, True),
              "sd3": (16, 8, None, False), "zimage": (16, 8, None, False), "lumina2": (16, 8, None, False),
              "flux2": (128, 16, None, False), "chroma": (16, 8, None, False), "wan22": (48, 16, 4, True)}
FAMILIES = sorted(VAE_LAYOUT)


class StandInCLIP:
    """What core's text-encode nodes use of a CLIP: tokenize, encode_from_tokens_scheduled, encode_from_tokens."""

    def __init__(self, family: str):
        self.family = family

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return {"text": str(text), "images": len(kwargs.get("images") or [])}

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict=None, show_pbar=True):
        text = tokens["text"]
        if text.strip() == "":
            cond = tf.empty_cond(self.family)
        else:
            cond = tf.text_cond(self.family, seed=zlib.crc32(text.encode("utf-8")) % 100_000)
        return [[c, dict(extra, **(add_dict or {}))] for c, extra in cond]

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        (cond, extra), = self.encode_from_tokens_scheduled(tokens)
        if return_dict:
            return dict(extra, cond=cond)
        return (cond, extra.get("pooled_output")) if return_pooled else cond


class StandInVAE:
    """Deterministic pixels <-> latents with the family's channels and compression (no learned weights)."""

    def __init__(self, family: str):
        self.family = family
        self.channels, self.factor, self.temporal, self.five_d = VAE_LAYOUT[family]
        # core's VAE attributes the trainer reads: video VAEs (Wan, Qwen-Image) take a batch of pictures as the
        # frames of one clip, and state (frames, height, width) ratios
        self.latent_dim = 3 if (self.temporal or self.five_d) else 2
        self.not_video = False
        # what the trainer fingerprints for its latent cache key (core: the VAE's weights): the layout
        self.first_stage_model = torch.nn.Module()
        self.first_stage_model.register_buffer("layout", torch.tensor(
            [self.channels, self.factor, self.temporal or 0, int(self.five_d), zlib.crc32(family.encode())]))
        self.downscale_ratio = ((lambda a: max(0, (a + 3) // 4), self.factor, self.factor) if self.latent_dim == 3
                                else self.factor)

    def encode(self, pixels):
        x = pixels[..., :3].movedim(-1, 1).float()  # [N,3,H,W]
        x = torch.nn.functional.avg_pool2d(x, self.factor) * 2.0 - 1.0
        reps = -(-self.channels // 3)
        lat = x.repeat(1, reps, 1, 1)[:, :self.channels]  # [N,C,h,w]
        if self.temporal:  # a video: frames 0, 1-4, 5-8, ... -> one latent frame each
            frames = [lat[:1]] + [lat[i:i + self.temporal].mean(0, keepdim=True)
                                  for i in range(1, lat.shape[0], self.temporal)]
            return torch.cat(frames).movedim(0, 1).unsqueeze(0)  # [1,C,T,h,w]
        if self.five_d:
            return lat.unsqueeze(2)  # [N,C,1,h,w]
        return lat

    def decode(self, samples):
        x = samples.float()
        video = x.ndim == 5
        if video:  # [B,C,T,h,w] -> [B*T,C,h,w]
            b, c, t = x.shape[:3]
            x = x.movedim(2, 1).reshape(b * t, c, *x.shape[-2:])
        rgb = torch.stack([x[:, i::3].mean(1) for i in range(3)], dim=1)
        rgb = torch.sigmoid(rgb * 2.0)
        rgb = torch.nn.functional.interpolate(rgb, scale_factor=self.factor, mode="nearest").movedim(1, -1)
        if video:
            rgb = rgb.reshape(b, t, *rgb.shape[1:])
            if self.temporal and t > 1:  # 1 + 4 (T - 1) frames, as core's Wan VAE decodes
                rgb = torch.cat([rgb[:, :1], rgb[:, 1:].repeat_interleave(self.temporal, dim=1)], dim=1)
        return rgb.clamp(0.0, 1.0)


class StandInClipVision:
    """What CLIPVisionEncode uses: encode_image -> comfy.clip_vision.Output (ViT-H/14's 257 x 1280 shape)."""

    def encode_image(self, image, crop=True):
        g = torch.Generator().manual_seed(int(image.float().mean().item() * 1e6) % (2 ** 31))
        out = comfy.clip_vision.Output()
        out["penultimate_hidden_states"] = torch.randn((image.shape[0], 257, 1280), generator=g) * 0.5
        out["last_hidden_state"] = out["penultimate_hidden_states"]
        out["image_embeds"] = out["penultimate_hidden_states"][:, 0, :1024]
        out["mm_projected"] = None
        out["image_sizes"] = [(3, 224, 224)] * image.shape[0]
        return out


class _Base:
    CATEGORY = "InDomain test stand-ins"
    FUNCTION = "load"


class IDTestCLIPLoader(_Base):
    """Stands in for CLIPLoader / TripleCLIPLoader (the clip names are only recorded)."""
    RETURN_TYPES = ("CLIP",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (FAMILIES,)}, "optional": {"clip_name": ("STRING", {"default": ""})}}

    def load(self, family, clip_name=""):
        return (StandInCLIP(family),)


class IDTestVAELoader(_Base):
    RETURN_TYPES = ("VAE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (FAMILIES,)}, "optional": {"vae_name": ("STRING", {"default": ""})}}

    def load(self, family, vae_name=""):
        return (StandInVAE(family),)


class IDTestCLIPVisionLoader(_Base):
    RETURN_TYPES = ("CLIP_VISION",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": ("STRING", {"default": ""})}}

    def load(self, clip_name):
        return (StandInClipVision(),)


class IDTestTinyUNETLoader(_Base):
    """Reads the tiny family's diffusion-model file under the workflow's name from models/diffusion_models and loads
    it into the family's core class at its tiny config (what core's detection cannot rebuild at tiny size)."""
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unet_name": ("STRING", {"default": ""}), "family": (sorted(tf.FAMILIES),)}}

    def load(self, unet_name, family):
        import comfy.utils

        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        sd, meta = comfy.utils.load_torch_file(path, return_metadata=True)
        if (meta or {}).get("indomain.tiny") != family:
            raise ValueError(f"{unet_name} is not a tiny {family} model (metadata {meta!r})")
        mp = tf.build(family, 0)
        mp.model.diffusion_model.load_state_dict(sd, strict=True)
        return (mp,)


NODE_CLASS_MAPPINGS = {c.__name__: c for c in (IDTestCLIPLoader, IDTestVAELoader, IDTestCLIPVisionLoader,
                                                IDTestTinyUNETLoader)}
