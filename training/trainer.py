"""The training loop: base checkpoint + domain latents -> null-text domain UNet.

Full fine-tune of the null-text UNet (training/model.py builds and calibrates it) with the
ordinary denoising loss on the model's native target, AdamW, gradient clipping, EMA (the
saved model is the EMA), gradient accumulation, mixed precision on CUDA, optional gradient
checkpointing, and data-parallel training under torchrun.

Every random choice of a step (which images, flips, crops, noise levels, noise) is a pure
function of (seed, step, micro-batch, rank), so a resumed run continues exactly where an
uninterrupted one would be, and a run is repeatable from its seed.

Resume state is one safetensors file next to the output (`NAME.resume`, not listed by the
loader): live weights, EMA, AdamW moments, step, RNG states, with the run's settings as JSON
metadata. Never pickle.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..guidance.checkpoint import DomainCheckpointError, save_safetensors_atomic, write_domain_checkpoint
from ..guidance.nulltext import convert_to_null_text
from .lock import OutputLock, remove_partials
from .data import TrainingInputError, check_resolution, display_name, encode_images, scan_images
from .model import (base_meta, cpu_model_sampling, detached_unet_copy, empty_prompt, make_null_text_unet,
                    native_target, noisy_inputs, sample_sigmas)

log = logging.getLogger("indomain.training")

RESUME_SUFFIX = ".resume"
RESUME_FORMAT = "indomain.resume"
RESUME_VERSION = 1
# settings that must match for a resumed run to continue the same run
RESUME_MUST_MATCH = ("seed", "batch_size", "grad_accum", "resolution", "crop", "hflip", "null_text", "ema_decay",
                     "weight_decay")


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf. The message names the step, the last good checkpoint and the fix."""


@dataclass
class TrainConfig:
    steps: int = 2000
    lr: float = 1e-5
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
    mixed_precision: str = "auto"      # "auto" (bf16/fp16 autocast on CUDA, fp32 on CPU) | "no" | "bf16" | "fp16"
    grad_checkpointing: bool = False
    null_text: bool = True             # False: plain fine-tune of the unmodified UNet on the empty prompt (baseline)
    calibration_images: int = 64       # domain latents used to calibrate the null-text constants
    cache_dir: Optional[str] = None    # latent cache; default <pack>/.cache/latents
    keep_resume_state: bool = True     # keep NAME.resume after a finished run (lets --resume extend it)

    def validate(self) -> None:
        problems = []
        if self.steps < 1:
            problems.append(f"steps must be >= 1 (got {self.steps})")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1 (got {self.batch_size})")
        if self.grad_accum < 1:
            problems.append(f"grad_accum must be >= 1 (got {self.grad_accum})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be a positive number (got {self.lr}); 1e-5 is the reference")
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"ema_decay must be in [0, 1) (got {self.ema_decay})")
        if not 0.0 <= self.hflip <= 1.0:
            problems.append(f"hflip is a probability in [0, 1] (got {self.hflip})")
        if self.crop not in ("center", "random"):
            problems.append(f"crop must be 'center' or 'random' (got {self.crop!r})")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            problems.append(f"mixed_precision must be auto, no, bf16 or fp16 (got {self.mixed_precision!r})")
        if self.save_every < 0:
            problems.append(f"save_every must be >= 0 (got {self.save_every})")
        if problems:
            raise TrainingInputError("invalid training settings: " + "; ".join(problems) + ".")
        check_resolution(self.resolution)


@dataclass
class TrainResult:
    path: Optional[Path]
    losses: list[float]
    steps_done: int
    state_dict: dict[str, torch.Tensor]          # the EMA weights (what is saved)
    interrupted: bool = False
    resume_path: Optional[Path] = None
    meta: object = None                          # DomainMeta (null-text runs)
    summary: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- paths and pre-flight checks


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
        raise TrainingInputError(f"cannot write the output {out_path}: {e.strerror or e}. "
                                 "Choose a writable folder (or a bare name to save into ComfyUI/models/domain_unets).") from None
    return out_path


def default_cache_dir() -> Path:
    from ..devkit.host import PACK_ROOT

    return Path(os.environ.get("INDOMAIN_LATENT_CACHE", PACK_ROOT / ".cache" / "latents"))


# ----------------------------------------------------------------------------- determinism


