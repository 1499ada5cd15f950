"""The domain model checkpoint: one `.safetensors` file with the domain model's weights (for the
full form the null-text UNet, the calibrated constants included as `<block>.attn2.constant`) and
string metadata:

    indomain.format          "indomain.domain_unet"
    indomain.format_version  "1"
    indomain.form            the domain model form (forms/): "full", "plain"; absent in files written
                             before forms existed, which read as "full"
    indomain.base_architecture   ComfyUI model family of the base (e.g. "SD15", "SDXL")
    indomain.model_type      prediction type of the base ("EPS", "V_PREDICTION")
    indomain.base_signature  sha256 of the base UNet's key/shape layout (the architecture)
    indomain.base_fingerprint    sha256 over sampled base weights (which base it started from)
    indomain.calibration     JSON: how the constants were computed; for models with an extra vector input
                             (SDXL's `y`) also `empty_y`, the vector every training step used (the empty
                             prompt's pooled embedding and the training size), as little-endian float32 in
                             base64; the domain pass feeds it instead of one built from the negative prompt
                             (files without it: the negative's, at the sampling size)
    indomain.training        JSON: settings and data summary of the training run

Reading validates all of it (the weights with the check STATE_CHECKS holds for the file's form) and
says what is wrong and what to do. Only safetensors is ever
read (never pickle); writes go to a temp file in the same folder and are renamed into place.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .nulltext import CONSTANT_NAME

FORMAT_NAME = "indomain.domain_unet"
FORMAT_VERSION = 1
DEFAULT_FORM = "full"
REQUIRED_KEYS = ("indomain.format", "indomain.format_version", "indomain.base_architecture",
                 "indomain.model_type", "indomain.base_signature", "indomain.base_fingerprint")


class DomainCheckpointError(ValueError):
    """A domain UNet file is missing, unreadable, or not what it should be. The message names the fix."""


@dataclass
class DomainMeta:
    base_architecture: str
    model_type: str
    base_signature: str
    base_fingerprint: str
    format_version: int = FORMAT_VERSION
    form: str = DEFAULT_FORM
    calibration: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def to_metadata(self) -> dict[str, str]:
        md = {
            "indomain.format": FORMAT_NAME,
            "indomain.format_version": str(self.format_version),
            "indomain.form": self.form,
            "indomain.base_architecture": self.base_architecture,
            "indomain.model_type": self.model_type,
            "indomain.base_signature": self.base_signature,
            "indomain.base_fingerprint": self.base_fingerprint,
            "indomain.calibration": json.dumps(self.calibration, sort_keys=True),
            "indomain.training": json.dumps(self.training, sort_keys=True),
        }
        for k, v in self.extra.items():
            md[f"indomain.extra.{k}"] = str(v)
        return md

    @classmethod
    def from_metadata(cls, md: dict[str, str], path: str = "") -> "DomainMeta":
        missing = [k for k in REQUIRED_KEYS if k not in md]
        if missing:
            raise DomainCheckpointError(
                f"{path}: missing InDomain metadata {missing}. This is not a domain UNet written by InDomain's "
                "trainer (or its metadata was stripped). Train one with `python -m indomain.training` or the "
                "'Train Domain UNet' node; a plain UNet belongs in core's 'Load Diffusion Model' node instead.")
        if md["indomain.format"] != FORMAT_NAME:
            raise DomainCheckpointError(f"{path}: format is {md['indomain.format']!r}, expected {FORMAT_NAME!r}.")
        try:
            version = int(md["indomain.format_version"])
        except ValueError:
            raise DomainCheckpointError(f"{path}: unreadable format_version {md['indomain.format_version']!r}.") from None
        if version > FORMAT_VERSION:
            raise DomainCheckpointError(
                f"{path}: format version {version} is newer than this InDomain supports ({FORMAT_VERSION}); update the pack.")

        def _json(key):
            try:
                return json.loads(md.get(key, "{}") or "{}")
            except json.JSONDecodeError:
                raise DomainCheckpointError(f"{path}: metadata {key} is not valid JSON.") from None

        extra = {k[len("indomain.extra."):]: v for k, v in md.items() if k.startswith("indomain.extra.")}
        return cls(md["indomain.base_architecture"], md["indomain.model_type"], md["indomain.base_signature"],
                   md["indomain.base_fingerprint"], version, md.get("indomain.form", DEFAULT_FORM),
                   _json("indomain.calibration"), _json("indomain.training"), extra)


TRAINED_Y_KEY = "empty_y"


def vector_to_json(t: torch.Tensor) -> dict:
    """A [1, N] tensor as JSON-safe metadata (exact: float32 bytes in base64)."""
    import numpy as np

    t = t.detach().float().cpu().reshape(1, -1).contiguous()
    return {"dtype": "float32", "shape": list(t.shape),
            "data": base64.b64encode(t.numpy().astype("<f4").tobytes()).decode("ascii")}


def trained_y(meta: "DomainMeta", name: str = "") -> torch.Tensor | None:
    """The `y` vector the domain model was trained with (calibration.empty_y), or None for files without it."""
    import numpy as np

    d = meta.calibration.get(TRAINED_Y_KEY) if isinstance(meta.calibration, dict) else None
    if d is None:
        return None
    try:
        shape = [int(v) for v in d["shape"]]
        raw = base64.b64decode(d["data"], validate=True)
        if d.get("dtype") != "float32" or len(shape) != 2 or shape[0] != 1 or len(raw) != 4 * shape[1] or not shape[1]:
            raise ValueError("shape or size")
        y = torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32)).reshape(shape)
    except (KeyError, TypeError, ValueError, AttributeError, binascii.Error):
        raise DomainCheckpointError(
            f"{name}: metadata indomain.calibration.{TRAINED_Y_KEY} (the extra vector input the model was trained "
            "with) is unreadable. Copy the original file again or re-train it.") from None
    if not torch.isfinite(y).all():
        raise DomainCheckpointError(f"{name}: metadata indomain.calibration.{TRAINED_Y_KEY} holds NaN/inf values; "
                                    "copy the original file again or re-train it.")
    return y


def architecture_signature(shapes: dict[str, tuple]) -> str:
    """sha256 of a UNet's sorted key:shape layout (identifies the architecture, not the weights)."""
    h = hashlib.sha256()
    for k in sorted(shapes):
        h.update(f"{k}:{tuple(int(s) for s in shapes[k])}\n".encode())
    return h.hexdigest()


