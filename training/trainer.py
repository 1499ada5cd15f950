"""The training loop: base checkpoint + domain latents -> a domain model file.

What is trained, and how it is saved, is the domain model form's business (forms/: the paper's
null-text UNet by default). The loop reads build -> restore -> step -> finish: the ordinary
denoising loss on the model's native target, AdamW, gradient clipping, EMA (the saved model is
the EMA), gradient accumulation, mixed precision on CUDA, optional gradient checkpointing, and
data-parallel training under torchrun. Around it: config.py (settings, result, output paths),
batches.py (latents and determinism), distributed.py, optim.py (EMA, precision), resume.py, outputs.py
(what a run writes while it trains: model file, resume state, loss curve, previews).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..forms import DomainModelForm, form_named
from ..guidance.checkpoint import cast_for_saving
from .batches import TrainingData, model_resolution_factor
from .config import (TrainConfig, TrainingDiverged, TrainResult, check_output_writable, default_cache_dir,
                     resume_path_for)
from .data import (EncodedImages, TrainingInputError, check_resolution, display_name, encode_images, scan_images,
                   vae_spatial_ratio)
from .distributed import (all_reduce_mean, any_rank, barrier, dist_info, gather_from_ranks, weights_digest,
                          wrap_data_parallel)
from ..forms.model import base_meta, empty_prompt, trained_calibration
from .optim import (EMA, adds_in_place, autocast_dtype, core_training_mode, ema_decay_at, enable_grad_checkpointing,
                    frozen_dtype, grad_scaler, materialise_)
from .outputs import Previewer, Saver
from .resume import base_identity, check_same_base, load_resume_state, restore_optimisation, restore_weights
from .lock import OutputLock, remove_partials

log = logging.getLogger("indomain.training")


@dataclass
class Run:
    """Everything a run updates: the module (and its data-parallel wrapper), EMA, optimiser, step, losses."""

    form: DomainModelForm
    module: torch.nn.Module
    model: torch.nn.Module
    prompt: object
    record: dict
    ema: EMA
    optimizer: torch.optim.Optimizer
    scaler: object
    amp_dtype: object
    step: int = 0
    losses: list = field(default_factory=list)
    prompts: dict = field(default_factory=dict)   # EmptyPrompt per batch latent (h, w) other than the training size
    base_identity: dict = field(default_factory=dict)  # resume.base_identity: which base a LoRA-form run trains on


def _build(model_patcher, clip, data: TrainingData, config: TrainConfig, device, saved, base_name=None) -> Run:
    """The form's trainable module (fresh, or the skeleton the resume state fills), EMA and optimiser."""
    form = form_named(config.form).for_config(config)
    if saved is not None:
        trainable = form.restore_trainable(model_patcher, clip, data.size_hw, saved[1]["calibration"])
    else:
        trainable = form.build_trainable(model_patcher, clip, data.calibration_latents(config), config.seed, device)
    module = materialise_(trainable.module)
    identity = base_identity(module, form.keeps_key, model_patcher, base_name)  # {} when every weight is saved
    if saved is not None:
        check_same_base(saved[1], identity)
        restore_weights(saved[0], module, form.keeps_key)
    for p in module.parameters():
        p.requires_grad_(False)
    for _name, p in form.trainable_parameters(module):
        p.requires_grad_(True)
    module.to(device)
    module.train()
    if config.grad_checkpointing or adds_in_place(module):
        enable_grad_checkpointing(module)
    ema = EMA(module)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    # a half-precision frozen base (the LoRA form, config.base_precision) computes in its own dtype; the adapter,
    # its gradients and AdamW's moments stay float32 (autocast casts the adapter's weights per op)
    amp_dtype = frozen_dtype(module) or autocast_dtype(config.mixed_precision, device)
    scaler = grad_scaler(amp_dtype, device)
    return Run(form, module, module, trainable.prompt, trainable.record, ema, optimizer, scaler, amp_dtype,
               base_identity=identity)


