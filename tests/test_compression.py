"""Mean-pooling phi: the sliding-sum backward against autograd through ``unfold`` and against a
per-position oracle written from the definition."""

import pytest
import torch

from nsa.ops.compression import compress_mean, compress_mean_backward, compress_mean_strided


def _covering_blocks_oracle(grad, seq_len, block, stride):
    """Position ``t`` gets ``grad[i] / block`` of every block ``i`` covering it
    (``i*stride <= t < i*stride + block``)."""
    out = torch.zeros(grad.shape[0], seq_len, *grad.shape[2:], dtype=grad.dtype)
    for i in range(grad.shape[1]):
        out[:, i * stride:i * stride + block] += grad[:, i:i + 1] / block
    return out


@pytest.mark.parametrize("seq_len,block,stride",
                         [(70, 8, 4), (64, 32, 16), (37, 12, 4), (50, 6, 6), (5, 8, 4)])
def test_backward_equals_autograd_and_oracle(seq_len, block, stride):
    gen = torch.Generator().manual_seed(seq_len + block)
    x = torch.randn(2, seq_len, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    out = compress_mean_strided(x, block, stride)
    torch.testing.assert_close(out, compress_mean(x, block, stride), rtol=0, atol=0)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (got,) = torch.autograd.grad(out, x, grad)
    if out.shape[1]:
        (want,) = torch.autograd.grad(compress_mean(x, block, stride), x, grad)
    else:  # no complete block: the naive op's output is a constant
        want = torch.zeros_like(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    oracle = _covering_blocks_oracle(grad, seq_len, block, stride)
    torch.testing.assert_close(got, oracle, rtol=1e-12, atol=1e-12)
    assert got.shape == x.shape


def test_bf16_backward_keeps_dtype_and_matches_float64():
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(1, 7, 2, 16, generator=gen)
    got = compress_mean_backward(grad.bfloat16(), torch.Size((1, 40, 2, 16)), 16, 4)
    assert got.dtype == torch.bfloat16
    want = _covering_blocks_oracle(grad.double(), 40, 16, 4)
    assert ((got.double() - want).abs().max() / want.abs().max()) < 1e-2


def test_stride_must_divide_block():
    with pytest.raises(ValueError, match="stride=3 must divide block=8"):
        compress_mean_strided(torch.randn(1, 20, 1, 4), 8, 3)
