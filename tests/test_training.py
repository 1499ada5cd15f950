"""The trainer on the tiny SD15-layout checkpoint: loss goes down, the file loads and samples in a
real ComfyUI graph, resume is exact, a diverging run stops cleanly.

Learning rate 2e-4 (not the 1e-5 default): the tiny randomly initialised UNet needs it for the
loss to fall clearly within 50 steps; batch 2 and 8x8 latents keep it at ~1 s/step on 2 cores.
"""
from __future__ import annotations

import logging

import pytest
import torch

from indomain.devkit.graphs import sample_with_domain
from indomain.devkit.images import add_bad_files, make_image_folder
from indomain.guidance.checkpoint import read_domain_checkpoint
from indomain.training.trainer import TrainConfig, TrainingDiverged, resume_path_for, train

LR = 2e-4


@pytest.fixture(scope="module")
def images(session_dir):
    folder = session_dir / "train_images"
    if not folder.exists():
        make_image_folder(folder, 12, 64, seed=0)
        add_bad_files(folder)
    return folder


def cfg(session_dir, **kw):
    base = dict(steps=10, lr=LR, batch_size=2, resolution=64, seed=3, save_every=0,
                cache_dir=str(session_dir / "latent_cache"))
    base.update(kw)
    return TrainConfig(**base)


def test_fifty_steps_lower_the_loss_and_the_file_loads_and_samples(comfy, base, models_dir, session_dir, images, caplog):
    model, clip, vae = base
    out = models_dir / "domain_unets" / "trained50.safetensors"
    with caplog.at_level(logging.WARNING, logger="indomain.training"):
        result = train(model, clip, vae, images, cfg(session_dir, steps=50), out)
    # unreadable / non-image / tiny files: one warning each, counted, training goes on
    skipped_warnings = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped_warnings) == 3
    for name in ("broken.png", "notes.JPG", "tiny.png"):
        assert sum(f"{name}: " in m for m in skipped_warnings) == 1, (name, skipped_warnings)
    assert result.summary["skipped"] == 3 and result.summary["images"] == 12

    losses = result.losses
    assert len(losses) == 50 and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)
    print(f"50 steps: loss {first:.4f} -> {last:.4f}; loop {result.summary['seconds']} s")

    sd, meta = read_domain_checkpoint(out)
    assert meta.training["steps"] == 50 and meta.training["images"] == 12 and meta.training["skipped"] == 3
    assert meta.training["resolution"] == 64 and meta.training["lr"] == LR
    assert meta.calibration["latents"] == 12
    assert result.resume_path is not None and result.resume_path.is_file()
    # the saved weights are the EMA, and training moved them away from the calibrated start
    for k, v in result.state_dict.items():
        assert torch.equal(v, sd[k].float()), k

    graph = sample_with_domain("tiny_sd15.safetensors", {"class_type": "InDomainLoadDomainUNet", "inputs": {
        "model": ["1", 0], "domain_unet_name": out.name}}, prompt="a red circle", seed=1, steps=3)
    run = comfy.run(graph, outputs=["2", "6"])
    domain = run.output("2")
    loaded = domain.model.diffusion_model.state_dict()
    assert torch.allclose(loaded["out.2.weight"].float(), sd["out.2.weight"].float())
    samples = run.output("6")["samples"]
    assert samples.shape == (1, 4, 8, 8) and torch.isfinite(samples).all()


