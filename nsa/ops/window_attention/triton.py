"""Sliding-window attention in Triton (forward and backward), FlashAttention-2 style, GQA folded.

The query at ``t`` reads keys ``max(0, t - w + 1) .. t``. A query program owns ``BT`` positions x
the ``G`` heads of one key/value head (``BLOCK_M`` rows) and walks only the key tiles of its band,
in three runs: lower edge tiles (window start masked), interior tiles (no mask at all), upper
edge tiles (causal diagonal masked). The dk/dv program owns one key tile and walks the position
tiles that read it in one masked loop (see the kernel for why). No atomics: every output element
has one writer, so results are deterministic.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from nsa.ops.triton_common import (
    LOG2E,
    GroupTunedKernel,
    attend_keys_at,
    dkdv_tile,
    dot_precision,
    kv_tile_descriptors,
    load_block,
    load_rows,
    load_rows_split,
    row_layout,
    set_kv_tile_rows,
    softmax_delta,
    softmax_finish,
    split_acc,
    split_dim,
    store_or_add_rows_split,
    store_rows,
)


@triton.jit
def _query_tiles(qa, qb, k_base, v_base, descs, lo, hi, row_pos, T, W, skt, svt, qk_scale, m_i, l_i, acc,
                 acc_b, lse2, delta_t, do_t, sel_lo, sel_hi, lse2_b, delta_b, DK: tl.constexpr,
                 DV: tl.constexpr, DK_A: tl.constexpr, DK_B: tl.constexpr, DV_PAD: tl.constexpr,
                 BN: tl.constexpr, MASKED: tl.constexpr, BACKWARD: tl.constexpr, PREC: tl.constexpr,
                 TMA: tl.constexpr, SECOND: tl.constexpr):
    for k0 in range(lo, hi, BN):
        kpos = k0 + tl.arange(0, BN)
        allowed = (kpos[None, :] <= row_pos[:, None]) & (kpos[None, :] > row_pos[:, None] - W)
        # Selection's forced blocks (SECOND; see _win_query_kernel): keys sel_lo .. sel_hi of a row.
        forced = (kpos[None, :] >= sel_lo[:, None]) & (kpos[None, :] <= sel_hi[:, None])
        m_i, l_i, acc, acc_b = attend_keys_at(k0, kpos, allowed, qa, qb, k_base, v_base, descs, T, skt, svt,
                                              qk_scale, m_i, l_i, acc, acc_b, lse2, delta_t, do_t, DK, DV,
                                              DK_A, DK_B, DV_PAD, BN, PREC, BACKWARD, MASKED, TMA,
                                              (forced, lse2_b, delta_b), SECOND)
    return m_i, l_i, acc, acc_b


@triton.jit
def _win_query_kernel(q, k, v, o, lse, do, delta, dq, lse_b, delta_b, o_b, k_desc_a, k_desc_b, v_desc,
                      sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh, slb, slt, slh,
                      T, W, qk_scale, scale,
                      HK: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                      DK_A: tl.constexpr, DK_B: tl.constexpr, DV_PAD: tl.constexpr, BN: tl.constexpr,
                      BACKWARD: tl.constexpr, DQ_ADD: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr,
                      BLOCK_M: tl.constexpr, TMA: tl.constexpr, SECOND: tl.constexpr, BS: tl.constexpr):
    """Forward (o, lse) or, with BACKWARD, dq, over the key tiles of the tile's band (with ``TMA``
    loaded through the tensor descriptors ``k_desc_a, k_desc_b, v_desc``).

    With ``SECOND`` (backward only) the dq of selection attention's forced blocks is added too,
    with selection's ``lse_b, delta_b`` (strided like ``lse``) over the same ``q, k, v, dO``
    (selection and window read one key/value tensor, and every branch the gated sum's ``dO``):
    the local blocks ``c - 1, c`` (keys ``BS * (t // BS - 1) .. t`` of the row at ``t``) in the
    tiles the window walks anyway, where the scores and ``dO V^T`` serve both branches
    (:func:`softmax_grad`; the launcher requires ``W >= 2 * BS``, so that those keys lie in every
    row's window), and block 0 in one more walk over its keys (for rows where it is not local)
    with selection's softmax alone: loaded once for the tile's ``BLOCK_M`` rows, where
    selection's walk loads it per position.

    With ``SECOND`` in the forward, selection's softmax over its forced blocks of the same ``k, v``
    is written as well (``o_b``, strided like ``o``, and ``lse_b``): keys ``BS * (t // BS - 1) .. t``
    and block 0, walked once per tile of ``BLOCK_M`` rows after the window's own keys; selection's
    forward then starts from it (:func:`nsa.ops.selected_attention.triton.selected_attention_forward`
    with ``forced``) and walks only the blocks it chose."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    descs = (k_desc_a, k_desc_b, v_desc, pid_bh // HK, pid_bh % HK)
    b = (pid_bh // HK).to(tl.int64)
    h = pid_bh % HK
    t0 = pid_t * BT
    r, row_pos, row_ok = row_layout(t0, T, G, BT, BLOCK_M)
    head = h * G + r % G
    qa, qb = load_rows_split(q + b * sqb, row_pos, head, sqt, sqh, row_ok, DK, DK_A, DK_B)
    k_base = k + b * skb + h * skh
    v_base = v + b * svb + h * svh
    if BACKWARD:
        do_t = load_rows(do + b * sob, row_pos, head, sot, soh, row_ok, DV, DV_PAD)
        lse_rows = b * slb + row_pos.to(tl.int64) * slt + head * slh
        lse2 = tl.load(lse + lse_rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
        delta_t = tl.load(delta + lse_rows, mask=row_ok, other=0.0)
        acc, acc_b = split_acc(BLOCK_M, DK_A, DK_B)
        if SECOND:
            lse2_b = tl.load(lse_b + lse_rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
            delta_bt = tl.load(delta_b + lse_rows, mask=row_ok, other=0.0)
        else:
            lse2_b, delta_bt = lse2, delta_t  # unused
    else:
        do_t = qa
        lse2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        delta_t = lse2
        acc = tl.zeros([BLOCK_M, DV_PAD], dtype=tl.float32)
        acc_b = acc
        lse2_b, delta_bt = lse2, delta_t  # unused
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    t_last = tl.minimum(t0 + BT, T) - 1
    end = t_last + 1
    end_tiles = tl.cdiv(end, BN) * BN
    lo = tl.maximum(t0 - W + 1, 0) // BN * BN
    # Interior tiles: every key is inside every row's window and at or before every row.
    full_lo = tl.minimum(tl.cdiv(tl.maximum(t_last - W + 1, 0), BN) * BN, end_tiles)
    full_hi = tl.maximum((t0 + 1) // BN * BN, full_lo)
    # Three runs of key tiles: lower edge (masked), interior (unmasked), diagonal edge (masked).
    # With SECOND (backward) the last run starts at the tile of the first row's local blocks (at
    # or below full_hi), so that it holds every key any row reads as a local one.
    local_lo = BS * (row_pos // BS - 1)
    split = full_hi
    if SECOND:  # noqa: SIM102 (nested: Triton folds a constexpr if, not an `and` of constexprs)
        if BACKWARD:
            split = tl.maximum(tl.maximum(BS * (t0 // BS - 1), 0) // BN * BN, lo)
    interior_lo = tl.minimum(full_lo, split)
    m_i, l_i, acc, acc_b = _query_tiles(qa, qb, k_base, v_base, descs, lo, interior_lo, row_pos, T, W, skt,
                                        svt, qk_scale, m_i, l_i, acc, acc_b, lse2, delta_t, do_t, local_lo,
                                        row_pos, lse2_b, delta_bt, DK, DV, DK_A, DK_B, DV_PAD, BN, True,
                                        BACKWARD, PREC, TMA, False)
    m_i, l_i, acc, acc_b = _query_tiles(qa, qb, k_base, v_base, descs, interior_lo, split, row_pos, T, W, skt,
                                        svt, qk_scale, m_i, l_i, acc, acc_b, lse2, delta_t, do_t, local_lo,
                                        row_pos, lse2_b, delta_bt, DK, DV, DK_A, DK_B, DV_PAD, BN, False,
                                        BACKWARD, PREC, TMA, False)
    m_i, l_i, acc, acc_b = _query_tiles(qa, qb, k_base, v_base, descs, split, end, row_pos, T, W, skt, svt,
                                        qk_scale, m_i, l_i, acc, acc_b, lse2, delta_t, do_t, local_lo,
                                        row_pos, lse2_b, delta_bt, DK, DV, DK_A, DK_B, DV_PAD, BN, True,
                                        BACKWARD, PREC, TMA, SECOND)
    # Block 0 for the rows where it is not local (t >= 2 BS), in one more walk with selection's
    # softmax alone over keys 0 .. min(t, BS - 1): the row positions given are those last keys
    # (-1: none), the window T + BS wide (no lower edge).
    block0_last = tl.where(row_pos >= 2 * BS, tl.minimum(row_pos, BS - 1), -1)
    if BACKWARD:
        if SECOND:
            m_i, l_i, acc, acc_b = _query_tiles(qa, qb, k_base, v_base, descs, 0, BS, block0_last, T, T + BS,
                                                skt, svt, qk_scale, m_i, l_i, acc, acc_b, lse2_b, delta_bt,
                                                do_t, local_lo, row_pos, lse2_b, delta_bt, DK, DV, DK_A, DK_B,
                                                DV_PAD, BN, True, BACKWARD, PREC, TMA, False)
        store_or_add_rows_split(dq + b * sqb, acc * scale, acc_b * scale, row_pos, head, sqt, sqh, row_ok,
                                DK, DK_A, DK_B, DQ_ADD)
    else:
        out, lse_t = softmax_finish(m_i, l_i, acc)
        store_rows(o + b * sob, out, row_pos, head, sot, soh, row_ok, DV, DV_PAD)
        lse_rows = b * slb + row_pos.to(tl.int64) * slt + head * slh
        tl.store(lse + lse_rows, lse_t, mask=row_ok)
        if SECOND:
            # Selection's forced blocks, one softmax, in one loop (one pipeline; two loops, local
            # tiles then block 0's, measured the same on an H100): block 0's tiles, then the local
            # ones from the first row's local tile (from block 0's end where they overlap). A row
            # reads keys local_lo .. t (all of 0 .. t while t < 2 BS) and block 0's up to
            # block0_last.
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, DV_PAD], dtype=tl.float32)
            block0_end = tl.cdiv(BS, BN) * BN
            local_from = tl.maximum(tl.maximum(BS * (t0 // BS - 1), 0) // BN * BN, block0_end)
            tiles = block0_end // BN + tl.maximum(tl.cdiv(end - local_from, BN), 0)
            for tile in range(tiles):
                k0 = tile * BN
                k0 = tl.where(k0 < block0_end, k0, k0 - block0_end + local_from)
                kpos = k0 + tl.arange(0, BN)
                allowed = (kpos[None, :] <= row_pos[:, None]) & ((kpos[None, :] >= local_lo[:, None])
                                                                 | (kpos[None, :] <= block0_last[:, None]))
                m_i, l_i, acc, acc_b = attend_keys_at(
                    k0, kpos, allowed, qa, qb, k_base, v_base, descs, T, skt, svt, qk_scale, m_i, l_i, acc,
                    acc, lse2, delta_t, do_t, DK, DV, DK_A, DK_B, DV_PAD, BN, PREC, BACKWARD, True, TMA)
            out, lse_t = softmax_finish(m_i, l_i, acc)
            store_rows(o_b + b * sob, out, row_pos, head, sot, soh, row_ok, DV, DV_PAD)
            tl.store(lse_b + lse_rows, lse_t, mask=row_ok)


@triton.jit
def _win_dkdv_kernel(q, k, v, do, lse, delta, dk, dv,
                     sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh, slb, slt, slh,
                     T, W, qk_scale, scale,
                     HK: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                     DK_A: tl.constexpr, DK_B: tl.constexpr, DV_PAD: tl.constexpr, BN: tl.constexpr,
                     PREC: tl.constexpr, BT: tl.constexpr, BLOCK_M: tl.constexpr, KEYS_AS_M: tl.constexpr,
                     ADD: tl.constexpr):
    """dk, dv of one key tile over the positions k0 .. k0 + BN - 2 + W that read it; with
    ``KEYS_AS_M`` its dots take the key tile as M (see :func:`softmax_grad_keys`). With ``ADD``
    they are added to what ``dk, dv`` hold (another branch's gradients of the same keys/values,
    added in float32, rounded once)."""
    k0 = tl.program_id(0) * BN
    pid_bh = tl.program_id(1)
    b = (pid_bh // HK).to(tl.int64)
    h = pid_bh % HK
    kpos = k0 + tl.arange(0, BN)
    k_base = k + b * skb + h * skh
    ka, kb = load_rows_split(k_base, kpos, kpos * 0, skt, 0, kpos < T, DK, DK_A, DK_B)
    vb = load_block(v + b * svb + h * svh, kpos, T, svt, DV, DV_PAD)
    r = tl.arange(0, BLOCK_M)
    head = h * G + r % G
    dk_acc, dk_acc_b = split_acc(BN, DK_A, DK_B)
    dv_acc = tl.zeros([BN, DV_PAD], dtype=tl.float32)
    end = tl.minimum(T, tl.minimum(k0 + BN, T) - 1 + W)
    # One masked walk over the band. Three runs (masked edges, an unmasked interior) computed
    # fewer masks but pipelined three loops: 36 asynchronous copies and 40 bytes of spills per
    # thread against 12 and 24 (sm_90, Triton 3.6, 32 rows x 128 keys); H100, twentieth session:
    # 64k 7.29 -> 6.08 ms at 64/4 heads, 1.70 -> 1.57 at 16/4, 8k 0.92 -> 0.77, outputs bitwise equal.
    # (Selection's local blocks are not taken on here as in the query kernel: a second
    # walk over their readers with selection's lse made this pass 6.1 -> 8.0-8.7 ms at 64k 64/4,
    # more than the 1.25 ms their share costs selection's own dK/dV pass; twenty-first session.)
    q_base, do_base, lse_base, delta_base = q + b * sqb, do + b * sob, lse + b * slb, delta + b * slb
    for p0 in range(k0, end, BT):
        row_pos = p0 + r // G
        row_ok = (r < BT * G) & (row_pos < T)
        qa, qb = load_rows_split(q_base, row_pos, head, sqt, sqh, row_ok, DK, DK_A, DK_B)
        do_t = load_rows(do_base, row_pos, head, sot, soh, row_ok, DV, DV_PAD)
        rows = row_pos.to(tl.int64) * slt + head * slh
        lse2 = tl.load(lse_base + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
        delta_t = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        allowed = ((kpos[None, :] <= row_pos[:, None]) & (row_pos[:, None] < kpos[None, :] + W)
                   & row_ok[:, None])
        allowed_t = ((kpos[:, None] <= row_pos[None, :]) & (row_pos[None, :] < kpos[:, None] + W)
                     & row_ok[None, :])
        dk_acc, dk_acc_b, dv_acc = dkdv_tile(qa, qb, do_t, lse2, delta_t, ka, kb, vb, allowed, allowed_t,
                                             qk_scale, dk_acc, dk_acc_b, dv_acc, DK_B, PREC, True, KEYS_AS_M)
    kvalid = kpos < T
    # dk/dv are allocated like k/v (empty_like of contiguous tensors), so k's strides address dk.
    store_or_add_rows_split(dk + b * skb + h * skh, dk_acc * scale, dk_acc_b * scale, kpos, kpos * 0, skt, 0,
                            kvalid, DK, DK_A, DK_B, ADD)
    store_or_add_rows_split(dv + b * svb + h * svh, dv_acc, dv_acc, kpos, kpos * 0, svt, 0, kvalid, DV,
                            DV_PAD, 0, ADD)


# (rows, warps, stages[, constexprs]); the first of each list won scripts/gpu/tune_kernels.py
# (H200, G=16, 64k: dK/dV 7.7 ms with 64 rows x 64 keys against 9.7 with 32 x 64 and 12.3 with
# the first choice; 128-key tiles, which helped compressed attention's dK/dV, were 11-19 ms here).
# (64, 4, 3) with 32-key steps: the fastest forward at 16/4 heads and dq at 64/4 (H100, 64k,
# fourteenth session: 0.92 against 1.00 ms, 4.26 against 4.35).
# TMA_OPTIONS: the same walks with the key/value tiles loaded by the TMA (the launcher passes
# descriptors where it can, rows sized to each config's BN by the pre_hook; elsewhere the pointer
# options run). H100, seventeenth session, 64k, 64/4 heads: forward 3.61 -> 3.24 ms ((64, 4, 3)
# with 32-key steps), dq 4.13 -> 3.84 ((64, 4, 2)). Pointer options first: the interpreter runs
# the first option.
TMA_OPTIONS = [(64, 4, 2, {"TMA": True}), (128, 8, 2, {"TMA": True}), (128, 8, 3, {"TMA": True}),
               (64, 4, 3, {"BN": 32, "TMA": True})]
_query_kernel = GroupTunedKernel(_win_query_kernel,
                                 [(64, 4, 2), (128, 8, 2), (128, 8, 3), (64, 4, 3, {"BN": 32}), *TMA_OPTIONS],
                                 key=["G", "DK", "DV", "BACKWARD", "SECOND"], extra={"BN": 64, "TMA": False},
                                 pre_hook=functools.partial(set_kv_tile_rows, rows="BN",
                                                            names=("k_desc_a", "k_desc_b", "v_desc")))
# dK/dV with keys as the M of the dots (KEYS_AS_M, compressed attention's dK/dV form): measured
# on an H100 (fourteenth session, tune_kernels.py --only win at 8k and 64k, 64/4 and 16/4 heads),
# 32 rows x 128 keys on 8 warps, 3 stages won at 64/4 (64k 7.17 ms against 8.14 for the best of
# the former list; 8k 0.90 against 1.04), 64 x 64 on 4 warps at 16/4 (1.70 against 2.14; 0.22
# against 0.29). (32, 4, 3) and (64, 4, 2) stay for the head dims not swept (192/128), and
# (32, 8, 2), never the fastest, as the option that spills nothing (the compile suite's rule: the
# first option spills 72 bytes per thread under Triton 3.9, 40 under 3.6 in the three-run walk;
# none and 24 since the single masked loop).
_dkdv_kernel = GroupTunedKernel(_win_dkdv_kernel, [(32, 8, 3, {"KEYS_AS_M": True, "BN": 128}),
                                                   (64, 4, 2, {"KEYS_AS_M": True}), (32, 4, 3), (64, 4, 2),
                                                   (32, 8, 2)],
                                key=["G", "DK", "DV", "ADD"], extra={"BN": 64, "KEYS_AS_M": False})


class SelectionForcedBlocks(NamedTuple):
    """Selection attention's forced blocks (0, ``c - 1`` and ``c`` of the query at ``t``, ``c = t //
    block``), whose dq share the window's dq pass takes on where both branches read one
    key/value tensor (see :func:`_win_query_kernel`): selection's ``lse`` and ``delta`` (float32
    ``[B, T, HQ]``, strided like the window's) and its block length."""

    lse: torch.Tensor
    delta: torch.Tensor
    block: int


def _meta(q, k, v):
    num_kv = k.shape[2]
    dk, dv = q.shape[-1], v.shape[-1]
    dk_a, dk_b = split_dim(dk)
    return dict(HK=num_kv, G=q.shape[2] // num_kv, DK=dk, DV=dv, DK_A=dk_a, DK_B=dk_b,
                DV_PAD=triton.next_power_of_2(dv), PREC=dot_precision(q.dtype))


def _forced_args(forced: SelectionForcedBlocks | None, lse: torch.Tensor, delta: torch.Tensor, window: int):
    """``(lse_b, delta_b, SECOND, BS)`` of the query kernel for ``forced`` (placeholders for ``None``)."""
    if forced is None:
        return lse, delta, False, 16
    if window < 2 * forced.block:
        raise ValueError(f"forced: selection's local blocks (2 x {forced.block} keys) must lie in the "
                         f"window, got window={window}; accepted: window >= {2 * forced.block}")
    for name, x in (("lse", forced.lse), ("delta", forced.delta)):
        if x.shape != lse.shape or x.stride() != lse.stride() or x.dtype != torch.float32:
            raise ValueError(f"forced.{name}: float32 shaped and strided like the window's lse "
                             f"{tuple(lse.shape)} {lse.stride()}, got {x.dtype} {tuple(x.shape)} "
                             f"{x.stride()}")
    return forced.lse, forced.delta, True, forced.block


def _query_pass(q, k, v, window, scale, *, lse=None, do=None, delta=None, dq=None, forced=None,
                forced_block=None):
    """Forward when ``do is None`` (returns o, lse; with ``forced_block`` also selection's
    forced-block softmax o, lse), else dq (added to ``dq`` when given; with ``forced``,
    selection's forced-block share added too)."""
    batch, seq_len, num_heads, _ = q.shape
    meta = _meta(q, k, v)
    backward = do is not None
    dq_add = dq is not None
    o_b = None
    if backward:
        dq = dq if dq_add else torch.empty_like(q)
        o = do  # unused by the dq pass; do's strides are the output's
        lse_b, delta_b, second, select_block = _forced_args(forced, lse, delta, window)
    else:
        o = q.new_empty(batch, seq_len, num_heads, v.shape[-1])
        lse = torch.empty(batch, seq_len, num_heads, dtype=torch.float32, device=q.device)
        do, delta, dq = o, lse, q  # unused in the forward
        second, select_block = forced_block is not None, forced_block or 16
        # Selection's forced-block softmax (its own tensors), else placeholders.
        o_b = torch.empty_like(o) if second else None
        lse_b, delta_b = (torch.empty_like(lse) if second else lse), lse

    def grid(cfg):
        return (triton.cdiv(seq_len, cfg["BT"]), batch * meta["HK"])

    # Rows set per config (BN) by the kernel's pre_hook; the tensors stand in where there are none.
    descs = kv_tile_descriptors(k, v, 64, (meta["DK_A"], meta["DK_B"]), meta["DV_PAD"],
                                _query_kernel.reads_descriptors())
    _query_kernel(grid, q, k, v, o, lse, do, delta, dq, lse_b, delta_b, o if o_b is None else o_b,
                  *(descs or (k, k, v)),
                  *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], *lse.stride(), seq_len,
                  window, scale * LOG2E, scale, BACKWARD=backward, DQ_ADD=dq_add, SECOND=second,
                  BS=select_block, seq_len=seq_len, tma=descs is not None,
                  restore=("dq",) if dq_add else (), **meta)  # in place: dq when it adds to another's
    if backward:
        return dq
    return (o, lse) if o_b is None else (o, lse, o_b, lse_b)


def _dkdv_pass(q, k, v, do, lse, delta, window, scale, add_to=None):
    batch, seq_len = q.shape[:2]
    meta = _meta(q, k, v)
    if add_to is None:
        dk, dv = torch.empty_like(k), torch.empty_like(v)
    else:
        dk, dv = add_to
        for name, grad, like in (("dk", dk, k), ("dv", dv, v)):
            if (grad.shape, grad.dtype, grad.stride()) != (like.shape, like.dtype, like.stride()):
                raise ValueError(f"add_to: {name} must be shaped, typed and strided like {tuple(like.shape)} "
                                 f"{like.dtype} {like.stride()}, got {tuple(grad.shape)} {grad.dtype} "
                                 f"{grad.stride()}")

    def grid(cfg):
        return (triton.cdiv(seq_len, cfg["BN"]), batch * meta["HK"])

    _dkdv_kernel(grid, q, k, v, do, lse, delta, dk, dv, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                 *do.stride()[:3], *lse.stride(), seq_len, window, scale * LOG2E, scale,
                 ADD=add_to is not None, seq_len=seq_len,
                 restore=("dk", "dv") if add_to is not None else (), **meta)  # in place: the sums
    return dk, dv


class _WindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window, scale):
        o, lse = window_attention_forward(q, k, v, window, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.window, ctx.scale = window, scale
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        do = do.contiguous()
        dq, dk, dv = window_attention_backward(q, k, v, lse, do, softmax_delta(o, do, dlse), ctx.window,
                                               ctx.scale)
        return dq, dk, dv, None, None


def window_attention_forward(q, k, v, window: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``o, lse`` of contiguous ``q, k, v`` (no autograd): the forward kernel alone."""
    return _query_pass(q, k, v, window, scale)


def window_attention_forward_with_forced(q, k, v, window: int, scale: float, select_block: int):
    """:func:`window_attention_forward`'s ``o, lse`` and, over the same ``k, v``, selection
    attention's softmax over each query's forced blocks alone (0, ``c - 1``, ``c`` of the query at
    ``t``, ``c = t // select_block``): ``o_forced [B, T, HQ, Dv]`` in ``q.dtype`` and ``lse_forced
    [B, T, HQ]`` float32, which selection's forward completes with the blocks it chose
    (:func:`nsa.ops.selected_attention.triton.selected_attention_forward`'s ``forced``). Their keys
    are loaded once per tile of positions here, where selection's walk loads them per position."""
    if select_block < 1 or select_block & (select_block - 1):
        raise ValueError(f"select_block: a power of two, got {select_block}")
    return _query_pass(q, k, v, window, scale, forced_block=select_block)


def window_attention_backward(q, k, v, lse, do, delta, window: int, scale: float, dq=None):
    """``dq, dk, dv`` (no autograd) from contiguous ``q, k, v``, ``do`` (strided like the output),
    ``lse`` and ``delta`` float32 ``[B, T, HQ]`` (:func:`softmax_delta`'s). With ``dq`` given the
    query gradient is added to it in place (a float32 sum rounded once) and returned."""
    dq = window_attention_backward_dq(q, k, v, lse, do, delta, window, scale, dq=dq)
    dk, dv = window_attention_backward_dkdv(q, k, v, lse, do, delta, window, scale)
    return dq, dk, dv


def window_attention_backward_dq(q, k, v, lse, do, delta, window: int, scale: float, dq=None,
                                 forced: SelectionForcedBlocks | None = None):
    """The ``dq`` of :func:`window_attention_backward` alone; with ``forced``, selection attention's
    share from its forced blocks added (``window >= 2 * forced.block``; same ``q, k, v, do``)."""
    return _query_pass(q, k, v, window, scale, lse=lse, do=do, delta=delta, dq=dq, forced=forced)


def window_attention_backward_dkdv(q, k, v, lse, do, delta, window: int, scale: float, add_to=None):
    """The ``dk, dv`` of :func:`window_attention_backward` alone; with ``add_to = (dk, dv)`` (another
    branch's gradients of the same ``k, v``, laid out like them) added to those in place, which
    are returned."""
    return _dkdv_pass(q, k, v, do, lse, delta, window, scale, add_to)


def window_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int,
                            scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal sliding-window attention (Triton): the query at ``t`` reads keys ``max(0, t-w+1)..t``.

    Same function as :func:`nsa.ops.window_attention.naive.window_attention` with
    ``q_offset = k_offset = 0``; differentiable w.r.t. ``q, k, v`` (and through ``lse``).

    Args:
        q: ``[B, T, HQ, Dk]`` float16/bfloat16/float32.
        k: ``[B, T, HK, Dk]``, ``HQ % HK == 0``, same dtype.
        v: ``[B, T, HK, Dv]``, same dtype.
        window: ``w >= 1``, current token included.
        scale: defaults to ``1/sqrt(Dk)``.

    Returns:
        ``o [B, T, HQ, Dv]`` in ``q.dtype`` and ``lse [B, T, HQ]`` float32 (natural log).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    # Contiguous so that o, do and dq (and q) share one set of strides in the kernels.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _WindowAttention.apply(q, k, v, int(window), scale)