def _restore(run: Run, saved, device, world: int) -> None:
    """Continue from the saved step (or start at 0), then wrap for data parallelism."""
    if saved is not None:
        state, info = saved
        run.step = int(info["step"])
        run.losses = list(info.get("losses", []))
        restore_optimisation(state, info, run.module, run.ema, run.optimizer, run.scaler, device)
    else:
        for n in run.ema.shadow:
            run.ema.shadow[n] = run.ema.shadow[n].to(device)
    run.model = wrap_data_parallel(run.module, world, device)


def _step_loss(run: Run, data: TrainingData, config: TrainConfig, rank: int, world: int, device) -> float:
    """Forward and backward over the step's micro-batches; the mean loss over all ranks."""
    run.optimizer.zero_grad(set_to_none=True)
    step_loss = torch.zeros((), device=device)
    for micro in range(config.grad_accum):
        xc, t, target = data.micro_batch(config, run.step * config.grad_accum + micro, rank, world, device)
        ctx = run.prompts.get(tuple(xc.shape[-2:]), run.prompt).expand(xc.shape[0], device, torch.float32)
        sync = world == 1 or micro == config.grad_accum - 1
        with run.model.no_sync() if not sync else nullcontext():
            with torch.autocast(device_type=device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
                pred = run.model(xc, t, **ctx)
            loss = torch.nn.functional.mse_loss(pred.float(), target.float())
            back = loss / config.grad_accum
            (run.scaler.scale(back) if run.scaler is not None else back).backward()
        step_loss += loss.detach() / config.grad_accum
    return float(all_reduce_mean(step_loss, world))


def _apply_step(run: Run, config: TrainConfig, loss_value: float) -> None:
    """Clip, step the optimiser, update the EMA, count the step."""
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.module.parameters(), config.grad_clip)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.step += 1
    run.ema.update(run.module, ema_decay_at(run.step, config.ema_decay))
    run.losses.append(loss_value)




def _training_info(config: TrainConfig, data: TrainingData, world: int, amp_dtype) -> dict:
    return {
        "images": data.info.get("images"), "skipped": data.info.get("skipped", 0), "resolution": config.resolution,
        "latent_size": list(data.size_hw), "lr": config.lr, "weight_decay": config.weight_decay,
        "batch_size": config.batch_size, "grad_accum": config.grad_accum, "world_size": world,
        "effective_batch": config.batch_size * config.grad_accum * world, "ema_decay": config.ema_decay,
        "grad_clip": config.grad_clip, "crop": config.crop, "hflip": config.hflip, "seed": config.seed,
        "mixed_precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
        "grad_checkpointing": bool(config.grad_checkpointing),
        "form": config.form, **({"lora_rank": config.lora_rank, "lora_alpha": config.lora_alpha or config.lora_rank,
                                 "base_precision": config.base_precision,
                                 "base_dtype": str(amp_dtype or torch.float32).replace("torch.", "")}
                                if config.form == "lora" else {}),
        **({"objective": {"target": "velocity (noise - x0)", "loss": "MSE in velocity space",
                          "shift": data.objective.shift, "timestep_multiplier": data.objective.multiplier,
                          "timestep_sampling": data.objective.timestep_sampling,
                          **({"logit_mean": data.objective.logit_mean, "logit_std": data.objective.logit_std}
                             if data.objective.timestep_sampling == "logit_normal" else {})}}
           if data.objective is not None else {}),
        "save_precision": config.save_precision, "data_fingerprint": data.fingerprint, "trainer": "indomain.training",
        **({"buckets": data.source.bucket_counts} if config.buckets else {}),
    }




