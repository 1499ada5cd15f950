"""Train Domain UNet: MODEL + CLIP + VAE + an image folder -> a domain MODEL, saved to models/domain_unets.
Wiring only: the trainer is ../training."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..pack import DOMAIN_UNET_FOLDER
from ..sampling.domain_model import build_domain_model, ensure_base_model
from .search import search_aliases
from .paths import ALLOW_ABSOLUTE_ENV, check_save_name, image_root, input_subfolders, resolve_image_folder
from .validation import combo_problem, first_problem

log = logging.getLogger("indomain")


def domain_unet_output_path(save_name: str) -> tuple[Path, str]:
    """(absolute path, name as the loader lists it) for a save name inside models/domain_unets."""
    name = check_save_name(save_name)
    if not name.lower().endswith(".safetensors"):
        name += ".safetensors"
    folder = Path(folder_paths.get_folder_paths(DOMAIN_UNET_FOLDER)[0])
    return folder / name, name


_NOT_CONNECTED = object()  # validate_inputs' default for 'images': ComfyUI leaves an unconnected input out


class TrainDomainUNet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InDomainTrainDomainUNet", **search_aliases("InDomainTrainDomainUNet"),
            display_name="Train Domain UNet",
            category="InDomain",
            description="Fine-tunes a text-free (null-text) copy of the base UNet on a folder of unlabelled images and "
                        "saves it to models/domain_unets. Interruptible (a checkpoint is saved first) and resumable. "
                        "Connect 'domain_model' to Domain KSampler.",
            is_output_node=True,
            # every input arrives as a list: core's dataset loaders send one IMAGE per picture (sizes may differ),
            # and the whole list must reach one training run (core's own trainer does the same)
            is_input_list=True,
            inputs=[
                io.Model.Input("model", tooltip="The BASE model (from Load Checkpoint) the domain UNet starts from. "
                               "It is not modified."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The base checkpoint's CLIP (or the family's text encoder from Load CLIP): encodes "
                              "the empty prompt once (SD: to calibrate the constants that replace cross-attention; "
                              "DiTs: the conditioning of every step). Not needed when 'empty_prompt' is connected."),
                io.Vae.Input("vae", optional=True,
                             tooltip="The base checkpoint's VAE: encodes the images once (cached on disk). Not needed "
                             "when training on 'latents'."),
                io.Combo.Input("image_folder", options=[""] + input_subfolders(),
                               tooltip="Subfolder of ComfyUI's input folder holding the domain images (searched "
                               "recursively; jpg/png/webp/bmp). No captions needed. A few hundred images are typical; at "
                               "least tens. Paths outside input/ are refused unless the server is started with "
                               f"{ALLOW_ABSOLUTE_ENV}=1. Leave empty to train only on the images connected to 'images'."),
                io.Int.Input("steps", default=2000, min=1, max=1000000, tooltip="Optimizer steps. Thousands for a real "
                             "domain; each step sees batch_size images."),
                io.Float.Input("learning_rate", default=0.0, min=0.0, max=1.0, step=1e-6, round=1e-8,
                               tooltip="AdamW learning rate. 0 = auto: the form's own default, 1e-5 for the full "
                               "form (the paper's setting) and 1e-4 for the LoRA form (adapters need a higher "
                               "rate). Lower it if the loss explodes."),
                io.Int.Input("batch_size", default=4, min=1, max=256, tooltip="Images per step. Larger is steadier but "
                             "needs more memory (the paper used 32)."),
                io.Int.Input("resolution", default=512, min=8, max=4096, step=8, tooltip="Training resolution in pixels "
                             "(short side resized, then cropped square). Multiple of 64 for SD1.5/SDXL: 512 for SD1.5, "
                             "1024 for SDXL."),
                io.String.Input("save_name", default="my_domain", tooltip="File name in models/domain_unets "
                                "('.safetensors' is added). If that file already exists, a fresh run is refused before "
                                "training unless 'resume' (continue it) or 'overwrite' (replace it) is on."),
                io.Int.Input("seed", optional=True, default=0, min=0, max=0xffffffffffffffff, tooltip="Seed for data order, noise and "
                             "flips: the same seed and settings give the same weights. Keep 'control after generate' "
                             "on 'fixed' (the frontend adds it to every seed input) so re-queueing and resume keep it."),
                io.Boolean.Input("resume", optional=True, default=False, tooltip="Continue the run saved under save_name (from its "
                                 "'.resume' state, written at every checkpoint) instead of starting over."),
                io.Int.Input("save_every", optional=True, default=500, min=0, max=1000000, tooltip="Save a checkpoint every N steps "
                             "(0 = only at the end). One is always saved on interrupt."),
                io.Float.Input("ema_decay", optional=True, default=0.9999, min=0.0, max=0.99999, step=0.0001, round=0.00001,
                               tooltip="EMA decay of the saved weights (warmed up over the first steps)."),
                io.Combo.Input("crop", optional=True, options=["center", "random"], default="center",
                               tooltip="Square crop after resizing: centre, or random per step (more variety)."),
                io.Float.Input("hflip", optional=True, default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Probability of a horizontal flip per image and step (0 for text/asymmetric domains)."),
                io.Int.Input("grad_accum", optional=True, default=1, min=1, max=256,
                             tooltip="Gradient accumulation: effective batch = batch_size x grad_accum."),
                io.Boolean.Input("grad_checkpointing", optional=True, default=True,
                                 tooltip="Recompute activations in the backward pass: much less memory for some speed "
                                 "(on by default; the LoRA form's memory is mostly activations). Off: faster where the "
                                 "memory is there."),
                io.Int.Input("preview_every", optional=True, default=0, min=0, max=1000000,
                             tooltip="Every N steps (and at the end) sample the current EMA domain model with a fixed "
                                     "seed and show it on this node; the pictures are saved in "
                                     "models/domain_unets/<save_name>.previews/. 0 = off. Costs sampling time, not "
                                     "training: each preview is preview_steps sampling steps (two model passes "
                                     "each, three with a preview_prompt) plus a VAE decode."),
                io.String.Input("preview_prompt", optional=True, default="",
                                tooltip="Optional prompt for a second preview through decoupled guidance (base model for "
                                        "the text, the domain model for the domain; cfg 2.5, domain weight 2). Empty: "
                                        "only the domain model's own (unconditional) sample."),
                io.Int.Input("preview_steps", optional=True, default=20, min=1, max=1000,
                             tooltip="Sampling steps per preview picture (euler). Fewer is cheaper and blurrier."),
                io.Boolean.Input("buckets", optional=True, default=False,
                                 tooltip="Aspect-ratio buckets: train non-square images whole, in a few shapes of about "
                                         "resolution x resolution pixels (e.g. 448x576, 512x512, 640x448 at 512), "
                                         "instead of cropping them square. Each batch comes from one shape."),
                io.Image.Input("images", optional=True,
                               tooltip="Training images from any image node (Load Image, core's dataset loaders, ...): "
                                       "a batch or a list of images of any sizes. Used together with image_folder "
                                       "(leave the folder empty to train on these alone). Encoded latents are cached "
                                       "by content."),
                io.Combo.Input("form", options=["full", "lora"], optional=True, default="full",
                               tooltip="full: train a complete null-text copy of the UNet (the paper's domain model). "
                               "lora: train only a low-rank adapter on the frozen base (about a quarter of the "
                               "training memory, a file of a few tens of MB, no second UNet when sampling)."),
                io.Int.Input("rank", optional=True, default=32, min=1, max=1024,
                             tooltip="LoRA form only: adapter rank. Higher captures more of the domain and makes a "
                             "bigger file; 16-64 is typical."),
                io.Float.Input("alpha", optional=True, default=0.0, min=0.0, max=4096.0, step=1.0,
                               tooltip="LoRA form only: the adapter is scaled by alpha / rank; 0 = the rank (scale 1)."),
                io.Boolean.Input("overwrite", optional=True, default=False,
                                 tooltip="Off: a fresh run whose save_name file already exists is refused before any "
                                 "training (the existing model is kept). On: the run starts over and the existing "
                                 "file and its '.resume' state are replaced at the first checkpoint. Ignored with "
                                 "'resume' on."),
                io.Combo.Input("save_precision", options=["fp16", "fp32"], optional=True, default="fp16",
                               tooltip="Precision of the weights in the saved file: fp16 (half the size; ComfyUI "
                               "casts on load) or fp32 (exact training weights, twice the size)."),
                io.Conditioning.Input("empty_prompt", optional=True,
                                      tooltip="The ENCODED EMPTY PROMPT (CLIP Text Encode with an empty text, from the "
                                      "model's own text encoder): what every training step is conditioned on. For "
                                      "flow-matching DiTs loaded with Load Diffusion Model (Qwen-Image, Wan, Z-Image / "
                                      "Lumina 2, SD3.5, Chroma, Flux.2) connect this instead of 'clip'. Reference "
                                      "latents / image-to-video inputs on it are refused (the domain model is text- and "
                                      "image-free; the sampler adds them)."),
                io.Latent.Input("latents", optional=True,
                                tooltip="Train on these latents instead of images (no VAE needed): a LATENT batch "
                                "(images [B,C,h,w]; for Wan / Qwen-Image [B,C,1,h,w] single-frame clips, or [B,C,T,h,w] "
                                "clips), e.g. from VAE Encode or Load Latent. Leave image_folder empty."),
                io.Combo.Input("timestep_sampling", options=["uniform", "logit_normal"], optional=True,
                               default="uniform",
                               tooltip="Flow-matching DiTs only: how training draws noise levels. uniform: t ~ U(0,1) "
                               "moved by the model's shift (as its sampler; a ModelSamplingSD3/Flux/AuraFlow node's "
                               "shift applies); logit_normal: t = sigmoid(N(0,1)) then the shift (SD3's training)."),
                io.Combo.Input("base_precision", options=["auto", "bf16", "fp16", "fp32"], optional=True,
                               default="auto",
                               tooltip="LoRA form only: the dtype of the frozen base while it trains (the adapter and "
                               "its optimiser state are always fp32). auto: the base's own bf16/fp16 as loaded (no "
                               "copy of it), else bf16 where the GPU runs it natively (RTX 30xx and newer; the CPU), "
                               "fp16 with loss scaling on older GPUs. fp32: a float32 copy (the most memory)."),
            ],
            outputs=[
                io.Model.Output("domain_model", display_name="domain_model",
                                tooltip="The trained domain UNet, ready for Domain KSampler (same as loading the saved file)."),
                io.String.Output("file_name", display_name="file_name",
                                 tooltip="The saved file's name in models/domain_unets (what Load Domain UNet lists)."),
                io.Custom("LOSS_MAP").Output("loss", display_name="loss",
                                             tooltip="The loss of every step (core's LOSS_MAP: connect Plot Loss Graph). "
                                                     "A curve with its moving average is also saved as "
                                                     "models/domain_unets/<save_name>.loss.png."),
            ],
        )

    @classmethod
    def validate_inputs(cls, image_folder=None, crop=None, form=None, images=_NOT_CONNECTED,
                        save_precision=None, latents=_NOT_CONNECTED, timestep_sampling=None,
                        base_precision=None) -> bool | str:
        """Own check of image_folder instead of core's list check: the list is refreshed only when the page
        reloads, and an absolute path is valid when the server owner opted in. `images` is absent from the
        call when nothing is connected to it (a link arrives as None)."""
        from ..training.data import TrainingInputError

        image_folder, crop, form = _single(image_folder), _single(crop), _single(form)  # is_input_list: lists
        timestep_sampling = _single(timestep_sampling)
        if image_folder is not None and str(image_folder).strip():  # empty: the connected images alone
            try:
                resolve_image_folder(image_folder)
            except TrainingInputError as e:
                return str(e)
        elif images is _NOT_CONNECTED and latents is _NOT_CONNECTED:
            return ("no training images: image_folder is empty and nothing is connected to 'images'. Pick a "
                    "subfolder of ComfyUI's input folder, or connect an IMAGE (Load Image, a dataset loader, ...).")
        return first_problem(combo_problem("crop", crop, ["center", "random"]),
                             combo_problem("form", form, ["full", "lora"]),
                             combo_problem("save_precision", _single(save_precision), ["fp16", "fp32"]),
                             combo_problem("timestep_sampling", timestep_sampling, ["uniform", "logit_normal"]),
                             combo_problem("base_precision", _single(base_precision), ["auto", "bf16", "fp16", "fp32"]))

    @classmethod
    def fingerprint_inputs(cls, image_folder="", **kwargs):
        """Re-run when the images change (ComfyUI otherwise caches on the inputs alone)."""
        import hashlib
        import os

        image_folder = _single(image_folder)
        from ..training.data import TrainingInputError, find_image_files

        h = hashlib.sha256(os.fsencode(str(image_folder)))
        try:
            folder = resolve_image_folder(image_folder)
        except TrainingInputError:
            return h.hexdigest()  # execute() reports the bad folder
        if not folder.is_dir():
            return h.hexdigest()
        # the files training reads (links followed once, no loops, none out of the input folder)
        files, _ = find_image_files(folder, image_root(image_folder))
        for path in files:
            try:
                st = os.stat(path)
            except OSError:
                continue
            h.update(os.fsencode(path) + f":{st.st_size}:{st.st_mtime_ns}\n".encode())  # names may be non-UTF-8
        return h.hexdigest()

    @classmethod
    def execute(cls, model, clip=None, vae=None, image_folder="", steps=2000, learning_rate=0.0, batch_size=4,
                resolution=512, save_name="my_domain", seed=0,
                resume=False, save_every=500, ema_decay=0.9999, crop="center", hflip=0.5, grad_accum=1,
                grad_checkpointing=True, preview_every=0, preview_prompt="", preview_steps=20, buckets=False,
                images=None, form="full", rank=32, alpha=0.0, overwrite=False,
                save_precision="fp16", empty_prompt=None, latents=None,
                timestep_sampling="uniform", base_precision="auto") -> io.NodeOutput:
        from ..training.loss_curve import loss_map
        from ..training.preview import progress_preview, side_by_side
        from ..training.config import refuse_taken_output
        from ..training.data import TrainingInputError
        from ..training.trainer import TrainConfig, prepare_images, train, train_on_latents

        # is_input_list: every input is a list (one value each, except `images`); direct calls pass plain values
        (model, clip, vae, image_folder, steps, learning_rate, batch_size, resolution, save_name, seed, resume,
         save_every, ema_decay, crop, hflip, grad_accum, grad_checkpointing, preview_every, preview_prompt,
         preview_steps, buckets, form, rank, alpha, overwrite, save_precision, timestep_sampling,
         base_precision) = (_single(v) for v in (
            model, clip, vae, image_folder, steps, learning_rate, batch_size, resolution, save_name, seed, resume,
            save_every, ema_decay, crop, hflip, grad_accum, grad_checkpointing, preview_every, preview_prompt,
            preview_steps, buckets, form, rank, alpha, overwrite, save_precision, timestep_sampling, base_precision))
        from ..forms.model import is_conditioning

        if empty_prompt is not None and not is_conditioning(empty_prompt):
            empty_prompt = _single(empty_prompt)  # is_input_list: [CONDITIONING]
        ensure_base_model(model)
        # learning_rate 0 (the widget's default): the form's own (TrainConfig.with_defaults)
        config = TrainConfig(steps=steps, lr=learning_rate or None, batch_size=batch_size, resolution=resolution, seed=seed,
                             save_every=save_every, ema_decay=ema_decay, crop=crop, hflip=hflip, grad_accum=grad_accum,
                             grad_checkpointing=grad_checkpointing, buckets=buckets, preview_every=preview_every,
                             preview_prompt=preview_prompt, preview_steps=preview_steps, form=form,
                             lora_rank=rank, lora_alpha=alpha, save_precision=save_precision,
                             timestep_sampling=timestep_sampling or "uniform",
                             base_precision=base_precision or "auto")
        text = empty_prompt if empty_prompt is not None else clip  # the encoded empty prompt, or what encodes it
        # bad folder / resolution: fail before any work; no folder = the connected images alone
        scan = (prepare_images(resolve_image_folder(image_folder), config, within=image_root(image_folder))
                if str(image_folder or "").strip() else None)
        out_path, name = domain_unet_output_path(save_name)
        refuse_taken_output(out_path, bool(resume), bool(overwrite), "overwrite")  # never replace a model silently
        pbar = comfy.utils.ProgressBar(steps)

        def progress(step, total, loss, ips):
            pbar.update_absolute(step, total)
            if step == 1 or step % 10 == 0 or step == total:
                log.info("InDomain training: step %d/%d loss %.4f (%.1f img/s)", step, total, loss, ips)

        def on_preview(step, total, pictures):
            pbar.update_absolute(step, total, progress_preview(side_by_side([im for _label, im in pictures])))

        latent_batch = latent_list(latents)
        if latent_batch is not None and (scan is not None or images is not None):
            raise TrainingInputError("connect either images (image_folder / 'images') or 'latents', not both.")
        if latent_batch is None and vae is None:
            raise TrainingInputError("training on images needs the checkpoint's VAE: connect 'vae' (or train on "
                                     "'latents').")
        with torch.inference_mode(False), torch.enable_grad():
            if latent_batch is not None:
                result = train_on_latents(model, text, latent_batch, config, out_path, resume=resume, progress=progress,
                                          should_stop=comfy.model_management.processing_interrupted, vae=vae,
                                          on_preview=on_preview)
            else:
                result = train(model, text, vae, scan.folder if scan is not None else None, config, out_path,
                               resume=resume, progress=progress,
                               should_stop=comfy.model_management.processing_interrupted,
                               scan=scan, images=images, on_preview=on_preview)
        if result.interrupted:
            log.info("InDomain training interrupted at step %d; saved %s (resume with 'resume' on)",
                     result.steps_done, out_path)
            comfy.model_management.throw_exception_if_processing_interrupted()
        folder_paths.filename_list_cache.pop(DOMAIN_UNET_FOLDER, None)  # the loader lists the new file at once
        domain = build_domain_model(model, result.state_dict, result.meta, source=str(out_path))
        if result.loss_curve_path is not None:
            log.info("InDomain training: loss curve %s", result.loss_curve_path)
        return io.NodeOutput(domain, name, loss_map(result.losses))


def latent_list(latents):
    """The LATENT input(s) (is_input_list: a list of LATENT dicts) as one list of per-sample latents, or None."""
    if latents is None:
        return None
    items = latents if isinstance(latents, list) else [latents]
    out = []
    for lat in items:
        if lat is None:
            continue
        samples = lat["samples"] if isinstance(lat, dict) else lat
        out += list(samples.detach().float().cpu())
    if out and len({tuple(x.shape) for x in out}) == 1:
        return torch.stack(out)  # one size: trained at that size (whatever the VAE's factor, e.g. Wan 2.2's 16)
    return out or None


def _single(value):
    """One value of an is_input_list input (a one-element list), or the value itself."""
    if isinstance(value, list):
        return value[0] if value else None
    return value
