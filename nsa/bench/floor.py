"""Measured lower bounds of the NSA forward on one card: how fast the work each branch cannot
avoid runs on that card's fastest kernels, beside dense cuDNN in the same process.

The spec's rough floor (~16 ms at 64k) prices all three attentions at dense attention's
TFLOP/s. Selection attention is not dense: each position's query heads of one KV head read their
own chosen key/value blocks, and on random data neighbouring positions rarely choose the same
one, so its bytes (13 non-forced blocks x ``l'`` keys x ``(Dk + Dv)`` x 2 bytes per position and
KV head: ~110 GB at 64k; the forced blocks go to the window's pass) reach the SMs once per
position. The bounds, each measured, none of them a model:

- ``selection gathers``: :func:`gather_selected_blocks` loads exactly those blocks (the lists the
  backend selects for the same inputs) and sums them: selection attention's memory traffic
  without its arithmetic, best of several launch shapes (pointer loads and TMA boxes).
- ``compressed products``: cuDNN SDPA, not causal, over as many keys as a query sees compressed
  tokens on average: compressed attention's FLOPs at the card's best dense rate. Block scoring
  recomputes its ``q.k`` products: half of that again.
- ``window products``: the same over ``w`` keys.
- ``combine``: one copy of an output: the gate sum fused into the last branch's pass still reads
  the two other branches' outputs.

A forward at least as long as their sum is as fast as this algorithm gets on that card for
those inputs, so ``cuDNN / floor`` bounds the ratio any kernel of it can reach.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nsa.ops import triton_common
from nsa.ops.triton_common import load_box, tile_descriptors

# Launch shapes timed for the gather bound (warps, pipeline stages, TMA): the bound is the best.
GATHER_SHAPES = [(w, s, tma) for tma in (False, True) for w in (2, 4, 8) for s in (2, 3, 4)]


@triton.jit
def _gather_blocks_kernel(K, V, K_DESC, V_DESC, BLOCKS, OUT, T, HK,
                          stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                          stride_ib, stride_it, stride_ih,
                          COUNT: tl.constexpr, SELECT_BLOCK: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                          TMA: tl.constexpr, STAGES: tl.constexpr):
    """One program per (position, KV head): loads the ``[SELECT_BLOCK, D]`` tiles of k and v of
    each listed block (``-1``: none) and writes the sum of all their elements (so that no load
    can be dropped)."""
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HK
    h = bh % HK
    rows = tl.arange(0, SELECT_BLOCK)
    k_cols = tl.arange(0, DK)
    v_cols = tl.arange(0, DV)
    k_base = K + b.to(tl.int64) * stride_kb + h * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h * stride_vh
    lists = BLOCKS + b.to(tl.int64) * stride_ib + t.to(tl.int64) * stride_it + h * stride_ih
    acc_k = tl.zeros([SELECT_BLOCK, DK], tl.float32)
    acc_v = tl.zeros([SELECT_BLOCK, DV], tl.float32)
    for i in tl.range(0, COUNT, num_stages=STAGES):
        j = tl.load(lists + i)
        if TMA:
            # A padding entry puts the box wholly before row 0: zeros, nothing read.
            row0 = tl.where(j >= 0, j * SELECT_BLOCK, -SELECT_BLOCK)
            k_tile = load_box(K_DESC, b, row0, h, SELECT_BLOCK, DK)
            v_tile = load_box(V_DESC, b, row0, h, SELECT_BLOCK, DV)
        else:
            key = j.to(tl.int64) * SELECT_BLOCK + rows
            # From key, not j: the interpreter rejects masks built from a 0-d tensor.
            ok = (key >= 0) & (key < T)
            k_tile = tl.load(k_base + key[:, None] * stride_kt + k_cols[None, :], mask=ok[:, None], other=0.0)
            v_tile = tl.load(v_base + key[:, None] * stride_vt + v_cols[None, :], mask=ok[:, None], other=0.0)
        acc_k += k_tile.to(tl.float32)
        acc_v += v_tile.to(tl.float32)
    total = tl.sum(tl.sum(acc_k, axis=1), axis=0) + tl.sum(tl.sum(acc_v, axis=1), axis=0)
    tl.store(OUT + bh.to(tl.int64) * T + t, total)


def non_forced_blocks(blocks: torch.Tensor, select_block: int) -> torch.Tensor:
    """The chosen blocks other than the forced ones (0, ``c - 1``, ``c`` of position ``t``,
    ``c = t // select_block``), ascending, ``-1`` after.

    Args:
        blocks: int64 ``[B, T, HK, n]`` as :func:`nsa.ops.selection.triton.select_blocks_triton`
            returns them (ascending, ``-1`` padding).
        select_block: ``l'``.

    Returns:
        int32 ``[B, T, HK, m]``, ``m`` the most non-forced blocks any position has (``n - 3`` once
        positions have more than ``n`` blocks to choose from).
    """
    if blocks.dim() != 4:
        raise ValueError(f"non_forced_blocks: blocks must be [B, T, HK, n], got shape {tuple(blocks.shape)}")
    cur = (torch.arange(blocks.shape[1], device=blocks.device) // select_block).view(1, -1, 1, 1)
    keep = (blocks >= 0) & (blocks != 0) & (blocks != cur) & (blocks != cur - 1)
    # Kept entries first in ascending order: padding sorts after every block index.
    ordered = torch.where(keep, blocks, torch.iinfo(torch.int64).max).sort(dim=-1).values
    width = max(int(keep.sum(-1).max()), 1)
    ordered = ordered[..., :width]
    return torch.where(ordered == torch.iinfo(torch.int64).max, -1, ordered).to(torch.int32).contiguous()


def gather_selected_blocks(k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor, *, select_block: int,
                           num_warps: int = 4, num_stages: int = 3, tma: bool = False) -> torch.Tensor:
    """Per position and KV head, the sum of every element of k and v in its listed blocks' keys.

    Args:
        k: ``[B, T, HK, Dk]`` float16/bfloat16/float32, ``Dk`` a power of two.
        v: ``[B, T, HK, Dv]`` same dtype, ``Dv`` a power of two.
        blocks: int32 ``[B, T, HK, m]`` block indices, ``-1`` for none (:func:`non_forced_blocks`).
        select_block: ``l'``, keys per block (a power of two).
        num_warps, num_stages: launch shape; ``tma``: load the tiles by the TMA (sm_90 and later).

    Returns:
        float32 ``[B, HK, T]``.
    """
    batch, seq_len, num_kv, head_dim = k.shape
    v_head_dim = v.shape[-1]
    for name, value in (("Dk", head_dim), ("Dv", v_head_dim), ("select_block", select_block)):
        if value & (value - 1) or value < 16:
            raise ValueError(f"gather_selected_blocks: {name}={value} must be a power of two >= 16")
    if v.shape[:3] != k.shape[:3] or blocks.shape[:3] != k.shape[:3] or blocks.dtype != torch.int32:
        raise ValueError(f"gather_selected_blocks: k {tuple(k.shape)}, v {tuple(v.shape)} and int32 blocks "
                         f"{tuple(blocks.shape)} {blocks.dtype} must share [B, T, HK]")
    out = torch.empty(batch, num_kv, seq_len, dtype=torch.float32, device=k.device)
    descs = (None, None)
    if tma:
        descs = tile_descriptors((k, v), [1, select_block, 1], [head_dim, v_head_dim], [0, 1])
        if descs is None:
            raise ValueError("gather_selected_blocks: tma=True needs an sm_90 GPU, TMA_LOADS on "
                             f"(now {triton_common.TMA_LOADS}) and 16-byte aligned k, v")
    _gather_blocks_kernel[(seq_len, batch * num_kv)](
        k, v, descs[0] if tma else k, descs[1] if tma else v, blocks, out, seq_len, num_kv,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        blocks.stride(0), blocks.stride(1), blocks.stride(2),
        COUNT=blocks.shape[-1], SELECT_BLOCK=select_block, DK=head_dim, DV=v_head_dim, TMA=tma,
        STAGES=num_stages, num_warps=num_warps)
    return out


@dataclass
class FloorRow:
    """One measured piece of the bound (``ms``), or a time it is compared with."""

    seq_len: int
    name: str
    ms: float
    what: str


def forward_floor(seq_len: int, head_dim: int = 128, v_head_dim: int = 128, num_heads: int = 64,
                  num_kv_heads: int = 4, shapes: list[tuple[int, int, bool]] = GATHER_SHAPES,
                  ) -> list[FloorRow]:
    """The bound's pieces at one length (bf16, B = 1, the paper's blocks, random data, CUDA), the
    backend's forward and selection kernel, and dense causal cuDNN, all in this process."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from nsa.bench.prefill import _bench, bench_config, dense_rows, nsa_inputs
    from nsa.functional import nsa_attention
    from nsa.ops.compressed_attention.triton import compressed_attention_triton
    from nsa.ops.compression import compress_mean
    from nsa.ops.reads import compressed_reads, window_reads
    from nsa.ops.selected_attention.triton import selected_attention_triton
    from nsa.ops.selection.triton import select_blocks_triton

    config = bench_config(head_dim, v_head_dim, num_heads, num_kv_heads)
    x = {name: t.detach() for name, t in nsa_inputs(config, seq_len).items()}
    q, k, v = x["q"], x["k"], x["v"]
    sel = config.select_block
    k_cmp = compress_mean(k, config.compress_block, config.compress_stride)
    v_cmp = compress_mean(v, config.compress_block, config.compress_stride)
    _, lse = compressed_attention_triton(q, k_cmp, v_cmp, block=config.compress_block,
                                         stride=config.compress_stride)
    blocks = select_blocks_triton(q, k_cmp, lse, block=config.compress_block, stride=config.compress_stride,
                                  select_block=sel, select_count=config.select_count)
    lists = non_forced_blocks(blocks, sel)
    rows = []

    def row(name: str, ms: float, what: str) -> None:
        rows.append(FloorRow(seq_len, name, ms, what))

    reference = gather_selected_blocks(k, v, lists, select_block=sel)
    gathers = {}
    for warps, stages, tma in shapes:
        try:
            out = gather_selected_blocks(k, v, lists, select_block=sel, num_warps=warps, num_stages=stages,
                                         tma=tma)
        except Exception as exc:  # noqa: BLE001 - a shape that cannot compile or launch: recorded
            row(f"gathers {warps}w {stages}s tma={tma}", float("nan"),
                f"cannot run: {type(exc).__name__}: {str(exc)[:160]}")
            continue
        # Every shape must read the same elements (sums in another order: float32 rounding).
        if not torch.allclose(out, reference, rtol=1e-4, atol=1e-2):
            raise AssertionError(f"gather shape {warps}w {stages}s tma={tma} summed other elements")
        gathers[(warps, stages, tma)] = _bench(lambda w=warps, s=stages, m=tma: gather_selected_blocks(
            k, v, lists, select_block=sel, num_warps=w, num_stages=s, tma=m))
        row(f"gathers {warps}w {stages}s tma={tma}", gathers[(warps, stages, tma)],
            "one launch shape of the selection gathers")
    best = min(gathers, key=gathers.get)
    listed = int((lists >= 0).sum())
    gib = listed * sel * (head_dim + v_head_dim) * q.element_size() / 2**30
    row("selection gathers", gathers[best], f"{listed} blocks, {gib:.1f} GiB, best shape {best}: "
        f"{gib * 2**30 / gathers[best] / 1e9:.2f} TB/s")
    all_lists = blocks.to(torch.int32)
    row("selection gathers, all n", _bench(lambda: gather_selected_blocks(
        k, v, all_lists, select_block=sel, num_warps=best[0], num_stages=best[1], tma=best[2])),
        "the same over every chosen block (forced ones too): compare with the backend's selection forward")

    def dense_ms(keys: int) -> float:
        """cuDNN SDPA, not causal, every query over ``keys`` keys."""
        qd = torch.randn(1, num_heads, seq_len, head_dim, device="cuda", dtype=q.dtype)
        kd = torch.randn(1, num_heads, keys, head_dim, device="cuda", dtype=q.dtype)
        vd = torch.randn(1, num_heads, keys, v_head_dim, device="cuda", dtype=q.dtype)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return _bench(lambda: torch.nn.functional.scaled_dot_product_attention(qd, kd, vd))

    positions = torch.arange(seq_len)
    mean_cmp = max(round(float(compressed_reads(positions, block=config.compress_block,
                                                stride=config.compress_stride).float().mean())), 1)
    cmp_ms = dense_ms(mean_cmp)
    row("compressed products", cmp_ms,
        f"cuDNN, not causal, {mean_cmp} keys (mean visible of {k_cmp.shape[1]})")
    row("scoring products", cmp_ms / 2, "half of the compressed products (q.k only)")
    mean_win = max(round(float(window_reads(positions, window=config.window).float().mean())), 1)
    row("window products", dense_ms(mean_win), f"cuDNN, not causal, {mean_win} keys (mean visible)")
    o = torch.randn(1, seq_len, num_heads, v_head_dim, device="cuda", dtype=q.dtype)
    out = torch.empty_like(o)
    row("combine", _bench(lambda: out.copy_(o)), "one copy of an output (two passes over it)")
    row("floor", sum(r.ms for r in rows if r.name in FLOOR_PIECES), "sum of: " + ", ".join(FLOOR_PIECES))

    row("nsa selection forward", _bench(lambda: selected_attention_triton(q, k, v, blocks, select_block=sel)),
        "the backend's selection attention over all n blocks (forced ones included)")
    row("nsa forward", _bench(lambda: nsa_attention(q, k, v, x["gates"], config, backend="triton")),
        "nsa_attention, Triton backend")
    for dense in dense_rows(seq_len, head_dim, v_head_dim, num_heads, num_kv_heads):
        row(f"{dense.impl} causal forward", dense.fwd_ms, dense.note or "dense baseline (nsa bench's rows)")
    return rows


# The pieces summed into the bound.
FLOOR_PIECES = ("selection gathers", "compressed products", "scoring products", "window products", "combine")


def floor_summary(rows: list[FloorRow]) -> dict[str, float]:
    """``{"floor_ms", "nsa_ms", "cudnn_ms", "max_ratio", "nsa_ratio"}`` of one length's rows:
    ``max_ratio`` is cuDNN's forward over the floor, the most any kernel of this algorithm gets."""
    by_name = {r.name: r.ms for r in rows}
    floor, nsa, cudnn = by_name["floor"], by_name["nsa forward"], by_name["sdpa-cudnn causal forward"]
    return {"floor_ms": floor, "nsa_ms": nsa, "cudnn_ms": cudnn, "max_ratio": cudnn / floor,
            "nsa_ratio": cudnn / nsa}