@torch.no_grad()
def weights_fingerprint(state_dict: dict[str, torch.Tensor], samples_per_tensor: int = 256) -> str:
    """sha256 over names, shapes and a strided sample of each tensor's values (fast even for SDXL)."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k]
        h.update(f"{k}:{tuple(t.shape)}\n".encode())
        flat = t.detach().reshape(-1)
        if flat.numel():
            step = max(1, flat.numel() // samples_per_tensor)
            sample = flat[::step][:samples_per_tensor].float().cpu()
            h.update(sample.numpy().tobytes())
    return h.hexdigest()


def _all_finite(t: torch.Tensor) -> bool:
    if t.element_size() == 1:  # float8 kinds: torch has no isfinite for them
        t = t.float()
    return bool(torch.isfinite(t).all())


def check_null_text_state(state_dict: dict[str, torch.Tensor], where: str) -> None:
    """The full form's file: a calibrated null-text UNet."""
    constants = [k for k in state_dict if k.endswith(f".attn2.{CONSTANT_NAME}")]
    if not constants:
        raise DomainCheckpointError(f"{where}: no '<block>.attn2.{CONSTANT_NAME}' tensors: not a null-text domain UNet.")
    leftovers = [k for k in state_dict if ".attn2.to_" in k]
    if leftovers:
        raise DomainCheckpointError(f"{where}: still has cross-attention weights ({leftovers[0]}); not a null-text UNet.")
    if all(float(state_dict[k].float().abs().max()) == 0.0 for k in constants):
        raise DomainCheckpointError(f"{where}: every null-text constant is zero: calibration never ran. "
                                    "Re-train; the trainer calibrates the constants before step 0.")


def check_plain_unet_state(state_dict: dict[str, torch.Tensor], where: str) -> None:
    """The plain form's file: an unmodified UNet (cross-attention kept)."""
    constants = [k for k in state_dict if k.endswith(f".attn2.{CONSTANT_NAME}")]
    if constants:
        raise DomainCheckpointError(f"{where}: holds null-text constants ({constants[0]}) but its form is 'plain'.")


def check_lora_state(state_dict: dict[str, torch.Tensor], where: str) -> None:
    """The LoRA form's file: low-rank adapters + calibrated constants in ComfyUI's LoRA key layout."""
    from .lora import DomainLoRA, LoRAFormatError

    try:
        lora = DomainLoRA.from_state_dict(state_dict, where)
    except LoRAFormatError as e:
        raise DomainCheckpointError(str(e)) from None
    if lora.constants and all(float(c.abs().max()) == 0.0 for c in lora.constants.values()):
        raise DomainCheckpointError(f"{where}: every null-text constant is zero: calibration never ran. "
                                    "Re-train; the trainer calibrates the constants before step 0.")


# the content check of each domain model form's file (forms/ holds the forms themselves)
STATE_CHECKS: dict[str, Callable[[dict, str], None]] = {"full": check_null_text_state, "plain": check_plain_unet_state,
                                                        "lora": check_lora_state}


def check_state(state_dict: dict[str, torch.Tensor], meta: DomainMeta, where: str) -> None:
    if meta.form not in STATE_CHECKS:
        raise DomainCheckpointError(f"{where}: domain model form {meta.form!r} is unknown to this InDomain "
                                    f"(it knows {', '.join(STATE_CHECKS)}); update the pack.")
    STATE_CHECKS[meta.form](state_dict, where)


