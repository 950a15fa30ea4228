"""RoPE's rotation in Triton (interpreter on CPU) against the reference and a complex-number oracle."""

import pytest
import torch
from compiled_subprocess import run_compiled

from nsa.ops.rotary import rotate_half
from nsa.ops.rotary.triton import rotate_half_triton
from nsa.rope import rope_inverse_frequencies


def tables(batch: int, seq_len: int, head_dim: int, *, per_sequence: bool, seed: int):
    """float32 cos/sin ``[B|1, T, D/2]`` at random absolute positions (angles in float64)."""
    gen = torch.Generator().manual_seed(seed)
    rows = batch if per_sequence else 1
    positions = torch.randint(0, 70000, (rows, seq_len), generator=gen).double()
    angles = positions[..., None] * rope_inverse_frequencies(head_dim, 10000.0)
    return angles, torch.cos(angles).float(), torch.sin(angles).float()


@pytest.mark.parametrize("shape", [(2, 5, 3, 8), (1, 37, 4, 32), (3, 2, 1, 6), (1, 19, 2, 128)])
@pytest.mark.parametrize("per_sequence", [False, True])
def test_float32_matches_reference_and_complex_rotation(shape, per_sequence):
    batch, seq_len, _, dim = shape
    angles, cos, sin = tables(batch, seq_len, dim, per_sequence=per_sequence, seed=sum(shape))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(dim))
    got = rotate_half_triton(x, cos, sin)
    torch.testing.assert_close(got, rotate_half(x, cos, sin), rtol=1e-6, atol=1e-6)
    # Independent oracle: pairs (i, i + D/2) as complex numbers times e^{i angle}, float64.
    half = dim // 2
    pairs = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.polar(
        torch.ones_like(angles), angles)[:, :, None, :]
    torch.testing.assert_close(got.double(), torch.cat([pairs.real, pairs.imag], dim=-1), rtol=1e-5,
                               atol=1e-5)
    assert got.is_contiguous() and got.dtype == x.dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rounds_the_float32_rotation(dtype):
    _, cos, sin = tables(2, 23, 16, per_sequence=False, seed=1)
    x = torch.randn(2, 23, 3, 16, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = rotate_half_triton(x, cos, sin)
    want = rotate_half(x, cos, sin)
    assert got.dtype == dtype
    # Both compute in float32 and round once; a fused multiply-add may move that by one unit.
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-6)


def test_strided_input_a_column_slice_of_a_wider_projection():
    """The layer passes q and each key as column slices of one fused projection."""
    _, cos, sin = tables(2, 9, 8, per_sequence=False, seed=3)
    wide = torch.randn(2, 9, 5 * 8 + 7, generator=torch.Generator().manual_seed(4))
    x = wide[..., 8:32].view(2, 9, 3, 8)
    assert not x.is_contiguous()
    torch.testing.assert_close(rotate_half_triton(x, cos, sin), rotate_half(x.contiguous(), cos, sin),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("per_sequence", [False, True])
def test_gradient_is_the_inverse_rotation_and_matches_reference(per_sequence):
    _, cos, sin = tables(2, 13, 12, per_sequence=per_sequence, seed=5)
    gen = torch.Generator().manual_seed(6)
    wide = torch.randn(2, 13, 50, generator=gen, requires_grad=True)
    x = wide[..., 2:38].view(2, 13, 3, 12)
    grad = torch.randn(2, 13, 3, 12, generator=gen)
    got, = torch.autograd.grad(rotate_half_triton(x, cos, sin), wide, grad)
    want, = torch.autograd.grad(rotate_half(x, cos, sin), wide, grad)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert got[..., :2].abs().max() == 0 and got[..., 38:].abs().max() == 0
    # A rotation is orthogonal: rotating the gradient back recovers it.
    torch.testing.assert_close(rotate_half_triton(got[..., 2:38].reshape(2, 13, 3, 12), cos, -sin),
                               rotate_half(got[..., 2:38].reshape(2, 13, 3, 12), cos, -sin))


def test_bad_inputs_are_named():
    _, cos, sin = tables(1, 4, 8, per_sequence=False, seed=7)
    x = torch.randn(1, 4, 2, 8)
    with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32"):
        rotate_half_triton(x.double(), cos, sin)
    with pytest.raises(ValueError, match="D even"):
        rotate_half_triton(torch.randn(1, 4, 2, 7), cos, sin)
    with pytest.raises(ValueError, match=r"cos must be float32 \[B\|1, T, D/2\]"):
        rotate_half_triton(x, cos.double(), sin)
    with pytest.raises(ValueError, match="sin must be"):
        rotate_half_triton(x, cos, sin[:, :3])


def test_kernel_compiles_for_sm90():
    """The interpreter misses compiled-mode errors: build the kernel for sm_90 (bundled ptxas)."""
    code = (
        "from nsa.ops.offline_compile import compile_as_launched, resource_usage\n"
        "from nsa.ops.rotary.triton import _rotate_kernel\n"
        "sig = {n: 'i32' for n in _rotate_kernel.arg_names}\n"
        "sig.update(X='*bf16', COS='*fp32', SIN='*fp32', OUT='*bf16')\n"
        "for half in (16, 64, 96):\n"
        "    pad = 1 << (half - 1).bit_length()\n"
        "    const = dict(SIGN=-1.0, HALF=half, HALF_PAD=pad, BLOCK_T=max(16, min(256, 2048 // pad)))\n"
        "    for name in const: sig[name] = 'constexpr'\n"
        "    k = compile_as_launched(_rotate_kernel, sig, const, arch=90, num_warps=4, num_stages=1,\n"
        "                            aligned=lambda n: n.startswith('stride'))\n"
        "    print(half, resource_usage(k))\n")
    out = run_compiled(code, timeout=300)
    lines = out.splitlines()
    assert len(lines) == 3 and all(", 0)" in line for line in lines), out
