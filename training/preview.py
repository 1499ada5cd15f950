"""Preview images while training: sample the current EMA domain model with a fixed seed.

Every `every` optimizer steps the trainer hands the EMA weights to a `PreviewRenderer`, which
samples them through ComfyUI with the pack's own sampling code:

- "domain": the domain model's own prediction (cfg 0, domain weight 1: u + 1 * (d - u) = d), i.e.
  what the domain model has learnt so far;
- "prompt" (only when a prompt is given): decoupled guidance, the base model for the text term
  and the unconditional prediction, the domain model for the domain term (`domain_guider`, the
  same guider as Domain KSampler; cfg PROMPT_CFG, domain weight PROMPT_DOMAIN_WEIGHT).

Flow-matching DiTs (the text-free LoRA form): the same two pictures through the same guider, the domain term
fed the encoded empty prompt (which may stand in for the CLIP: then only "domain" is drawn); the latent is a
single-frame clip for the video families, decoded by their video VAE one clip at a time.

Same seed, noise and sampler at every preview, so successive pictures differ only by training.
The latents are decoded with the checkpoint's VAE; the pictures are saved as PNG in
`NAME.previews/` next to the checkpoint (`step_000100_domain.png`, `..._prompt.png`) and shown
side by side as the progress bar's preview in the ComfyUI UI.

Cost: each preview is `steps` sampling steps (two model passes each for "domain": the base's
unconditional and the domain model; three for "prompt") plus a VAE decode, at batch 1 and the
training resolution. The run's randomness is untouched (the CPU RNG is forked), so a
run with previews trains exactly the same weights as one without.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("indomain.training")

PREVIEW_DIR_SUFFIX = ".previews"
PREVIEW_MAX_SIZE = 512          # longest side of the picture sent to the UI (core's default preview size)
PROMPT_CFG = 2.5                # control weight of the prompt preview (Domain KSampler's default)
PROMPT_DOMAIN_WEIGHT = 2.0      # domain weight of the prompt preview (Domain KSampler's default)
SAMPLER = "euler"
SCHEDULER = "normal"


@dataclass
class PreviewSettings:
    every: int = 0              # optimizer steps between previews; 0 = off
    prompt: str = ""            # also sample this prompt through decoupled guidance
    steps: int = 20             # sampling steps per picture
    seed: int = 0               # noise seed, the same for every preview


def preview_dir_for(out_path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + PREVIEW_DIR_SUFFIX)


def preview_due(step: int, total: int, every: int) -> bool:
    """A preview after optimizer step `step` (1-based): every `every` steps, and at the end of the run."""
    return every > 0 and (step % every == 0 or step == total)


def latents_to_pil(pixels: torch.Tensor) -> list:
    """VAE output [B, H, W, 3] in 0..1 -> PIL RGB images."""
    import numpy as np
    from PIL import Image

    arr = (pixels.detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    return [Image.fromarray(np.ascontiguousarray(a[..., :3]), "RGB") for a in arr]


def side_by_side(images: list, gap: int = 4):
    """One picture of the previews next to each other (what the progress bar shows)."""
    from PIL import Image

    w = sum(im.width for im in images) + gap * (len(images) - 1)
    h = max(im.height for im in images)
    out = Image.new("RGB", (w, h), (255, 255, 255))
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width + gap
    return out


def progress_preview(image) -> tuple:
    """The value ComfyUI's ProgressBar.update_absolute(value, total, preview) sends to the UI as an image
    (the same ("JPEG", PIL image, max size) tuple core's latent previewers produce, in 0.3.75 and 0.33)."""
    return ("JPEG", image, PREVIEW_MAX_SIZE)


class PreviewRenderer:
    """Samples EMA weights of a null-text domain UNet into pictures. Build once per run (encodes the prompts
    once), call `render(state_dict, meta)` at each preview."""

    def __init__(self, model_patcher, clip, vae, settings: PreviewSettings, latent_hw: tuple[int, int]):
        from ..forms.model import encoded_empty_prompt, is_conditioning

        self.base = model_patcher
        self.vae = vae
        self.settings = settings
        self.latent_hw = tuple(int(s) for s in latent_hw)
        # `clip`: a CLIP, or (DiTs) the encoded empty prompt itself, which is then the negative and the domain
        # model's text (the text-free LoRA form of a DiT is trained, and sampled, on it)
        self.negative = encoded_empty_prompt(clip) if is_conditioning(clip) else _encode(clip, "")
        self.positive = None
        if settings.prompt.strip():
            if is_conditioning(clip):
                from .data import TrainingInputError

                raise TrainingInputError("preview_prompt needs a text encoder to encode the prompt: connect 'clip' "
                                         "(the family's text encoder) besides 'empty_prompt', or leave "
                                         "preview_prompt empty (the domain preview needs only the empty prompt).")
            self.positive = _encode(clip, settings.prompt)

    @torch.no_grad()
    def render(self, state_dict: dict, meta) -> list[tuple[str, object]]:
        """[(label, PIL image)] from a domain model file's state (the form's file_state of the EMA weights):
        "domain", then "prompt" when a prompt is set. The domain MODEL is built as Load Domain UNet builds it,
        by the file's form, so every form previews."""
        from ..sampling.domain_model import build_domain_model
        from .data import decode_pictures

        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            domain = build_domain_model(self.base, state_dict, meta, source="training preview")
            latents = [("domain", self._sample_domain(domain))]
            if self.positive is not None:
                latents.append(("prompt", self._sample_prompt(domain)))
            images = [(label, latents_to_pil(decode_pictures(self.vae, x))[0]) for label, x in latents]
            self._release()
        return images

    # -- sampling
    def _noise_and_latent(self, model):
        import comfy.sample

        from ..forms.model import model_latent_shape

        # [1, C, h, w], or a single-frame clip [1, C, 1, h, w] for the video families (Wan, Qwen-Image)
        latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros(model_latent_shape(model, self.latent_hw)))
        return comfy.sample.prepare_noise(latent, self.settings.seed), latent

    def _run(self, guider, model):
        import comfy.model_management
        import comfy.samplers

        noise, latent = self._noise_and_latent(model)
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), SCHEDULER,
                                                 self.settings.steps)
        sampler = comfy.samplers.sampler_object(SAMPLER)
        # no callback, no progress bar: the node's bar shows training steps, not sampling steps
        out = guider.sample(noise, latent, sampler, sigmas, callback=None, disable_pbar=True, seed=self.settings.seed)
        return out.to(comfy.model_management.intermediate_device())

    def _sample_domain(self, domain):
        from ..sampling.guider import domain_guider

        # u + 1 * (d - u) = d: the domain model's own prediction, through the pack's guider so that every form
        # (a separate UNet, or patches on the base) samples as it does in Domain KSampler
        guider = domain_guider(self.base, domain, self.negative, self.negative, 0.0, 1.0, empty_prompt=self.negative)
        return self._run(guider, self.base)

    def _sample_prompt(self, domain):
        from ..sampling.guider import domain_guider

        guider = domain_guider(self.base, domain, self.positive, self.negative, PROMPT_CFG, PROMPT_DOMAIN_WEIGHT,
                               empty_prompt=self.negative)
        return self._run(guider, self.base)

    def _release(self):
        """On a GPU, give the memory of the sampled models back to training."""
        import comfy.model_management

        if getattr(self.base, "load_device", torch.device("cpu")).type != "cpu":
            comfy.model_management.unload_all_models()
            comfy.model_management.soft_empty_cache()


def _encode(clip, text: str):
    """CONDITIONING for `text`, as core's CLIPTextEncode makes it (no progress bar)."""
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens, show_pbar=False)


def save_previews(images: list[tuple[str, object]], folder, step: int) -> list[Path]:
    from .loss_curve import save_png_atomic

    folder = Path(folder)
    return [save_png_atomic(im, folder / f"step_{step:06d}_{label}.png") for label, im in images]
