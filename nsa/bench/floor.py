"""Measured lower bounds of NSA on one card (prefill forward and backward, the decode step): how
fast the work each branch cannot avoid runs there, beside dense attention in the same process.

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
those inputs, so ``cuDNN / floor`` bounds the ratio any kernel of it can reach. The backward's
floor is built the same way (:func:`prefill_floor`): selection's dq gathers (the forward's
blocks again) and its dK/dV reads (each key block's readers' q and dO rows,
:func:`gather_reader_rows`), compressed attention's and the window's backward at cuDNN's rate,
two output copies for the gate sum's backward.

The decode step's floor (:func:`decode_floor`) is the time to read the bytes the spec says a step
reads, in the order the step's data dependence imposes: the compressed keys and values first
(the top-n needs every block's score), then the chosen blocks and the window. Measured three
ways with one kernel that only loads 64-row tiles of keys and values (:func:`read_tiles`): all
tiles in one launch with no order (the bytes alone), the two phases as two launches of a CUDA
graph, and the two phases in one launch split by a grid-wide barrier. The floor is the faster of
the last two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from nsa.ops import triton_common
from nsa.ops.triton_common import load_box, tile_descriptors

if TYPE_CHECKING:
    from nsa.config import NSAConfig

# Launch shapes timed for the gather bound (warps, pipeline stages, TMA): the bound is the best.
GATHER_SHAPES = [(w, s, tma) for tma in (False, True) for w in (4, 8) for s in (2, 3, 4)]


def _require_powers_of_two(caller: str, minimum: int = 16, **sizes: int) -> None:
    """Tile sizes the floor kernels take whole (``tl.arange``): powers of two, at least ``minimum``."""
    for name, value in sizes.items():
        if value < minimum or value & (value - 1):
            raise ValueError(f"{caller}: {name}={value} must be a power of two >= {minimum}")


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
    _require_powers_of_two("gather_selected_blocks", Dk=head_dim, Dv=v_head_dim, select_block=select_block)
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


@triton.jit
def _gather_reader_rows_kernel(Q, DO, QPOS, ITEM_GROUP, ITEM_START, ITEM_LEN, OUT, NB, HK,
                               stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh,
                               G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                               POSITIONS: tl.constexpr, STAGES: tl.constexpr):
    """One program per work item (a chunk of the positions that chose one key block): loads the
    ``G`` query heads' rows of q and dO of each position, ``POSITIONS`` positions per step, and
    writes the sum of all their elements."""
    item = tl.program_id(0)
    group = tl.load(ITEM_GROUP + item)
    start = tl.load(ITEM_START + item)
    length = tl.load(ITEM_LEN + item)
    bh = group // NB
    b = (bh // HK).to(tl.int64)
    r = tl.arange(0, POSITIONS * GP)
    head = (bh % HK) * G + r % GP
    q_cols = tl.arange(0, DK)
    o_cols = tl.arange(0, DV)
    acc_q = tl.zeros([POSITIONS * GP, DK], tl.float32)
    acc_o = tl.zeros([POSITIONS * GP, DV], tl.float32)
    for e in tl.range(0, length, POSITIONS, num_stages=STAGES):
        entry = e + r // GP
        ok = (entry < length) & (r % GP < G)
        t = tl.load(QPOS + start + entry, mask=ok, other=0).to(tl.int64)
        q_rows = Q + b * stride_qb + t[:, None] * stride_qt + head[:, None] * stride_qh
        o_rows = DO + b * stride_ob + t[:, None] * stride_ot + head[:, None] * stride_oh
        acc_q += tl.load(q_rows + q_cols[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        acc_o += tl.load(o_rows + o_cols[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    total = tl.sum(tl.sum(acc_q, axis=1), axis=0) + tl.sum(tl.sum(acc_o, axis=1), axis=0)
    tl.store(OUT + item, total)


def gather_reader_rows(q: torch.Tensor, do: torch.Tensor, blocks: torch.Tensor, *, select_block: int,
                       num_kv_heads: int, positions: int = 1, num_warps: int = 4, num_stages: int = 3,
                       ) -> torch.Tensor:
    """Selection dK/dV's reads without its arithmetic: for every key block, the query-head rows of
    q and dO of each position that chose it (keys-major, the lists :func:`nsa.ops.selected_attention.
    triton.invert_selection` makes for the backend's dK/dV pass).

    Args:
        q: ``[B, T, HQ, Dk]``, do: ``[B, T, HQ, Dv]`` (``Dk``, ``Dv`` powers of two >= 16).
        blocks: int ``[B, T, HK, m]`` chosen blocks, ``-1`` for none.
        positions: positions loaded per step (a power of two).

    Returns:
        float32 ``[items]``: each work item's sum of the elements it read (spare items 0).
    """
    from nsa.ops.selected_attention.triton import invert_selection

    _, seq_len, num_heads, head_dim = q.shape
    _require_powers_of_two("gather_reader_rows", Dk=head_dim, Dv=do.shape[-1])
    _require_powers_of_two("gather_reader_rows", minimum=1, positions=positions)
    qpos, item_group, item_start, item_len, _, _ = invert_selection(blocks, seq_len, select_block)
    out = torch.empty(item_group.shape[0], dtype=torch.float32, device=q.device)
    group = num_heads // num_kv_heads
    _gather_reader_rows_kernel[(item_group.shape[0],)](
        q, do, qpos, item_group, item_start, item_len, out, -(-seq_len // select_block), num_kv_heads,
        q.stride(0), q.stride(1), q.stride(2), do.stride(0), do.stride(1), do.stride(2),
        G=group, GP=triton.next_power_of_2(group), DK=head_dim, DV=do.shape[-1], POSITIONS=positions,
        STAGES=num_stages, num_warps=num_warps)
    return out


@dataclass
class FloorRow:
    """One measured piece of the bound (``ms``), or a time it is compared with."""

    seq_len: int
    name: str
    ms: float
    what: str


def _best_time(name: str, shapes: list[tuple], run, row, timer=None, reference: float | None = None,
               ) -> tuple[float, tuple]:
    """Times ``run(*shape)`` (launches returning per-program sums of what they read: a tensor or a
    tuple of them) for every launch shape with ``timer`` (a callable's milliseconds; default
    :func:`nsa.bench.prefill._bench`), each checked to sum the same elements as ``reference``
    (default: the first shape's), records a row per shape and returns the best time and its
    shape. A shape that cannot compile, launch or be timed is recorded, not fatal."""
    from nsa.bench.prefill import _bench

    timer = timer or _bench
    times = {}
    for shape in shapes:
        label = f"{name} {' '.join(str(x) for x in shape)}"
        try:
            sums = run(*shape)
            total = sum(float(x.double().sum()) for x in (sums if isinstance(sums, tuple) else (sums,)))
            reference = total if reference is None else reference
            # Every shape must read the same elements (sums in another order: float32 rounding).
            if abs(total - reference) > 1e-4 * abs(reference) + 1.0:
                raise AssertionError(f"{label} summed other elements: {total} against {reference}")
            times[shape] = timer(lambda shape=shape: run(*shape))
        except AssertionError:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded, the other shapes still count
            row(label, float("nan"), f"cannot run: {type(exc).__name__}: {str(exc)[:160]}")
            continue
        row(label, times[shape], f"one launch shape of the {name}")
    best = min(times, key=times.get)
    return times[best], best


def prefill_floor(seq_len: int, head_dim: int = 128, v_head_dim: int = 128, num_heads: int = 64,
                  num_kv_heads: int = 4, backward: bool = True,
                  shapes: list[tuple[int, int, bool]] = GATHER_SHAPES) -> list[FloorRow]:
    """The bound's pieces at one length (bf16, B = 1, the paper's blocks, random data, CUDA), the
    backend's forward (and backward) and selection kernel, and dense causal SDPA, in this process.

    The backward's pieces (rows ``bwd: ...``): selection's dq pass gathers the forward's blocks
    again; its dK/dV pass reads, for every key block, the q and dO rows of each position that
    chose it (:func:`gather_reader_rows`; block 0 included, the local blocks left to the window's
    pass); compressed attention's and the window's backward at cuDNN's rate over their mean keys;
    the gate sum's backward two copies of an output (dO and the three outputs read for dgates).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from nsa.bench.prefill import _bench, _time_fwd_bwd, bench_config, dense_rows, nsa_inputs
    from nsa.functional import nsa_attention
    from nsa.ops.compressed_attention.triton import compressed_attention_triton
    from nsa.ops.compression import compress_mean
    from nsa.ops.reads import compressed_reads, window_reads
    from nsa.ops.selected_attention.triton import selected_attention_triton
    from nsa.ops.selection.triton import select_blocks_triton

    config = bench_config(head_dim, v_head_dim, num_heads, num_kv_heads)
    leaves = nsa_inputs(config, seq_len)
    q, k, v = (leaves[name].detach() for name in ("q", "k", "v"))
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

    gathers_ms, best = _best_time("gathers", shapes, lambda w, s, m: gather_selected_blocks(
        k, v, lists, select_block=sel, num_warps=w, num_stages=s, tma=m), row)
    listed = int((lists >= 0).sum())
    gib = listed * sel * (head_dim + v_head_dim) * q.element_size() / 2**30
    row("selection gathers", gathers_ms, f"{listed} blocks, {gib:.1f} GiB, best shape (warps, stages, tma) "
        f"{best}: {gib * 2**30 / gathers_ms / 1e9:.2f} TB/s")
    all_lists = blocks.to(torch.int32)
    row("selection gathers, all n", _bench(lambda: gather_selected_blocks(
        k, v, all_lists, select_block=sel, num_warps=best[0], num_stages=best[1], tma=best[2])),
        "the same over every chosen block (forced ones too): compare with the backend's selection forward")

    def dense_ms(keys: int) -> tuple[float, float | None]:
        """cuDNN SDPA, not causal, every query over ``keys`` keys: forward (and backward) ms."""
        qd, kd, vd = (torch.randn(1, num_heads, n, d, device="cuda", dtype=q.dtype, requires_grad=backward)
                      for n, d in ((seq_len, head_dim), (keys, head_dim), (keys, v_head_dim)))
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            def attend():
                return torch.nn.functional.scaled_dot_product_attention(qd, kd, vd)
            return _time_fwd_bwd(attend, [qd, kd, vd])[:2] if backward else (_bench(attend), None)

    positions = torch.arange(seq_len)
    mean_cmp = max(round(float(compressed_reads(positions, block=config.compress_block,
                                                stride=config.compress_stride).float().mean())), 1)
    mean_win = max(round(float(window_reads(positions, window=config.window).float().mean())), 1)
    cmp_ms, win_ms = dense_ms(mean_cmp), dense_ms(mean_win)
    row("compressed products", cmp_ms[0],
        f"cuDNN, not causal, {mean_cmp} keys (mean visible of {k_cmp.shape[1]})")
    row("scoring products", cmp_ms[0] / 2, "half of the compressed products (q.k only)")
    row("window products", win_ms[0], f"cuDNN, not causal, {mean_win} keys (mean visible)")
    o = torch.randn(1, seq_len, num_heads, v_head_dim, device="cuda", dtype=q.dtype)
    copy = torch.empty_like(o)
    copy_ms = _bench(lambda: copy.copy_(o))
    row("combine", copy_ms, "one copy of an output (two passes over it)")
    row("floor", sum(r.ms for r in rows if r.name in FLOOR_PIECES), "sum of: " + ", ".join(FLOOR_PIECES))
    row("nsa selection forward", _bench(lambda: selected_attention_triton(q, k, v, blocks, select_block=sel)),
        "the backend's selection attention over all n blocks (forced ones included)")

    def forward():
        return nsa_attention(leaves["q"], leaves["k"], leaves["v"], leaves["gates"], config, backend="triton")

    if backward:
        row("bwd: selection dq gathers", gathers_ms,
            "the forward's selection gathers (dq reads the same blocks)")
        # dK/dV's lists: the non-forced blocks and block 0 (the local ones lie in the window's band).
        readers = torch.cat([torch.zeros_like(lists[..., :1]), lists], dim=-1)
        do = torch.randn_like(o)
        dkdv_ms, dkdv_best = _best_time("dK/dV gathers", DKDV_SHAPES, lambda p, w, s: gather_reader_rows(
            q, do, readers, select_block=sel, num_kv_heads=num_kv_heads, positions=p, num_warps=w,
            num_stages=s), row)
        row("bwd: selection dK/dV gathers", dkdv_ms,
            f"q and dO rows of each block's readers, best shape (positions, warps, stages) {dkdv_best}")
        row("bwd: compressed products", cmp_ms[1], f"cuDNN backward, not causal, {mean_cmp} keys")
        row("bwd: window products", win_ms[1], f"cuDNN backward, not causal, {mean_win} keys")
        row("bwd: combine", 2 * copy_ms, "two copies of an output (dO and the three outputs read)")
        row("backward floor", sum(r.ms for r in rows if r.name in BACKWARD_PIECES),
            "sum of: " + ", ".join(BACKWARD_PIECES))
        nsa_fwd, nsa_bwd, _, _ = _time_fwd_bwd(forward, list(leaves.values()))
        row("nsa backward", nsa_bwd, "nsa_attention, Triton backend (nsa bench's timing)")
    else:
        with torch.no_grad():
            nsa_fwd = _bench(forward)
    row("nsa forward", nsa_fwd, "nsa_attention, Triton backend")
    for dense in dense_rows(seq_len, head_dim, v_head_dim, num_heads, num_kv_heads):
        what = dense.note or "dense baseline (nsa bench's rows)"
        row(f"{dense.impl} causal forward", dense.fwd_ms, what)
        if backward:
            row(f"{dense.impl} causal backward", dense.bwd_ms, what)
    return rows


# The pieces summed into each bound.
FLOOR_PIECES = ("selection gathers", "compressed products", "scoring products", "window products", "combine")
BACKWARD_PIECES = ("bwd: selection dq gathers", "bwd: selection dK/dV gathers", "bwd: compressed products",
                   "bwd: window products", "bwd: combine")
# Launch shapes of the dK/dV gathers: (positions per step, warps, stages).
DKDV_SHAPES = [(p, w, s) for p in (1, 4) for w in (4, 8) for s in (2, 3)]


def floor_summary(rows: list[FloorRow], nsa: str = "nsa forward", baseline: str = "sdpa-cudnn causal forward",
                  floor: str = "floor") -> dict[str, float]:
    """``{"floor_ms", "nsa_ms", "baseline_ms", "max_ratio", "nsa_ratio"}`` of one shape's rows:
    ``max_ratio`` is the baseline's time over the floor, the most any kernel of this algorithm
    gets (the decode rows: ``nsa="nsa step", baseline="dense step"``; the backward's:
    ``floor="backward floor"``, ``nsa="nsa backward"``, ``baseline="sdpa-cudnn causal backward"``)."""
    by_name = {r.name: r.ms for r in rows}
    floor_ms, nsa_ms, base = by_name[floor], by_name[nsa], by_name[baseline]
    return {"floor_ms": floor_ms, "nsa_ms": nsa_ms, "baseline_ms": base, "max_ratio": base / floor_ms,
            "nsa_ratio": base / nsa_ms}


# ----- decode: the step's bytes in its dependence order --------------------------------------------

# Rows per tile of the decode floor's reads: one selection block (l' = 64).
TILE_ROWS = 64


@triton.jit
def _read_tile_range(K, V, TILES, start, stop, acc_k, acc_v, strides, ROWS: tl.constexpr, DK: tl.constexpr,
                     DV: tl.constexpr, STAGES: tl.constexpr):
    """Adds tiles ``start + pid, start + pid + P, ... < stop`` of ``TILES`` (``[n, 3]``: batch,
    first row, head) of k and v to the accumulators; ``strides``: k's then v's (batch, row, head)."""
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh = strides
    rows = tl.arange(0, ROWS)
    for i in tl.range(start + tl.program_id(0), stop, tl.num_programs(0), num_stages=STAGES):
        b = tl.load(TILES + 3 * i).to(tl.int64)
        key = tl.load(TILES + 3 * i + 1).to(tl.int64) + rows
        h = tl.load(TILES + 3 * i + 2)
        acc_k += tl.load(K + b * stride_kb + h * stride_kh + key[:, None] * stride_kt
                         + tl.arange(0, DK)[None, :]).to(tl.float32)
        acc_v += tl.load(V + b * stride_vb + h * stride_vh + key[:, None] * stride_vt
                         + tl.arange(0, DV)[None, :]).to(tl.float32)
    return acc_k, acc_v


@triton.jit
def _read_tiles_kernel(K, V, TILES, OUT, ARRIVALS, start, split, stop,
                       stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                       ROWS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, STAGES: tl.constexpr,
                       BARRIER: tl.constexpr):
    """A persistent grid reads tiles ``[start, split)``; with ``BARRIER`` every program then waits
    until all have, and reads ``[split, stop)``. Each program writes the sum of the elements it read
    (so that no load can be dropped)."""
    strides = (stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh)
    acc_k = tl.zeros([ROWS, DK], tl.float32)
    acc_v = tl.zeros([ROWS, DV], tl.float32)
    acc_k, acc_v = _read_tile_range(K, V, TILES, start, split, acc_k, acc_v, strides, ROWS, DK, DV, STAGES)
    if BARRIER:
        # Arrivals only ever grow, by the grid size per launch: a program waits for the multiple
        # of it its own arrival completes (graph replays need no reset).
        programs = tl.num_programs(0)
        arrived = tl.atomic_add(ARRIVALS, 1) + 1
        target = ((arrived - 1) // programs + 1) * programs
        while arrived < target:
            arrived = tl.atomic_add(ARRIVALS, 0)
        acc_k, acc_v = _read_tile_range(K, V, TILES, split, stop, acc_k, acc_v, strides, ROWS, DK, DV, STAGES)
    total = tl.sum(tl.sum(acc_k, axis=1), axis=0) + tl.sum(tl.sum(acc_v, axis=1), axis=0)
    tl.store(OUT + tl.program_id(0), total)


def read_tiles(k: torch.Tensor, v: torch.Tensor, tiles: torch.Tensor, *, programs: int, start: int = 0,
               stop: int | None = None, split: int | None = None, arrivals: torch.Tensor | None = None,
               num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """Loads ``[TILE_ROWS, D]`` tiles of ``k`` and ``v`` on a persistent grid of ``programs``.

    Args:
        k: ``[B, R, HK, Dk]``, v: ``[B, R, HK, Dv]`` (``Dk``, ``Dv`` powers of two >= 16).
        tiles: int32 ``[n, 3]``: batch, first row, head of each tile (rows within ``R``).
        start, stop: the tiles read (default all).
        split: with ``arrivals`` (an int32 ``[1]`` zeroed once, one per grid size), tiles
            ``[start, split)`` are read first and the programs wait for each other before the rest:
            ``programs`` must all be resident at once (at most one per SM is safe).

    Returns:
        float32 ``[programs]``: each program's sum of the elements it read.
    """
    stop = tiles.shape[0] if stop is None else stop
    _require_powers_of_two("read_tiles", Dk=k.shape[-1], Dv=v.shape[-1])
    if tiles.dim() != 2 or tiles.shape[1] != 3 or tiles.dtype != torch.int32:
        raise ValueError(f"read_tiles: tiles must be int32 [n, 3], got {tiles.dtype} {tuple(tiles.shape)}")
    if (split is None) != (arrivals is None):
        raise ValueError("read_tiles: split and arrivals come together (the barrier needs both)")
    out = torch.empty(programs, dtype=torch.float32, device=k.device)
    barrier = split is not None
    _read_tiles_kernel[(programs,)](
        k, v, tiles, out, arrivals if barrier else out, start, split if barrier else stop, stop,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        ROWS=TILE_ROWS, DK=k.shape[-1], DV=v.shape[-1], STAGES=num_stages, BARRIER=barrier,
        num_warps=num_warps)
    return out


def decode_step_tiles(config: NSAConfig, batch: int, context: int, generator: torch.Generator | None = None,
                      ) -> tuple[torch.Tensor, int, int]:
    """The tiles one decode step reads (the new token at position ``context - 1`` of each
    sequence), over one ``[B, R, HK, D]`` layout: the compressed cache, then the selection cache,
    then the window's ring.

    Returns:
        int32 ``[n, 3]`` tiles (the compressed ones first), their count before the selection's, and
        ``R``. Compressed keys round up to whole tiles; the chosen blocks are 0, ``c - 1``, ``c``
        and ``n - 3`` others drawn at random (distinct), the window its last ``w`` rows.
    """
    if context % TILE_ROWS or config.window % TILE_ROWS or config.select_block != TILE_ROWS:
        raise ValueError(f"decode_step_tiles: context={context}, window={config.window} must be multiples of "
                         f"{TILE_ROWS} and select_block={config.select_block} equal to it")
    cmp_tiles = -(-config.num_compressed(context) // TILE_ROWS)
    cmp_rows = cmp_tiles * TILE_ROWS
    current = (context - 1) // config.select_block
    count = min(config.select_count, current + 1)
    forced = sorted({0, max(current - 1, 0), current})
    others = torch.arange(1, max(current - 1, 1))  # the blocks that are not forced
    tiles_cmp, tiles_rest = [], []
    for b in range(batch):
        for h in range(config.num_kv_heads):
            tiles_cmp += [(b, i * TILE_ROWS, h) for i in range(cmp_tiles)]
            pick = others[torch.randperm(len(others), generator=generator)[:count - len(forced)]].tolist()
            tiles_rest += [(b, cmp_rows + j * TILE_ROWS, h) for j in sorted(forced + pick)]
            tiles_rest += [(b, cmp_rows + context + r, h) for r in range(0, config.window, TILE_ROWS)]
    tiles = torch.tensor(tiles_cmp + tiles_rest, dtype=torch.int32)
    return tiles, len(tiles_cmp), cmp_rows + context + config.window


# Persistent-grid shapes of the decode floor: (programs per SM, warps, stages). The barrier runs
# one program per SM only (all must be resident at once).
READ_SHAPES = [(per_sm, w, s) for per_sm in (1, 2, 4) for w in (4, 8) for s in (2, 3)]


def decode_floor(context: int, batch: int, head_dim: int = 128, v_head_dim: int = 128,
                 shapes: list[tuple[int, int, int]] = READ_SHAPES) -> list[FloorRow]:
    """The decode step's floor at one context and batch (bf16, the paper's config, CUDA), beside
    the Triton step and the best dense SDPA (``nsa bench decode``'s rows), all in this process."""
    from nsa.bench.decode import bench_us, dense_rows, graphed, nsa_row, paper_config, read_bytes

    config = paper_config(head_dim, v_head_dim)
    gen = torch.Generator().manual_seed(context + batch)
    tiles, first_phase, rows_total = decode_step_tiles(config, batch, context, gen)
    tiles = tiles.cuda()
    k = torch.randn(batch, rows_total, config.num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(batch, rows_total, config.num_kv_heads, v_head_dim, device="cuda", dtype=torch.bfloat16)
    sms = torch.cuda.get_device_properties(k.device).multi_processor_count
    nbytes = tiles.shape[0] * TILE_ROWS * (head_dim + v_head_dim) * k.element_size()
    _, formula_bytes = read_bytes(config, batch, context, 2)
    rows, label = [], f"{context} B{batch}"

    def row(name: str, ms: float, what: str) -> None:
        rows.append(FloorRow(context, name, ms, f"{label}: {what}"))

    def graph_ms(fn) -> float:
        """``fn`` replayed from a CUDA graph, as ``nsa bench decode`` times a step."""
        replay, in_graph, note = graphed(fn)
        if not in_graph:
            raise RuntimeError(note)
        return bench_us(replay) / 1000.0

    reference = float(read_tiles(k, v, tiles, programs=1).double().sum())

    def launches(per_sm: int, warps: int, stages: int, first: int = 0, stop: int | None = None):
        return read_tiles(k, v, tiles, programs=per_sm * sms, start=first, stop=stop, num_warps=warps,
                          num_stages=stages)

    one_ms, _ = _best_time("one launch", shapes, launches, row, graph_ms, reference)
    two_ms, _ = _best_time("two launches", shapes, lambda *shape: (
        launches(*shape, stop=first_phase), launches(*shape, first=first_phase)), row, graph_ms, reference)
    arrivals = {}  # one counter per grid size: arrivals grow by the grid size per launch

    def barrier(per_sm: int, warps: int, stages: int):
        counter = arrivals.setdefault(per_sm, torch.zeros(1, dtype=torch.int32, device="cuda"))
        return read_tiles(k, v, tiles, programs=per_sm * sms, split=first_phase, arrivals=counter,
                          num_warps=warps, num_stages=stages)

    # One program per SM only: a barrier's programs must all be resident at once.
    resident = [shape for shape in shapes if shape[0] == 1]
    barrier_ms, _ = _best_time("barrier", resident, barrier, row, graph_ms, reference)
    row("empty launch", graph_ms(lambda: read_tiles(k, v, tiles, programs=sms, stop=0)),
        "the reader over no tiles, one program per SM (graph)")
    row("bytes alone", one_ms, f"{nbytes / 1e6:.1f} MB in tiles (formula {formula_bytes / 1e6:.1f}), "
        f"{nbytes / one_ms / 1e6:.0f} GB/s, no order")
    row("two launches", two_ms, "compressed tiles, then the rest (graph)")
    row("barrier", barrier_ms, "both phases in one launch, a grid barrier between")
    row("floor", min(two_ms, barrier_ms), "the faster of the dependence-respecting two")
    nsa = nsa_row(batch, context, head_dim, v_head_dim)
    row("nsa step", nsa.us / 1000.0,
        f"nsa bench decode's Triton step (graph={nsa.cuda_graph}) {nsa.note}".strip())
    dense = [d for d in dense_rows(batch, context, head_dim, v_head_dim) if d.us is not None]
    fastest = min(dense, key=lambda d: d.us)
    row("dense step", fastest.us / 1000.0, f"best dense SDPA: {fastest.impl}")
    return rows