def step_generator(seed: int, *keys) -> torch.Generator:
    """A CPU generator seeded by (seed, keys): the randomness of a step depends on nothing else."""
    digest = hashlib.sha256(repr((int(seed),) + tuple(keys)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class LatentSource:
    """Per-image latents (each [C, h, w], h/w >= the training size) and their mirrored encodings."""

    def __init__(self, latents, flipped=None, size_hw: tuple[int, int] | None = None, crop: str = "center"):
        if isinstance(latents, torch.Tensor):
            if latents.ndim != 4:
                raise TrainingInputError(f"latents must be [N, C, H, W]; got shape {tuple(latents.shape)}")
            latents = list(latents)
        if isinstance(flipped, torch.Tensor):
            flipped = list(flipped)
        if not latents:
            raise TrainingInputError("no training latents were given (the image folder produced none).")
        self.latents = [x.detach().float().cpu().clone() for x in latents]
        self.flipped = None if flipped is None else [x.detach().float().cpu().clone() for x in flipped]
        self.crop = crop
        if size_hw is None:
            size_hw = (min(x.shape[-2] for x in self.latents), min(x.shape[-1] for x in self.latents))
        self.size_hw = tuple(int(s) for s in size_hw)
        small = [i for i, x in enumerate(self.latents) if x.shape[-2] < self.size_hw[0] or x.shape[-1] < self.size_hw[1]]
        if small:
            raise TrainingInputError(f"latent {small[0]} is smaller than the training size {self.size_hw}")
        self._perms: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.latents)

    def index_at(self, seed: int, position: int) -> int:
        """The image at global sample `position`: epoch-wise permutations, a pure function of (seed, position)."""
        n = len(self)
        epoch = position // n
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = torch.randperm(n, generator=step_generator(seed, "perm", epoch))
        return int(self._perms[epoch][position % n])

    def batch(self, indices: list[int], gen: torch.Generator, hflip: float) -> torch.Tensor:
        th, tw = self.size_hw
        out = []
        for i in indices:
            flip = bool(torch.rand((), generator=gen) < hflip)
            src = self.latents[i]
            if flip:
                src = self.flipped[i] if self.flipped is not None else torch.flip(src, dims=[-1])
            h, w = src.shape[-2:]
            if self.crop == "random":
                top = int(torch.randint(0, h - th + 1, (), generator=gen))
                left = int(torch.randint(0, w - tw + 1, (), generator=gen))
            else:
                top, left = (h - th) // 2, (w - tw) // 2
            out.append(src[:, top:top + th, left:left + tw])
        return torch.stack(out)


# ----------------------------------------------------------------------------- distributed


def dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_distributed() -> tuple[int, int, int]:
    """Initialise torch.distributed when launched by torchrun (NCCL on GPUs, gloo on CPU).

    Returns (rank, world_size, local_rank). Call before ComfyUI picks its device.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1:
        return 0, 1, 0
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and os.environ.get("INDOMAIN_FORCE_CPU") != "1"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank


def _all_reduce_mean(value: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value = value / world
    return value


def _any_rank(flag: bool, world: int, device) -> bool:
    if world <= 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over every byte of every tensor (exact identity, for the cross-rank check)."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- model helpers


def _materialise_(module: torch.nn.Module) -> torch.nn.Module:
    """Replace inference-mode tensors (ComfyUI executes nodes under torch.inference_mode) by ordinary
    ones, so autograd can use them."""
    with torch.inference_mode(False):
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None:
                    m._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            for name, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[name] = b.detach().clone()
    return module


def _enable_grad_checkpointing(unet: torch.nn.Module) -> int:
    """Recompute each UNet block's activations in the backward pass (less memory, ~30% slower)."""
    from torch.utils.checkpoint import checkpoint

    blocks = []
    for attr in ("input_blocks", "output_blocks"):
        blocks += list(getattr(unet, attr, []) or [])
    mid = getattr(unet, "middle_block", None)
    if isinstance(mid, torch.nn.Module):
        blocks.append(mid)
    for b in blocks:
        inner = b.forward

        def fwd(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        b.forward = fwd
    return len(blocks)


def _autocast_dtype(config: TrainConfig, device: torch.device):
    mp = config.mixed_precision
    if device.type != "cuda":
        if mp in ("bf16", "fp16"):
            log.warning("InDomain training: %s autocast requested on %s; training in fp32 (CPU autocast was "
                        "15x slower here)", mp, device.type)
        return None
    if mp == "no":
        return None
    if mp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mp == "bf16" else torch.float16


class _EMA:
    def __init__(self, module: torch.nn.Module):
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, decay: float) -> None:
        for n, p in module.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1.0 - decay)

    def state_dict(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The module's full state dict (buffers such as the null-text constants included) with EMA weights."""
        out = {}
        for k, v in module.state_dict().items():
            out[k] = (self.shadow[k] if k in self.shadow else v).detach().float().cpu().clone()
        return out


def ema_decay_at(step: int, decay: float) -> float:
    return min(decay, (1.0 + step) / (10.0 + step))


# ----------------------------------------------------------------------------- saving


def _write_output(path: Path, state_dict: dict, meta, null_text: bool) -> Path:
    if null_text:
        return write_domain_checkpoint(path, state_dict, meta)
    # baseline: a plain UNet state dict, loadable by core 'Load Diffusion Model'
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise DomainCheckpointError(f"refusing to write {path}: non-finite values in {bad[:3]}.")
    md = {k: v for k, v in meta.to_metadata().items() if k in ("indomain.training", "indomain.base_architecture",
                                                               "indomain.model_type", "indomain.base_fingerprint")}
    md["indomain.kind"] = "plain_finetune"
    return save_safetensors_atomic(state_dict, path, md)


def _save_resume(path: Path, unet, ema: _EMA, optimizer, step: int, info: dict, scaler) -> Path:
    names = {id(p): n for n, p in unet.named_parameters()}
    tensors = {f"model/{k}": v for k, v in unet.state_dict().items()}
    tensors.update({f"ema/{k}": v for k, v in ema.shadow.items()})
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if not st:
                continue
            for key, val in st.items():
                if isinstance(val, torch.Tensor):
                    tensors[f"opt/{names[id(p)]}/{key}"] = val.detach()
    tensors["rng/torch"] = torch.random.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda{i}"] = s
    meta = dict(info, step=step, format=RESUME_FORMAT, version=RESUME_VERSION)
    if scaler is not None:
        meta["scaler"] = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in scaler.state_dict().items()}
    return save_safetensors_atomic(tensors, path, {RESUME_FORMAT: json.dumps(meta, sort_keys=True)})