def test_ten_steps_equal_five_plus_resume_plus_five(comfy, base, session_dir, images, tmp_path):
    model, clip, vae = base
    # fp32 files: this checks that resuming is exact, which fp16 rounding of the file would blur
    straight = train(model, clip, vae, images, cfg(session_dir, steps=10, save_precision="fp32"),
                     tmp_path / "straight.safetensors")
    half = train(model, clip, vae, images, cfg(session_dir, steps=5, save_precision="fp32"), tmp_path / "split.safetensors")
    assert half.steps_done == 5 and resume_path_for(tmp_path / "split.safetensors").is_file()
    resumed = train(model, clip, vae, images, cfg(session_dir, steps=10, save_precision="fp32"),
                    tmp_path / "split.safetensors", resume=True)
    assert resumed.steps_done == 10
    assert resumed.losses == pytest.approx(straight.losses, abs=1e-6)
    worst = max(float((straight.state_dict[k] - resumed.state_dict[k]).abs().max()) for k in straight.state_dict)
    assert worst <= 1e-6, worst
    # and the files on disk agree too
    a, _ = read_domain_checkpoint(tmp_path / "straight.safetensors")
    b, meta = read_domain_checkpoint(tmp_path / "split.safetensors")
    assert meta.training["steps"] == 10
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    # a different seed is a different run, so resume refuses it (rather than silently mixing runs)
    with pytest.raises(ValueError, match="seed"):
        train(model, clip, vae, images, cfg(session_dir, steps=12, seed=4), tmp_path / "split.safetensors", resume=True)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(comfy, base, session_dir, images, tmp_path):
    model, clip, vae = base
    out = tmp_path / "diverge.safetensors"
    # lr 1e30 grows weights past fp16's range before the loss turns non-finite: fp32 files, so the
    # checkpoints before the bad step can be written (fp16 files refuse overflow: test_domain_checkpoint)
    with pytest.raises(TrainingDiverged) as err:
        train(model, clip, vae, images, cfg(session_dir, steps=8, lr=1e30, save_every=1, save_precision="fp32"), out)
    msg = str(err.value)
    assert "at step" in msg and "Lower the learning rate" in msg and str(out) in msg
    bad_step = int(msg.split("at step ")[1].split(";")[0])
    sd, meta = read_domain_checkpoint(out)  # validates: finite, calibrated
    assert meta.training["steps"] == bad_step - 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_plain_form_trains_says_so_and_samples_as_a_domain_model(comfy, base, session_dir, images, tmp_path):
    """The second domain model form (the benchmarks' naive baseline): an unmodified UNet fine-tuned on the
    empty prompt. Its file says form 'plain', keeps the base's layout, and Load Domain UNet turns it into a
    domain model the guider runs; resuming it as another form is refused."""
    from indomain.forms import domain_info
    from indomain.sampling.domain_model import load_domain_model

    model, clip, vae = base
    out = tmp_path / "plain.safetensors"
    result = train(model, clip, vae, images, cfg(session_dir, steps=3, form="plain"), out)
    sd, meta = read_domain_checkpoint(out)
    assert meta.form == "plain" and meta.training["form"] == "plain"
    assert meta.calibration == {"kind": "plain_finetune", "prompt": ""}
    base_sd = model.model.diffusion_model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in base_sd.items()}
    assert any(".attn2.to_k." in k for k in sd)
    assert all(torch.equal(result.state_dict[k], sd[k].float()) for k in sd)
    assert not all(torch.equal(sd[k].float(), base_sd[k].float()) for k in sd)  # it trained

    domain = load_domain_model(model, out)
    assert domain_info(domain).form.name == "plain" and domain.model is not model.model
    _check_one_step_formula(model, domain, clip)
    with pytest.raises(ValueError, match="form"):
        train(model, clip, vae, images, cfg(session_dir, steps=5), out, resume=True)


def _check_one_step_formula(model, domain, clip):
    """One guider step equals u + w_d (D(x, ∅) - u) + w_c (B(x, c) - u) computed from the models directly."""
    from indomain.devkit.domain import one_guider_step
    from indomain.sampling.guider import domain_guider

    def encode(text):
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        return [[cond, {"pooled_output": pooled}]]

    pos, neg = encode("a red circle"), encode("")
    seen = one_guider_step(domain_guider(model, domain, pos, neg, 2.5, 2.0))

    def pred(m, c):
        with torch.no_grad():
            return m.model.apply_model(seen["x"], seen["s"], c_crossattn=c[0][0]).float()

    u, g, d = pred(model, neg), pred(model, pos), pred(domain, neg)
    assert (d - u).abs().max() > 1e-4  # the domain term is not u in disguise
    torch.testing.assert_close(seen["out"].float(), u + 2.0 * (d - u) + 2.5 * (g - u), rtol=1e-5, atol=1e-5)
