"""RoPE beyond the trained context (nsa.rope.RopeScaling: YaRN and position interpolation) and in
the layer, prefill and decode alike (the trainer's evaluation grid: tests/test_models.py)."""

from __future__ import annotations

import math

import pytest
import torch
from test_layer import make_layer, small_config

from nsa.rope import RopeScaling, apply_rope, apply_rope_queries, rope_inverse_frequencies


def test_linear_scaling_is_rope_at_positions_divided_by_the_factor():
    # Independent of the implementation's frequency code: fractional positions p / s.
    x = torch.randn(2, 11, 3, 12, dtype=torch.float64)
    positions = torch.arange(500, 511)
    scaling = RopeScaling("linear", 6.0, 64)
    torch.testing.assert_close(apply_rope(x, positions, theta=1e4, scaling=scaling),
                               apply_rope(x, positions.double() / 6.0, theta=1e4), rtol=0, atol=1e-12)


@pytest.mark.parametrize("theta", [1e4, 1e8])
def test_yarn_keeps_fast_pairs_interpolates_slow_ones_and_ramps_between(theta):
    head_dim, original, factor = 64, 512, 8.0
    base = rope_inverse_frequencies(head_dim, theta)
    scaled = RopeScaling("yarn", factor, original).inverse_frequencies(base)
    rotations = original * base / (2 * math.pi)
    fast, slow = rotations >= 32, rotations <= 1
    middle = ~fast & ~slow
    assert fast.any() and slow.any() and middle.any()
    torch.testing.assert_close(scaled[fast], base[fast], rtol=0, atol=0)
    torch.testing.assert_close(scaled[slow], base[slow] / factor, rtol=1e-15, atol=0)
    assert ((scaled[middle] < base[middle]) & (scaled[middle] > base[middle] / factor)).all()
    # Monotone in the pair index, as RoPE's own frequencies are: the ramp does not reorder them.
    assert (scaled[1:] < scaled[:-1]).all()


def test_factor_one_is_rope_as_trained_and_the_temperature_grows_with_the_factor():
    base = rope_inverse_frequencies(16, 1e4)
    for method in ("yarn", "linear"):
        unscaled = RopeScaling(method, 1.0, 64).inverse_frequencies(base)
        torch.testing.assert_close(unscaled, base, rtol=0, atol=0)
    assert RopeScaling("yarn", 1.0, 64).query_scale == 1.0
    assert RopeScaling("yarn", math.e, 64).query_scale == pytest.approx(1.21)
    assert RopeScaling("linear", 16.0, 64).query_scale == 1.0
    q = torch.randn(1, 5, 2, 8, dtype=torch.float64)
    scaling = RopeScaling("yarn", 16.0, 64)
    torch.testing.assert_close(apply_rope_queries(q, torch.arange(5), scaling=scaling),
                               apply_rope(q, torch.arange(5), scaling=scaling) * scaling.query_scale)


def test_for_context_only_scales_beyond_the_trained_context():
    assert RopeScaling.for_context("none", 4096, 512) is None
    assert RopeScaling.for_context("yarn", 512, 512) is None
    assert RopeScaling.for_context("yarn", 4096, 512) == RopeScaling("yarn", 8.0, 512)
    with pytest.raises(ValueError, match="method must be 'none' or one of"):
        RopeScaling.for_context("ntk", 256, 512)


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "ntk", "factor": 2.0, "original_context": 64}, "RopeScaling.method must be one of"),
    ({"method": "yarn", "factor": 0.5, "original_context": 64}, "RopeScaling.factor must be >= 1"),
    ({"method": "yarn", "factor": 2.0, "original_context": 0}, "original_context must be a positive"),
    ({"method": "yarn", "factor": 2.0, "original_context": 64, "beta_slow": 40.0},
     "0 < beta_slow < beta_fast"),
])
def test_bad_scaling_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RopeScaling(**kwargs)


def test_layer_rejects_a_scaling_of_the_wrong_type():
    from nsa import NSAAttention

    with pytest.raises(TypeError, match="rope_scaling must be an nsa.rope.RopeScaling"):
        NSAAttention(16, small_config(), rope_scaling=2.0)


@pytest.mark.parametrize("method", ["yarn", "linear"])
def test_scaled_layer_decodes_what_it_prefills(method):
    """Prefill of T + K tokens equals prefill of T then K decode steps with the same scaling, and
    the scaling changes the output (it is applied on both paths, not ignored by one)."""
    layer = make_layer(small_config(), seed=3)
    x = torch.randn(2, 29, 16, dtype=torch.float64)
    plain = layer(x)
    layer.rope_scaling = RopeScaling(method, 4.0, 8)
    full = layer(x)
    assert not torch.allclose(full, plain)
    cache = layer.new_cache(2, 29)
    outs = [layer(x[:, :20], cache=cache)]
    outs += [layer(x[:, t:t + 1], cache=cache) for t in range(20, 29)]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-10, atol=1e-10)
