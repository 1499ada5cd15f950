"""The domain UNet file format and the loader's validation, on a real ComfyUI host."""
from __future__ import annotations

import os
import shutil

import pytest
import safetensors.torch
import torch

from indomain.guidance.checkpoint import (DomainCheckpointError, DomainMeta, read_domain_checkpoint,
                                          write_domain_checkpoint)


def _listing(folder):
    return sorted(os.listdir(folder))


def test_roundtrip_keeps_weights_and_metadata(domain_file, tmp_path):
    sd, meta = read_domain_checkpoint(domain_file)
    assert meta.base_architecture == "SD15" and meta.model_type == "EPS"
    assert meta.calibration["latents"] > 0 and len(meta.base_fingerprint) == 64
    out = write_domain_checkpoint(tmp_path / "copy.safetensors", sd, meta)
    sd2, meta2 = read_domain_checkpoint(out)
    assert meta2 == meta
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert _listing(tmp_path) == ["copy.safetensors"]  # no temp file left behind


def test_loader_output_is_a_memory_managed_model(comfy, base, domain_file):
    from comfy.model_patcher import ModelPatcher

    from indomain.forms import domain_info

    model = base[0]
    domain = comfy.node("InDomainLoadDomainUNet").execute(model, domain_file.name).result[0]
    assert isinstance(domain, ModelPatcher)
    assert domain_info(domain).meta.base_architecture == "SD15"
    assert domain.model is not model.model and domain.model_size() > 0
    # weights are exactly the file's
    sd, _ = read_domain_checkpoint(domain_file)
    loaded = domain.model.diffusion_model.state_dict()
    assert all(torch.equal(loaded[k].float(), sd[k].float()) for k in sd)


def _expect_error(fn, *needles):
    with pytest.raises(DomainCheckpointError) as e:
        fn()
    msg = str(e.value)
    for n in needles:
        assert n.lower() in msg.lower(), msg
    return msg


