"""Command line: train a domain UNet from a folder of images and a base checkpoint.

    python -m indomain.training --base ckpt.safetensors --images DIR --out NAME [options]

Runs data-parallel under `torchrun --nproc_per_node N -m indomain.training ...` (only rank 0
writes). Ctrl-C saves a checkpoint (and resume state) and exits; `--resume` continues.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from ..pack import DOMAIN_UNET_FOLDER, import_comfy

EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    from ..forms import FORMS
    from .config import BASE_PRECISIONS, TrainConfig

    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m indomain.training",
        description="Train an InDomain text-free domain UNet from a folder of unlabelled images and a base checkpoint. "
                    "The result loads in ComfyUI with the 'Load Domain UNet' node.",
        epilog="Several GPUs: torchrun --nproc_per_node N -m indomain.training ... (same options; batch size is per GPU).")
    base = p.add_mutually_exclusive_group(required=True)
    base.add_argument("--base", help="base checkpoint (.safetensors: model, CLIP and VAE) the domain model starts "
                      "from, e.g. ComfyUI/models/checkpoints/v1-5-pruned-emaonly.safetensors")
    base.add_argument("--diffusion-model", help="a diffusion model file alone (ComfyUI/models/diffusion_models: "
                      "Qwen-Image, Wan, Z-Image / Lumina 2, SD3.5, Chroma, Flux.2); give --empty-prompt or --clip, "
                      "and --latents (or --images with --vae)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--images", help="folder of domain images (searched recursively; jpg/png/webp/bmp)")
    data.add_argument("--latents", help="train on latents instead of images: a .latent / .safetensors file as core's "
                      "Save Latent writes it ('latent_tensor' [N,C,h,w], or [N,C,T,h,w] clips for Wan / Qwen-Image)")
    p.add_argument("--vae", help="with --diffusion-model and --images: the family's VAE file")
    p.add_argument("--clip", action="append", default=None, help="with --diffusion-model: the family's text encoder "
                   "file(s) (repeat for several), to encode the empty prompt once; see --clip-type")
    p.add_argument("--clip-type", default="stable_diffusion", help="core's CLIP type of --clip (as Load CLIP's 'type': "
                   "sd3, flux, flux2, chroma, lumina2, wan, qwen_image, ...)")
    p.add_argument("--empty-prompt", help="the encoded empty prompt as a .safetensors file: 'cross_attn' [1,T,D] and the "
                   "family's other conditioning tensors (e.g. 'pooled_output'; a 0-d 'guidance'); instead of --clip")
    p.add_argument("--timestep-sampling", choices=("uniform", "logit_normal"), default="uniform",
                   help="flow-matching DiTs: uniform t moved by the model's shift (default), or logit-normal t then the shift")
    p.add_argument("--out", required=True, help="output name or path; a bare NAME is saved as "
                   "ComfyUI/models/domain_unets/NAME.safetensors")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--lr", type=_lr, default=None, help="AdamW learning rate (default auto: the form's own, "
                   + ", ".join(f"{f.name} {f.DEFAULT_LR:g}" for f in FORMS.values()) + ")")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"AdamW weight decay (default {d.weight_decay:g})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"images per step per process (default {d.batch_size})")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="gradient accumulation steps (default 1)")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help=f"max gradient norm, 0 = off (default {d.grad_clip:g})")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help=f"EMA decay; the EMA is what is saved (default {d.ema_decay})")
    p.add_argument("--resolution", type=int, default=d.resolution, help=f"training resolution in px, a multiple of 8 "
                   f"(64 for SD1.5/SDXL's UNet) (default {d.resolution})")
    p.add_argument("--crop", choices=("center", "random"), default=d.crop, help="crop after resizing the short side (default center)")
    p.add_argument("--hflip", type=float, default=d.hflip, help=f"horizontal flip probability (default {d.hflip})")
    p.add_argument("--seed", type=int, default=d.seed, help="seed: a run is repeatable from it (default 0)")
    p.add_argument("--save-every", type=int, default=d.save_every, help=f"checkpoint every N steps, 0 = only at the end "
                   f"(default {d.save_every}); also saved on Ctrl-C")
    p.add_argument("--mixed-precision", choices=("auto", "no", "bf16", "fp16"), default=d.mixed_precision,
                   help="autocast on CUDA: auto = bf16 where supported, else fp16. On the CPU, auto trains in fp32; bf16 "
                        "autocasts where the CPU has native bf16 (AVX512-BF16 / AMX; ~2x faster), else fp32 with a warning")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in the backward pass: much less memory for some speed. Default: on "
                   "for --form lora, off otherwise; --no-grad-checkpointing turns it off")
    p.add_argument("--base-precision", choices=BASE_PRECISIONS, default=d.base_precision,
                   help="--form lora: dtype of the frozen base while training (the adapter and its optimiser state "
                   "are fp32). auto = the base's own bf16/fp16 where the device runs it (no copy), else bf16 where "
                   "supported (CPU, Ampere+), fp16 with loss scaling on older GPUs (default auto)")
    p.add_argument("--form", choices=sorted(FORMS), default=d.form, help="domain model form: "
                   + "; ".join(f"{f.name} = {f.description}" for f in FORMS.values()) + f" (default {d.form})")
    p.add_argument("--plain-finetune", action="store_true", help="same as --form plain: fine-tune the unmodified UNet "
                   "on the empty prompt (a plain UNet file, also loadable by core 'Load Diffusion Model'; for comparisons)")
    p.add_argument("--rank", type=int, default=d.lora_rank, help=f"--form lora: adapter rank (default {d.lora_rank})")
    p.add_argument("--alpha", type=float, default=None, help="--form lora: LoRA alpha; the adapter is scaled by "
                   "alpha / rank (default: the rank, scale 1)")
    p.add_argument("--save-precision", choices=("fp16", "fp32"), default=d.save_precision,
                   help=f"precision of the weights in the written file (default {d.save_precision}: half the size)")
    p.add_argument("--buckets", action="store_true", help="aspect-ratio buckets: train non-square images whole, in a few "
                   "shapes of about resolution x resolution pixels, instead of cropping them square")
    p.add_argument("--preview-every", type=int, default=d.preview_every, help="every N steps (and at the end) sample the "
                   "EMA model with a fixed seed into NAME.previews/ next to the output; 0 = off (default). Costs "
                   "sampling time: --preview-steps steps of two model passes (three with --preview-prompt) plus a VAE decode")
    p.add_argument("--preview-prompt", default=d.preview_prompt, help="also preview this prompt through decoupled "
                   "guidance (cfg 2.5, domain weight 2)")
    p.add_argument("--preview-steps", type=int, default=d.preview_steps, help=f"sampling steps per preview picture "
                   f"(default {d.preview_steps})")
    p.add_argument("--cache-dir", default=None, help="latent cache folder (default <pack>/.cache/latents)")
    p.add_argument("--resume", action="store_true", help="continue from NAME.resume (saved next to the output)")
    p.add_argument("--overwrite", action="store_true", help="a fresh run may replace an existing output file (it is "
                   "overwritten at the first checkpoint); without it, and without --resume, a taken name is refused "
                   "before any training")
    p.add_argument("--drop-resume-state", action="store_true", help="delete NAME.resume after a finished run "
                   "(saves disk; the run can then no longer be extended)")
    p.add_argument("--summary-json", default=None, help="also write the final summary as JSON to this file")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    return p


def _lr(text: str):
    """--lr: a number, or 'auto' (the form's default)."""
    return None if text.strip().lower() == "auto" else float(text)


def resolve_out(out: str, models_dir: Path | None = None) -> Path:
    """A bare name goes to <ComfyUI>/models/domain_unets; anything with a folder part is a path."""
    name = out if out.lower().endswith(".safetensors") else out + ".safetensors"
    if os.sep in out or (os.altsep and os.altsep in out) or out.startswith("."):
        return Path(name).expanduser().resolve()
    if models_dir is None:
        import folder_paths

        models_dir = Path(folder_paths.models_dir)
    return Path(models_dir) / DOMAIN_UNET_FOLDER / name


def config_from_args(args):
    from .config import BASE_PRECISIONS, TrainConfig

    return TrainConfig(
        steps=args.steps, lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
        grad_accum=args.grad_accum, grad_clip=args.grad_clip, ema_decay=args.ema_decay, resolution=args.resolution,
        crop=args.crop, hflip=args.hflip, seed=args.seed, save_every=args.save_every,
        mixed_precision=args.mixed_precision, grad_checkpointing=args.grad_checkpointing,
        base_precision=args.base_precision,
        form="plain" if args.plain_finetune else args.form, cache_dir=args.cache_dir,
        keep_resume_state=not args.drop_resume_state, lora_rank=args.rank, lora_alpha=args.alpha or 0.0,
        save_precision=args.save_precision, buckets=args.buckets, preview_every=args.preview_every,
        preview_prompt=args.preview_prompt, preview_steps=args.preview_steps,
        timestep_sampling=args.timestep_sampling)


def check_input_file(option: str, value: str) -> Path:
    from .data import TrainingInputError

    path = Path(value).expanduser()
    if not path.is_file():
        raise TrainingInputError(f"{option}: file not found: {path}.")
    if path.suffix.lower() not in (".safetensors", ".sft", ".latent"):
        raise TrainingInputError(f"{option} {path.name}: only .safetensors files are loaded (pickle files can run code).")
    return path


def load_latents(path) -> "torch.Tensor":
    """A latent file as core's Save Latent writes it ('latent_tensor'), or with a 'samples' tensor."""
    import safetensors.torch

    from .data import TrainingInputError

    sd = safetensors.torch.load_file(str(path), device="cpu")
    for key in ("latent_tensor", "samples"):
        if key in sd:
            x = sd[key].float()
            if "latent_format_version_0" not in sd and key == "latent_tensor":
                x = x * (1.0 / 0.18215)  # core's Load Latent: files without the marker hold scaled SD1 latents
            return x
    raise TrainingInputError(f"--latents {Path(path).name}: no 'latent_tensor' (or 'samples') tensor in the file.")


def load_empty_prompt(path) -> list:
    """--empty-prompt FILE -> CONDITIONING [[cross_attn, {other keys}]] (0-d tensors become numbers)."""
    import safetensors.torch

    from .data import TrainingInputError

    sd = safetensors.torch.load_file(str(path), device="cpu")
    if "cross_attn" not in sd:
        raise TrainingInputError(f"--empty-prompt {Path(path).name}: no 'cross_attn' tensor (the encoded empty prompt's "
                                 "text embedding, [1, tokens, width]).")
    extras = {k: (float(v) if v.ndim == 0 else v) for k, v in sd.items() if k != "cross_attn"}
    return [[sd["cross_attn"], extras]]


def preflight(args, config):
    """Everything that can be checked without a model, first; then ComfyUI; then the output's lock, so a second
    run on the same output stops here, before loading models. Returns (scan, base, rank, out_path, lock)."""
    from .config import check_output_writable, refuse_taken_output
    from .lock import OutputLock
    from .data import TrainingInputError
    from .distributed import setup_distributed
    from .trainer import prepare_images

    config.validate()
    scan = prepare_images(args.images, config) if args.images else None
    for option, value in (("--base", args.base), ("--diffusion-model", args.diffusion_model), ("--latents", args.latents),
                          ("--vae", args.vae), ("--empty-prompt", args.empty_prompt)):
        if value:
            check_input_file(option, value)
    for value in args.clip or []:
        check_input_file("--clip", value)
    if args.diffusion_model and not (args.clip or args.empty_prompt):
        raise TrainingInputError("--diffusion-model needs the encoded empty prompt (every step is conditioned on it): "
                                 "give --empty-prompt FILE, or --clip FILE with --clip-type for the family's text encoder.")
    if args.diffusion_model and args.images and not args.vae:
        raise TrainingInputError("--diffusion-model with --images needs the family's VAE (--vae FILE), or train on "
                                 "--latents.")
    base = Path(args.base or args.diffusion_model).expanduser()
    rank, _world, _local = setup_distributed()
    import_comfy(cpu=True if args.cpu else None)
    out_path = resolve_out(args.out)
    lock = None
    if rank == 0:
        check_output_writable(out_path)
        lock = OutputLock(out_path).acquire()
    try:  # after the lock: a run still writing this name is reported as such, not as a taken name
        refuse_taken_output(out_path, args.resume, args.overwrite, "--overwrite")
    except TrainingInputError:
        if lock is not None:
            lock.release()
        raise
    return scan, base, rank, out_path, lock


class CtrlC:
    """First Ctrl-C asks the trainer to stop after this step (it saves first); the second aborts."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        return False

    def _on_sigint(self, signum, frame):
        if self.requested:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: finishing this step, saving a checkpoint (Ctrl-C again to abort without saving)",
              file=sys.stderr, flush=True)


def progress_bar(total: int, rank: int):
    """(progress callback, close) showing steps, loss and images/s on rank 0."""
    if rank != 0:
        return (lambda *a: None), (lambda: None)
    from tqdm import tqdm

    bar = tqdm(total=total, desc="training", unit="step", dynamic_ncols=True, file=sys.stderr)

    def progress(step, total, loss, ips):
        bar.n = step
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.1f}", refresh=False)
        bar.refresh()

    return progress, bar.close


def print_summary(result, config, summary_json: str | None) -> None:
    s = result.summary
    state = "interrupted" if result.interrupted else "done"
    print(f"{state}: {result.steps_done}/{config.steps} steps, loss {s.get('first_loss') or float('nan'):.4f} -> "
          f"{s.get('last_loss') or float('nan'):.4f}, {s['images']} images ({s['skipped']} skipped), "
          f"{s['seconds']:.1f} s", flush=True)
    for line in s.get("skipped_files", []):
        print(f"  skipped {line}")
    if result.path:
        print(f"saved {result.path}")
    if result.loss_curve_path:
        print(f"loss curve {result.loss_curve_path}")
    if result.preview_paths:
        print(f"previews {result.preview_paths[0].parent} ({len(result.preview_paths)} pictures)")
    if result.resume_path:
        print(f"resume state {result.resume_path} (continue with --resume)")
    if summary_json:
        Path(summary_json).write_text(json.dumps(dict(
            s, path=str(result.path) if result.path else None,
            loss_curve=str(result.loss_curve_path) if result.loss_curve_path else None,
            previews=[str(p) for p in result.preview_paths]), indent=2, default=str))


def say_preview(out_path):
    """on_preview for the command line: one line per preview above the progress bar."""
    def on_preview(step, total, pictures):
        from tqdm import tqdm

        from .preview import preview_dir_for

        tqdm.write(f"preview at step {step}: {preview_dir_for(out_path)}/step_{step:06d}_*.png", file=sys.stderr)
    return on_preview


def configure_logging() -> None:
    """The trainer's own information lines (logger 'indomain') at INFO; everything else (ComfyUI's model
    loading chatter on the root logger) at WARNING. Not `getLogger("root")`: that *is* the root logger."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("indomain").setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()

    from .config import TrainingDiverged
    from .data import TrainingInputError

    if args.cpu:
        os.environ["INDOMAIN_FORCE_CPU"] = "1"
    config = config_from_args(args)
    try:
        scan, base, rank, out_path, lock = preflight(args, config)
    except TrainingInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return _run(args, config, scan, base, rank, out_path)
    finally:
        if lock is not None:
            lock.release()


