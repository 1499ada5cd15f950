"""LoRA-form training on a half-precision frozen base (issue 24): the base trains in bf16 (fp16 with a loss
scaler) as its own weights, with no float32 copy of it; the adapter and AdamW's moments are float32; the loss
falls; a bf16 run lands close to an fp32 run; gradient checkpointing is on by default for the LoRA form.

Runs on the tiny SD15-layout checkpoint (CPU), through the trainer's own build and step functions, so what is
counted is what a run holds."""
from __future__ import annotations

import pytest
import torch

from indomain.training.config import TrainConfig
from indomain.training.data import TrainingInputError


def cfg(**kw):
    base = dict(steps=3, lr=1e-3, batch_size=2, resolution=64, seed=3, save_every=0, form="lora", lora_rank=4,
                calibration_images=4, hflip=0.0, ema_decay=0.0, keep_resume_state=False)
    base.update(kw)
    return TrainConfig(**base).with_defaults()


def latents(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a learnable domain: a fixed pattern plus a little noise (VAE-space scale)
    pattern = torch.randn(1, 4, 8, 8, generator=g) * 4.0
    return pattern + 0.3 * torch.randn(n, 4, 8, 8, generator=g)


@pytest.fixture(scope="module")
def bf16_base(comfy, base):
    """The tiny checkpoint's UNet loaded by ComfyUI in bf16 (as a bf16 checkpoint / weight_dtype loads it)."""
    import comfy.sd

    model, clip, _vae = base
    sd = {k: v.detach().to(torch.bfloat16) for k, v in model.model.diffusion_model.state_dict().items()}
    half = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.bfloat16})
    assert next(half.model.diffusion_model.parameters()).dtype == torch.bfloat16
    return half, clip


def build(model, clip, config):
    """A run as the trainer builds it (trainer._build/_restore), on the CPU."""
    from indomain.training import trainer
    from indomain.training.batches import TrainingData

    device = torch.device("cpu")
    data = TrainingData.prepare(model, latents(), None, config, None, None)
    with torch.inference_mode(False), torch.enable_grad():
        run = trainer._build(model, clip, data, config, device, None)
        trainer._restore(run, None, device, 1)
    return run, data


def step(run, data, config):
    from indomain.training import trainer

    with torch.inference_mode(False), torch.enable_grad():
        loss = trainer._step_loss(run, data, config, 0, 1, torch.device("cpu"))
        trainer._apply_step(run, config, loss)
    return loss