def train_on_latents(model_patcher, clip, latents, config: TrainConfig, out_path=None, resume: bool = False,
                     progress: Callable | None = None, should_stop: Callable[[], bool] | None = None,
                     flipped_latents=None, data_info: dict | None = None, bucket_hw: list | None = None,
                     vae=None, on_preview: Callable | None = None, base_name: str | None = None) -> TrainResult:
    """Train on already-encoded (unprocessed VAE) latents: a [N, C, h, w] tensor or a list of [C, h_i, w_i].

    `progress(step, total, loss, images_per_s)` is called after every optimizer step; training
    stops (after saving) when `should_stop()` returns True. With `out_path` None nothing is written.
    `bucket_hw` (with config.buckets): each latent's bucket (h, w) in latent cells. Previews
    (config.preview_every) need `vae`; `on_preview(step, total, [(label, PIL image)])` receives them.
    While it writes, the output is locked (NAME.lock): a second run on the same name is refused.
    `base_name`: the base checkpoint's name for messages (a LoRA-form resume on another base names it).
    """
    config.validate()
    config = config.with_defaults()
    rank, _world = dist_info()
    out_path = None if out_path is None else Path(out_path)
    if out_path is None or rank != 0:
        return _train_on_latents(model_patcher, clip, latents, config, out_path, resume, progress, should_stop,
                                 flipped_latents, data_info, bucket_hw, vae, on_preview, base_name)
    check_output_writable(out_path)
    with OutputLock(out_path):
        remove_partials(out_path)  # temp files of a save that a kill -9 interrupted
        return _train_on_latents(model_patcher, clip, latents, config, out_path, resume, progress, should_stop,
                                 flipped_latents, data_info, bucket_hw, vae, on_preview, base_name)


def _train_on_latents(model_patcher, clip, latents, config: TrainConfig, out_path, resume, progress, should_stop,
                      flipped_latents, data_info, bucket_hw, vae, on_preview, base_name=None) -> TrainResult:
    import comfy.model_management

    rank, world = dist_info()
    resume_file = None if out_path is None else resume_path_for(out_path)
    check_text_input(model_patcher, clip, config)
    data = TrainingData.prepare(model_patcher, latents, flipped_latents, config, data_info, bucket_hw,
                                vae_ratio=8 if vae is None else vae_spatial_ratio(vae))
    check_dit_conditioning(model_patcher, clip, data.size_hw)
    if config.buckets:
        log.info("InDomain training: aspect-ratio buckets (latent HxW: images) %s", data.source.bucket_counts)
    # resume state read and checked before building anything expensive
    saved = load_resume_state(resume_file, config, world, data.fingerprint) if resume else None

    device = comfy.model_management.get_torch_device()
    with torch.inference_mode(False), torch.enable_grad(), core_training_mode():
        run = _build(model_patcher, clip, data, config, device, saved, base_name)
        _restore(run, saved, device, world)
        # SDXL's size conditioning differs per bucket shape (SD1.x's empty prompt does not depend on it)
        run.prompts = {hw: empty_prompt(model_patcher, clip, hw) for hw in data.shapes if hw != tuple(data.size_hw)}
        training_info = _training_info(config, data, world, run.amp_dtype)
        meta = base_meta(model_patcher, trained_calibration(run.record, run.prompt), {}, form=run.form.name)
        saver = Saver(out_path, resume_file, rank, meta, training_info, config, world)
        previewer = Previewer(model_patcher, clip, vae, config, data, out_path, rank, meta, on_preview)

        interrupted = False
        t_start, images_seen = time.perf_counter(), 0
        while run.step < config.steps:
            if any_rank(bool(should_stop and should_stop()), world, device):
                interrupted = True
                break
            loss_value = _step_loss(run, data, config, rank, world, device)
            if not math.isfinite(loss_value):
                run.optimizer.zero_grad(set_to_none=True)
                raise saver.diverged(run, loss_value)
            _apply_step(run, config, loss_value)
            images_seen += config.batch_size * config.grad_accum * world
            if progress is not None:
                progress(run.step, config.steps, loss_value, images_seen / max(1e-9, time.perf_counter() - t_start))
            previewer.after_step(run)
            if config.save_every and run.step % config.save_every == 0 and run.step < config.steps:
                saver.save(run)

        saver.save(run)
        barrier(world)
        # exactly what the file holds (its precision included), so a model built from it equals the loaded file
        final = cast_for_saving(run.form.file_state(run.ema.state_dict(run.module, run.form.keeps_key)),
                                config.save_precision)
        if (out_path is not None and rank == 0 and not interrupted and not config.keep_resume_state
                and resume_file.is_file()):
            resume_file.unlink()
        losses = run.losses
        summary = dict(training_info, steps_done=run.step, target_steps=config.steps, interrupted=interrupted,
                       first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
                       seconds=round(time.perf_counter() - t_start, 3), rank=rank, weights_digest=weights_digest(final))
        if world > 1:
            summary["rank_weight_digests"] = gather_from_ranks(summary["weights_digest"], world)
    return TrainResult(path=out_path if (out_path is not None and saver.step is not None) else None,
                       losses=losses, steps_done=run.step, state_dict=final, interrupted=interrupted,
                       resume_path=resume_file if (resume_file is not None and resume_file.is_file()) else None,
                       meta=dataclasses.replace(meta, training=dict(training_info, steps=run.step)),
                       summary=summary,
                       loss_curve_path=saver.loss_curve if (saver.loss_curve is not None
                                                            and saver.loss_curve.is_file()) else None,
                       preview_paths=previewer.paths)


