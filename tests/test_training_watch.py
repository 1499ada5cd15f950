"""Training you can watch, trainer level: previews of the EMA model, the loss curve, IMAGE tensors as
training data, and aspect-ratio buckets (deterministic, resume-safe) on the tiny SD15-layout checkpoint."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from indomain.devkit.graphs import sample_with_domain
from indomain.guidance.checkpoint import read_domain_checkpoint
from indomain.training.buckets import BucketedLatentSource, bucket_sizes, nearest_bucket
from indomain.training.loss_curve import loss_curve_path, loss_map, moving_average
from indomain.training.preview import preview_dir_for, preview_due
from indomain.training.trainer import TrainConfig, train

LR = 2e-4


# ----------------------------------------------------------------------------- pure parts


def test_moving_average_is_a_trailing_mean():
    assert moving_average([4, 2, 6, 8], 2) == [4.0, 3.0, 4.0, 7.0]
    values = [float(v) for v in np.random.default_rng(0).random(50)]
    got = moving_average(values, 7)
    assert all(math.isclose(got[i], float(np.mean(values[max(0, i - 6):i + 1]))) for i in range(50))
    assert loss_map([1, 2.5]) == {"loss": [1.0, 2.5]}


def test_preview_schedule():
    assert [s for s in range(1, 11) if preview_due(s, 10, 4)] == [4, 8, 10]
    assert not any(preview_due(s, 10, 0) for s in range(1, 11))


@pytest.mark.parametrize("resolution,factor", [(512, 64), (1024, 64), (64, 8)])
def test_bucket_sizes_keep_the_pixel_count_and_the_model_factor(resolution, factor):
    sizes = bucket_sizes(resolution, factor)
    assert (resolution, resolution) in sizes and 3 <= len(sizes) <= 11
    for w, h in sizes:
        assert w % factor == 0 and h % factor == 0
        assert abs(w * h / resolution ** 2 - 1) < 0.2, (w, h)
        assert (h, w) in sizes  # portrait twin of every landscape shape
    assert nearest_bucket(1000, 1000, sizes) == (resolution, resolution)
    wide = nearest_bucket(2000, 1000, sizes)
    assert wide[0] > wide[1] and nearest_bucket(1000, 2000, sizes) == (wide[1], wide[0])


def test_bucketed_batches_come_from_one_bucket_cover_every_image_and_are_a_pure_function():
    shapes = [(8, 8)] * 5 + [(6, 10)] * 3 + [(10, 6)] * 1
    latents = [torch.full((4, h, w), float(i)) for i, (h, w) in enumerate(shapes)]
    src = BucketedLatentSource(latents, None, shapes)
    per_epoch = src.chunks_per_epoch(2)
    assert per_epoch == 3 + 2 + 1
    seen = set()
    for m in range(per_epoch):
        bucket, local = src.micro_batch_indices(7, m, 0, 2, 1)
        x = src.micro_batch(7, m, 0, 2, 1, torch.Generator().manual_seed(0), 0.0)
        assert tuple(x.shape[-2:]) == bucket and x.shape[0] == 2
        seen |= {int(v) for v in x[:, 0, 0, 0]}
    assert seen == set(range(9))  # one epoch shows every image
    # a fresh source (as after a resume) gives the same batches at the same micro-steps
    again = BucketedLatentSource(latents, None, shapes)
    for m in (0, 4, 11, 12):
        assert again.micro_batch_indices(7, m, 0, 2, 1) == src.micro_batch_indices(7, m, 0, 2, 1)
    # two ranks split the same global batch
    b0, r0 = src.micro_batch_indices(7, 3, 0, 1, 2)
    b1, r1 = src.micro_batch_indices(7, 3, 1, 1, 2)
    assert b0 == b1 and r0 + r1 == src.micro_batch_indices(7, 3, 0, 2, 1)[1]
    assert src.calibration_latents(7, 9).shape == (9, 4, 6, 6)


# ----------------------------------------------------------------------------- on the tiny checkpoint


def mixed_images(seed: int = 0) -> list[torch.Tensor]:
    """IMAGE batches of different sizes (as core's dataset loader delivers them): square, wide, tall."""
    rng = np.random.default_rng(seed)
    out = []
    for w, h in [(64, 64), (64, 64), (112, 64), (104, 56), (64, 112), (72, 72)]:
        arr = np.full((h, w, 3), 0.9, dtype=np.float32)
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        arr[y0:y0 + h // 2, x0:x0 + w // 2] = rng.random(3)
        out.append(torch.from_numpy(arr)[None])
    return out


def cfg(session_dir, **kw):
    base = dict(steps=4, lr=LR, batch_size=2, resolution=64, seed=5, save_every=0,
                cache_dir=str(session_dir / "watch_cache"))
    base.update(kw)
    return TrainConfig(**base)


def test_buckets_from_mixed_size_images_are_resume_exact(comfy, base, session_dir, tmp_path):
    model, clip, vae = base
    images = mixed_images()
    straight = train(model, clip, vae, None, cfg(session_dir, buckets=True), tmp_path / "a.safetensors", images=images)
    buckets = straight.summary["buckets"]
    # The tiny model's size factor is 8 (one UNet level), so the 64 px buckets are 48x88 ... 88x48. Worked by hand
    # (nearest log aspect ratio): 64x64, 64x64 and 72x72 -> 64x64 = latent 8x8; 112x64 (1.75) and 104x56 (1.86)
    # -> 88x48 (1.83) = latent h x w 6x11; 64x112 -> 48x88 = latent 11x6. Names are latent "HxW".
    assert buckets == {"8x8": 3, "6x11": 2, "11x6": 1}, buckets
    _, meta = read_domain_checkpoint(tmp_path / "a.safetensors")
    assert meta.training["buckets"] == buckets and meta.training["images"] == 6

    stopped = {"n": 0}

    def stop_after_two():
        return stopped["n"] >= 2

    def progress(step, *_):
        stopped["n"] = step

    part = train(model, clip, vae, None, cfg(session_dir, buckets=True), tmp_path / "b.safetensors", images=images,
                 progress=progress, should_stop=stop_after_two)
    assert part.interrupted and part.steps_done == 2
    resumed = train(model, clip, vae, None, cfg(session_dir, buckets=True), tmp_path / "b.safetensors", images=images,
                    resume=True)
    assert resumed.steps_done == 4 and resumed.summary["latent_cache_hits"] == 6  # cached by content
    assert resumed.losses == straight.losses
    assert resumed.summary["weights_digest"] == straight.summary["weights_digest"]


def test_previews_and_loss_curve_beside_the_checkpoint(comfy, base, models_dir, session_dir, tmp_path):
    """Previews at the configured steps, saved and handed to the caller; the final 'domain' preview is what core
    KSampler makes from the saved file at cfg 1 with the same seed (an independent sampling path); previews
    leave the trained weights unchanged."""
    model, clip, vae = base
    out = models_dir / "domain_unets" / "watch_previews.safetensors"
    shown = []
    config = cfg(session_dir, steps=3, preview_every=2, preview_steps=3, preview_prompt="a red square")
    result = train(model, clip, vae, None, config, out, images=mixed_images(1),
                   on_preview=lambda step, total, pics: shown.append((step, total, [label for label, _ in pics])))
    assert shown == [(2, 3, ["domain", "prompt"]), (3, 3, ["domain", "prompt"])]  # every 2 steps and at the end
    folder = preview_dir_for(out)
    assert sorted(p.name for p in folder.iterdir()) == [
        "step_000002_domain.png", "step_000002_prompt.png", "step_000003_domain.png", "step_000003_prompt.png"]
    assert sorted(result.preview_paths) == sorted(folder.iterdir())
    curve = loss_curve_path(out)
    assert result.loss_curve_path == curve and Image.open(curve).size == (800, 480)
    assert len(result.losses) == 3

    # the final domain preview against core KSampler on the saved (EMA) file
    graph = sample_with_domain("tiny_sd15.safetensors", {"class_type": "InDomainLoadDomainUNet", "inputs": {
        "model": ["1", 0], "domain_unet_name": out.name}}, prompt="", steps=3, size=64)
    graph["7"] = {"class_type": "KSampler", "inputs": {
        "model": ["2", 0], "seed": config.seed, "steps": 3, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["4", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}}
    graph["8"] = {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}}
    del graph["6"]
    core = comfy.run(graph, outputs=["8"]).output("8")[0].float().numpy()
    preview = np.asarray(Image.open(folder / "step_000003_domain.png"), dtype=np.float32) / 255.0
    assert preview.shape == core.shape
    diff = np.abs(preview - core)
    assert diff.mean() < 2 / 255 and diff.max() < 24 / 255, (diff.mean(), diff.max())
    assert preview.std() > 0.01  # a picture, not a blank

    # the same run without previews trains the same weights
    plain = train(model, clip, vae, None, cfg(session_dir, steps=3), tmp_path / "plain.safetensors",
                  images=mixed_images(1))
    assert plain.summary["weights_digest"] == result.summary["weights_digest"]


@pytest.mark.slow
def test_cli_writes_previews_and_the_loss_curve_and_says_where(tiny_files, session_dir, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from indomain.devkit.images import make_image_folder

    images = make_image_folder(tmp_path / "imgs", 4, 64, seed=2)  # some of them wider than tall
    out = tmp_path / "cli" / "watched.safetensors"
    r = subprocess.run([sys.executable, "-m", "indomain.training", "--base", str(tiny_files["checkpoint"]), "--images",
                        str(images), "--out", str(out), "--resolution", "64", "--batch-size", "2", "--lr", "1e-4",
                        "--cache-dir", str(session_dir / "watch_cache"), "--cpu", "--steps", "2", "--buckets",
                        "--preview-every", "1", "--preview-steps", "2", "--summary-json", str(tmp_path / "s.json")],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    curve, previews = loss_curve_path(out), preview_dir_for(out)
    assert f"loss curve {curve}" in r.stdout and f"previews {previews}" in r.stdout
    assert "preview at step 1" in r.stderr and "preview at step 2" in r.stderr
    assert Image.open(curve).size == (800, 480)
    assert sorted(p.name for p in previews.iterdir()) == ["step_000001_domain.png", "step_000002_domain.png"]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["loss_curve"] == str(curve) and len(summary["previews"]) == 2 and summary["buckets"]
