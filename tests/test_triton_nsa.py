"""The Triton backend's single autograd node (interpreter on CPU): its shared backward (deltas from
the combine kernel, the gate folded into each branch's lse so that no branch gradient is stored,
dq summed in place) against the branch ops' own autograd and the float64 reference."""

import math

import pytest
import torch

from nsa import NSAConfig
from nsa.ops import triton_nsa
from nsa.ops.combine.triton import combine_backward, combine_branches_triton, gate_folded_lse
from nsa.ops.compressed_attention.triton import compressed_attention_triton
from nsa.ops.compression import compress_mean
from nsa.ops.reference import nsa_reference
from nsa.ops.selected_attention.triton import selected_attention_triton
from nsa.ops.selection.triton import select_blocks_triton
from nsa.ops.triton_nsa import nsa_triton
from nsa.ops.window_attention.triton import window_attention_triton


def _branch_ops(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, c: NSAConfig):
    """The same function from the branch ops, each its own autograd node (summed dq by autograd)."""
    o_cmp, lse = compressed_attention_triton(q, k_cmp, v_cmp, block=c.compress_block,
                                             stride=c.compress_stride)
    blocks = select_blocks_triton(q, k_cmp, lse, block=c.compress_block, stride=c.compress_stride,
                                  select_block=c.select_block, select_count=c.select_count)
    o_slc, _ = selected_attention_triton(q, k_slc, v_slc, blocks, select_block=c.select_block)
    o_win, _ = window_attention_triton(q, k_win, v_win, window=c.window)
    return combine_branches_triton(o_cmp, o_slc, o_win, gates), blocks


# Gates >= 0 (with exact zeros) take the gate-in-lse path; gates of either sign the stored dO_b one.
# Every backward schedule (on CPU the side stream's passes run in line, in the schedule's order,
# which decides the order of the dq adds).
@pytest.mark.parametrize("schedule", triton_nsa.BACKWARD_SCHEDULES)
@pytest.mark.parametrize("seq_len,heads,kv_heads,dims,signed_gates",
                         [(72, 4, 2, (16, 16), False), (50, 3, 1, (32, 16), True)])
def test_fused_backward_equals_branch_ops_and_reference(seq_len, heads, kv_heads, dims, signed_gates,
                                                        schedule, monkeypatch):
    monkeypatch.setattr(triton_nsa, "BACKWARD_SCHEDULE", schedule)
    c = NSAConfig(num_heads=heads, num_kv_heads=kv_heads, head_dim=dims[0], v_head_dim=dims[1],
                  compress_block=8, compress_stride=4, select_block=16, select_count=3, window=20, phi="mean")
    gen = torch.Generator().manual_seed(seq_len + heads)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    q = rand(1, seq_len, heads, dims[0])
    # Separate key/value tensors per branch, so that each branch's gradient lands in its own.
    kv = [rand(1, seq_len, kv_heads, d) for _ in range(3) for d in dims]
    k_cmp, v_cmp = (compress_mean(x, c.compress_block, c.compress_stride) for x in kv[:2])
    if signed_gates:
        gates = torch.randn(1, seq_len, heads, 3, generator=gen)
    else:
        gates = torch.rand(1, seq_len, heads, 3, generator=gen)
        gates[torch.rand(gates.shape, generator=gen) < 0.2] = 0.0
    assert bool((gates < 0).any()) == signed_gates and bool((gates == 0).any()) != signed_gates
    inputs = [q, k_cmp, v_cmp, *kv[2:], gates]
    grad_out = rand(1, seq_len, heads, dims[1])

    leaves = [x.clone().requires_grad_() for x in inputs]
    out, blocks, _ = nsa_triton(*leaves, c, with_reads=False)
    fused = torch.autograd.grad(out, leaves, grad_out)

    leaves = [x.clone().requires_grad_() for x in inputs]
    want_out, want_blocks = _branch_ops(*leaves, c)
    per_op = torch.autograd.grad(want_out, leaves, grad_out)

    leaves = [x.double().requires_grad_() for x in inputs]
    ref_out, ref_blocks, _ = nsa_reference(*leaves, c, with_reads=False)
    ref = torch.autograd.grad(ref_out, leaves, grad_out.double())

    assert torch.equal(blocks, want_blocks) and torch.equal(blocks, ref_blocks)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    names = ("dq", "dk_cmp", "dv_cmp", "dk_slc", "dv_slc", "dk_win", "dv_win", "dgates")
    for name, got, by_op, by_ref in zip(names, fused, per_op, ref):
        assert torch.isfinite(got).all(), name
        # The fused dq is one float32 sum of the three branches; autograd's adds them in another order.
        torch.testing.assert_close(got, by_op, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(got.double(), by_ref, rtol=1e-4, atol=1e-5, msg=name)


def test_combine_backward_deltas_are_each_branch_rowsum():
    gen = torch.Generator().manual_seed(3)
    outs = [torch.randn(2, 9, 3, 24, generator=gen) for _ in range(3)]
    gates = torch.rand(2, 9, 3, 3, generator=gen)
    grad = torch.randn(2, 9, 3, 24, generator=gen)
    *d_outs, d_gates, deltas = combine_backward(grad, *outs, gates)
    assert deltas.shape == (3, 2, 9, 3) and deltas.dtype == torch.float32
    *none, d_gates_folded, deltas_folded = combine_backward(grad, *outs, gates, branch_grads=False)
    assert none == [None, None, None]
    torch.testing.assert_close(d_gates_folded, d_gates, rtol=0, atol=0)
    for branch, (d_out, o) in enumerate(zip(d_outs, outs)):
        gate = gates[..., branch:branch + 1]
        torch.testing.assert_close(d_out, gate * grad)
        torch.testing.assert_close(d_gates[..., branch], (grad * o).sum(-1))
        # Stored dO_b: rowsum(dO_b * o_b); read ungated with the gate in the lse: rowsum(dO * o_b).
        torch.testing.assert_close(deltas[branch], (gate * grad * o).sum(-1))
        torch.testing.assert_close(deltas_folded[branch], (grad * o).sum(-1))


def test_gate_folded_lse():
    lse = torch.tensor([[0.5, -1.0, float("-inf"), 2.0]])
    gate = torch.tensor([[0.25, 1.0, 0.5, 0.0]], dtype=torch.bfloat16)
    got = gate_folded_lse(lse, gate)
    want = torch.tensor([[0.5 - math.log(0.25), -1.0, float("-inf"), float("inf")]])
    assert got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got, want)


def test_negative_gates_flag_picks_the_stored_path_only_when_needed():
    from nsa.ops.triton_nsa import _NegativeGates

    assert _NegativeGates(torch.tensor([[0.0, 0.5, 1.0]])).any() is False
    assert _NegativeGates(torch.tensor([[0.2, -1e-6, 1.0]])).any() is True


def test_unknown_backward_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule: 'both-beside' is not one of"):
        triton_nsa.branch_backward(*[None] * 11, NSAConfig(num_heads=2, num_kv_heads=1, head_dim=16), 1.0,
                                   schedule="both-beside")
