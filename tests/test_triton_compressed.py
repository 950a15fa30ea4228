"""Triton compressed attention (forward, lse, dq/dk/dv) against the naive reference, on CPU.

Kernels run in Triton's interpreter, in float32 (its bf16 ``tl.dot`` is wrong). Errors are bounded
against a float64 reference by a multiple of the naive float32 path's own error.
"""

import functools
import heapq
import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything defines a Triton kernel

import pytest
import torch

from nsa.config import num_compressed
from nsa.ops.compressed_attention.naive import compressed_attention, visible_compressed
from nsa.ops.compressed_attention.triton import compressed_attention_triton

# (batch, T, HK, G, Dk, Dv, l, d): G in {1, 2, 4, 8} and one non-power-of-two group, Dk != Dv,
# Dk split into two dot blocks (24 = 16 + 8 padded, 48 = 32 + 16),
# T off every tile size, and T < l (no row sees a compressed token).
CASES = [
    (2, 45, 2, 1, 16, 16, 8, 4),
    (2, 61, 2, 2, 32, 16, 8, 8),
    (1, 77, 1, 4, 24, 40, 16, 8),
    (2, 38, 1, 8, 16, 16, 4, 2),
    (1, 50, 2, 3, 48, 32, 8, 4),
    (2, 6, 2, 2, 16, 16, 8, 4),
]


def _error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref).abs().max().item() if x.numel() else 0.0


def _assert_close_to_float64(name, got, naive32, ref64, slack=1e-6):
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    bound = 4 * _error(naive32, ref64) + slack
    err = _error(got, ref64)
    assert err <= bound, f"{name}: max error {err:.3g} vs float64 exceeds {bound:.3g} (4x naive fp32 + {slack})"


@pytest.mark.parametrize("batch,seq_len,num_kv,group,dk,dv,block,stride", CASES,
                         ids=[f"B{c[0]}-T{c[1]}-HK{c[2]}-G{c[3]}-dk{c[4]}-dv{c[5]}-l{c[6]}-d{c[7]}" for c in CASES])
def test_forward_and_backward_match_reference(batch, seq_len, num_kv, group, dk, dv, block, stride):
    gen = torch.Generator().manual_seed(seq_len * 31 + group)
    num_cmp = num_compressed(seq_len, block, stride)
    # q as a transposed view: the kernels must honour arbitrary batch/time/head strides.
    q64 = torch.randn(batch, num_kv * group, seq_len, dk, generator=gen, dtype=torch.float64).transpose(1, 2)
    k64 = torch.randn(batch, num_cmp, num_kv, dk, generator=gen, dtype=torch.float64)
    v64 = torch.randn(batch, num_cmp, num_kv, dv, generator=gen, dtype=torch.float64)
    do64 = torch.randn(batch, seq_len, num_kv * group, dv, generator=gen, dtype=torch.float64)

    def run(fn, dtype):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q64, k64, v64)]
        o, lse = fn(*leaves, block=block, stride=stride)
        (o.to(torch.float64) * do64).sum().backward()
        return o.detach(), lse, [x.grad for x in leaves]

    o_ref, lse_ref, grads_ref = run(compressed_attention, torch.float64)
    o_naive, lse_naive, grads_naive = run(compressed_attention, torch.float32)
    o, lse, grads = run(compressed_attention_triton, torch.float32)

    assert o.dtype == torch.float32 and lse.dtype == torch.float32
    assert o.shape == (batch, seq_len, num_kv * group, dv) and lse.shape == (batch, seq_len, num_kv * group)
    empty = visible_compressed(torch.arange(seq_len), block, stride) == 0
    assert torch.isneginf(lse[:, empty]).all() and torch.isfinite(lse[:, ~empty]).all()
    assert (o[:, empty] == 0).all()
    _assert_close_to_float64("o", o, o_naive, o_ref)
    _assert_close_to_float64("lse", lse[:, ~empty], lse_naive[:, ~empty], lse_ref[:, ~empty])
    for name, got, naive, ref in zip(("dq", "dk", "dv"), grads, grads_naive, grads_ref):
        _assert_close_to_float64(name, got, naive, ref)
    assert (grads[0][:, empty] == 0).all(), "queries that see nothing must get zero dq"


def test_backward_is_deterministic():
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 40, 4, 16, generator=gen).requires_grad_()
    k = torch.randn(1, num_compressed(40, 8, 4), 2, 16, generator=gen).requires_grad_()
    v = torch.randn(1, k.shape[1], 2, 16, generator=gen).requires_grad_()
    do = torch.randn(1, 40, 4, 16, generator=gen)
    grads = []
    for _ in range(2):
        q.grad = k.grad = v.grad = None
        o, _ = compressed_attention_triton(q, k, v, block=8, stride=4)
        (o * do).sum().backward()
        grads.append([x.grad.clone() for x in (q, k, v)])
    for first, second in zip(*grads):
        assert torch.equal(first, second)


