"""The trainer's GPU-only paths, checked on a CPU where torch allows it: fp16 GradScaler resume, the "auto"
precision choice, unloading the base once the trainable copy exists, and rank 0's long file writes under
data-parallel training (two gloo processes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from indomain.training import gpu


def _scaled_step(scaler):
    """One fp16-style optimizer step through the scaler (finite gradients)."""
    param = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([param], lr=0.1)
    loss = (param * 3.0).sum()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def _scaler_after_steps(n: int):
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    for _ in range(n):
        _scaled_step(scaler)
    return scaler


def test_fp16_resume_scaler_state_survives_the_resume_file_and_updates():
    """The saved GradScaler state goes through JSON (the resume file's metadata) and the resumed scaler can
    take steps: growth_interval stays an int, the scale and growth tracker carry on where they were."""
    scaler = _scaler_after_steps(2)
    saved = json.loads(json.dumps(gpu.scaler_state_for_json(scaler)))
    assert isinstance(saved["growth_interval"], int) and isinstance(saved["_growth_tracker"], int)

    resumed = torch.amp.GradScaler("cpu")
    gpu.load_scaler_state(resumed, saved)
    _scaled_step(resumed)  # the third finite step: the scale grows (growth_interval 3)
    _scaled_step(scaler)
    assert resumed.get_scale() == scaler.get_scale() == 2048.0
    assert resumed.state_dict() == scaler.state_dict()


def test_fp16_resume_from_a_file_written_before_the_fix():
    """Resume files written by earlier versions saved every number as a float. torch's update then raises
    TypeError (the defect); load_scaler_state restores the int fields so those files resume too."""
    scaler = _scaler_after_steps(1)
    old_format = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in scaler.state_dict().items()}

    broken = torch.amp.GradScaler("cpu")
    broken.load_state_dict(old_format)
    with pytest.raises(TypeError):  # what resuming an fp16 run did before
        _scaled_step(broken)

    fixed = torch.amp.GradScaler("cpu")
    gpu.load_scaler_state(fixed, old_format)
    _scaled_step(fixed)
    assert fixed.state_dict()["growth_interval"] == scaler.state_dict()["growth_interval"]


def test_trainer_resume_file_keeps_the_scaler_state(tmp_path):
    """The trainer's own resume writer and restorer carry a GradScaler that can update after loading."""
    from indomain.training.optim import EMA
    from indomain.training.resume import read_resume_state, restore_optimisation, save_resume_state

    unet = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(unet.parameters())
    scaler = _scaler_after_steps(2)
    path = save_resume_state(tmp_path / "run.resume", unet, EMA(unet), opt, 2, {"config": {}}, scaler)
    state, info = read_resume_state(path)
    resumed = torch.amp.GradScaler("cpu")
    restore_optimisation(state, info, unet, EMA(unet), torch.optim.AdamW(unet.parameters()), resumed,
                         torch.device("cpu"))
    assert resumed.state_dict() == scaler.state_dict()
    _scaled_step(resumed)
    assert resumed.get_scale() == 2048.0


def test_auto_precision_uses_fp16_where_bf16_is_only_emulated():
    """torch.cuda.is_bf16_supported() counts emulation by default (pre-Ampere cards: slow bf16). "auto" asks
    for native support only. The probes below stand in for a card; the real torch function takes the flag."""
    def pre_ampere(including_emulation=True):  # bf16 only by emulation
        return including_emulation

    def ampere(including_emulation=True):
        return True

    def no_bf16(including_emulation=True):
        return False

    assert gpu.auto_amp_dtype(pre_ampere) == torch.float16
    assert gpu.auto_amp_dtype(ampere) == torch.bfloat16
    assert gpu.auto_amp_dtype(no_bf16) == torch.float16
    import inspect

    assert "including_emulation" in inspect.signature(torch.cuda.is_bf16_supported).parameters, \
        "this torch cannot exclude bf16 emulation; gpu.native_bf16_supported falls back to the compute capability"


def test_base_is_unloaded_once_the_trainable_copy_exists(comfy, base):
    """On a base carrying a LoRA (core's own loader, as a LoraLoader in front of the Train node would): the
    trainable copy holds the patched weights (checked against W + strength * alpha / rank * up @ down computed
    here), and once it exists the base is out of ComfyUI's loaded models with its patch taken back out of its
    weights (ComfyUI's unload restores the unpatched tensors, which frees the patched ones), so training does
    not hold a second copy of the UNet."""
    import comfy.model_management as mm
    import comfy.sd

    from indomain.forms.model import detached_unet_copy

    model = base[0]
    sd = model.model.diffusion_model.state_dict()
    original = {k: v.detach().float().clone() for k, v in sd.items()}
    g = torch.Generator().manual_seed(7)
    rank, alpha, strength = 2, 1.0, 0.7
    lora, expected = {}, dict(original)
    for k, w in sd.items():
        if k.endswith(".weight") and w.ndim == 2 and min(w.shape) > rank:  # every Linear: attention, projections
            name = "lora_unet_" + k[: -len(".weight")].replace(".", "_")
            up, down = torch.randn(w.shape[0], rank, generator=g), torch.randn(rank, w.shape[1], generator=g)
            lora.update({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down,
                         f"{name}.alpha": torch.tensor(alpha)})
            expected[k] = original[k] + strength * alpha / rank * (up @ down)
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0.0)
    changed = [k for k in sd if not torch.equal(expected[k], original[k])]
    assert len(changed) >= 4 and len(changed) == len(lora) // 3, "the LoRA should reach every Linear weight"

    # not applied yet: a patch reaches the weights only when ComfyUI loads the model, so a copy holding it
    # (checked below) proves detached_unet_copy loaded the base itself before copying
    assert all(torch.equal(v.float(), original[k]) for k, v in patched.model.diffusion_model.state_dict().items())
    loads = []
    real_load = mm.load_models_gpu

    def load_and_check(models, *args, **kw):  # ComfyUI's own loader, watched: was the patched base loaded?
        out = real_load(models, *args, **kw)
        loads.append(any(lm.model is not None and patched.is_clone(lm.model) for lm in mm.current_loaded_models))
        return out

    mm.load_models_gpu = load_and_check
    try:
        unet = detached_unet_copy(patched)
    finally:
        mm.load_models_gpu = real_load
    assert loads and all(loads), loads  # the patched base was loaded for the copy

    still_loaded = [lm for lm in mm.current_loaded_models if lm.model is not None and patched.is_clone(lm.model)]
    assert still_loaded == [], "the base stays loaded after the trainable copy was made"
    assert patched.model.model_loaded_weight_memory == 0
    after = patched.model.diffusion_model.state_dict()
    assert all(torch.equal(after[k].float(), original[k]) for k in sd), "the base's weights still carry the patch"
    copy = unet.state_dict()
    assert copy.keys() == sd.keys()
    for k, v in copy.items():  # the copy: patched (what training starts from), fp32, its own memory
        assert v.dtype == torch.float32 and v.data_ptr() != after[k].data_ptr(), k
        assert torch.allclose(v, expected[k], atol=1e-5), (k, float((v - expected[k]).abs().max()))


