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
from .gpu import load_scaler_state, scaler_state_for_json

log = logging.getLogger("indomain.training")

RESUME_FORMAT = "indomain.resume"
RESUME_VERSION = 1
# settings that must match for a resumed run to continue the same run
RESUME_MUST_MATCH = ("seed", "batch_size", "grad_accum", "resolution", "crop", "hflip", "form", "ema_decay", "buckets",
                     "weight_decay", "lora_rank", "lora_alpha")


def save_resume_state(path: Path, module, ema, optimizer, step: int, info: dict, scaler, keeps_key=None) -> Path:
    """`keeps_key(name)`: which of the module's state to save (a form with frozen base weights saves only what
    it trains; the base comes from the base checkpoint again on resume)."""
    names = {id(p): n for n, p in module.named_parameters()}
    tensors = {f"model/{k}": v for k, v in module.state_dict().items() if keeps_key is None or keeps_key(k)}
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
        meta["scaler"] = scaler_state_for_json(scaler)
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


def base_identity(module: torch.nn.Module, keeps_key, model_patcher, base_name: str | None = None) -> dict:
    """What a resume state records of the base, for a form that does not save the base's weights (LoRA): a
    cheap fingerprint of the frozen weights the run trains on (names, shapes and a strided sample of every
    tensor, LoRAs and other weight patches on the base included) and a description naming it. {} for forms
    that save every weight (nothing of the base is needed to continue them)."""
    from ..guidance.checkpoint import weights_fingerprint

    if keeps_key is None:
        return {}
    frozen = {k: v for k, v in module.state_dict().items() if not keeps_key(k)}
    if not frozen:
        return {}
    return {"base_fingerprint": weights_fingerprint(frozen), "base": describe_base(model_patcher, base_name)}


def describe_base(model_patcher, base_name: str | None = None) -> str:
    """A name for the base in messages: the checkpoint's file name where known (the command line passes it;
    newer cores record it on the loaded model), else its architecture; plus the weight patches on it."""
    name = base_name
    init = getattr(model_patcher, "cached_patcher_init", None)
    if not name and isinstance(init, tuple) and len(init) > 1 and init[1] and isinstance(init[1][0], (str, Path)):
        name = Path(init[1][0]).name
    if not name:
        config = getattr(getattr(model_patcher, "model", None), "model_config", None)
        name = f"a {type(config).__name__} checkpoint" if config is not None else "the base model"
    patched = [k for k in getattr(model_patcher, "patches", {}) or {} if str(k).startswith("diffusion_model.")]
    return name + (f" with {len(patched)} patched UNet weight(s) (a LoRA or similar applied to it)" if patched else "")


def check_same_base(info: dict, identity: dict) -> None:
    """Refuse to continue a run on another base than the one its state was trained on (another checkpoint,
    or the same one with a LoRA added or removed): the saved adapter only fits the weights it trained on."""
    saved = info.get("base_fingerprint")
    if not identity or saved is None:
        if identity and saved is None:
            log.warning("InDomain training: the resume state does not record its base (written by an older "
                        "InDomain); make sure the same base, with the same LoRAs, is connected.")
        return
    if saved != identity["base_fingerprint"]:
        raise TrainingInputError(
            f"cannot resume: the saved run trained on {info.get('base', 'another base')}, and the base connected now "
            f"({identity['base']}) has other weights. Connect the original base exactly as it was (the same "
            "checkpoint, with the same LoRAs or none), or start a new run under another output name.")


def restore_weights(state: dict, module: torch.nn.Module, keeps_key=None) -> None:
    saved = {k[len("model/"):]: v for k, v in state.items() if k.startswith("model/")}
    if keeps_key is None:
        module.load_state_dict(saved, strict=True)
        return
    result = module.load_state_dict(saved, strict=False)
    missing = [k for k in result.missing_keys if keeps_key(k)]
    if missing or result.unexpected_keys:
        raise TrainingInputError(f"the resume state does not fit this run's model (missing {missing[:3]}, unexpected "
                                 f"{result.unexpected_keys[:3]}); start without --resume or use the original settings.")


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
        load_scaler_state(scaler, info["scaler"])  # also files from before the int fields were kept