def check_text_input(model_patcher, clip, config: TrainConfig) -> None:
    """Refuse by name, before any work, what a run cannot do: no text input at all; a flow-matching DiT with a
    form other than 'lora'."""
    from ..forms.model import is_conditioning, is_flow_model

    family = type(model_patcher.model.model_config).__name__
    flow = is_flow_model(model_patcher)
    if clip is None:
        raise TrainingInputError(
            f"no text input: training needs the encoded EMPTY prompt once (every step is conditioned on it; "
            f"{family} " + ("fails without any text context). Connect 'empty_prompt' (CLIP Text Encode with an "
                            "empty text, from the family's own text encoder via Load CLIP), or 'clip'; on the "
                            "command line give --empty-prompt FILE or --clip FILE." if flow else
                            "calibrates its null-text constants with it). Connect the checkpoint's 'clip' (or "
                            "'empty_prompt')."))
    if config.preview_every and config.preview_prompt.strip() and is_conditioning(clip):
        raise TrainingInputError("preview_prompt needs a text encoder to encode the prompt: connect 'clip' (the "
                                 "family's text encoder) besides 'empty_prompt', or leave preview_prompt empty (the "
                                 "domain preview needs only the empty prompt).")
    if flow and config.form != "lora":
        raise TrainingInputError(f"{family} is a flow-matching DiT: its domain model is the 'lora' form (a text-free "
                                 f"LoRA in core's key format); form '{config.form}' needs an SD UNet's "
                                 "cross-attention layers. Choose form 'lora'.")


def check_dit_conditioning(model_patcher, clip, size_hw) -> None:
    """A DiT's empty-prompt conditioning, built once up front: image conditioning (reference latents, I2V) and
    concat-latent models are refused by name as input errors, before any model is copied."""
    from ..forms.model import dit_empty_prompt, is_flow_model
    from ..guidance.checkpoint import DomainCheckpointError

    if not is_flow_model(model_patcher):
        return
    try:
        dit_empty_prompt(model_patcher, clip, tuple(size_hw))
    except DomainCheckpointError as e:
        raise TrainingInputError(str(e)) from None


def prepare_images(image_dir, config: TrainConfig, within=None):
    """Pre-flight on the images alone (no model needed): settings, resolution, usable files (with `within`:
    only files that resolve inside that folder, links included; the Train node passes ComfyUI's input folder)."""
    config.validate()
    return scan_images(image_dir, config.resolution, within)


