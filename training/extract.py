"""Extract Domain LoRA: a full-form domain UNet -> a LoRA-form file.

    python -m indomain.training.extract --base ckpt.safetensors --domain my_domain.safetensors --rank 32 \
        [--report-ranks 8,16,64] [--out my_domain_lora]

The difference of every adaptable layer (Linear/Conv outside cross-attention) from the base is
approximated by its best rank-R factorisation (SVD); bias differences are kept exactly; the
null-text constants are copied. Unlike core's LoRA extraction (comfy_extras/nodes_lora_extract.py, which
clamps the factors at their 0.99 quantile and reports nothing), the factors are the exact truncated SVD (the
Frobenius optimum), one SVD per layer gives the error at every reported rank, and the file keeps one rank
(zero-padded), the alpha scale, exact bias differences and the constants of the LoRA form. The output is
written under the same lock as training (training/lock.py). The relative reconstruction error of the weight differences is
printed for the chosen rank and every --report-ranks rank, together with the share of the
difference the LoRA form cannot hold (normalisation layers), and saved in the file's metadata.

No ComfyUI needed: the base UNet is read straight from the checkpoint file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from ..guidance.checkpoint import (DomainCheckpointError, architecture_signature, read_domain_checkpoint,
                                   write_domain_checkpoint)
from ..guidance.lora import adapted_names_from_state, extract
from .lock import OutputLock, remove_partials

UNET_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")


def base_unet_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The UNet weights of a base checkpoint (full checkpoint or UNet-only file), keys without prefix."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        raise DomainCheckpointError(f"base checkpoint {path}: give an existing .safetensors file (pickle files are "
                                    "never opened).")
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        for prefix in UNET_PREFIXES:
            picked = [k for k in keys if k.startswith(prefix) and (prefix or k.startswith(("input_blocks.", "time_embed.",
                                                                                            "out.", "middle_block.",
                                                                                            "output_blocks.", "label_emb.")))]
            if picked:
                return {k[len(prefix):]: f.get_tensor(k) for k in picked}
    raise DomainCheckpointError(f"{path.name}: no UNet weights found (expected keys under 'model.diffusion_model.'). "
                                "Give the base checkpoint the domain UNet was trained from.")


def extract_domain_lora(base_sd: dict[str, torch.Tensor], domain_path: str | Path, out_path: str | Path, rank: int,
                        report_ranks=(), alpha: float | None = None, precision: str = "fp16") -> dict:
    """Write the LoRA-form file; return the report (errors per rank, what is not carried, sizes)."""
    domain_path, out_path = Path(domain_path), Path(out_path)
    if out_path.suffix.lower() != ".safetensors":
        out_path = out_path.with_name(out_path.name + ".safetensors")
    if out_path.resolve() == domain_path.resolve():
        raise DomainCheckpointError("the output would overwrite the full-form domain UNet; choose another name.")
    sd, meta = read_domain_checkpoint(domain_path)
    if getattr(meta, "form", "full") != "full":
        raise DomainCheckpointError(f"{domain_path.name} is a {meta.form}-form domain model; extraction takes a "
                                    "full-form (null-text UNet) file.")
    if architecture_signature({k: tuple(v.shape) for k, v in base_sd.items()}) != meta.base_signature:
        raise DomainCheckpointError(f"{domain_path.name} was trained from a base with another UNet layout than the "
                                    "checkpoint given; give the checkpoint it was trained from.")
    if rank < 1:
        raise DomainCheckpointError(f"rank must be >= 1 (got {rank}).")
    names = adapted_names_from_state(base_sd)
    result = extract(base_sd, sd, names, rank, report_ranks, alpha)
    report = {"rank": int(rank), "alpha": result.lora.alpha,
              "relative_error": {str(r): round(e, 6) for r, e in sorted(result.relative_error.items())},
              "not_carried": round(result.not_carried, 6), "not_carried_keys": result.not_carried_keys[:20],
              "layers": len(result.lora.layers), "source": domain_path.name}
    training = dict(meta.training, extracted=report)
    new_meta = dataclasses.replace(meta, training=training)
    if hasattr(new_meta, "form"):
        new_meta = dataclasses.replace(new_meta, form="lora")
    with OutputLock(out_path):  # the lock training takes: no run writes this name meanwhile
        remove_partials(out_path)
        path = write_domain_checkpoint(out_path, result.lora.to_state_dict(), new_meta, precision=precision)
    report["output"] = str(path)
    report["bytes"] = {"lora": path.stat().st_size, "full": domain_path.stat().st_size}
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m indomain.training.extract",
                                description="Low-rank (SVD) LoRA-form file from a full-form domain UNet and its base.")
    p.add_argument("--base", required=True, help="the base checkpoint (.safetensors) the domain UNet was trained from")
    p.add_argument("--domain", required=True, help="the full-form domain UNet file")
    p.add_argument("--rank", type=int, default=32, help="rank of the adapter written (default 32)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha written to the file (default: the rank)")
    p.add_argument("--report-ranks", default="", help="comma-separated ranks whose error to report too, e.g. 8,16,64")
    p.add_argument("--out", default=None, help="output path, or a bare name saved next to the domain file "
                   "(default: <domain>_lora<rank>)")
    p.add_argument("--save-precision", choices=("fp16", "fp32"), default="fp16", help="adapter precision (default fp16)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    domain = Path(args.domain).expanduser()
    out = args.out or f"{domain.stem}_lora{args.rank}"
    out_path = Path(out).expanduser()
    if out_path.parent == Path("."):
        out_path = domain.parent / out_path
    try:
        ranks = [int(r) for r in args.report_ranks.split(",") if r.strip()]
    except ValueError:
        print(f"error: --report-ranks takes comma-separated integers (got {args.report_ranks!r})", file=sys.stderr)
        return 2
    try:
        report = extract_domain_lora(base_unet_state(args.base), domain, out_path, args.rank, ranks, args.alpha,
                                     args.save_precision)
    except (DomainCheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r, e in report["relative_error"].items():
        print(f"rank {r:>5}: relative error of the weight difference {e:.4f}")
    print(f"not carried by the LoRA form (normalisation layers): {report['not_carried']:.4f} of the difference")
    print(f"wrote {report['output']} ({report['bytes']['lora'] / 1e6:.1f} MB; full form {report['bytes']['full'] / 1e6:.1f} MB)")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