def test_bad_files_give_clear_errors_and_write_nothing(comfy, base, domain_file, tmp_path):
    from indomain.sampling.domain_model import load_domain_model

    model = base[0]
    folder = tmp_path / "domain_unets"
    folder.mkdir()
    # not safetensors (a pickle would run code: never opened)
    pt = folder / "evil.ckpt"
    pt.write_bytes(b"\x80\x04not really a pickle")
    _expect_error(lambda: load_domain_model(model, pt), "only .safetensors", "re-export")
    # truncated
    trunc = folder / "truncated.safetensors"
    trunc.write_bytes(domain_file.read_bytes()[: domain_file.stat().st_size // 2])
    _expect_error(lambda: load_domain_model(model, trunc), "truncated or corrupt")
    # missing metadata
    sd, meta = read_domain_checkpoint(domain_file)
    bare = folder / "bare.safetensors"
    safetensors.torch.save_file(sd, str(bare))
    _expect_error(lambda: load_domain_model(model, bare), "missing InDomain metadata", "train one")
    # missing file
    _expect_error(lambda: load_domain_model(model, folder / "nope.safetensors"), "not found", "models/domain_unets")
    # NaN weights
    nan_sd = dict(sd)
    k = next(k for k in sd if k.endswith("attn2.constant"))
    nan_sd[k] = torch.full_like(sd[k], float("nan"))
    safetensors.torch.save_file(nan_sd, str(folder / "nan.safetensors"), metadata=meta.to_metadata())
    _expect_error(lambda: load_domain_model(model, folder / "nan.safetensors"), "NaN", "learning rate")
    before = _listing(folder)
    # the writer refuses uncalibrated (all-zero) constants and NaNs, leaving no file
    zero_sd = {k: (torch.zeros_like(v) if k.endswith("attn2.constant") else v) for k, v in sd.items()}
    _expect_error(lambda: write_domain_checkpoint(folder / "zero.safetensors", zero_sd, meta), "calibration never ran")
    _expect_error(lambda: write_domain_checkpoint(folder / "nan2.safetensors", nan_sd, meta), "non-finite")
    _expect_error(lambda: write_domain_checkpoint(folder / "x.ckpt", sd, meta), ".safetensors")
    assert _listing(folder) == before


def test_unwritable_output_folder_is_a_clear_error(domain_file, tmp_path):
    if os.geteuid() == 0:
        target = "/proc/indomain_cannot_write_here/d.safetensors"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = str(ro / "d.safetensors")
    sd, meta = read_domain_checkpoint(domain_file)
    _expect_error(lambda: write_domain_checkpoint(target, sd, meta), "cannot write", "writable")


def test_wrong_architecture_pairing_is_rejected(comfy, base, domain_file, tmp_path):
    from indomain.devkit import tiny_models
    from indomain.sampling.domain_model import load_domain_model

    sd2 = tiny_models.forced_model("sd2v")
    _expect_error(lambda: load_domain_model(sd2, domain_file), "SD15", "SD20", "connect")
    # same family name, but a different layout (metadata edited to claim it matches)
    sd, meta = read_domain_checkpoint(domain_file)
    meta_sd2 = DomainMeta(**{**meta.__dict__, "base_architecture": "SD20", "model_type": "V_PREDICTION"})
    fake = write_domain_checkpoint(tmp_path / "claims_sd2.safetensors", sd, meta_sd2)
    _expect_error(lambda: load_domain_model(sd2, fake), "layout", "checkpoint it was trained from")


def test_domain_model_as_base_is_rejected(comfy, base, domain_file):
    from indomain.sampling.domain_model import load_domain_model

    domain = load_domain_model(base[0], domain_file)
    with pytest.raises(ValueError, match="is a domain UNet"):
        load_domain_model(domain, domain_file)


def test_form_field_is_written_and_files_without_it_load_as_the_full_form(comfy, base, domain_file, tmp_path):
    """Files written before domain model forms existed have no `indomain.form`: they are full-form files."""
    from safetensors import safe_open

    from indomain.forms import domain_info
    from indomain.sampling.domain_model import load_domain_model

    sd, meta = read_domain_checkpoint(domain_file)
    with safe_open(str(domain_file), framework="pt") as f:
        assert f.metadata()["indomain.form"] == "full"
    assert meta.form == "full"
    # written the old way: the same metadata minus the form field
    old_metadata = {k: v for k, v in meta.to_metadata().items() if k != "indomain.form"}
    assert len(old_metadata) == len(meta.to_metadata()) - 1
    old = tmp_path / "before_forms.safetensors"
    safetensors.torch.save_file(sd, str(old), metadata=old_metadata)
    _, old_meta = read_domain_checkpoint(old)
    assert old_meta == meta
    domain = load_domain_model(base[0], old)
    assert domain_info(domain).form.name == "full" and domain_info(domain).source == str(old)
    loaded = domain.model.diffusion_model.state_dict()
    assert all(torch.equal(loaded[k].float(), sd[k].float()) for k in sd)


def test_unknown_or_mismatched_form_is_a_clear_error(comfy, base, domain_file, tmp_path):
    sd, meta = read_domain_checkpoint(domain_file)
    newer = tmp_path / "newer_form.safetensors"
    safetensors.torch.save_file(sd, str(newer), metadata={**meta.to_metadata(), "indomain.form": "hologram"})
    _expect_error(lambda: read_domain_checkpoint(newer), "hologram", "update the pack")
    # a null-text state dict that claims to be a plain UNet
    claims_plain = DomainMeta(**{**meta.__dict__, "form": "plain"})
    _expect_error(lambda: write_domain_checkpoint(tmp_path / "p.safetensors", sd, claims_plain), "form is 'plain'")
    assert not (tmp_path / "p.safetensors").exists()


def test_full_form_is_saved_in_fp16_by_default_and_fp32_on_request(domain_file, tmp_path):
    sd, meta = read_domain_checkpoint(domain_file)
    sd32 = {k: v.float() for k, v in sd.items()}
    half = write_domain_checkpoint(tmp_path / "half.safetensors", sd32, meta)
    full = write_domain_checkpoint(tmp_path / "full.safetensors", sd32, meta, precision="fp32")
    h, _ = read_domain_checkpoint(half)
    f, _ = read_domain_checkpoint(full)
    weights = [k for k in sd if not k.endswith(".attn2.constant")]
    assert all(h[k].dtype == torch.float16 for k in weights) and all(f[k].dtype == torch.float32 for k in weights)
    assert all(h[k].dtype == torch.float32 for k in sd if k.endswith(".attn2.constant"))  # constants keep fp32
    assert all(torch.equal(h[k], sd32[k].half()) for k in weights) and all(torch.equal(f[k], sd32[k]) for k in sd)
    assert 0.45 < half.stat().st_size / full.stat().st_size < 0.55
    big = dict(sd32, **{weights[0]: sd32[weights[0]] * 1e6})  # beyond fp16's range
    _expect_error(lambda: write_domain_checkpoint(tmp_path / "ovf.safetensors", big, meta), "overflow", "fp32")
    assert not (tmp_path / "ovf.safetensors").exists()