@pytest.mark.parametrize("seq_len,group", [(45, 2), (61, 8), (6, 2)], ids=["T45-G2", "T61-G8", "T6-no-key"])
def test_dq_adds_in_place_to_a_given_gradient(seq_len, group):
    """``dq=``: the pass adds its query gradient to another branch's (the Triton backend's order of
    dq passes is free then): the same tensor comes back, holding the sum."""
    from nsa.ops.compressed_attention.triton import (
        compressed_attention_backward,
        compressed_attention_forward,
    )
    from nsa.ops.triton_common import softmax_delta

    gen = torch.Generator().manual_seed(seq_len + group)
    block, stride, num_kv = 8, 4, 2
    q = torch.randn(1, num_kv * group, seq_len, 16, generator=gen).transpose(1, 2)  # strided like a view
    k = torch.randn(1, num_compressed(seq_len, block, stride), num_kv, 16, generator=gen)
    v = torch.randn(1, k.shape[1], num_kv, 16, generator=gen)
    do = torch.randn(1, seq_len, num_kv * group, 16, generator=gen)
    o, lse = compressed_attention_forward(q, k, v, block, stride, 0.25)
    delta = softmax_delta(o, do, None)
    dq_alone, dk_alone, dv_alone = compressed_attention_backward(q, k, v, lse, do, delta, block, stride, 0.25)
    held = torch.empty_strided(q.shape, q.stride()).copy_(torch.randn(q.shape, generator=gen))
    expected = held + dq_alone
    dq, dk, dv = compressed_attention_backward(q, k, v, lse, do, delta, block, stride, 0.25, dq=held)
    assert dq is held
    torch.testing.assert_close(dq, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(dk, dk_alone) and torch.equal(dv, dv_alone)
    with pytest.raises(ValueError, match="dq: strides"):
        compressed_attention_backward(q, k, v, lse, do, delta, block, stride, 0.25, dq=torch.zeros(q.shape))


def _production_tiles():
    from nsa.ops.compressed_attention import triton as cmp_triton

    configs = cmp_triton._FWD_CONFIGS + cmp_triton._DKDV_CONFIGS + cmp_triton._DQ_CONFIGS
    return sorted({(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in configs})


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("tiles", _production_tiles(), ids=lambda t: f"M{t[0]}-N{t[1]}")
def test_production_tiles_match_reference(tiles, tma, monkeypatch):
    """The interpreter normally runs small tiles; here every kernel runs one of the GPU autotune
    lists' tiles (N = 149 compressed tokens: a 128-key tile is followed by a mostly-masked one,
    whose TMA box reaches past the last token), its key/value tiles loaded by pointers or, in
    the forward and dq kernels, through tensor descriptors."""
    from nsa.ops.compressed_attention import triton as cmp_triton

    monkeypatch.setattr(cmp_triton, "INTERPRET_TILES", {"BLOCK_M": tiles[0], "BLOCK_N": tiles[1], "TMA": tma})
    gen = torch.Generator().manual_seed(tiles[0] * 1000 + tiles[1])
    seq_len, block, stride, num_kv, group, dk, dv = 600, 8, 4, 1, 4, 48, 32
    num_cmp = num_compressed(seq_len, block, stride)
    q64 = torch.randn(1, seq_len, num_kv * group, dk, generator=gen, dtype=torch.float64)
    k64 = torch.randn(1, num_cmp, num_kv, dk, generator=gen, dtype=torch.float64)
    v64 = torch.randn(1, num_cmp, num_kv, dv, generator=gen, dtype=torch.float64)
    do64 = torch.randn(1, seq_len, num_kv * group, dv, generator=gen, dtype=torch.float64)

    def run(fn, dtype):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q64, k64, v64)]
        o, _ = fn(*leaves, block=block, stride=stride)
        (o.to(torch.float64) * do64).sum().backward()
        return [o.detach()] + [x.grad for x in leaves]

    ref, naive, got = (run(compressed_attention, torch.float64), run(compressed_attention, torch.float32),
                       run(compressed_attention_triton, torch.float32))
    for name, g, n, r in zip(("o", "dq", "dk", "dv"), got, naive, ref):
        _assert_close_to_float64(name, g, n, r)


def test_tma_loads_off_leaves_the_pointer_configs(monkeypatch):
    """``TMA_LOADS = False`` (or tensors the TMA cannot read) yields no descriptors, and the
    autotuner then gets the pointer-load configs only (here of a list holding both kinds, as
    tune_kernels.py pins them)."""
    from nsa.ops import triton_common
    from nsa.ops.compressed_attention import triton as cmp_triton

    k, v = torch.randn(1, 40, 2, 16), torch.randn(1, 40, 2, 16)
    assert triton_common.kv_tile_descriptors(k, v, 16, (16, 0), 16) is not None
    monkeypatch.setattr(triton_common, "TMA_LOADS", False)
    assert triton_common.kv_tile_descriptors(k, v, 16, (16, 0), 16) is None
    both = cmp_triton._FWD_CONFIGS + cmp_triton.group_configs(cmp_triton.FWD_TMA_TILES)
    with cmp_triton._cmp_fwd_tuned.only(both[0]):
        cmp_triton._cmp_fwd_tuned.configs = both
        assert {bool(c.kwargs["TMA"]) for c in cmp_triton._cmp_fwd_tuned.at(65536, tma=True).configs} == {False, True}
        assert not any(c.kwargs["TMA"] for c in cmp_triton._cmp_fwd_tuned.at(65536, tma=False).configs)


