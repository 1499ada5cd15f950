"""Training the LoRA form on the tiny SD15-layout checkpoint: only the adapter trains (and is averaged,
saved and resumed), the base stays untouched, the file is small and loads as a LoRA-form domain model,
resume is exact, a changed rank is refused, interrupting saves; the command line and two data-parallel
processes under torchrun (gloo on CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from indomain.devkit.images import make_image_folder
from indomain.guidance.checkpoint import read_domain_checkpoint
from indomain.guidance.lora import DomainLoRA, merge_into
from indomain.training.trainer import TrainConfig, resume_path_for, train


@pytest.fixture(scope="module")
def images(session_dir):
    folder = session_dir / "lora_images"
    if not folder.exists():
        make_image_folder(folder, 6, 64, seed=5)
    return folder


def cfg(session_dir, **kw):
    base = dict(steps=4, lr=1e-3, batch_size=2, resolution=64, seed=2, save_every=0, form="lora", lora_rank=4,
                lora_alpha=8.0, cache_dir=str(session_dir / "latent_cache"))
    base.update(kw)
    return TrainConfig(**base)


def test_lora_training_trains_only_the_adapter_and_the_file_loads_as_lora(comfy, base, session_dir, images, tmp_path):
    from indomain.forms import domain_info
    from indomain.sampling.domain_model import load_domain_model

    model, clip, vae = base
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    out = tmp_path / "lora.safetensors"
    result = train(model, clip, vae, images, cfg(session_dir), out)
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    after = model.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base is never modified

    sd, meta = read_domain_checkpoint(out)
    assert meta.form == "lora" and meta.training["form"] == "lora"
    assert meta.training["lora_rank"] == 4 and meta.training["lora_alpha"] == 8.0
    lora = DomainLoRA.from_state_dict(sd, out.name)
    assert lora.rank == 4 and lora.alpha == 8.0 and lora.constants
    assert all(torch.equal(result.state_dict[k].float(), sd[k].float()) for k in sd)
    assert max(float(a.up.abs().max()) for a in lora.layers.values()) > 0  # the adapter trained (up starts at 0)
    base_bytes = sum(v.numel() * v.element_size() for v in before.values())
    assert out.stat().st_size < base_bytes / 10
    # the resume state holds the adapter, its EMA and AdamW moments, not the frozen base weights
    from safetensors import safe_open

    with safe_open(str(resume_path_for(out)), framework="pt") as f:
        model_keys = [k for k in f.keys() if k.startswith("model/")]
    assert model_keys and all(k.endswith((".lora_down", ".lora_up", ".attn2.constant")) for k in model_keys)

    domain = load_domain_model(model, out)
    assert domain_info(domain).form.name == "lora" and domain.model is model.model
    # independent: the file's adapter merged into the null-text base predicts what the LoRA-form pass predicts
    import comfy.sampler_helpers
    import comfy.samplers as samplers

    from indomain.forms.base import separate_unet_model
    from indomain.guidance.nulltext import convert_to_null_text, expected_null_text_shapes

    null_sd = {k: before[k] for k in expected_null_text_shapes(model.model.diffusion_model) if k in before}
    full_sd = merge_into(null_sd, lora)
    from indomain.forms import FORMS, DomainRecord

    full = separate_unet_model(model, full_sd, DomainRecord(FORMS["full"], meta), convert_to_null_text)
    neg = [[clip.encode_from_tokens(clip.tokenize(""))[0], {}]]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 2
    conds = samplers.encode_model_conds(model.model.extra_conds, comfy.sampler_helpers.convert_cond(neg), x, "cpu",
                                        "negative")
    sigma = torch.tensor([2.0])
    passes = {n: domain_info(d).form.domain_pass(d) for n, d in (("lora", domain), ("full", full))}
    preds = {}
    model.pre_run()  # calc_cond_batch runs on the base's current patcher, as inside a sampling run
    try:
        for n, p in passes.items():
            p.prepare()
            preds[n] = p.predict(model.model, [conds], x, sigma, {})[0]
            p.release()
    finally:
        model.cleanup()
    torch.testing.assert_close(preds["lora"], preds["full"], rtol=0, atol=1e-5)


def test_lora_resume_is_exact_and_a_changed_rank_is_refused(comfy, base, session_dir, images, tmp_path):
    model, clip, vae = base
    straight = train(model, clip, vae, images, cfg(session_dir, save_precision="fp32"), tmp_path / "a.safetensors")
    half = train(model, clip, vae, images, cfg(session_dir, steps=2, save_precision="fp32"), tmp_path / "b.safetensors")
    assert half.steps_done == 2
    resumed = train(model, clip, vae, images, cfg(session_dir, save_precision="fp32"), tmp_path / "b.safetensors",
                    resume=True)
    assert resumed.steps_done == 4 and resumed.losses == pytest.approx(straight.losses, abs=1e-6)
    worst = max(float((straight.state_dict[k] - resumed.state_dict[k]).abs().max()) for k in straight.state_dict)
    assert worst <= 1e-6, worst
    with pytest.raises(ValueError, match="lora_rank"):
        train(model, clip, vae, images, cfg(session_dir, steps=6, lora_rank=8, save_precision="fp32"),
              tmp_path / "b.safetensors", resume=True)


def test_interrupting_lora_training_saves_the_adapter(comfy, base, session_dir, images, tmp_path):
    model, clip, vae = base
    steps = []
    out = tmp_path / "stop.safetensors"
    result = train(model, clip, vae, images, cfg(session_dir, steps=10), out,
                   progress=lambda s, *a: steps.append(s), should_stop=lambda: len(steps) >= 2)
    assert result.interrupted and result.steps_done == 2
    _, meta = read_domain_checkpoint(out)
    assert meta.form == "lora" and meta.training["steps"] == 2


@pytest.mark.slow
def test_cli_form_lora_under_torchrun_two_processes(tiny_files, images, tmp_path):
    from indomain.devkit.host import free_port

    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "ddp" / "ddp_lora.safetensors"
    summary = tmp_path / "ddp.json"
    r = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m",
                        "indomain.training", "--base", str(tiny_files["checkpoint"]), "--images", str(images),
                        "--out", str(out), "--resolution", "64", "--batch-size", "2", "--lr", "1e-3", "--steps", "2",
                        "--cache-dir", str(tmp_path / "cache"), "--cpu", "--form", "lora", "--rank", "4",
                        "--alpha", "4", "--summary-json", str(summary)],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"),
                       timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    s = json.loads(summary.read_text())
    assert s["world_size"] == 2 and s["steps_done"] == 2
    assert len(s["rank_weight_digests"]) == 2 and s["rank_weight_digests"][0] == s["rank_weight_digests"][1]
    sd, meta = read_domain_checkpoint(out)
    assert meta.form == "lora" and meta.training["lora_rank"] == 4 and DomainLoRA.from_state_dict(sd, "f").rank == 4
