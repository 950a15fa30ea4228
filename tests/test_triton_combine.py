"""Fused gate combination (Triton, interpreter on CPU) against the eager reference."""

import pytest
import torch

from nsa.ops.combine import combine_branches
from nsa.ops.combine.triton import combine_branches_triton


@pytest.mark.parametrize("shape", [(2, 5, 3, 16), (1, 7, 4, 24), (1, 33, 2, 8)])
def test_forward_and_gradients_match_reference(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    outs = [torch.randn(shape, generator=gen, requires_grad=True) for _ in range(3)]
    gates = torch.rand(*shape[:-1], 3, generator=gen, requires_grad=True)
    got = combine_branches_triton(*outs, gates)
    want = combine_branches(*outs, gates)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    grad = torch.randn(shape, generator=gen)
    got_grads = torch.autograd.grad(got, [*outs, gates], grad)
    want_grads = torch.autograd.grad(want, [*outs, gates], grad)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
