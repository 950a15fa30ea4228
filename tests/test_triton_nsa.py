"""The Triton backend's single autograd node (interpreter on CPU): its shared backward (deltas from
the combine kernel, the gate folded into each branch's lse so that no branch gradient is stored,
dq summed in place) against the branch ops' own autograd and the float64 reference."""

import math

import pytest
import torch
from tile_options import option_id, option_pairs, pinned

from nsa import NSAConfig
from nsa.ops import triton_nsa
from nsa.ops.combine.triton import combine_backward, combine_branches_triton, gate_folded_lse
from nsa.ops.compressed_attention.triton import compressed_attention_triton
from nsa.ops.compression import compress_mean
from nsa.ops.reference import nsa_reference
from nsa.ops.selected_attention.triton import selected_attention_triton
from nsa.ops.selection.triton import select_blocks_triton
from nsa.ops.triton_nsa import nsa_triton
from nsa.ops.window_attention import triton as triton_window
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


# One key/value tensor for selection and window (nsa_attention's default): the window's dK/dV add to
# selection's, and with w >= 2 l' selection's forced blocks go to the window's dq pass (which adds
# selection's share; selection's walk leaves them out). G = 16 takes selection's one-position
# walk, G = 4 and 3 its union walk; window 20 < 2 x 16 keeps them in selection's pass.
@pytest.mark.parametrize("schedule", ["one-stream", "selection-beside"])
@pytest.mark.parametrize("seq_len,heads,kv_heads,dims,window,forced,signed_gates",
                         [(72, 4, 1, (16, 16), 40, True, False), (70, 16, 1, (16, 16), 32, True, False),
                          (50, 6, 2, (32, 16), 20, False, False), (50, 6, 2, (32, 16), 36, True, True)])
def test_one_kv_for_selection_and_window(seq_len, heads, kv_heads, dims, window, forced, signed_gates,
                                         schedule, monkeypatch):
    monkeypatch.setattr(triton_nsa, "BACKWARD_SCHEDULE", schedule)
    check_one_kv(seq_len, heads, kv_heads, dims, window, forced, monkeypatch, signed_gates)


# The window's forced-block passes on every tile option of its lists (the interpreter otherwise runs
# the first): 32- and 64-key query tiles, keys as M or not in dK/dV.
@pytest.mark.parametrize("options", option_pairs(triton_window._query_kernel, triton_window._dkdv_kernel),
                         ids=option_id)
def test_one_kv_on_every_window_tile(options, monkeypatch):
    with pinned((triton_window._query_kernel, triton_window._dkdv_kernel), options):
        check_one_kv(66, 8, 2, (16, 16), 36, True, monkeypatch)


# Each autotuned launch twice, what it changes in place put back in between (as the GPU's
# autotuning does): launches that add to or complete a tensor (dq sums, selection's forward from
# the window's forced blocks, the window's dK/dV into selection's) must name it, and none may name
# a placeholder that is a caller's tensor: the branch ops' window forward once copied over q, which
# selection's node had saved (autograd then refused its backward).
@pytest.mark.parametrize("schedule", ["one-stream", "selection-beside"])
@pytest.mark.parametrize("window,forced", [(36, True), (20, False)])
def test_in_place_kernels_survive_autotuning_relaunches(window, forced, schedule, autotune_relaunches,
                                                        monkeypatch):
    monkeypatch.setattr(triton_nsa, "BACKWARD_SCHEDULE", schedule)
    check_one_kv(50, 8, 2, (16, 16), window, forced, monkeypatch)
    assert autotune_relaunches, "no launch put anything back: the relaunch emulation did not run"