def train(model_patcher, clip, vae, image_dir, config: TrainConfig, out_path, resume: bool = False,
          progress: Callable | None = None, should_stop: Callable[[], bool] | None = None,
          scan=None, encode_progress: Callable | None = None, images=None,
          on_preview: Callable | None = None, base_name: str | None = None) -> TrainResult:
    """Image folder and/or IMAGE tensors -> cached VAE latents -> train_on_latents. Fails on bad input before any work.

    `images`: a ComfyUI IMAGE batch [B, H, W, C] or a list of them (images of different sizes), used
    besides (or instead of, with `image_dir` empty) the folder.
    """
    from ..guidance.checkpoint import weights_fingerprint
    from .image_items import encode_items, folder_items, tensor_items

    config.validate()
    config = config.with_defaults()
    if scan is None and image_dir not in (None, ""):
        scan = prepare_images(image_dir, config)
    items, skipped_tensors = tensor_items(images, config.resolution) if images is not None else ([], [])
    if scan is None and not items:
        what = ("all of the connected images were skipped (first: " + skipped_tensors[0] + ")" if skipped_tensors
                else "no image folder was given and no images are connected")
        raise TrainingInputError(f"no training images: {what}. Give a folder of domain images, or connect an IMAGE "
                                 "(Load Image, a dataset loader or any image node) to 'images'.")
    rank, _ = dist_info()
    lock = None
    if rank == 0:
        check_output_writable(out_path)
        lock = OutputLock(out_path).acquire()  # before any model work: a second writer is refused at once
    try:
        factor = model_resolution_factor(model_patcher, vae)
        check_resolution(config.resolution, factor)
        cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
        vae_fp = weights_fingerprint(vae.first_stage_model.state_dict())
        encoded, bucket_hw = EncodedImages([], [], []), None
        if scan is not None and not config.buckets:  # square folder images: the folder's own path (data.py)
            encoded = encode_images(vae, scan, config.resolution, config.crop, cache_dir, vae_fp, progress=encode_progress)
        if config.buckets or items:
            from .buckets import bucket_sizes, nearest_bucket

            more_items = (folder_items(scan) if scan is not None and config.buckets else []) + items
            if config.buckets:
                choices = bucket_sizes(config.resolution, factor)
                sizes = [nearest_bucket(*it.size, choices) for it in more_items]
                ratio = vae_spatial_ratio(vae)  # pixels per latent cell: 8, or 16 (Wan 2.2, Flux.2)
                bucket_hw = [(h // ratio, w // ratio) for w, h in sizes]
            else:
                sizes = [(config.resolution, config.resolution)] * len(more_items)
            more = encode_items(vae, more_items, sizes, config.crop, cache_dir, vae_fp, progress=encode_progress)
            encoded.latents += more.latents
            encoded.flipped += more.flipped
            encoded.digests += more.digests
            encoded.cache_hits += more.cache_hits
        skipped = (len(scan.skipped) if scan is not None else 0) + len(skipped_tensors)
        log.info("InDomain training: %d images (%d from cache, %d skipped)", len(encoded.latents), encoded.cache_hits,
                 skipped)
        data_info = {"images": (scan.count if scan is not None else 0) + len(items), "skipped": skipped,
                     "fingerprint": encoded.fingerprint, "cache_hits": encoded.cache_hits}
        result = train_on_latents(model_patcher, clip, encoded.latents, config, out_path, resume, progress, should_stop,
                                  flipped_latents=encoded.flipped, data_info=data_info, bucket_hw=bucket_hw, vae=vae,
                                  on_preview=on_preview, base_name=base_name)
        result.summary["skipped_files"] = ([f"{display_name(p.name)}: {why}" for p, why in scan.skipped] if scan is not None
                                           else []) + skipped_tensors
        result.summary["latent_cache_hits"] = encoded.cache_hits
        return result
    finally:
        if lock is not None:
            lock.release()
