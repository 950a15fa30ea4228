"""Sliding-window Triton kernels vs the naive reference, on CPU through the Triton interpreter."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined

import pytest
import torch
from tile_options import option_id, option_pairs, pinned

from nsa.ops.window_attention.naive import window_attention
from nsa.ops.window_attention import triton as triton_window
from nsa.ops.window_attention.triton import window_attention_triton

CASES = [  # (G, HK, Dk, Dv, T, window)
    (1, 2, 32, 32, 200, 150),   # window below T; interior (unmasked) tiles at 64 positions x G=1
    (2, 2, 24, 16, 90, 200),    # window above T: full causal attention
    (4, 1, 16, 16, 130, 17),    # window smaller than a key tile
    (8, 1, 48, 16, 100, 64),    # Dk = 32 + 16: two exact column tiles, like 192 = 128 + 64
    (16, 1, 16, 32, 77, 1),     # each query reads only itself
    (3, 2, 40, 24, 70, 33),     # G not a power of two; Dk = 32 + 8, Dv padded to 32
]


@pytest.mark.parametrize("group,num_kv,dk,dv,seq_len,window", CASES,
                         ids=[f"G{c[0]}-dk{c[2]}-dv{c[3]}-T{c[4]}-w{c[5]}" for c in CASES])
def test_window_attention_matches_naive(group, num_kv, dk, dv, seq_len, window):
    gen = torch.Generator().manual_seed(100 * group + window)
    batch = 2
    q = torch.randn(batch, seq_len, group * num_kv, dk, generator=gen)
    k = torch.randn(batch, seq_len, num_kv, dk, generator=gen)
    v = torch.randn(batch, seq_len, num_kv, dv, generator=gen)
    do = torch.randn(batch, seq_len, group * num_kv, dv, generator=gen)
    dlse = torch.randn(batch, seq_len, group * num_kv, generator=gen)

    def run(fn, dtype):
        leaves = [x.detach().clone().to(dtype).requires_grad_() for x in (q, k, v)]
        o, lse = fn(*leaves, window=window)
        ((o * do.to(dtype)).sum() + (lse * dlse.to(lse.dtype)).sum()).backward()
        return o, lse, [x.grad for x in leaves]

    o_ref, lse_ref, grads_ref = run(window_attention, torch.float64)
    o, lse, grads = run(window_attention_triton, torch.float32)
    assert o.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(o.double(), o_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), lse_ref, atol=2e-5, rtol=1e-4)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert torch.isfinite(g).all(), f"d{name} not finite"
        torch.testing.assert_close(g.double(), g_ref, atol=5e-5, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


def check_pinned_against_naive(kernels, options, *, group=16, dk=32, batch=1, num_kv=1, seed=9):
    """Outputs (o, lse) and every gradient of the Triton op with ``kernels`` pinned to ``options``
    equal the float64 naive op's, with a window (70 of T = 150) that spans several key tiles."""
    gen = torch.Generator().manual_seed(seed)
    seq_len, dv, window = 150, 16, 70
    q = torch.randn(batch, seq_len, group * num_kv, dk, generator=gen)
    k = torch.randn(batch, seq_len, num_kv, dk, generator=gen)
    v = torch.randn(batch, seq_len, num_kv, dv, generator=gen)
    do = torch.randn(batch, seq_len, group * num_kv, dv, generator=gen)

    def run(fn, dtype):
        leaves = [x.detach().clone().to(dtype).requires_grad_() for x in (q, k, v)]
        o, lse = fn(*leaves, window=window)
        (o * do.to(dtype)).sum().backward()
        return [o, lse] + [x.grad for x in leaves]

    with pinned(kernels, options):
        got_all = run(window_attention_triton, torch.float32)
    for name, got, want in zip(("o", "lse", "dq", "dk", "dv"), got_all, run(window_attention, torch.float64)):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("options", option_pairs(triton_window._query_kernel, triton_window._dkdv_kernel),
                         ids=option_id)
def test_every_production_tile_matches_naive(options):
    """Each option of the GPU autotune lists (the interpreter otherwise runs the first), at G = 16."""
    check_pinned_against_naive((triton_window._query_kernel, triton_window._dkdv_kernel), options)


@pytest.mark.parametrize("option", triton_window.TMA_OPTIONS, ids=lambda o: option_id((o,)))
@pytest.mark.parametrize("group,dk", [(16, 32), (4, 48)])
def test_tma_loads_match_naive(option, group, dk):
    """The query walks with key/value tiles loaded through tensor descriptors (interpreted; the
    pre_hook sizes them to the option's key tile): two sequences of two key/value heads (a tile
    past one sequence's end reads zeros, not the next) and a split head dim (48 = 32 + 16)."""
    check_pinned_against_naive((triton_window._query_kernel,), (option,), group=group, dk=dk, batch=2, num_kv=2,
                               seed=group + dk)


def test_backward_passes_refuse_a_forced_share_or_gradients_they_cannot_take():
    q, k, v = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 1, 16), torch.randn(1, 8, 1, 16)
    lse, delta, do = torch.zeros(1, 8, 2), torch.zeros(1, 8, 2), torch.randn(1, 8, 2, 16)
    forced = triton_window.SelectionForcedBlocks(lse, delta, 16)
    with pytest.raises(ValueError, match=r"must lie in the window, got window=31; accepted: window >= 32"):
        triton_window.window_attention_backward_dq(q, k, v, lse, do, delta, 31, 0.25, forced=forced)
    wide = triton_window.SelectionForcedBlocks(lse.double(), delta, 16)
    with pytest.raises(ValueError, match=r"forced.lse: float32 shaped and strided like the window's lse"):
        triton_window.window_attention_backward_dq(q, k, v, lse, do, delta, 32, 0.25, forced=wide)
    with pytest.raises(ValueError, match=r"add_to: dv must be shaped, typed and strided like \(1, 8, 1, 16\)"):
        triton_window.window_attention_backward_dkdv(q, k, v, lse, do, delta, 32, 0.25,
                                                     add_to=(torch.zeros_like(k), torch.zeros(1, 8, 1, 8)))