def read_resume_state(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            md = f.metadata() or {}
            if RESUME_FORMAT not in md:
                raise TrainingInputError(f"{path.name} is not an InDomain resume state; delete it or start without --resume.")
            info = json.loads(md[RESUME_FORMAT])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except TrainingInputError:
        raise
    except Exception as e:
        raise TrainingInputError(f"resume state {path} is unreadable ({e}); start without --resume "
                                 "(the last saved domain UNet is still usable).") from None
    if info.get("version", 0) > RESUME_VERSION:
        raise TrainingInputError(f"{path.name} was written by a newer InDomain; update the pack to resume it.")
    return tensors, info


# ----------------------------------------------------------------------------- the loop


def train_on_latents(model_patcher, clip, latents, config: TrainConfig, out_path=None, resume: bool = False,
                     progress: Callable | None = None, should_stop: Callable[[], bool] | None = None,
                     flipped_latents=None, data_info: dict | None = None) -> TrainResult:
    """Train on already-encoded (unprocessed VAE) latents: a [N, C, h, w] tensor or a list of [C, h_i, w_i].

    `progress(step, total, loss, images_per_s)` is called after every optimizer step; training
    stops (after saving) when `should_stop()` returns True. With `out_path` None nothing is written.
    While it writes, the output is locked (NAME.lock): a second run on the same name is refused.
    """
    config.validate()
    rank, _world = dist_info()
    out_path = None if out_path is None else Path(out_path)
    if out_path is None or rank != 0:
        return _train_on_latents(model_patcher, clip, latents, config, out_path, resume, progress, should_stop,
                                 flipped_latents, data_info)
    check_output_writable(out_path)
    with OutputLock(out_path):
        remove_partials(out_path)  # temp files of a save that a kill -9 interrupted
        return _train_on_latents(model_patcher, clip, latents, config, out_path, resume, progress, should_stop,
                                 flipped_latents, data_info)


def _train_on_latents(model_patcher, clip, latents, config: TrainConfig, out_path, resume, progress, should_stop,
                      flipped_latents, data_info) -> TrainResult:
    rank, world = dist_info()
    resume_file = None if out_path is None else resume_path_for(out_path)

    import comfy.model_management

    base = model_patcher.model
    # a CPU copy of the noise schedule: the step's noise and sigmas are drawn on the CPU (device independent)
    ms = cpu_model_sampling(model_patcher)
    latent_format = base.latent_format
    size_hw = (config.resolution // 8, config.resolution // 8)
    first = latents[0]
    if isinstance(latents, torch.Tensor) and config.crop == "center" and tuple(latents.shape[-2:]) != size_hw:
        size_hw = tuple(latents.shape[-2:])  # latents given at their own size (e.g. the toy world)
    factor = model_resolution_factor(model_patcher) // 8
    if size_hw[0] % factor or size_hw[1] % factor:
        raise TrainingInputError(f"latent size {size_hw} is not a multiple of {factor}, which this UNet needs "
                                 f"(resolution must be a multiple of {8 * factor} px).")
    if first.shape[0] != latent_format.latent_channels:
        raise TrainingInputError(f"latents have {first.shape[0]} channels but this model uses "
                                 f"{latent_format.latent_channels}; encode them with this checkpoint's VAE.")
    source = LatentSource(latents, flipped_latents, size_hw, config.crop)
    data_info = dict(data_info or {})
    data_info.setdefault("images", len(source))
    data_fp = data_info.get("fingerprint") or hashlib.sha256(
        b"".join(x.numpy().tobytes() for x in source.latents[:64])).hexdigest()

    # -- resume state (read before building anything expensive)
    state, info = None, None
    if resume:
        if resume_file is None or not resume_file.is_file():
            raise TrainingInputError(f"--resume: no resume state at {resume_file}; the run to resume saves it next to "
                                     "its output. Start without --resume (or with the same output name).")
        state, info = read_resume_state(resume_file)
        saved_cfg = info.get("config", {})
        diff = [k for k in RESUME_MUST_MATCH if k in saved_cfg and saved_cfg[k] != getattr(config, k)]
        if diff:
            raise TrainingInputError("cannot resume exactly: settings differ from the saved run: " + ", ".join(
                f"{k} {saved_cfg[k]!r} -> {getattr(config, k)!r}" for k in diff) + ". Use the original settings, "
                "or start a new run under another output name.")
        if info.get("world_size", 1) != world:
            raise TrainingInputError(f"cannot resume exactly: the run used {info.get('world_size')} process(es), this one "
                                     f"{world}. Launch with the same --nproc_per_node.")
        if info.get("data_fingerprint") != data_fp:
            raise TrainingInputError("cannot resume: the training images changed since the saved run (different "
                                     "files or contents). Restore the folder, or start a new run under another name.")
        if saved_cfg.get("lr") != config.lr:
            log.warning("InDomain training: resuming with lr %g (was %g)", config.lr, saved_cfg.get("lr"))

    device = comfy.model_management.get_torch_device()
    with torch.inference_mode(False), torch.enable_grad():
        # -- model
        calib_n = min(len(source), max(1, config.calibration_images))
        calib = latent_format.process_in(torch.stack(
            [source.batch([source.index_at(config.seed, i)], step_generator(config.seed, "calib", i), 0.0)[0]
             for i in range(calib_n)]))
        if config.null_text:
            if state is not None:
                unet = convert_to_null_text(detached_unet_copy(model_patcher))  # weights come from the state
                record = info["calibration"]
                prompt = empty_prompt(model_patcher, clip, size_hw)
            else:
                unet, _constants, prompt, record = make_null_text_unet(model_patcher, clip, calib, config.seed,
                                                                       device=device)
        else:
            unet = detached_unet_copy(model_patcher)
            prompt = empty_prompt(model_patcher, clip, size_hw)
            record = {"kind": "plain_finetune", "prompt": ""}
        _materialise_(unet)
        if state is not None:
            unet.load_state_dict({k[len("model/"):]: v for k, v in state.items() if k.startswith("model/")}, strict=True)
        for p in unet.parameters():
            p.requires_grad_(True)
        unet.to(device)
        unet.train()
        if config.grad_checkpointing:
            _enable_grad_checkpointing(unet)
        ema = _EMA(unet)
        opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=config.lr,
                                weight_decay=config.weight_decay)
        amp_dtype = _autocast_dtype(config, device)
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        step = 0
        losses: list[float] = []
        if state is not None:
            step = int(info["step"])
            losses = list(info.get("losses", []))
            for n in ema.shadow:
                ema.shadow[n] = state[f"ema/{n}"].float().to(device).clone()
            by_name = dict(unet.named_parameters())
            opt_sd = opt.state_dict()
            index = {id(p): i for i, p in enumerate(opt.param_groups[0]["params"])}
            for key, val in state.items():
                if key.startswith("opt/"):
                    pname, field_name = key[4:].rsplit("/", 1)
                    opt_sd["state"].setdefault(index[id(by_name[pname])], {})[field_name] = val
            opt.load_state_dict(opt_sd)
            torch.random.set_rng_state(state["rng/torch"])
            if scaler is not None and info.get("scaler"):
                scaler.load_state_dict(info["scaler"])
        else:
            for n in ema.shadow:
                ema.shadow[n] = ema.shadow[n].to(device)
        model = unet
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(unet, device_ids=[device.index] if device.type == "cuda" else None)

        base_meta_obj = base_meta(model_patcher, record, {})
        training_info = {
            "images": data_info.get("images"), "skipped": data_info.get("skipped", 0), "resolution": config.resolution,
            "latent_size": list(size_hw), "lr": config.lr, "weight_decay": config.weight_decay,
            "batch_size": config.batch_size, "grad_accum": config.grad_accum, "world_size": world,
            "effective_batch": config.batch_size * config.grad_accum * world, "ema_decay": config.ema_decay,
            "grad_clip": config.grad_clip, "crop": config.crop, "hflip": config.hflip, "seed": config.seed,
            "mixed_precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
            "null_text": config.null_text, "data_fingerprint": data_fp, "trainer": "indomain.training",
        }
        last_saved = {"step": None, "path": None}

        def save(at_step: int) -> None:
            if out_path is None or rank != 0 or last_saved["step"] == at_step:
                return
            meta = dataclasses.replace(base_meta_obj, training=dict(training_info, steps=at_step,
                                                                    target_steps=config.steps,
                                                                    final_loss=losses[-1] if losses else None))
            _write_output(out_path, ema.state_dict(unet), meta, config.null_text)
            _save_resume(resume_file, unet, ema, opt, at_step, {
                "config": dataclasses.asdict(config), "world_size": world, "data_fingerprint": data_fp,
                "calibration": record, "losses": losses, "output": out_path.name}, scaler)
            last_saved.update(step=at_step, path=out_path)

        global_batch = config.batch_size * world
        interrupted = False
        t_start, images_seen = time.perf_counter(), 0
        while step < config.steps:
            if _any_rank(bool(should_stop and should_stop()), world, device):
                interrupted = True
                break
            opt.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=device)
            for micro in range(config.grad_accum):
                m = step * config.grad_accum + micro
                positions = [m * global_batch + rank * config.batch_size + i for i in range(config.batch_size)]
                gen = step_generator(config.seed, "batch", m, rank)
                x0 = latent_format.process_in(source.batch([source.index_at(config.seed, p) for p in positions], gen,
                                                           config.hflip))
                sigma = sample_sigmas(ms, x0.shape[0], gen)
                noise = torch.randn(x0.shape, generator=gen)
                xc, t, x_noisy = noisy_inputs(ms, x0, sigma, noise)
                target = native_target(ms, sigma, x0, noise, x_noisy).to(device)
                xc, t = xc.to(device), t.to(device)
                ctx = prompt.expand(x0.shape[0], device, torch.float32)
                sync = world == 1 or micro == config.grad_accum - 1
                cm = model.no_sync() if (world > 1 and not sync) else _nullcontext()
                with cm:
                    with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        pred = model(xc, t, **ctx)
                    loss = torch.nn.functional.mse_loss(pred.float(), target.float())
                    back = loss / config.grad_accum
                    (scaler.scale(back) if scaler is not None else back).backward()
                step_loss += loss.detach() / config.grad_accum
            step_loss = _all_reduce_mean(step_loss, world)
            loss_value = float(step_loss)
            if not math.isfinite(loss_value):
                opt.zero_grad(set_to_none=True)
                where = (f"The last good checkpoint ({last_saved['path']}, step {last_saved['step']}) is kept"
                         if last_saved["step"] is not None else "No checkpoint had been saved yet")
                raise TrainingDiverged(
                    f"training loss became {loss_value} at step {step + 1}; training stopped. {where}. "
                    f"Lower the learning rate (now {config.lr:g}; try {config.lr / 10:g}) and start again "
                    "(or --resume from the last checkpoint with the lower rate).")
            if scaler is not None:
                scaler.unscale_(opt)
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            step += 1
            ema.update(unet, ema_decay_at(step, config.ema_decay))
            losses.append(loss_value)
            images_seen += config.batch_size * config.grad_accum * world
            if progress is not None:
                elapsed = max(1e-9, time.perf_counter() - t_start)
                progress(step, config.steps, loss_value, images_seen / elapsed)
            if config.save_every and step % config.save_every == 0 and step < config.steps:
                save(step)
        save(step)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        final = ema.state_dict(unet)
        if (out_path is not None and rank == 0 and not interrupted and not config.keep_resume_state
                and resume_file.is_file()):
            resume_file.unlink()
        summary = dict(training_info, steps_done=step, target_steps=config.steps, interrupted=interrupted,
                       first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
                       seconds=round(time.perf_counter() - t_start, 3), rank=rank,
                       weights_digest=weights_digest(final))
        if world > 1:
            import torch.distributed as dist

            digests = [None] * world
            dist.all_gather_object(digests, summary["weights_digest"])
            summary["rank_weight_digests"] = digests
    return TrainResult(path=out_path if (out_path is not None and last_saved["step"] is not None) else None,
                       losses=losses, steps_done=step, state_dict=final, interrupted=interrupted,
                       resume_path=resume_file if (resume_file is not None and resume_file.is_file()) else None,
                       meta=dataclasses.replace(base_meta_obj, training=dict(training_info, steps=step)),
                       summary=summary)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def model_resolution_factor(model_patcher, vae=None) -> int:
    """Pixels per latent cell times the UNet's total downsampling: resolutions must be multiples of this."""
    vae_ratio = 8
    if vae is not None:
        r = getattr(vae, "downscale_ratio", 8)
        vae_ratio = r if isinstance(r, int) else 8
    levels = len(model_patcher.model.model_config.unet_config.get("channel_mult", [1]))
    return vae_ratio * 2 ** max(0, levels - 1)


