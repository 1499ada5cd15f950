"""What a training run takes (TrainConfig, validated up front) and gives (TrainResult), and where it writes."""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..forms import FORMS
from ..pack import DOMAIN_UNET_FOLDER, PACK_ROOT
from .data import TrainingInputError, check_resolution

RESUME_SUFFIX = ".resume"
BASE_PRECISIONS = ("auto", "bf16", "fp16", "fp32")


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf. The message names the step, the last good checkpoint and the fix."""


@dataclass
class TrainConfig:
    steps: int = 2000
    lr: Optional[float] = None         # AdamW learning rate; None = the form's own default (forms/: DEFAULT_LR,
                                       # full 1e-5 as in the paper, lora 1e-4); see with_defaults()
    weight_decay: float = 1e-2
    batch_size: int = 4
    grad_accum: int = 1
    grad_clip: float = 1.0             # max global grad norm; 0 disables
    ema_decay: float = 0.9999          # with warm-up: min(decay, (1 + k) / (10 + k)) at optimizer step k
    resolution: int = 512
    crop: str = "center"               # "center" | "random"
    hflip: float = 0.5
    seed: int = 0
    save_every: int = 500              # also saved at the end and on interruption; 0 = only then
    mixed_precision: str = "auto"      # "auto" (bf16/fp16 autocast on CUDA, fp32 on CPU) | "no" | "bf16" (CPU too, if native) | "fp16"
    grad_checkpointing: Optional[bool] = None  # recompute block activations in the backward pass; None = the
                                       # form's default (on for the LoRA form, off for full/plain): see with_defaults()
    base_precision: str = "auto"       # LoRA form: dtype of the frozen base while it trains: "auto" (the base's own
                                       # half dtype; else bf16 where the device runs it natively, fp16 on older GPUs;
                                       # bf16 on CPU) | "bf16" | "fp16" (GradScaler) | "fp32". Adapter + AdamW: fp32
    form: str = "full"                 # domain model form (forms/): "full" null-text UNet | "plain" fine-tune (baseline)
                                       # | "lora" low-rank null-text adapter on the base's own weights
    lora_rank: int = 32                # LoRA form: adapter rank
    lora_alpha: float = 0.0            # LoRA form: scale alpha / rank; 0 = the rank (scale 1)
    save_precision: str = "fp16"       # weights in the written file: "fp16" (half the size) | "fp32"
    calibration_images: int = 64       # domain latents used to calibrate the null-text constants
    cache_dir: Optional[str] = None    # latent cache; default <pack>/.cache/latents
    keep_resume_state: bool = True     # keep NAME.resume after a finished run (lets --resume extend it)
    buckets: bool = False              # aspect-ratio buckets of about resolution² pixels instead of square crops
    preview_every: int = 0             # sample the EMA model every N steps (and at the end); 0 = off
    preview_prompt: str = ""           # also preview this prompt through decoupled guidance
    preview_steps: int = 20            # sampling steps per preview picture
    timestep_sampling: str = "uniform"  # flow-matching models: "uniform" t then the model's shift | "logit_normal"
    logit_mean: float = 0.0            # logit_normal: t = sigmoid(N(logit_mean, logit_std)), then the shift
    logit_std: float = 1.0

    def with_defaults(self) -> "TrainConfig":
        """These settings with what was left to the form filled in (lr None -> the form's DEFAULT_LR): what a
        run uses, records in its file and resume state, and compares on resume."""
        out = self
        if out.lr is None and out.form in FORMS:
            out = dataclasses.replace(out, lr=FORMS[out.form].DEFAULT_LR)
        if out.grad_checkpointing is None:
            # the LoRA form trains a frozen base: its memory is activations, which checkpointing cuts
            out = dataclasses.replace(out, grad_checkpointing=out.form == "lora")
        return out

    def validate(self) -> None:
        problems = []
        if self.steps < 1:
            problems.append(f"steps must be >= 1 (got {self.steps})")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1 (got {self.batch_size})")
        if self.grad_accum < 1:
            problems.append(f"grad_accum must be >= 1 (got {self.grad_accum})")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be a positive number, or left to the form (got {self.lr}); "
                            + ", ".join(f"{f.name} {f.DEFAULT_LR:g}" for f in FORMS.values()) + " are the defaults")
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"ema_decay must be in [0, 1) (got {self.ema_decay})")
        if not 0.0 <= self.hflip <= 1.0:
            problems.append(f"hflip is a probability in [0, 1] (got {self.hflip})")
        if self.crop not in ("center", "random"):
            problems.append(f"crop must be 'center' or 'random' (got {self.crop!r})")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            problems.append(f"mixed_precision must be auto, no, bf16 or fp16 (got {self.mixed_precision!r})")
        if self.base_precision not in BASE_PRECISIONS:
            problems.append(f"base_precision must be {', '.join(BASE_PRECISIONS)} (got {self.base_precision!r})")
        if self.save_every < 0:
            problems.append(f"save_every must be >= 0 (got {self.save_every})")
        if self.lora_rank < 1:
            problems.append(f"lora_rank must be >= 1 (got {self.lora_rank})")
        if not (self.lora_alpha >= 0 and math.isfinite(self.lora_alpha)):
            problems.append(f"lora_alpha must be >= 0 (got {self.lora_alpha}); 0 means the rank")
        if self.save_precision not in ("fp16", "fp32"):
            problems.append(f"save_precision must be fp16 or fp32 (got {self.save_precision!r})")
        if self.preview_every < 0:
            problems.append(f"preview_every must be >= 0 (got {self.preview_every})")
        if self.preview_steps < 1:
            problems.append(f"preview_steps must be >= 1 (got {self.preview_steps})")
        if self.timestep_sampling not in ("uniform", "logit_normal"):
            problems.append(f"timestep_sampling must be 'uniform' or 'logit_normal' (got {self.timestep_sampling!r})")
        if not (self.logit_std > 0 and math.isfinite(self.logit_std) and math.isfinite(self.logit_mean)):
            problems.append(f"logit_std must be > 0 and logit_mean finite (got {self.logit_mean}, {self.logit_std})")
        if self.form not in FORMS:
            problems.append(f"form must be one of {', '.join(FORMS)} (got {self.form!r})")
        if problems:
            raise TrainingInputError("invalid training settings: " + "; ".join(problems) + ".")
        check_resolution(self.resolution)


@dataclass
class TrainResult:
    path: Optional[Path]
    losses: list[float]
    steps_done: int
    state_dict: dict[str, torch.Tensor]          # what is saved: the form's file state of the EMA weights
    interrupted: bool = False
    resume_path: Optional[Path] = None
    meta: object = None                          # DomainMeta
    summary: dict = field(default_factory=dict)
    loss_curve_path: Optional[Path] = None       # NAME.loss.png next to the output
    preview_paths: list = field(default_factory=list)  # pictures saved in NAME.previews/


def resume_path_for(out_path: Path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + RESUME_SUFFIX)


def check_output_writable(out_path) -> Path:
    """Fail before any work when the output cannot be written; leaves nothing behind."""
    out_path = Path(out_path).expanduser()
    if out_path.suffix.lower() != ".safetensors":
        raise TrainingInputError(f"output {out_path.name!r}: domain UNets are saved as .safetensors; "
                                 "use a name ending in .safetensors (or no extension).")
    if out_path.is_dir():
        raise TrainingInputError(f"output {out_path} is a folder; give a file name such as {out_path / 'my_domain.safetensors'}.")
    folder = out_path.parent
    created = []
    try:
        probe = folder
        while not probe.exists():
            created.append(probe)
            probe = probe.parent
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".indomain-write-test.", dir=folder)
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        for d in created:  # undo folders we made for nothing (deepest first)
            try:
                d.rmdir()
            except OSError:
                pass
        raise TrainingInputError(f"cannot write the output {out_path}: {e.strerror or e}. Choose a writable folder "
                                 f"(or a bare name to save into ComfyUI/models/{DOMAIN_UNET_FOLDER}).") from None
    return out_path


def refuse_taken_output(out_path, resume: bool, overwrite: bool, switch: str = "overwrite") -> None:
    """Never replace an existing domain model silently: a fresh (not resumed) run whose output file exists is
    refused before any work unless `overwrite` is set. `switch` names the setting in the caller's words
    ('overwrite' on the node, '--overwrite' on the command line)."""
    out_path = Path(out_path).expanduser()
    if resume or overwrite or not out_path.exists():
        return
    resume_word = "resume" if switch == "overwrite" else "--resume"
    raise TrainingInputError(
        f"{out_path.name} already exists and this is a fresh run (not resumed): its first checkpoint would replace "
        f"that model. Pick another save name, turn on {resume_word} to continue the saved run, or turn on {switch} "
        "to replace it (the old file and its resume state are overwritten at the first checkpoint).")


def default_cache_dir() -> Path:
    return Path(os.environ.get("INDOMAIN_LATENT_CACHE", PACK_ROOT / ".cache" / "latents"))
