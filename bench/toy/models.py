"""The models the benchmark trains: the base (from scratch, text-conditioned), the ControlNet (base frozen)
and the fine-tunes (b), (c), (d) through the pack's trainer; each cached by its settings."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .. import common
from .config import DOMAIN_FIELDS, ToyConfig, autocast, log

def encode(clip, text: str) -> torch.Tensor:
    cond, _pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return cond.detach().float().cpu()


def base_lr_at(cfg: ToyConfig, step: int) -> float:
    """The base's learning rate at `step`: linear warm-up over 50 steps (a stable from-scratch start), then
    ("cosine") a cosine decay to 0 at base_steps, or ("constant") the peak rate throughout."""
    lr = cfg.base_lr * min(1.0, (step + 1) / 50)
    if cfg.base_schedule == "cosine":
        lr *= 0.5 * (1.0 + math.cos(math.pi * min(step, cfg.base_steps) / max(1, cfg.base_steps)))
    return lr


def train_base(cfg: ToyConfig, model_patcher, clip, raw_out: dict | None = None,
               step_ends: list | None = None) -> tuple[dict, list[float]]:
    """Train the tiny UNet from its deterministic init on the plain world, text-conditioned. With cfg.base_ema the
    weights returned are the exponential moving average (the raw last weights go to `raw_out` when given).
    `step_ends`, when given, gets the perf_counter at the end of every step (step times without the set-up)."""
    from ...devkit import toy_world as world
    from ...forms.model import detached_unet_copy, native_target, noisy_inputs, sample_sigmas
    from ...training.optim import EMA

    ms = model_patcher.get_model_object("model_sampling")
    combos = world.all_combos()
    contexts = torch.cat([encode(clip, world.prompt(s, c)) for s, c in combos])   # (16, 77, 768)
    empty = encode(clip, "")
    unet = detached_unet_copy(model_patcher)
    for p in unet.parameters():
        p.requires_grad_(True)
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.base_lr, weight_decay=1e-2)
    ema = EMA(unet) if cfg.base_ema else None  # the trainer's own EMA, at a constant decay
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    losses = []
    t0 = time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad():
        for step in range(cfg.base_steps):
            b = world.sample_batch(cfg.base_batch, gen, style="plain")
            combo_idx = b.shape * len(world.COLOURS) + b.colour  # all_combos() order: shape-major
            ctx = contexts[combo_idx]
            drop = torch.rand(cfg.base_batch, generator=gen) < cfg.p_uncond
            ctx[drop] = empty
            sigma = sample_sigmas(ms, cfg.base_batch, gen)
            noise = torch.randn(b.latents.shape, generator=gen)
            xc, t, x_noisy = noisy_inputs(ms, b.latents, sigma, noise)
            for g in opt.param_groups:
                g["lr"] = base_lr_at(cfg, step)
            with autocast(cfg):
                pred = unet(xc, t, context=ctx)
            loss = torch.nn.functional.mse_loss(pred.float(), native_target(ms, sigma, b.latents, noise, x_noisy))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            if ema is not None:
                ema.update(unet, cfg.base_ema)
            losses.append(float(loss.detach()))
            if step_ends is not None:
                step_ends.append(time.perf_counter())
            if step % 20 == 0 or step == cfg.base_steps - 1:
                log(f"base step {step + 1}/{cfg.base_steps} loss {losses[-1]:.4f} "
                    f"({(time.perf_counter() - t0) / (step + 1):.2f} s/step)")
    raw = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    if raw_out is not None:
        raw_out.update(raw)
    return (ema.state_dict(unet) if ema is not None else raw), losses


def controlnet_init(unet: torch.nn.Module, seed: int) -> torch.nn.Module:
    """core's ControlNet of the tiny UNet's layout, initialised the ControlNet way: its encoder a copy of the
    base's (time embedding, input blocks), every zero conv and the hint encoder's last conv at zero, so it
    starts as "no control"; the rest (hint encoder, its middle block, which the tiny base lacks) from `seed`."""
    import comfy.cldm.cldm
    import comfy.ops

    from ...devkit import tiny_models

    conf = {k: v for k, v in tiny_models.SD15_TINY_UNET.items() if k != "out_channels"}
    cn = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, **conf)
    tiny_models.init_weights_(cn, seed)
    base_sd, own = unet.state_dict(), cn.state_dict()
    copied = {k: v for k, v in base_sd.items() if k in own and own[k].shape == v.shape}
    cn.load_state_dict(copied, strict=False)
    with torch.no_grad():
        for m in [*cn.zero_convs, cn.middle_block_out, cn.input_hint_block[-1]]:
            for prm in m.parameters():
                prm.zero_()
    return cn.float()


def train_controlnet(cfg: ToyConfig, model_patcher, clip) -> tuple[dict, list[float]]:
    """Train a ControlNet on the base's plain world, the base frozen: the hint is the shape's mask as a ComfyUI
    hint image; the frozen base's diffusion model takes the ControlNet's output as `control=`; MSE on the
    noise; only the ControlNet is optimised. Returns (state dict without prefix, losses)."""
    from ...devkit import toy_world as world
    from ...forms.model import detached_unet_copy, native_target, noisy_inputs, sample_sigmas

    ms = model_patcher.get_model_object("model_sampling")
    contexts = torch.cat([encode(clip, world.prompt(s, c)) for s, c in world.all_combos()])
    empty = encode(clip, "")
    unet = detached_unet_copy(model_patcher)
    unet.eval()
    for prm in unet.parameters():
        prm.requires_grad_(False)
    seed = cfg.seed + 20
    cn = controlnet_init(unet, seed)
    cn.train()
    opt = torch.optim.AdamW(cn.parameters(), lr=cfg.cnet_lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    losses = []
    t0 = time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad():
        for step in range(cfg.cnet_steps):
            b = world.sample_batch(cfg.cnet_batch, gen, style="plain")
            hint = world.hint_image(b.masks).movedim(-1, 1)  # (B, 3, 64, 64): what core's ControlNet feeds its model
            ctx = contexts[b.shape * len(world.COLOURS) + b.colour]
            ctx[torch.rand(cfg.cnet_batch, generator=gen) < cfg.cnet_p_uncond] = empty
            sigma = sample_sigmas(ms, cfg.cnet_batch, gen)
            noise = torch.randn(b.latents.shape, generator=gen)
            xc, t, x_noisy = noisy_inputs(ms, b.latents, sigma, noise)
            for g in opt.param_groups:
                g["lr"] = cfg.cnet_lr * min(1.0, (step + 1) / 20)
            with autocast(cfg):
                control = cn(x=xc, hint=hint, timesteps=t, context=ctx)
                pred = unet(xc, t, context=ctx, control=control)
            loss = torch.nn.functional.mse_loss(pred.float(), native_target(ms, sigma, b.latents, noise, x_noisy))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(cn.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            if step % 20 == 0 or step == cfg.cnet_steps - 1:
                log(f"controlnet step {step + 1}/{cfg.cnet_steps} loss {losses[-1]:.4f} "
                    f"({(time.perf_counter() - t0) / (step + 1):.2f} s/step)")
    return {k: v.detach().clone() for k, v in cn.state_dict().items()}, losses


FORM_OF = {"naive": "plain", "domain": "full", "lora": "lora"}
FOLDER_OF = {"naive": "diffusion_models", "domain": "domain_unets", "lora": "domain_unets"}


def finetune_name(cfg: ToyConfig, which: str, seed: int, steps: int) -> str:
    from .world import DOMAIN_WORLD_VERSION

    # the domain images' world is in the key: a fine-tune of other domain images is another model
    extra = {"form": FORM_OF[which], "ft_seed": cfg.seed + seed, "steps": steps, "domain_world": DOMAIN_WORLD_VERSION}
    if which == "lora":
        extra.update(lora_rank=cfg.lora_rank, lora_lr=cfg.lora_lr)
    return f"toy_{which}_{cfg.key(*DOMAIN_FIELDS, **extra)}.safetensors"


def finetune(cfg: ToyConfig, which: str, seed: int, steps: int, base_model, base_clip, latents, root: Path,
             retrain: bool) -> tuple[str, dict, bool]:
    """Train (or reuse) one fine-tune; returns (file name, summary, trained now)."""
    from ...training.trainer import TrainConfig, train_on_latents

    name = finetune_name(cfg, which, seed, steps)
    path = root / "models" / FOLDER_OF[which] / name
    record = path.with_suffix(".json")
    if path.exists() and record.exists() and not retrain:
        return name, json.loads(record.read_text()), False
    log(f"training {which} (form {FORM_OF[which]}, seed {cfg.seed + seed}, {steps} steps)")
    t = time.perf_counter()
    tc = TrainConfig(steps=steps, lr=cfg.lora_lr if which == "lora" else cfg.domain_lr, batch_size=cfg.domain_batch,
                     resolution=64, hflip=0.0, seed=cfg.seed + seed, save_every=0, form=FORM_OF[which],
                     ema_decay=cfg.ema_decay, calibration_images=min(64, cfg.domain_images), keep_resume_state=False,
                     lora_rank=cfg.lora_rank, cache_dir=str(root / "latent_cache"),
                     mixed_precision="bf16" if cfg.precision == "bf16" else "no")
    res = train_on_latents(base_model, base_clip, latents, tc, out_path=path)
    summary = {"form": FORM_OF[which], "seed": cfg.seed + seed, "steps": res.steps_done,
               "first_loss": res.losses[0], "last_loss": res.losses[-1],
               "mean_loss_last_10": sum(res.losses[-10:]) / len(res.losses[-10:]),
               "seconds": time.perf_counter() - t, "losses": [float(x) for x in res.losses]}
    common.write_json(record, summary)
    import comfy.model_management

    comfy.model_management.unload_all_models()
    return name, summary, True