def non_finite_keys(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding NaN or inf."""
    return [k for k, v in state_dict.items() if v.is_floating_point() and not _all_finite(v)]


PRECISIONS = {"fp16": torch.float16, "fp32": torch.float32}


def cast_for_saving(state_dict: dict[str, torch.Tensor], precision: str = "fp16") -> dict[str, torch.Tensor]:
    """Weights in the file's precision; the null-text constants (a few KB) and scalars stay float32."""
    if precision not in PRECISIONS:
        raise DomainCheckpointError(f"precision must be one of {', '.join(PRECISIONS)} (got {precision!r}).")
    dtype = PRECISIONS[precision]
    return {k: (v.to(dtype) if v.is_floating_point() and v.ndim > 0 and not k.endswith(f".attn2.{CONSTANT_NAME}")
                else v) for k, v in state_dict.items()}


def write_domain_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], meta: DomainMeta,
                            precision: str = "fp16") -> Path:
    """Validate and write atomically (temp file in the same folder, then rename). Returns the path.

    Weights are stored in fp16 by default (half the size; ComfyUI casts on load), fp32 on request."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":  # one rule everywhere (CLI, node, loader): any case of .safetensors
        raise DomainCheckpointError(f"{path}: domain UNets are saved as .safetensors; use a name ending in .safetensors.")
    check_state(state_dict, meta, str(path))
    bad = non_finite_keys(state_dict)
    if bad:
        raise DomainCheckpointError(f"refusing to write {path}: non-finite values in {bad[:3]} (training diverged?).")
    state_dict = cast_for_saving(state_dict, precision)
    bad = non_finite_keys(state_dict)
    if bad:
        raise DomainCheckpointError(f"refusing to write {path}: {bad[:3]} overflow in {precision}. "
                                    "Save in fp32 (--save-precision fp32) instead.")
    metadata = dict(meta.to_metadata(), **{"indomain.precision": precision})
    try:
        return save_safetensors_atomic(state_dict, path, metadata)
    except OSError as e:
        raise DomainCheckpointError(f"cannot write to {path.parent}: {e.strerror or e}. Choose a writable output folder.") from None


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> Path:
    """Write a .safetensors file in a private temp folder beside it (`.NAME.XXXXXXXX.partial/`) + rename: a
    reader never sees half a file, and a failure (disk full, Ctrl-C) leaves the previous file, if any,
    untouched. The folder, not a temp file: safetensors itself writes through its own temp file
    (`.tmpXXXXXX`), which a kill -9 would otherwise leave beside the models; a whole leftover folder is
    found and removed by the next run (training.lock.remove_partials)."""
    import shutil

    import safetensors.torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{path.stem}.", suffix=".partial", dir=path.parent)
    tmp = os.path.join(tmp_dir, path.name)
    try:
        safetensors.torch.save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # temp files are 0600; give the file normal permissions
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def _identity(path: Path) -> tuple | None:
    """What changes when a save replaces the file (inode, size, modification time); None if it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def read_domain_checkpoint(path: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, torch.Tensor], DomainMeta]:
    """Read and validate a domain UNet file. Raises DomainCheckpointError naming the problem and the fix."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DomainCheckpointError(f"domain UNet not found: {path}. Put trained files in ComfyUI/models/domain_unets "
                                    "(the trainer writes there by default).")
    if path.suffix.lower() != ".safetensors":
        raise DomainCheckpointError(f"{path.name}: only .safetensors domain UNets are loaded (pickle-based "
                                    ".ckpt/.pt/.bin files can run code and are never opened). Re-export it as .safetensors.")
    # safetensors may re-open the file by name for the tensors, so a save that lands (atomic rename) during the
    # read could pair one version's metadata with another's tensors: read until the file is the same before and after
    for _attempt in range(20):
        before = _identity(path)
        try:
            with safe_open(str(path), framework="pt", device=device) as f:
                md = f.metadata() or {}
                meta = DomainMeta.from_metadata(md, path.name)
                state_dict = {k: f.get_tensor(k) for k in f.keys()}
        except DomainCheckpointError:
            if _identity(path) == before:
                raise
            continue  # replaced while reading: read the new file
        except Exception as e:  # safetensors raises several types for truncated/corrupt headers and data
            if _identity(path) != before:
                continue
            raise DomainCheckpointError(f"{path.name}: not a readable safetensors file (truncated or corrupt?): {e}. "
                                        "Copy it again or re-run training to rewrite it.") from None
        if _identity(path) == before:
            break
    else:
        raise DomainCheckpointError(f"{path.name} kept changing while it was read (a training run saving to it?); "
                                    "load it when the run has finished, or load a copy.")
    not_float = [f"{k} ({v.dtype})" for k, v in state_dict.items() if not v.is_floating_point()]
    if not_float:
        raise DomainCheckpointError(f"{path.name}: tensors that are not floating point: {not_float[:3]}; a domain UNet "
                                    "holds float weights only (the file was altered or is not a domain UNet). Re-train "
                                    "or copy the original again.")
    check_state(state_dict, meta, path.name)
    trained_y(meta, path.name)  # readable, or a named error now rather than when sampling
    bad = non_finite_keys(state_dict)
    if bad:
        raise DomainCheckpointError(f"{path.name}: contains NaN/inf in {bad[:3]}; the training run that wrote it diverged. "
                                    "Use an earlier checkpoint or re-train with a lower learning rate.")
    return state_dict, meta