def prepare_images(image_dir, config: TrainConfig):
    """Pre-flight on the images alone (no model needed): settings, resolution, usable files."""
    config.validate()
    return scan_images(image_dir, config.resolution)


def train(model_patcher, clip, vae, image_dir, config: TrainConfig, out_path, resume: bool = False,
          progress: Callable | None = None, should_stop: Callable[[], bool] | None = None,
          scan=None, encode_progress: Callable | None = None) -> TrainResult:
    """Image folder -> cached VAE latents -> train_on_latents. Fails on bad input before any work."""
    from ..guidance.checkpoint import weights_fingerprint

    scan = scan or prepare_images(image_dir, config)
    rank, _ = dist_info()
    lock = None
    if rank == 0:
        check_output_writable(out_path)
        lock = OutputLock(out_path).acquire()  # before any model work: a second writer is refused at once
    try:
        check_resolution(config.resolution, model_resolution_factor(model_patcher, vae))
        cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
        vae_fp = weights_fingerprint(vae.first_stage_model.state_dict())
        encoded = encode_images(vae, scan, config.resolution, config.crop, cache_dir, vae_fp, progress=encode_progress)
        log.info("InDomain training: %d images (%d from cache, %d skipped)", len(encoded.latents), encoded.cache_hits,
                 len(scan.skipped))
        data_info = {"images": scan.count, "skipped": len(scan.skipped), "fingerprint": encoded.fingerprint,
                     "cache_hits": encoded.cache_hits}
        result = train_on_latents(model_patcher, clip, encoded.latents, config, out_path, resume, progress, should_stop,
                                  flipped_latents=encoded.flipped, data_info=data_info)
        result.summary["skipped_files"] = [f"{display_name(p.name)}: {why}" for p, why in scan.skipped]
        result.summary["latent_cache_hits"] = encoded.cache_hits
        return result
    finally:
        if lock is not None:
            lock.release()
