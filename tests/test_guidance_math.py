"""The combination maths (guidance/combine.py): pure torch, no ComfyUI."""
from __future__ import annotations

import itertools

import pytest
import torch

from indomain.guidance.combine import bound_update, cfg_equivalent, combine, term_active


def _preds(n, seed=0, shape=(2, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


def test_combine_is_the_decoupled_formula():
    u, d, c = _preds(3)
    out = combine(u, [(2.0, d), (2.5, c)])
    torch.testing.assert_close(out, u + 2.0 * (d - u) + 2.5 * (c - u))


def test_combine_zero_weights_return_uncond_exactly():
    u, d = _preds(2)
    assert torch.equal(combine(u, [(0.0, d)]), u)


@pytest.mark.parametrize("w_c,extra", list(itertools.product([7.0, 2.5, 1.0, 0.0, -1.5], [[2.0], [0.0], [2.0, -0.5], [1.0, -1.0]])))
def test_cfg_equivalent_reproduces_combination(w_c, extra):
    u, c, *es = _preds(2 + len(extra), seed=len(extra))
    terms = list(zip(extra, es))
    cond, scale = cfg_equivalent(u, c, w_c, terms)
    via_cfg = u + scale * (cond - u)
    expected = combine(u, [(w_c, c)] + terms)
    torch.testing.assert_close(via_cfg, expected, rtol=1e-10, atol=1e-10)


def test_cfg_equivalent_keeps_primary_weight_as_scale():
    u, c, d = _preds(3)
    cond, scale = cfg_equivalent(u, c, 7.0, [(2.0, d)])
    assert scale == 7.0
    cond0, _ = cfg_equivalent(u, c, 7.0, [(0.0, d)])
    assert torch.equal(cond0, c)  # a zero-weight term leaves the CFG pair untouched


def test_term_active_uses_comfy_interval_convention():
    assert term_active(5.0, 10.0, 1.0)
    assert term_active(10.0, 10.0, 1.0) and term_active(1.0, 10.0, 1.0)
    assert not term_active(10.5, 10.0, 1.0)
    assert not term_active(0.5, 10.0, 1.0)


def test_bound_update_scales_each_sample_down_to_the_ratio_and_keeps_the_rest():
    g = torch.Generator().manual_seed(3)
    update = torch.randn(3, 4, 8, 8, generator=g)
    reference = torch.randn(3, 4, 8, 8, generator=g)
    reference[1] *= 10  # sample 1 is already inside the bound; samples 0 and 2 are not
    out = bound_update(update, reference, 0.5)
    for i in range(3):
        n_u, n_r = float(update[i].pow(2).sum().sqrt()), float(reference[i].pow(2).sum().sqrt())
        if n_u <= 0.5 * n_r:
            assert torch.equal(out[i], update[i])
        else:  # independent computation: the same direction, the norm exactly at the bound
            torch.testing.assert_close(out[i], update[i] * (0.5 * n_r / n_u), rtol=1e-6, atol=1e-7)
    assert torch.equal(out[1], update[1]) and not torch.equal(out[0], update[0]) and not torch.equal(out[2], update[2])
    assert bound_update(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), 1.0).abs().max() == 0  # no 0/0
    with pytest.raises(ValueError, match="max_ratio"):
        bound_update(update, reference, 0.0)