def _run(args, config, scan, base, rank, out_path) -> int:
    from .data import TrainingInputError
    from .trainer import TrainingDiverged

    import comfy.sd

    from .trainer import train, train_on_latents

    if rank == 0:
        what = (f"latents {args.latents}" if scan is None else f"{scan.count} images in {scan.folder}"
                + (f" ({len(scan.skipped)} skipped)" if scan.skipped else ""))
        print(f"InDomain training: {what} -> {out_path}", flush=True)
    if args.base:
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(base), output_vae=True, output_clip=True)
    else:
        model = comfy.sd.load_diffusion_model(str(base))
        clip = vae = None
        if args.vae:
            import comfy.utils

            vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(args.vae, safe_load=True))
        if args.clip:
            clip_type = getattr(comfy.sd.CLIPType, args.clip_type.upper(), None)
            if clip_type is None:
                print(f"error: --clip-type {args.clip_type!r} is not one of this ComfyUI's CLIP types "
                      f"({', '.join(t.name.lower() for t in comfy.sd.CLIPType)})", file=sys.stderr)
                return 2
            clip = comfy.sd.load_clip(ckpt_paths=list(args.clip), clip_type=clip_type)
    if args.empty_prompt:
        clip = load_empty_prompt(args.empty_prompt)  # the encoded empty prompt itself (takes precedence)
    progress, close_bar = progress_bar(config.steps, rank)
    try:
        with CtrlC() as ctrl_c:
            if args.latents:
                result = train_on_latents(model, clip, load_latents(args.latents), config, out_path,
                                          resume=args.resume, progress=progress, should_stop=lambda: ctrl_c.requested,
                                          vae=vae, on_preview=say_preview(out_path), base_name=base.name)
            else:
                result = train(model, clip, vae, scan.folder, config, out_path, resume=args.resume, progress=progress,
                               should_stop=lambda: ctrl_c.requested, scan=scan, on_preview=say_preview(out_path),
                               base_name=base.name)
    except TrainingInputError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 3
    finally:
        close_bar()
    if rank == 0:
        print_summary(result, config, args.summary_json)
    try:
        from .distributed import finish_distributed

        finish_distributed()
    except Exception:
        pass
    return EXIT_INTERRUPTED if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