def check_one_kv(seq_len, heads, kv_heads, dims, window, forced, monkeypatch, signed_gates=False):
    """Outputs, blocks and gradients of the Triton backend with one k, v for selection and window,
    against the branch ops' autograd and the float64 reference; ``forced``: whether the config lets
    the window's dq pass take selection's forced blocks (a negative gate keeps them in selection's)."""
    c = NSAConfig(num_heads=heads, num_kv_heads=kv_heads, head_dim=dims[0], v_head_dim=dims[1],
                  compress_block=8, compress_stride=4, select_block=16, select_count=4, window=window,
                  phi="mean")
    gen = torch.Generator().manual_seed(seq_len + window)
    q = torch.randn(1, seq_len, heads, dims[0], generator=gen)
    k, v = (torch.randn(1, seq_len, kv_heads, d, generator=gen) for d in dims)
    k_cmp, v_cmp = (compress_mean(x, c.compress_block, c.compress_stride) for x in (k, v))
    gates = (torch.randn if signed_gates else torch.rand)(1, seq_len, heads, 3, generator=gen)
    grad_out = torch.randn(1, seq_len, heads, dims[1], generator=gen)
    inputs = [q, k_cmp, v_cmp, k, v, gates]
    assert triton_nsa.shared_kv_backward(k, v, k, v, c)[:2] == (True, forced)

    passes = []
    window_forward = triton_nsa.window_attention_forward_with_forced
    window_dq = triton_nsa.window_attention_backward_dq
    window_dkdv = triton_nsa.window_attention_backward_dkdv

    def spy_forward(*args):
        passes.append(("forward", True))
        return window_forward(*args)

    def spy_dq(*args, dq=None, forced=None):
        passes.append(("dq", forced is not None))
        return window_dq(*args, dq=dq, forced=forced)

    def spy_dkdv(*args, add_to=None):
        passes.append(("dkdv", add_to is not None))
        return window_dkdv(*args, add_to=add_to)

    monkeypatch.setattr(triton_nsa, "window_attention_forward_with_forced", spy_forward)
    monkeypatch.setattr(triton_nsa, "window_attention_backward_dq", spy_dq)
    monkeypatch.setattr(triton_nsa, "window_attention_backward_dkdv", spy_dkdv)
    leaves = [x.clone().requires_grad_() for x in inputs]
    lq, lk_cmp, lv_cmp, lk, lv, lg = leaves
    out, blocks, _ = nsa_triton(lq, lk_cmp, lv_cmp, lk, lv, lk, lv, lg, c, with_reads=False)
    fused = torch.autograd.grad(out, leaves, grad_out)
    # The forward's forced blocks go to the window at any window width.
    assert passes == [("forward", True), ("dq", forced and not signed_gates), ("dkdv", True)]

    leaves = [x.clone().requires_grad_() for x in inputs]
    lq, lk_cmp, lv_cmp, lk, lv, lg = leaves
    want_out, want_blocks = _branch_ops(lq, lk_cmp, lv_cmp, lk, lv, lk, lv, lg, c)
    per_op = torch.autograd.grad(want_out, leaves, grad_out)

    leaves = [x.double().requires_grad_() for x in inputs]
    lq, lk_cmp, lv_cmp, lk, lv, lg = leaves
    ref_out, ref_blocks, _ = nsa_reference(lq, lk_cmp, lv_cmp, lk, lv, lk, lv, lg, c, with_reads=False)
    ref = torch.autograd.grad(ref_out, leaves, grad_out.double())

    assert torch.equal(blocks, want_blocks) and torch.equal(blocks, ref_blocks)
    # Selection's softmax summed in another order (its forced blocks first, from the window's pass).
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-6)
    for name, got, by_op, by_ref in zip(("dq", "dk_cmp", "dv_cmp", "dk", "dv", "dgates"), fused, per_op, ref):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, by_op, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(got.double(), by_ref, rtol=1e-4, atol=1e-5, msg=name)


def test_shared_kv_backward_needs_one_kv_and_for_forced_blocks_a_window_of_two(monkeypatch):
    c = NSAConfig(num_heads=2, num_kv_heads=1, head_dim=16, select_block=64, window=128)
    k, v = torch.zeros(1, 8, 1, 16), torch.zeros(1, 8, 1, 16)
    assert triton_nsa.shared_kv_backward(k, v, k, v, c) == (
        True, True, "one key/value tensor: selection's forced blocks in the window's dq pass")
    assert triton_nsa.shared_kv_backward(k, v, k.clone(), v, c) == (
        False, False, "selection and window read different key/value tensors")
    narrow = NSAConfig(num_heads=2, num_kv_heads=1, head_dim=16, select_block=64, window=127)
    why = "one key/value tensor; selection's forced blocks in its own dq pass: window=127 < 2 x select_block=64"
    assert triton_nsa.shared_kv_backward(k, v, k, v, narrow) == (True, False, why)
    monkeypatch.setattr(triton_nsa, "SHARED_KV_BACKWARD", False)
    assert triton_nsa.shared_kv_backward(k, v, k, v, c)[:2] == (False, False)
    with pytest.raises(ValueError, match="forced_in_window: needs one_kv"):
        triton_nsa.branch_backward(*[None] * 11, c, 1.0, forced_in_window=True)


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


def test_info_names_the_forward_and_backward_sharing_and_packed_pieces_keep_one_kv(monkeypatch):
    from nsa.functional import nsa_attention

    c = NSAConfig(num_heads=4, num_kv_heads=1, head_dim=16, compress_block=8, compress_stride=4,
                  select_block=16, select_count=3, window=32, phi="mean")
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(1, 40, 4, 16, generator=gen)
    k, v = torch.randn(1, 40, 1, 16, generator=gen), torch.randn(1, 40, 1, 16, generator=gen)
    gates = torch.rand(1, 40, 4, 3, generator=gen)
    cu_seqlens = torch.tensor([0, 17, 40])
    decided = []
    decide = triton_nsa.shared_kv_backward

    def spy(*args):
        decided.append(decide(*args)[0])
        return decide(*args)

    monkeypatch.setattr(triton_nsa, "shared_kv_backward", spy)
    _, info = nsa_attention(q, k, v, gates, c, backend="triton", cu_seqlens=cu_seqlens, return_info=True)
    # Both pieces' nodes (and the info) saw one k, v for selection and window.
    assert decided == [True, True, True]
    assert info.backward_path == "one key/value tensor: selection's forced blocks in the window's dq pass"
    assert info.forward_path == "one key/value tensor: selection's forced blocks in the window's forward"
    _, info = nsa_attention(q, k, v, gates, c, backend="triton", window_kv=(k.clone(), v), return_info=True)
    assert info.backward_path == info.forward_path == "selection and window read different key/value tensors"
    monkeypatch.setattr(triton_nsa, "SHARED_KV_FORWARD", False)
    _, info = nsa_attention(q, k, v, gates, c, backend="triton", return_info=True)
    assert info.forward_path == "turned off (nsa.ops.triton_nsa.SHARED_KV_FORWARD)"
    _, info = nsa_attention(q, k, v, gates, c, backend="reference", return_info=True)
    assert info.backward_path == info.forward_path == ""
