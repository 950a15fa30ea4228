"""NSAAttention: gradients reach every parameter, gate start values, packed == per-sequence,
no NaN on short inputs, RoPE and phi against independent formulas, clear errors, the README example."""

import math

import pytest
import torch

from nsa import NSAAttention, NSAConfig
from nsa.ops.compression import compress_mean
from nsa.phi import BlockCompressor
from nsa.rope import RopeScaling, apply_rope, apply_rope_queries

SMALL = {"compress_block": 4, "compress_stride": 2, "select_block": 8, "select_count": 3, "window": 6}


def small_config(**changes) -> NSAConfig:
    fields = dict(num_heads=4, num_kv_heads=2, head_dim=8, v_head_dim=6, **SMALL)
    fields.update(changes)
    return NSAConfig(**fields)


def make_layer(config: NSAConfig, d_model: int = 16, seed: int = 0) -> NSAAttention:
    torch.manual_seed(seed)
    return NSAAttention(d_model, config).double()


@pytest.mark.parametrize("phi", ["mlp", "mean"])
@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
@pytest.mark.parametrize("group", [1, 2])
def test_training_step_gives_every_parameter_a_finite_nonzero_gradient(phi, gate, group):
    config = small_config(num_heads=2 * group, phi=phi, gate=gate)
    layer = make_layer(config, seed=group)
    x = torch.randn(2, 29, 16, dtype=torch.float64)
    out = layer(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    loss = (out * torch.randn_like(out)).sum()
    loss.backward()
    names = [name for name, _ in layer.named_parameters()]
    assert "k_proj.cmp.weight" in names and "v_proj.cmp.weight" in names
    assert (phi == "mlp") == any(name.startswith("phi_k.") for name in names)
    for name, param in layer.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
        assert param.grad.abs().max() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize("gate, start", [("sigmoid", 0.5), ("softmax", 1.0 / 3.0)])
def test_gates_start_uniform(gate, start):
    layer = make_layer(small_config(gate=gate))
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    _, _, gates = layer.project(x, torch.arange(7))
    assert gates.shape == (2, 7, 4, 3)
    torch.testing.assert_close(gates, torch.full_like(gates, start), rtol=0, atol=1e-15)
    _, info = layer(x, return_info=True)
    assert all(abs(mean - start) < 1e-6 for mean, _ in info.gate_stats.values())  # stats are float32


@pytest.mark.parametrize("phi", ["mlp", "mean"])
@pytest.mark.parametrize("lengths", [[13, 1, 30, 4], [9, 24], [0, 7, 0, 5], [0, 0]])
def test_packed_forward_equals_separate_sequences(phi, lengths):
    config = small_config(phi=phi)
    layer = make_layer(config, seed=len(lengths))
    xs = [torch.randn(1, n, 16, dtype=torch.float64) for n in lengths]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    packed, info = layer(torch.cat(xs, dim=1), cu_seqlens=offsets, return_info=True)
    for i, x in enumerate(xs):
        alone, alone_info = layer(x, return_info=True)
        a, b = offsets[i].item(), offsets[i + 1].item()
        torch.testing.assert_close(packed[:, a:b], alone, rtol=0, atol=1e-12)
        assert torch.equal(info.selected_blocks[:, a:b], alone_info.selected_blocks)
    assert packed.shape[1] == info.selected_blocks.shape[1] == sum(lengths)


def test_padded_batch_equals_rows():
    layer = make_layer(small_config())
    x = torch.randn(3, 21, 16, dtype=torch.float64)
    out = layer(x)
    for row in range(3):
        torch.testing.assert_close(out[row:row + 1], layer(x[row:row + 1]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("phi", ["mlp", "mean"])
@pytest.mark.parametrize("shape", ["T1", "T_below_l", "below_every_block", "packed_short"])
def test_no_nan_on_short_inputs(phi, shape):
    config = small_config(phi=phi, compress_block=8, compress_stride=4, select_block=16, window=12)
    layer = make_layer(config)
    if shape == "packed_short":
        x = torch.randn(1, 1 + 3 + 7, 16, dtype=torch.float64, requires_grad=True)
        kwargs = {"cu_seqlens": torch.tensor([0, 1, 4, 11])}
    else:
        length = {"T1": 1, "T_below_l": 7, "below_every_block": 5}[shape]
        x = torch.randn(2, length, 16, dtype=torch.float64, requires_grad=True)
        kwargs = {}
    out = layer(x, **kwargs)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() > 0
    for name, param in layer.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), name


def test_decode_step_no_nan_for_first_token():
    layer = make_layer(small_config())
    cache = layer.new_cache(2, 5)
    out, info = layer(torch.randn(2, 1, 16, dtype=torch.float64), cache=cache, return_info=True)
    assert torch.isfinite(out).all()
    assert info.reads["cmp"].eq(0).all() and info.reads["win"].eq(1).all() and info.reads["slc"].eq(1).all()
    assert info.positions.tolist() == [[0], [0]] and info.lengths.tolist() == [1, 1]
    assert info.backend == "reference" and info.backend_reason == "auto: decode runs the reference path"


@pytest.mark.parametrize("phi", ["mlp", "mean"])
def test_layer_is_causal(phi):
    """Changing x after t changes no output at or before t (phi over blocks that end after t, RoPE,
    the selection and every branch included)."""
    layer = make_layer(small_config(phi=phi), seed=5)
    x = torch.randn(1, 30, 16, dtype=torch.float64)
    base = layer(x)
    for t in (0, 3, 4, 9, 17, 28):
        changed = x.clone()
        changed[:, t + 1:] = torch.randn_like(changed[:, t + 1:]) * 3
        out = layer(changed)
        assert torch.equal(out[:, :t + 1], base[:, :t + 1]), f"output at or before {t} changed"
        assert not torch.allclose(out[:, t + 1:], base[:, t + 1:]), "the perturbation did nothing"


def test_rope_and_phi_gradcheck():
    x = torch.randn(1, 5, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: apply_rope(t, torch.arange(3, 8)), (x,))
    phi = BlockCompressor("mlp", 2, 1, 4, hidden=3).double()
    assert torch.autograd.gradcheck(phi, (x,))


# ----- RoPE and phi against independent formulas ----------------------------------------------

def rope_complex(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE as a complex rotation of the pairs (i, i + D/2): an independent formulation."""
    half = x.shape[-1] // 2
    freqs = torch.tensor([theta ** (-2.0 * i / x.shape[-1]) for i in range(half)], dtype=torch.float64)
    rotation = torch.polar(torch.ones(len(positions), half, dtype=torch.float64),
                           positions.double()[:, None] * freqs)
    z = torch.complex(x[..., :half], x[..., half:]) * rotation[None, :, None, :]
    return torch.cat([z.real, z.imag], dim=-1)


@pytest.mark.parametrize("head_dim", [2, 8, 14])
def test_rope_matches_complex_rotation_and_is_relative(head_dim):
    x = torch.randn(2, 9, 3, head_dim, dtype=torch.float64)
    positions = torch.arange(100, 109)
    torch.testing.assert_close(apply_rope(x, positions, theta=500.0), rope_complex(x, positions, 500.0),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(apply_rope(x, torch.zeros(9, dtype=torch.long)), x, rtol=0, atol=0)
    # q.k after rotation depends only on the position difference.
    q, k = torch.randn(2, 1, 1, 1, head_dim, dtype=torch.float64)

    def dot(pq: int, pk: int) -> float:
        return float((apply_rope(q, torch.tensor([pq])) * apply_rope(k, torch.tensor([pk]))).sum())

    assert math.isclose(dot(7, 3), dot(1007, 1003), rel_tol=0, abs_tol=1e-9)
    assert not math.isclose(dot(7, 3), dot(7, 4), rel_tol=0, abs_tol=1e-9)


def test_rope_keeps_low_precision_dtype():
    x = torch.randn(1, 4, 2, 8, dtype=torch.bfloat16)
    out = apply_rope(x, torch.arange(4))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), rope_complex(x.double(), torch.arange(4), 10000.0).float(),
                               rtol=2e-2, atol=2e-2)


def test_phi_mlp_matches_formula_and_mean_matches_compress_mean():
    torch.manual_seed(3)
    block, stride, dim = 4, 2, 6
    x = torch.randn(2, 11, 3, dim, dtype=torch.float64)
    phi = BlockCompressor("mlp", block, stride, dim, hidden=10).double()
    out = phi(x)
    assert out.shape == (2, 4, 3, dim)
    first, second = phi.mlp[0], phi.mlp[2]
    for i in range(4):
        rows = x[:, i * stride:i * stride + block] + phi.position[None, :, None, :]  # [B, l, H, D]
        flat = rows.permute(0, 2, 1, 3).reshape(2, 3, block * dim)
        want = torch.nn.functional.gelu(flat @ first.weight.T + first.bias) @ second.weight.T + second.bias
        torch.testing.assert_close(out[:, i], want, rtol=0, atol=1e-12)
    mean = BlockCompressor("mean", block, stride, dim)
    assert list(mean.parameters()) == []
    torch.testing.assert_close(mean(x), compress_mean(x, block, stride), rtol=0, atol=0)


def test_phi_hidden_is_used():
    layer = NSAAttention(16, small_config(), phi_hidden=5)
    assert layer.phi_k.mlp[0].out_features == 5 and layer.phi_v.mlp[0].in_features == 4 * 6


# ----- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("make, match", [
    (lambda: NSAAttention(16, small_config(head_dim=7)), r"config\.head_dim must be even for RoPE"),
    (lambda: NSAAttention(0, small_config()), "d_model must be a positive int"),
    (lambda: NSAAttention(16, {"num_heads": 4}), "config must be an nsa.NSAConfig"),
    (lambda: NSAAttention(16, small_config(), phi_hidden=0), "phi_hidden must be a positive int"),
    (lambda: NSAAttention(16, small_config(), rope_theta=-1.0), "rope_theta must be positive"),
])
def test_bad_construction_raises_clearly(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_bad_forward_inputs_raise_clearly():
    layer = make_layer(small_config())
    good = torch.randn(2, 5, 16, dtype=torch.float64)
    cases = [
        (torch.randn(2, 5, 15, dtype=torch.float64), {}, r"last dim must be d_model=16"),
        (torch.randn(5, 16, dtype=torch.float64), {}, r"x must be 3-D \[B, T, d_model\]"),
        (good.float(), {}, "x must have the layer's parameter dtype torch.float64"),
        (good, {"cu_seqlens": torch.tensor([0, 5])}, r"packed as \[1, total, d_model\]"),
        (good[:1], {"cu_seqlens": torch.tensor([0, 2, 4])}, "end at total=5"),
        (good[:1], {"cu_seqlens": torch.tensor([0.0, 5.0])}, "cu_seqlens must be a 1-D int32/int64"),
        (good, {"backend": "cuda"}, "backend must be one of"),
    ]
    for x, kwargs, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            layer(x, **kwargs)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer([[1.0]])


def test_bad_cache_inputs_raise_clearly():
    layer = make_layer(small_config())
    cache = layer.new_cache(2, 6)
    with pytest.raises(ValueError, match="cache batch mismatch: the cache holds 2 sequences, x has batch 3"):
        layer(torch.randn(3, 1, 16, dtype=torch.float64), cache=cache)
    with pytest.raises(ValueError, match="the cache holds 2 sequences, cu_seqlens describes 3"):
        layer(torch.randn(1, 3, 16, dtype=torch.float64), cu_seqlens=torch.tensor([0, 1, 2, 3]), cache=cache)
    with pytest.raises(ValueError, match="more than the cache's max_len=6"):
        layer(torch.randn(2, 7, 16, dtype=torch.float64), cache=cache)
    layer(torch.randn(2, 4, 16, dtype=torch.float64), cache=cache)
    with pytest.raises(ValueError, match=r"sequence 1 would reach 7 tokens, more than the cache's max_len=6 "
                                         r"\(it holds 4\)"):
        layer(torch.randn(1, 3, 16, dtype=torch.float64), cu_seqlens=torch.tensor([0, 0, 3]), cache=cache)
    assert cache.lengths.tolist() == [4, 4], "a refused step must not change the cache"
    with pytest.raises(TypeError, match="cache dtype torch.float32 must equal x's dtype torch.float64"):
        layer(torch.randn(2, 1, 16, dtype=torch.float64), cache=layer.new_cache(2, 6, dtype=torch.float32))
    other = NSAAttention(16, small_config(window=7)).double()
    with pytest.raises(ValueError, match="cache was allocated for config"):
        other(torch.randn(2, 1, 16, dtype=torch.float64), cache=cache)
    with pytest.raises(RuntimeError, match="no incremental-decode kernels"):
        layer(torch.randn(2, 1, 16, dtype=torch.float64), cache=cache, backend="triton")
    with pytest.raises(TypeError, match="cache must be an nsa.NSACache"):
        layer(torch.randn(2, 1, 16, dtype=torch.float64), cache={"k": None})


# ----- the README example -----------------------------------------------------------------------

def test_readme_usage_example():
    import torch

    import nsa

    config = nsa.NSAConfig(num_heads=8, num_kv_heads=2, head_dim=32, compress_block=16, compress_stride=8,
                           select_block=32, select_count=4, window=64)
    layer = nsa.NSAAttention(256, config)
    x = torch.randn(2, 200, 256)
    y = layer(x)                                      # training / prefill: [2, 200, 256]
    y.sum().backward()
    cache = layer.new_cache(batch_size=2, max_len=256)
    with torch.no_grad():
        out = layer(x[:, :190], cache=cache)          # prefill into the cache
        for t in range(190, 200):                     # then one token at a time
            step, info = layer(x[:, t:t + 1], cache=cache, return_info=True)
    print(info.reads["slc"].flatten().tolist(), cache.lengths.tolist())
    assert torch.allclose(step, y[:, -1:], atol=1e-4) and out.shape == (2, 190, 256)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("scaling", [None, RopeScaling("yarn", 4.0, 16)])
@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
def test_fused_input_projection_equals_the_separate_projections(bias, scaling, gate):
    """project() runs q, the three keys and values and the gate as one linear map; the result is
    each module applied on its own (float64, so only summation order may differ)."""
    torch.manual_seed(3)
    layer = NSAAttention(16, small_config(gate=gate), bias=bias, rope_scaling=scaling).double()
    with torch.no_grad():
        layer.gate_proj.weight.normal_()  # zero-initialised: make the gate columns count
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    positions = torch.arange(11) + 5
    q, kv, gates = layer.project(x, positions)
    c = layer.config
    expect_q = apply_rope_queries(layer.q_proj(x).view(2, 11, c.num_heads, c.head_dim), positions,
                                  theta=layer.rope_theta, scaling=scaling)
    torch.testing.assert_close(q, expect_q, rtol=1e-12, atol=1e-12)
    for branch in ("cmp", "slc", "win"):
        k = apply_rope(layer.k_proj[branch](x).view(2, 11, c.num_kv_heads, c.head_dim), positions,
                       theta=layer.rope_theta, scaling=scaling)
        v = layer.v_proj[branch](x).view(2, 11, c.num_kv_heads, c.v_head_dim)
        torch.testing.assert_close(kv[branch][0], k, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(kv[branch][1], v, rtol=1e-12, atol=1e-12)
    logits = layer.gate_proj(x).view(2, 11, c.num_heads, 3)
    expect_gates = torch.sigmoid(logits) if gate == "sigmoid" else torch.softmax(logits, dim=-1)
    torch.testing.assert_close(gates, expect_gates, rtol=1e-12, atol=1e-12)
    # Gradients reach every projection through the fused map, each its own.
    (q.sum() + sum(t.pow(2).sum() for pair in kv.values() for t in pair) + gates.sum()).backward()
    for name, p in layer.named_parameters():
        if name.startswith(("q_proj", "k_proj", "v_proj", "gate_proj")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