RANK0_WAIT_SCRIPT = textwrap.dedent("""
    import datetime, os, sys, time
    import torch, torch.distributed as dist
    from indomain.training import gpu

    use_helper = sys.argv[1] == "helper"
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=float(sys.argv[2])))
    rank, world = dist.get_rank(), dist.get_world_size()
    gpu._rank0_io_group()  # created collectively up front, as a first save would

    def slow_write():  # rank 0 writing a large resume file: longer than the collective timeout
        time.sleep(float(sys.argv[3]))
        return "written"

    if use_helper:
        result = gpu.on_rank0_others_wait(slow_write, rank, world)
    else:  # what the trainer did before: rank 0 writes, the others go on to the next collective
        result = slow_write() if rank == 0 else None
    t = torch.ones(1)
    dist.all_reduce(t)  # the next training step's collective
    print(f"rank {rank} ok {result} {t.item()}", flush=True)
    dist.destroy_process_group()
""")


def _torchrun(tmp_path, mode: str, timeout_s: float, write_s: float):
    from indomain.devkit.host import free_port

    script = tmp_path / "rank0_wait.py"
    script.write_text(RANK0_WAIT_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(script), mode, str(timeout_s), str(write_s)],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_ddp_ranks_wait_for_rank0_writes_longer_than_the_collective_timeout(tmp_path):
    """Two gloo processes, collective timeout 3 s, rank 0 'writes' for 8 s. With the trainer's wait every rank
    carries on; without it the other rank's next all_reduce times out (the check can fail)."""
    ok = _torchrun(tmp_path, "helper", 3, 8)
    assert ok.returncode == 0, (ok.stdout + ok.stderr)[-3000:]
    assert "rank 0 ok written 2.0" in ok.stdout and "rank 1 ok None 2.0" in ok.stdout

    before = _torchrun(tmp_path, "plain", 3, 8)
    assert before.returncode != 0, "without the wait, rank 1 should have timed out"
    assert "rank 1 ok" not in before.stdout
