"""Null-text conversion and calibration on ComfyUI's real UNetModel (tiny SD15 layout)."""
from __future__ import annotations

import pytest
import torch

from indomain.devkit import tiny_models
from indomain.devkit.host import import_comfy
from indomain.guidance.nulltext import (NullTextConstant, calibrate_constants, convert_to_null_text,
                                        cross_attention_blocks, expected_null_text_shapes, is_null_text)


@pytest.fixture(scope="module")
def unet():
    import_comfy()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    m = UNetModel(**tiny_models.SD15_TINY_UNET, operations=comfy.ops.disable_weight_init)
    tiny_models.init_weights_(m, 0)
    return m.float().eval()


def _calibration_batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(1, 77, 768, generator=g)  # stands in for the empty-prompt embedding
    return ctx, [(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999.0 - 300 * i] * 2)) for i in range(n)]


def test_constants_are_nonzero_and_equal_mean_base_attn2_output(unet):
    ctx, batches = _calibration_batches()
    blocks = cross_attention_blocks(unet)
    assert len(blocks) >= 2
    # reference: record each attn2 output independently and average by hand
    outputs = {name: [] for name, _ in blocks}
    hooks = [b.attn2.register_forward_hook(lambda m, i, o, name=name: outputs[name].append(o.detach().clone()))
             for name, b in blocks]
    with torch.no_grad():
        for x, t in batches:
            unet(x, t, context=ctx.expand(x.shape[0], -1, -1))
    for h in hooks:
        h.remove()

    constants = calibrate_constants(unet, lambda b: unet(b[0], b[1], context=ctx.expand(b[0].shape[0], -1, -1)), batches)
    for name, _ in blocks:
        ref = torch.cat([o.reshape(-1, o.shape[-1]) for o in outputs[name]]).mean(0)
        assert constants[name].abs().max() > 1e-4, f"{name}: constant is zero (calibration did not run)"
        torch.testing.assert_close(constants[name], ref, rtol=1e-5, atol=1e-6)


def test_converted_unet_runs_without_text_and_matches_layout(unet):
    import copy

    ctx, batches = _calibration_batches()
    expected = expected_null_text_shapes(unet)
    constants = calibrate_constants(unet, lambda b: unet(b[0], b[1], context=ctx.expand(b[0].shape[0], -1, -1)), batches)
    nt = convert_to_null_text(copy.deepcopy(unet), constants)
    assert is_null_text(nt) and not is_null_text(unet)
    assert {k: tuple(v.shape) for k, v in nt.state_dict().items()} == expected
    assert not any(".attn2.to_" in k or ".norm2." in k for k in nt.state_dict())
    x, t = batches[0]
    with torch.no_grad():
        a = nt(x, t, context=ctx.expand(2, -1, -1))
        b = nt(x, t, context=torch.randn(2, 77, 768))  # any text: ignored
    assert torch.equal(a, b)
    # the constant blocks output the calibrated vector at every position
    name, block = next((n, b) for n, b in nt.named_modules() if isinstance(getattr(b, "attn2", None), NullTextConstant))
    out = block.attn2(torch.zeros(2, 5, constants[name].shape[0]))
    assert torch.equal(out, constants[name].expand(2, 5, -1))


def test_conversion_refuses_missing_constants(unet):
    import copy

    with pytest.raises(KeyError, match="no calibrated constant"):
        convert_to_null_text(copy.deepcopy(unet), {})
    with pytest.raises(ValueError, match="no calibration batches"):
        calibrate_constants(unet, lambda b: None, [])
    with pytest.raises(RuntimeError, match="never reached"):
        calibrate_constants(unet, lambda b: None, [object()])