def eval_loss(run, data, config, indices=range(1000, 1006)):
    """The loss on fixed micro-batches (fixed latents, noise and timesteps: the trainer's batches are a function
    of the step index), so before/after compare the model, not the draw."""
    device = torch.device("cpu")
    total = 0.0
    with torch.inference_mode(False), torch.no_grad():
        for i in indices:
            xc, t, target = data.micro_batch(config, i, 0, 1, device)
            ctx = run.prompt.expand(xc.shape[0], device, torch.float32)
            with torch.autocast("cpu", dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
                pred = run.model(xc, t, **ctx)
            total += float(torch.nn.functional.mse_loss(pred.float(), target.float()))
    return total / len(indices)


def storage_ptrs(module, frozen=True):
    return {p.untyped_storage().data_ptr() for p in module.parameters() if p.requires_grad != frozen}


def test_bf16_base_is_the_base_itself_and_the_adapter_and_adam_are_fp32(bf16_base):
    model, clip = bf16_base
    config = cfg()
    base_params = list(model.model.diffusion_model.parameters())
    base_bytes = sum(p.numel() * p.element_size() for p in base_params)
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    run, data = build(model, clip, config)

    frozen = [p for p in run.module.parameters() if not p.requires_grad]
    trained = [p for p in run.module.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert {n for n, p in run.module.named_parameters() if p.requires_grad} == {
        n for n, _ in run.form.trainable_parameters(run.module)}
    # every frozen Linear/Conv weight is bf16 and IS the base's storage (no copy); only norms' few weights differ
    base_ptrs = {p.untyped_storage().data_ptr() for p in base_params}
    big = [p for p in frozen if p.ndim >= 2]
    assert big and all(p.dtype == torch.bfloat16 for p in big)
    assert all(p.untyped_storage().data_ptr() in base_ptrs for p in big)
    own_bytes = sum(p.numel() * p.element_size() for p in frozen if p.untyped_storage().data_ptr() not in base_ptrs)
    assert own_bytes < 0.01 * base_bytes, f"{own_bytes} bytes of base weights copied (base: {base_bytes})"
    assert not any(p.dtype == torch.float32 and p.ndim >= 2 for p in frozen)  # no float32 copy of the base
    assert run.module.indomain_shared["shared"] > 0
    assert run.amp_dtype == torch.bfloat16 and run.scaler is None

    losses = [step(run, data, config) for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    states = [s for s in run.optimizer.state.values()]
    assert states and all(s["exp_avg"].dtype == torch.float32 and s["exp_avg_sq"].dtype == torch.float32
                          for s in states)
    assert all(p.grad is None for p in frozen)  # no gradients for the base
    # the base (what the ModelPatcher holds) is unchanged and still bf16
    after = model.model.diffusion_model.state_dict()
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in before)


def test_grad_checkpointing_is_on_by_default_for_the_lora_form_only(bf16_base):
    assert cfg().grad_checkpointing is True
    assert cfg(form="full").grad_checkpointing is False
    assert cfg(grad_checkpointing=False).grad_checkpointing is False
    model, clip = bf16_base
    run, _data = build(model, clip, cfg())
    first = run.module.input_blocks[0]
    assert first.forward.__name__ == "fwd"  # training/optim.enable_grad_checkpointing's wrapper


def test_the_loss_falls_on_a_bf16_base(bf16_base):
    model, clip = bf16_base
    config = cfg(lr=5e-3)
    run, data = build(model, clip, config)
    start = eval_loss(run, data, config)
    for _ in range(6):
        step(run, data, config)
    end = eval_loss(run, data, config)
    print(f"eval loss {start:.4f} -> {end:.4f}")
    assert end < 0.9 * start, (start, end)


def test_fp16_base_trains_with_a_loss_scaler(bf16_base):
    model, clip = bf16_base
    config = cfg(base_precision="fp16")
    run, data = build(model, clip, config)
    big = [p for p in run.module.parameters() if not p.requires_grad and p.ndim >= 2]
    assert all(p.dtype == torch.float16 for p in big)
    assert run.amp_dtype == torch.float16
    assert isinstance(run.scaler, torch.amp.GradScaler) and run.scaler.is_enabled()
    scale = run.scaler.get_scale()
    assert scale > 1.0  # the loss is scaled up before the backward pass
    losses = [step(run, data, config) for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    trained = [p for p in run.module.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trained)
    assert max(float(m.lora_up.detach().abs().max()) for m in run.module.modules() if hasattr(m, "lora_up")) > 0


def test_bf16_training_lands_close_to_fp32(comfy, base):
    """The same run on the fp32 base with base_precision fp32 and bf16: losses and trained adapters agree."""
    model, clip, _vae = base
    results = {}
    for precision in ("fp32", "bf16"):
        config = cfg(base_precision=precision, lr=2e-3)
        run, data = build(model, clip, config)
        assert run.amp_dtype == (None if precision == "fp32" else torch.bfloat16)
        losses = [step(run, data, config) for _ in range(4)]
        ups = torch.cat([m.lora_up.detach().float().reshape(-1) for m in run.module.modules() if hasattr(m, "lora_up")])
        results[precision] = (losses, ups)
    (l32, u32), (l16, u16) = results["fp32"], results["bf16"]
    for a, b in zip(l32, l16):
        assert abs(a - b) <= 0.01 * abs(a), (l32, l16)
    rel = float((u16 - u32).norm() / u32.norm())
    print(f"losses fp32 {l32} bf16 {l16}; adapter relative difference {rel:.4f}")
    assert rel < 0.15, rel
    assert float(u32.norm()) > 0


def test_base_precision_resolution_and_validation():
    from indomain.training.optim import base_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def native(including_emulation=True):
        return True

    def old_card(including_emulation=True):
        return including_emulation  # bf16 only emulated

    assert base_dtype("auto", cpu, torch.float32) == torch.bfloat16
    assert base_dtype("auto", cpu, torch.bfloat16) == torch.bfloat16
    assert base_dtype("auto", cuda, torch.float32, probe=native) == torch.bfloat16
    assert base_dtype("auto", cuda, torch.float32, probe=old_card) == torch.float16
    assert base_dtype("auto", cuda, torch.float16, probe=native) == torch.float16  # the base's own: no copy
    assert base_dtype("auto", cuda, torch.bfloat16, probe=old_card) == torch.float16
    assert base_dtype("fp32", cuda, torch.float16, probe=native) == torch.float32
    assert base_dtype("fp16", cpu, torch.float32) == torch.float16
    with pytest.raises(TrainingInputError, match="base_precision"):
        TrainConfig(base_precision="int8").validate()


def test_cli_takes_base_precision_and_no_grad_checkpointing():
    from indomain.training.__main__ import build_parser, config_from_args

    p = build_parser()
    common = ["--images", "x", "--base", "c.safetensors", "--out", "o"]
    args = p.parse_args(common + ["--form", "lora"])
    c = config_from_args(args).with_defaults()
    assert c.base_precision == "auto" and c.grad_checkpointing is True
    args = p.parse_args(common + ["--form", "lora", "--base-precision", "fp16", "--no-grad-checkpointing"])
    c = config_from_args(args).with_defaults()
    assert c.base_precision == "fp16" and c.grad_checkpointing is False
    args = p.parse_args(common + ["--grad-checkpointing"])
    assert config_from_args(args).with_defaults().grad_checkpointing is True


def test_train_node_base_precision_input(comfy):
    node = comfy.node("InDomainTrainDomainUNet")
    inputs = node.GET_SCHEMA().inputs
    last = inputs[-1]
    assert last.id == "base_precision" and last.default == "auto"
    assert list(last.options) == ["auto", "bf16", "fp16", "fp32"] and "LoRA" in last.tooltip
    gc = next(i for i in inputs if i.id == "grad_checkpointing")
    assert gc.default is True
    assert "base_precision" in str(node.validate_inputs(image_folder="", base_precision="int8",
                                                         latents=None))
