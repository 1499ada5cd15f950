"""Resume state: one safetensors file next to the output (`NAME.resume`, not listed by the loader)
with live weights, EMA, AdamW moments, step and RNG states, and the run's settings as JSON
metadata. Never pickle. Saving, reading, checking that a run may continue, and restoring."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..guidance.checkpoint import save_safetensors_atomic
from .data import TrainingInputError

log = logging.getLogger("indomain.training")

RESUME_FORMAT = "indomain.resume"
RESUME_VERSION = 1
# settings that must match for a resumed run to continue the same run
RESUME_MUST_MATCH = ("seed", "batch_size", "grad_accum", "resolution", "crop", "hflip", "form", "ema_decay",
                     "weight_decay")


def save_resume_state(path: Path, module, ema, optimizer, step: int, info: dict, scaler) -> Path:
    names = {id(p): n for n, p in module.named_parameters()}
    tensors = {f"model/{k}": v for k, v in module.state_dict().items()}
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


def saved_settings(info: dict) -> dict:
    """The saved run's settings; states written before forms existed said `null_text` instead of `form`."""
    cfg = dict(info.get("config", {}))
    if "form" not in cfg and "null_text" in cfg:
        cfg["form"] = "full" if cfg["null_text"] else "plain"
    return cfg


def load_resume_state(resume_file: Path | None, config, world: int, data_fingerprint: str):
    """(tensors, info) of the run to continue, after checking it can continue exactly with these settings."""
    if resume_file is None or not resume_file.is_file():
        raise TrainingInputError(f"--resume: no resume state at {resume_file}; the run to resume saves it next to "
                                 "its output. Start without --resume (or with the same output name).")
    state, info = read_resume_state(resume_file)
    saved_cfg = saved_settings(info)
    diff = [k for k in RESUME_MUST_MATCH if k in saved_cfg and saved_cfg[k] != getattr(config, k)]
    if diff:
        raise TrainingInputError("cannot resume exactly: settings differ from the saved run: " + ", ".join(
            f"{k} {saved_cfg[k]!r} -> {getattr(config, k)!r}" for k in diff) + ". Use the original settings, "
            "or start a new run under another output name.")
    if info.get("world_size", 1) != world:
        raise TrainingInputError(f"cannot resume exactly: the run used {info.get('world_size')} process(es), this one "
                                 f"{world}. Launch with the same --nproc_per_node.")
    if info.get("data_fingerprint") != data_fingerprint:
        raise TrainingInputError("cannot resume: the training images changed since the saved run (different "
                                 "files or contents). Restore the folder, or start a new run under another name.")
    if saved_cfg.get("lr") != config.lr:
        log.warning("InDomain training: resuming with lr %g (was %g)", config.lr, saved_cfg.get("lr"))
    return state, info


def restore_weights(state: dict, module: torch.nn.Module) -> None:
    module.load_state_dict({k[len("model/"):]: v for k, v in state.items() if k.startswith("model/")}, strict=True)


def restore_optimisation(state: dict, info: dict, module, ema, optimizer, scaler, device) -> None:
    """EMA, AdamW moments, torch RNG and the loss scaler as they were at the saved step."""
    for n in ema.shadow:
        ema.shadow[n] = state[f"ema/{n}"].float().to(device).clone()
    by_name = dict(module.named_parameters())
    opt_sd = optimizer.state_dict()
    index = {id(p): i for i, p in enumerate(optimizer.param_groups[0]["params"])}
    for key, val in state.items():
        if key.startswith("opt/"):
            pname, field_name = key[4:].rsplit("/", 1)
            opt_sd["state"].setdefault(index[id(by_name[pname])], {})[field_name] = val
    optimizer.load_state_dict(opt_sd)
    torch.random.set_rng_state(state["rng/torch"])
    if scaler is not None and info.get("scaler"):
        scaler.load_state_dict(info["scaler"])