@pytest.mark.parametrize("seq_len,block,stride,chunk_len",
                         [(600, 8, 4, 32), (65536, 32, 16, 2048), (1000, 16, 8, 24), (77, 16, 8, 8),
                          (130, 5, 3, 6)])
def test_chunk_slots_count_each_rows_chunks(seq_len, block, stride, chunk_len):
    """The dK/dV partials' closed-form layout against counting: row ``n`` has one slot per chunk
    from its first reader's to the last, rows one after another."""
    from nsa.ops.compressed_attention.triton import chunk_slot_start

    num_chunks = -(-seq_len // chunk_len)
    start = 0
    for n in range(num_compressed(seq_len, block, stride) + 1):
        first = (n * stride + block - 1) // chunk_len
        assert chunk_slot_start(n, chunk_len, num_chunks, block, stride) == (start, first), n
        start += num_chunks - first


def _grid_makespan(seq_len, heads, chunk_len, block=32, stride=16, key_tile=128, tile_positions=4, sms=132):
    """List schedule of the dK/dV grid in launch order (last chunks first) on ``sms`` SMs running
    one program each; a program's time is its query tiles. Returns makespan / balanced time."""
    num_cmp = num_compressed(seq_len, block, stride)
    num_chunks = -(-seq_len // chunk_len)
    last_tile = -(-seq_len // tile_positions)
    work = []
    for chunk in reversed(range(num_chunks)):
        for _ in range(heads):
            for key0 in range(0, num_cmp, key_tile):
                lo = max((key0 * stride + block - 1) // tile_positions, chunk * chunk_len // tile_positions)
                work.append(max(0, min(last_tile, (chunk + 1) * chunk_len // tile_positions) - lo))
    free = [0] * sms
    for w in work:
        heapq.heappush(free, heapq.heappop(free) + w)
    return max(free) / (sum(work) / sms)


@pytest.mark.parametrize("seq_len,heads", [(8192, 4), (65536, 4), (131072, 4), (65536, 1), (8192, 32)])
def test_dkdv_chunks_even_out_the_grid(seq_len, heads):
    """The chosen chunks give the dK/dV pass an even grid (the former five query splits at 64k,
    64/4 heads: the last SM finished 20% after the balanced time), with float32 partials bounded
    by the wave count, not the sequence length."""
    from nsa.ops.compressed_attention import triton as cmp_triton

    sms, block, stride = 132, 32, 16
    num_cmp = num_compressed(seq_len, block, stride)
    wanted = cmp_triton.DKDV_WAVES * sms
    chunk = cmp_triton._balanced_chunk_len(seq_len, num_cmp, heads, block, stride, 128, 128, wanted)
    programs = functools.partial(cmp_triton._dkdv_programs, seq_len, num_cmp, heads, block, stride, 128)
    assert chunk % 128 == 0 and (programs(chunk) >= wanted or chunk == 128)
    assert 2 * chunk >= seq_len or programs(2 * chunk) < wanted, "a longer chunk would still fill the waves"
    assert _grid_makespan(seq_len, heads, chunk) < 1.05
    slots = cmp_triton.chunk_slot_start(num_cmp, chunk, -(-seq_len // chunk), block, stride)[0]
    assert slots * heads * 128 * 8 < 300 * 2**20, "float32 dk + dv partials at d = 128"
    if (seq_len, heads) == (65536, 4):
        assert _grid_makespan(seq_len, heads, -(-seq_len // 5)) > 1.15


def test_dkdv_refuses_chunks_that_split_a_query_tile(monkeypatch):
    from nsa.ops.compressed_attention import triton as cmp_triton

    monkeypatch.setattr(cmp_triton, "dkdv_chunk_len", lambda *args, **kwargs: 8)
    q, k, v = torch.randn(1, 40, 2, 16), torch.randn(1, 9, 2, 16), torch.randn(1, 9, 2, 16)
    o, lse = cmp_triton.compressed_attention_forward(q, k, v, 8, 4, 0.25)
    delta = torch.zeros(1, 40, 2)
    with pytest.raises(ValueError, match="chunks of 8 positions split query tiles of 32"):
        cmp_triton.compressed_attention_backward_dkdv(q, k, v, lse, torch.randn_like(o), delta, 8, 4, 0.25)
