"""Triton decode step: NSA for a few new tokens per sequence, read straight from the caches.

Same function as :func:`nsa.ops.decode.naive.nsa_decode_reference` (same arguments). Every
program owns one new token of one sequence and one key/value head (grid axis 0, so any batch fits), i.e. the ``G`` query heads of
a GQA group (the M dimension of its ``tl.dot``, padded to ``GP >= 16`` rows), so each key/value
tile is loaded once for the whole group. The key range of each branch is split across programs
(flash-decoding): program ``(split, row)`` writes a partial ``(o, log2-sum-exp, keys counted)``
and one combine kernel merges the splits, applies the gates and writes the output and the reads.

A step is four launches and no host synchronisation, so it can be captured in a CUDA graph
(shapes and the split plan depend only on tensor shapes):

1. ``_range_kernel``: the two contiguous key ranges in one launch: compressed attention over
   ``[0, num_cmp(t + 1))`` (the first splits of grid axis 1) and window attention over
   ``max(0, t - w + 1) .. t`` read from the ring (the other splits). With
   ``DecodePlan.window_overlap`` the window splits are a second launch on a side stream instead,
   joined before the combine (the capture of a CUDA graph forks and joins the same way).
2. ``_score_kernel``: ``p_cmp = exp2(q.k * scale * log2e - lse)`` with the merged log-sum-exp of
   1, summed over the group's heads (Eq. 10) and mapped to selection blocks by Eq. 9 (the second
   pass over the compressed keys); it writes one int64 ranking key per block: float bits of the
   score above ``2^31 - 1 - j``, +inf bits for the forced blocks 0, c, c-1, ``-1`` for blocks that
   cannot be chosen. Larger key = better block, equal scores rank the lower index first: exactly
   the reference's stable sort.
3. ``_select_kernel``: top-n of those keys (the n-th largest by a bitonic top-k or by removing
   the maximum ``n - 1`` times, ``DecodePlan.top_n``; the chosen blocks in ascending order by a
   prefix sum), then selection attention over the positions ``<= t`` of
   the chosen blocks of its slots, read from the selection cache; it writes the block indices.
4. ``_combine_kernel`` (one program per query head): merge each branch's splits, gate, sum;
   reads = keys counted.

The read counters are the number of key positions whose masks were on in the tiles each branch
loaded, summed over splits: counted from the ranges used, not from the formula.

With ``DecodePlan.pdl`` (sm_90 and later; opt-in until timed) launches 2-4 are programmatic
dependent launches: each kernel's programs may be scheduled while the previous one finishes and
wait for its writes at their first instruction (``_wait_for_previous_kernel``), to hide the
launch latency that dominates a batch-1 step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from nsa.config import NSAConfig
from nsa.ops import streams
from nsa.ops.decode.naive import BRANCH_NAMES, check_decode_inputs
from nsa.ops.selection.triton import eq9_dot
from nsa.ops.triton_common import interpreting

LOG2E = 1.4426950408889634
# Split counts, chunk sizes and buffer widths change with every shape; not specialising on them
# (divisibility by 16, == 1) keeps a sweep of shapes to a few compiles per kernel.
INDEX_BITS = tl.constexpr(0x7FFFFFFF)
FORCED_KEY_HIGH = tl.constexpr(0x7F800000 << 32)  # float bits of +inf above the index bits
MAX_SPLITS = 64
WINDOW_OVERLAPS = ("none", "compressed", "scoring")
TOP_N_METHODS = ("bitonic", "max-removal")
# Software-pipeline depth of the key loops (range and select kernels): tiles in flight per program
# (decode_stages). A program whose chunk is at most two tiles (batch 1 at long contexts: one tile
# each) gets 2: the third buffer only costs occupancy (H200, 64k, batch 1: 31.2 against 33.5 us per
# step). Longer chunks (batch 32) get 3 only at head dims above 128 (see decode_stages).
DECODE_STAGES = 3
SHORT_CHUNK_STAGES = 2
# Tiles per program of the fused scoring at most. Its steps are short and latency-bound (a few
# loads of tile sums, no keys), unlike the other branches' bandwidth-bound ones, so it does not
# share their program count: at batch 32 (64k) that gave 3 programs per token group of 22
# serial steps each, 12.6-17.8 us of a 187 us step (H100, nineteenth session).
FUSED_SCORE_STEPS = 4




def pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


@triton.jit
def _wait_for_previous_kernel(PDL: tl.constexpr):
    """With programmatic dependent launch this program may run before the previous kernel of the
    stream has finished: wait until its writes are visible, then allow the step's next kernel to
    be scheduled (its programs wait here in turn, so every earlier kernel has finished too).
    Called first thing by every decode kernel: correct whether or not the launch was programmatic."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _token(pid_r, KQ, HK, LENGTHS, NUM_NEW):
    """Sequence, new-token row, kv head, absolute position and validity of program row ``pid_r``."""
    b = pid_r // (KQ * HK)
    i = (pid_r // HK) % KQ
    h = pid_r % HK
    length = tl.load(LENGTHS + b).to(tl.int32)
    count = tl.load(NUM_NEW + b).to(tl.int32)
    return b, i, h, length - count + i, i < count


@triton.jit
def _load_group_queries(Q, b, i, h, stride_qb, stride_qt, stride_qh,
                        G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr, DKP: tl.constexpr):
    g = tl.arange(0, GP)
    dk = tl.arange(0, DKP)
    head = (h * G + g).to(tl.int64)
    return tl.load(Q + b.to(tl.int64) * stride_qb + i.to(tl.int64) * stride_qt + head[:, None] * stride_qh
                   + dk[None, :], mask=(g < G)[:, None] & (dk < DK)[None, :], other=0.0)


@triton.jit
def _attend(q, acc, m_i, l_i, k_base, v_base, rows, kmask, stride_kn, stride_vn, qk_scale,
            DK: tl.constexpr, DKP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, PRECISION: tl.constexpr):
    """Online-softmax update (base 2) of the group's rows with the keys at cache ``rows`` where ``kmask``."""
    dk = tl.arange(0, DKP)
    dv = tl.arange(0, DVP)
    rows64 = rows.to(tl.int64)
    k = tl.load(k_base + rows64[:, None] * stride_kn + dk[None, :], mask=kmask[:, None] & (dk < DK)[None, :],
                other=0.0)
    v = tl.load(v_base + rows64[:, None] * stride_vn + dv[None, :], mask=kmask[:, None] & (dv < DV)[None, :],
                other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    s = tl.where(kmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no key keeps m = -inf; shifting by 0 keeps exp2 finite (it gives 0).
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(s - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i, s


@triton.jit
def _store_partial(acc, m_i, l_i, counted, O_PART, LSE_PART, CNT_PART, part, GP: tl.constexpr, DVP: tl.constexpr):
    """A split's normalised output, log2-sum-exp2 (``-inf`` where it saw no key) and keys counted."""
    g = tl.arange(0, GP)
    dv = tl.arange(0, DVP)
    seen = l_i > 0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    part = part.to(tl.int64)
    tl.store(O_PART + (part * GP + g[:, None]) * DVP + dv[None, :], o)
    tl.store(LSE_PART + part * GP + g, lse)
    tl.store(CNT_PART + part, tl.sum(counted))


@triton.jit(do_not_specialize=["N_TILES", "CMP_CHUNK", "CMP_SPLITS", "WIN_CHUNK", "WIN_SPLITS", "SPLIT_BASE"])
def _range_kernel(Q, KC, VC, KW, VW, LENGTHS, NUM_NEW, O_CMP, L_CMP, C_CMP, O_WIN, L_WIN, C_WIN, P_TILE, M_TILE,
                  KQ, HK, RING, N_TILES,
                  stride_qb, stride_qt, stride_qh, stride_kcb, stride_kcn, stride_kch, stride_vcb, stride_vcn,
                  stride_vch, stride_kwb, stride_kwn, stride_kwh, stride_vwb, stride_vwn, stride_vwh, qk_scale,
                  CMP_CHUNK, CMP_SPLITS, WIN_CHUNK, WIN_SPLITS, SPLIT_BASE,
                  G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr, DKP: tl.constexpr,
                  DV: tl.constexpr, DVP: tl.constexpr, BLOCK: tl.constexpr, STRIDE: tl.constexpr,
                  WINDOW: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                  FUSED: tl.constexpr, SELECT_BLOCK: tl.constexpr, NBT: tl.constexpr, PDL: tl.constexpr):
    """Partial compressed attention (splits ``0 .. CMP_SPLITS-1`` of axis 1) or window attention
    (the next ``WIN_SPLITS``) of token group ``program_id(0)``: one launch for both contiguous
    key ranges, the branch picked per program by scalar selects rather than divergent code.
    Split ``program_id(1) + SPLIT_BASE``: a launch of only the window splits (``SPLIT_BASE =
    CMP_SPLITS``) can run on another stream (``DecodePlan.window_overlap``).

    With ``FUSED`` the compressed programs also write, per tile ``u`` of ``BLOCK_N`` compressed
    tokens, the Eq. 9 block sums of ``exp2(s - m_u)`` per head (``P_TILE [rows, N_TILES, GP, J+1]``)
    and the tile maxima ``m_u`` (``M_TILE [rows, N_TILES, GP]``): slot ``k < J = BLOCK_N / a`` is
    block ``u*J + k``, slot ``J`` the part of block ``(u+1)*J`` whose window starts in this tile.
    Scaled by ``exp2(m_u - lse)`` they give ``p_slc`` without reading the compressed keys again.
    """
    _wait_for_previous_kernel(PDL)
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1) + SPLIT_BASE
    is_win = pid_s >= CMP_SPLITS
    split = tl.where(is_win, pid_s - CMP_SPLITS, pid_s)
    b, i, h, t, valid = _token(pid_r, KQ, HK, LENGTHS, NUM_NEW)
    q = _load_group_queries(Q, b, i, h, stride_qb, stride_qt, stride_qh, G, GP, DK, DKP)
    # Compressed: tokens [0, num_cmp(t + 1)) of the compressed cache. Window: positions
    # max(0, t - w + 1) .. t, position p at ring slot p % RING.
    visible = tl.where(valid & (t + 1 >= BLOCK), (t + 1 - BLOCK) // STRIDE + 1, 0)
    cmp_lo = split * CMP_CHUNK
    win_lo = tl.maximum(t - WINDOW + 1, 0) + split * WIN_CHUNK
    lo = tl.where(is_win, win_lo, cmp_lo)
    hi = tl.where(is_win, tl.where(valid, tl.minimum(win_lo + WIN_CHUNK, t + 1), win_lo),
                  tl.minimum(cmp_lo + CMP_CHUNK, visible))
    ring = tl.where(is_win, RING, 1 << 30)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    k_base = tl.where(is_win, KW + b64 * stride_kwb + h64 * stride_kwh, KC + b64 * stride_kcb + h64 * stride_kch)
    v_base = tl.where(is_win, VW + b64 * stride_vwb + h64 * stride_vwh, VC + b64 * stride_vcb + h64 * stride_vch)
    stride_kn = tl.where(is_win, stride_kwn, stride_kcn)
    stride_vn = tl.where(is_win, stride_vwn, stride_vcn)
    acc = tl.zeros([GP, DVP], dtype=tl.float32)
    m_i = tl.full([GP], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    counted = tl.zeros([BLOCK_N], dtype=tl.int32)
    cols = tl.arange(0, BLOCK_N)
    g = tl.arange(0, GP)
    kk = tl.arange(0, NBT)
    A: tl.constexpr = SELECT_BLOCK // STRIDE
    B: tl.constexpr = BLOCK // STRIDE
    J: tl.constexpr = BLOCK_N // A
    # Eq. 9 weights of one tile: token i, block slot k: #{(m, u): m - u = i - a*k}, 0 <= m < a, 0 <= u < b.
    # Exact in float16 (w <= min(a, b) <= 2048, checked by plan_decode) for eq9_dot's tensor-core dots.
    r = cols[:, None] - A * kk[None, :]
    w = tl.minimum(B - 1, A - 1 - r) - tl.maximum(0, -r) + 1
    w = tl.where(kk[None, :] <= J, tl.maximum(w, 0), 0).to(tl.float16)
    # Window programs compute but never store tile sums (a tensor mask, not a 0-d one).
    tile_rows = tl.where(is_win, 0, GP)
    tile_base = pid_r.to(tl.int64) * N_TILES
    for start in range(lo, hi, BLOCK_N):
        positions = start + cols
        kmask = positions < hi
        acc, m_i, l_i, s = _attend(q, acc, m_i, l_i, k_base, v_base, positions % ring, kmask, stride_kn,
                                   stride_vn, qk_scale, DK, DKP, DV, DVP, PRECISION)
        counted += kmask.to(tl.int32)
        if FUSED:
            m_tile = tl.max(s, 1)
            e = tl.exp2(s - tl.where(m_tile == float("-inf"), 0.0, m_tile)[:, None])
            # Two fp16 tensor-core dots to float32 accuracy, not an fp32 FMA dot: the latter ran
            # on the CUDA cores with layout conversions through shared memory in every tile.
            sums = eq9_dot(e, w)
            tile = tile_base + start // BLOCK_N
            tl.store(P_TILE + (tile * GP + g[:, None]) * (J + 1) + kk[None, :], sums,
                     mask=(g[:, None] < tile_rows) & (kk[None, :] <= J))
            tl.store(M_TILE + tile * GP + g, m_tile, mask=g < tile_rows)
    part = pid_r * tl.where(is_win, WIN_SPLITS, CMP_SPLITS) + split
    _store_partial(acc, m_i, l_i, counted, tl.where(is_win, O_WIN, O_CMP), tl.where(is_win, L_WIN, L_CMP),
                   tl.where(is_win, C_WIN, C_CMP), part, GP, DVP)


@triton.jit
def _nth_largest_key(keys, COUNT: tl.constexpr, COUNTP: tl.constexpr, NBP: tl.constexpr,
                     BITONIC: tl.constexpr):
    """The ``COUNT``-th largest of ``keys`` ([NBP] int64; valid keys distinct and >= 0, the rest
    -1), or -1 when fewer than ``COUNT`` are valid: the blocks ``>=`` it and valid are the top-n.

    ``BITONIC``: ``tl.topk``, a bitonic top-k (sorted runs of ``COUNTP``, halved by pairwise
    maxima), whose steps stay within a thread or a warp until the last few, but whose work grows
    with the keys each thread holds. Otherwise the maximum is removed ``COUNT - 1`` times: a
    cross-warp reduction (shared memory, barriers) per removal, 15 in a row at the paper's n.
    :func:`top_n_method` picks one.
    """
    if BITONIC:
        if COUNTP > NBP:  # fewer blocks than slots: every valid block is chosen
            top = tl.full([COUNTP], -1, tl.int64)
        else:
            top = tl.topk(keys, COUNTP)  # descending
        rank = tl.arange(0, COUNTP)
        threshold = tl.max(tl.where(rank == COUNT - 1, top, -1), 0)
    else:
        # Valid keys are distinct, so COUNT - 1 removals leave the COUNT-th largest (-1 when
        # fewer blocks can be chosen, which then takes every valid one).
        threshold = tl.max(keys, 0)
        work = keys
        for _removed in range(COUNT - 1):
            work = tl.where(work == threshold, -1, work)
            threshold = tl.max(work, 0)
    return threshold


@triton.jit(do_not_specialize=["NB_CAP", "CHUNK", "SPLITS"])
def _select_kernel(Q, KS, VS, KEYS, BLOCKS, LENGTHS, NUM_NEW, O_SLC, L_SLC, C_SLC, KQ, HK, NB_CAP,
                   stride_qb, stride_qt, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
                   qk_scale, CHUNK, SPLITS,
                   G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr, DKP: tl.constexpr,
                   DV: tl.constexpr, DVP: tl.constexpr, SELECT_BLOCK: tl.constexpr, COUNT: tl.constexpr,
                   COUNTP: tl.constexpr, NBP: tl.constexpr, BITONIC: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    """Top-n of token group ``program_id(0)``'s ranking keys, then partial selection attention over
    the chosen blocks of slots ``[s*CHUNK, (s+1)*CHUNK)``, ``s = program_id(1)``.

    Every split recomputes the (cheap, <= a few thousand keys) top-n rather than waiting for
    another launch, and writes the block indices of its own slots.
    """
    _wait_for_previous_kernel(PDL)
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    b, i, h, t, valid = _token(pid_r, KQ, HK, LENGTHS, NUM_NEW)
    q = _load_group_queries(Q, b, i, h, stride_qb, stride_qt, stride_qh, G, GP, DK, DKP)
    jj = tl.arange(0, NBP)
    keys = tl.load(KEYS + pid_r.to(tl.int64) * NB_CAP + jj, mask=jj < NB_CAP, other=-1)
    threshold = _nth_largest_key(keys, COUNT, COUNTP, NBP, BITONIC)
    chosen = (keys >= threshold) & (keys >= 0)
    slot_of = tl.cumsum(chosen.to(tl.int32), 0) - 1  # ascending block order
    acc = tl.zeros([GP, DVP], dtype=tl.float32)
    m_i = tl.full([GP], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    counted = tl.zeros([BLOCK_N], dtype=tl.int32)
    k_base = KS + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = VS + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    cols = tl.arange(0, BLOCK_N)
    first, last = pid_s * CHUNK, tl.minimum(pid_s * CHUNK + CHUNK, COUNT)
    row_blocks = BLOCKS + pid_r.to(tl.int64) * COUNT
    # This split's slots: each chosen block is stored straight to its slot, the slots past the
    # chosen ones get -1; the loop then reads its block from there. (Searching the chosen blocks
    # for each slot's index took a cross-warp reduction over all NBP keys per slot.)
    tl.store(row_blocks + slot_of, jj.to(tl.int64), mask=chosen & (slot_of >= first) & (slot_of < last))
    n_chosen = tl.sum(chosen.to(tl.int32), 0)
    cc = tl.arange(0, COUNTP)
    tl.store(row_blocks + cc, tl.full([COUNTP], -1, tl.int64),
             mask=(cc >= n_chosen) & (cc >= first) & (cc < last))
    tl.debug_barrier()  # the stores above, from any thread, are read back by every thread below
    for slot in range(first, last):
        j = tl.load(row_blocks + slot).to(tl.int32)
        positions = j * SELECT_BLOCK + cols
        # Positions j*l' .. min(t, j*l' + l' - 1); padding slots (-1) and padding tokens read none.
        span = tl.where((j >= 0) & valid, tl.minimum(t + 1 - j * SELECT_BLOCK, SELECT_BLOCK), 0)
        kmask = cols < span
        # (a name of its own: Triton types loop-carried names, and _ is the loop index above)
        acc, m_i, l_i, _logits = _attend(q, acc, m_i, l_i, k_base, v_base, positions, kmask, stride_kn,
                                         stride_vn, qk_scale, DK, DKP, DV, DVP, PRECISION)
        counted += kmask.to(tl.int32)
    _store_partial(acc, m_i, l_i, counted, O_SLC, L_SLC, C_SLC, pid_r * SPLITS + pid_s, GP, DVP)


@triton.jit
def _merged_lse(LSE_PART, pid_r, SPLITS, SPLITS_P: tl.constexpr, GP: tl.constexpr):
    """log2-sum-exp2 over a branch's splits, per row of the group (``-inf`` where nothing was seen)."""
    sp = tl.arange(0, SPLITS_P)
    g = tl.arange(0, GP)
    parts = tl.load(LSE_PART + (pid_r.to(tl.int64) * SPLITS + sp[:, None]) * GP + g[None, :],
                    mask=(sp < SPLITS)[:, None], other=float("-inf"))
    m = tl.max(parts, 0)
    m_shift = tl.where(m == float("-inf"), 0.0, m)
    return m_shift + tl.log2(tl.sum(tl.exp2(parts - m_shift[None, :]), 0))


@triton.jit(do_not_specialize=["NB_CAP", "CMP_SPLITS", "STEPS"])
def _score_kernel(Q, KC, LENGTHS, NUM_NEW, LSE_PART, KEYS, KQ, HK, NB_CAP,
                  stride_qb, stride_qt, stride_qh, stride_kb, stride_kn, stride_kh, qk_scale, CMP_SPLITS, STEPS,
                  CMP_SPLITS_P: tl.constexpr,
                  G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr, DKP: tl.constexpr,
                  BLOCK: tl.constexpr, STRIDE: tl.constexpr, SELECT_BLOCK: tl.constexpr,
                  PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, NB_STEP: tl.constexpr, NBT: tl.constexpr,
                  PDL: tl.constexpr):
    """Ranking keys of ``STEPS * NB_STEP`` selection blocks for one token's group (Eq. 8-10)."""
    _wait_for_previous_kernel(PDL)
    A: tl.constexpr = SELECT_BLOCK // STRIDE
    B: tl.constexpr = BLOCK // STRIDE
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    b, i, h, t, valid = _token(pid_r, KQ, HK, LENGTHS, NUM_NEW)
    q = _load_group_queries(Q, b, i, h, stride_qb, stride_qt, stride_qh, G, GP, DK, DKP)
    lse2 = _merged_lse(LSE_PART, pid_r, CMP_SPLITS, CMP_SPLITS_P, GP)
    row_ok = tl.arange(0, GP) < G
    visible = tl.where(valid & (t + 1 >= BLOCK), (t + 1 - BLOCK) // STRIDE + 1, 0)
    current = tl.where(valid, t // SELECT_BLOCK, -3)
    dk = tl.arange(0, DKP)
    # Eq. 9 slice of one step: w[i, k] = #{(m, u): a*k + m - u = i - (b-1)}, step-local i and k.
    local_i = tl.arange(0, BLOCK_N)[:, None]
    local_k = tl.arange(0, NBT)
    r = local_i - (B - 1) - A * local_k[None, :]
    w = tl.minimum(B - 1, A - 1 - r) - tl.maximum(0, -r) + 1
    w = tl.where(local_k[None, :] < NB_STEP, tl.maximum(w, 0), 0).to(tl.float32)
    k_base = KC + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    key_base = KEYS + pid_r.to(tl.int64) * NB_CAP
    for step in range(STEPS):
        j0 = (pid_s * STEPS + step) * NB_STEP
        cols = A * j0 - (B - 1) + tl.arange(0, BLOCK_N)
        col_ok = (cols >= 0) & (cols < visible)
        k = tl.load(k_base + cols.to(tl.int64)[:, None] * stride_kn + dk[None, :],
                    mask=col_ok[:, None] & (dk < DK)[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        # lse2 = -inf only where no column is visible, and where() drops those with the rest.
        p = tl.where(row_ok[:, None] & col_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        group_sum = tl.sum(p, 0)  # Eq. 10
        scores = tl.sum(group_sum[:, None] * w, 0)  # Eq. 9
        j = j0 + local_k
        forced = ((j == 0) | (j == current) | (j == current - 1)) & valid
        candidate = (j >= 1) & (j <= current - 2)
        # Scores are sums of exp2 >= 0; clamping the bits drops a possible -0.0.
        bits = tl.maximum(scores.to(tl.int32, bitcast=True), 0).to(tl.int64)
        low = INDEX_BITS.value - j.to(tl.int64)
        key = tl.where(candidate, (bits << 32) | low, -1)
        key = tl.where(forced, FORCED_KEY_HIGH | low, key)
        tl.store(key_base + j, key, mask=(local_k < NB_STEP) & (j < NB_CAP))


@triton.jit(do_not_specialize=["NB_CAP", "N_TILES", "CMP_SPLITS", "TILES"])
def _score_tiles_kernel(LENGTHS, NUM_NEW, LSE_PART, P_TILE, M_TILE, KEYS, KQ, HK, NB_CAP, N_TILES, CMP_SPLITS,
                        TILES, CMP_SPLITS_P: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                        BLOCK: tl.constexpr, STRIDE: tl.constexpr, SELECT_BLOCK: tl.constexpr,
                        BLOCK_N: tl.constexpr, NBT: tl.constexpr, PDL: tl.constexpr):
    """Ranking keys of the blocks of ``TILES`` tiles from the compressed pass's tile sums (Eq. 8-10)."""
    _wait_for_previous_kernel(PDL)
    A: tl.constexpr = SELECT_BLOCK // STRIDE
    J: tl.constexpr = BLOCK_N // A
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    _, _, _, t, valid = _token(pid_r, KQ, HK, LENGTHS, NUM_NEW)
    lse2 = _merged_lse(LSE_PART, pid_r, CMP_SPLITS, CMP_SPLITS_P, GP)
    g = tl.arange(0, GP)
    kk = tl.arange(0, NBT)
    row_ok = g < G
    visible = tl.where(valid & (t + 1 >= BLOCK), (t + 1 - BLOCK) // STRIDE + 1, 0)
    current = tl.where(valid, t // SELECT_BLOCK, -3)
    tile_base = pid_r.to(tl.int64) * N_TILES
    key_base = KEYS + pid_r.to(tl.int64) * NB_CAP
    for step in range(TILES):
        u = pid_s * TILES + step
        # Tiles with no visible token hold stale sums: read none of them.
        rows_u = tl.where((u < N_TILES) & (u * BLOCK_N < visible), GP, 0)
        rows_prev = tl.where((u >= 1) & (u - 1 < N_TILES) & ((u - 1) * BLOCK_N < visible), GP, 0)
        tile = tile_base + u
        sums = tl.load(P_TILE + (tile * GP + g[:, None]) * (J + 1) + kk[None, :],
                       mask=(g[:, None] < rows_u) & (kk[None, :] < J), other=0.0)
        m_u = tl.load(M_TILE + tile * GP + g, mask=g < rows_u, other=float("-inf"))
        carry = tl.load(P_TILE + ((tile - 1) * GP + g) * (J + 1) + J, mask=g < rows_prev, other=0.0)
        m_prev = tl.load(M_TILE + (tile - 1) * GP + g, mask=g < rows_prev, other=float("-inf"))
        # p_cmp = exp2(s - lse) = exp2(s - m_u) * exp2(m_u - lse); m_u <= lse wherever both exist.
        f_u = tl.where(row_ok & (m_u != float("-inf")), tl.exp2(m_u - lse2), 0.0)
        f_prev = tl.where(row_ok & (m_prev != float("-inf")), tl.exp2(m_prev - lse2), 0.0)
        scores = tl.sum(f_u[:, None] * sums, 0)  # Eq. 10 over the group's heads
        scores = tl.where(kk == 0, scores + tl.sum(f_prev * carry, 0), scores)
        j = u * J + kk
        forced = ((j == 0) | (j == current) | (j == current - 1)) & valid
        candidate = (j >= 1) & (j <= current - 2)
        bits = tl.maximum(scores.to(tl.int32, bitcast=True), 0).to(tl.int64)
        low = INDEX_BITS.value - j.to(tl.int64)
        key = tl.where(candidate, (bits << 32) | low, -1)
        key = tl.where(forced, FORCED_KEY_HIGH | low, key)
        tl.store(key_base + j, key, mask=(kk < J) & (j < NB_CAP))


@triton.jit
def _merge_branch(O_PART, LSE_PART, CNT_PART, pid_r, g, col0, SPLITS, SPLITS_P: tl.constexpr, GP: tl.constexpr,
                  DVP: tl.constexpr, DVC: tl.constexpr):
    """One head's branch output, columns ``col0 .. col0 + DVC - 1``, merged over the splits (one
    vector load each), and the keys counted."""
    sp = tl.arange(0, SPLITS_P)
    dv = col0 + tl.arange(0, DVC)
    part = pid_r.to(tl.int64) * SPLITS + sp
    lse = tl.load(LSE_PART + part * GP + g, mask=sp < SPLITS, other=float("-inf"))
    m = tl.max(lse, 0)
    m_shift = tl.where(m == float("-inf"), 0.0, m)
    weight = tl.exp2(lse - m_shift)
    total = tl.sum(weight, 0)
    weight = weight / tl.where(total > 0, total, 1.0)
    o = tl.load(O_PART + (part[:, None] * GP + g) * DVP + dv[None, :], mask=(sp < SPLITS)[:, None], other=0.0)
    counted = tl.sum(tl.load(CNT_PART + part, mask=sp < SPLITS, other=0))
    return tl.sum(weight[:, None] * o, 0), counted


@triton.jit(do_not_specialize=["ROWS", "S_CMP", "S_SLC", "S_WIN"])
def _combine_kernel(O_CMP, L_CMP, C_CMP, O_SLC, L_SLC, C_SLC, O_WIN, L_WIN, C_WIN, GATES, OUT, READS,
                    KQ, HK, ROWS, stride_gb, stride_gt, stride_gh, stride_ob, stride_ot, stride_oh,
                    S_CMP, S_SLC, S_WIN, S_CMP_P: tl.constexpr, S_SLC_P: tl.constexpr, S_WIN_P: tl.constexpr,
                    G: tl.constexpr, GP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
                    DVC: tl.constexpr, PDL: tl.constexpr):
    """``o = g_cmp o_cmp + g_slc o_slc + g_win o_win`` for ``DVC`` columns (program axis 1) of one
    query head of one token, and the token's reads (every program of the group stores the same
    counts)."""
    _wait_for_previous_kernel(PDL)
    pid = tl.program_id(0)
    col0 = tl.program_id(1) * DVC
    pid_r = pid // G
    g = pid % G
    b = pid_r // (KQ * HK)
    i = (pid_r // HK) % KQ
    h = pid_r % HK
    o_cmp, n_cmp = _merge_branch(O_CMP, L_CMP, C_CMP, pid_r, g, col0, S_CMP, S_CMP_P, GP, DVP, DVC)
    o_slc, n_slc = _merge_branch(O_SLC, L_SLC, C_SLC, pid_r, g, col0, S_SLC, S_SLC_P, GP, DVP, DVC)
    o_win, n_win = _merge_branch(O_WIN, L_WIN, C_WIN, pid_r, g, col0, S_WIN, S_WIN_P, GP, DVP, DVC)
    head = (h * G + g).to(tl.int64)
    gate_ptr = GATES + b.to(tl.int64) * stride_gb + i.to(tl.int64) * stride_gt + head * stride_gh
    out = (tl.load(gate_ptr).to(tl.float32) * o_cmp + tl.load(gate_ptr + 1).to(tl.float32) * o_slc
           + tl.load(gate_ptr + 2).to(tl.float32) * o_win)
    dv = col0 + tl.arange(0, DVC)
    out_ptr = OUT + b.to(tl.int64) * stride_ob + i.to(tl.int64) * stride_ot + head * stride_oh + dv
    tl.store(out_ptr, out.to(OUT.dtype.element_ty), mask=dv < DV)
    row = pid_r.to(tl.int64)
    tl.store(READS + row, n_cmp.to(tl.int64))
    tl.store(READS + ROWS + row, n_slc.to(tl.int64))
    tl.store(READS + 2 * ROWS + row, n_win.to(tl.int64))


@dataclass(frozen=True)
class DecodePlan:
    """Split plan of a decode step: a function of shapes only, so a captured step replays it.

    ``*_chunk`` is keys (``cmp``, ``win``) or selected blocks (``slc``) per program and
    ``*_splits`` programs per token group; ``score_steps`` Eq. 9 steps (tiles when ``fused``) of
    ``nb_step`` blocks per scoring program; ``fused``: the compressed pass leaves per-tile block
    sums (``n_tiles`` per token group) so the scoring does not read the compressed keys again.
    ``window_overlap``: ``"none"``, one launch for the compressed and window splits; otherwise the
    window splits run on a side stream, from the start (``"compressed"``: beside the compressed
    pass) or once the compressed pass is done (``"scoring"``: beside the scoring and the top-n,
    which leave the memory system mostly idle); the streams join before the combine.
    ``pdl``: the scoring, select and combine kernels are programmatic dependent launches
    (needs :func:`supports_pdl`, and ``window_overlap="none"``: a stream fork or join sits between
    two of those launches otherwise). Opt-in until it is timed on a GPU.
    ``combine_columns``: programs per query head in the combine kernel, each merging a slice of
    ``Dv`` (a power of two; slices of at least 16 columns): at batch 1 one program per head loads
    every split's partial alone. ``combine_warps`` is sized for the slice. ``top_n``: how the
    select kernel finds the n-th best block (:func:`top_n_method`).
    """

    block_n: int
    slc_block_n: int
    cmp_chunk: int
    cmp_splits: int
    win_chunk: int
    win_splits: int
    slc_chunk: int
    slc_splits: int
    score_block_n: int
    nb_step: int
    nbt: int
    score_steps: int
    score_splits: int
    num_blocks: int
    fused: bool
    n_tiles: int
    num_warps: int  # decode_warps(head_dim)
    num_stages: int  # decode_stages(cmp_chunk, block_n, head_dim)
    combine_warps: int  # combine_warps(most splits, Dv slice)
    window_overlap: str = "none"
    pdl: bool = False
    combine_columns: int = 1
    top_n: str = "bitonic"

    def __post_init__(self) -> None:
        if self.top_n not in TOP_N_METHODS:
            raise ValueError(f"DecodePlan.top_n must be one of {TOP_N_METHODS}, got {self.top_n!r}")
        if self.window_overlap not in WINDOW_OVERLAPS:
            raise ValueError(f"DecodePlan.window_overlap must be one of {WINDOW_OVERLAPS}, "
                             f"got {self.window_overlap!r}")
        if self.combine_columns < 1 or self.combine_columns & (self.combine_columns - 1):
            raise ValueError(f"DecodePlan.combine_columns must be a power of two >= 1, got {self.combine_columns}")
        if self.pdl and self.window_overlap != "none":
            raise ValueError(f"DecodePlan.pdl needs window_overlap='none', got {self.window_overlap!r}: a "
                             "programmatic launch must follow its predecessor in the same stream")


def supports_pdl(device: torch.device | str | None = None) -> bool:
    """Whether decode launches on ``device`` (default: the current CUDA device) can be
    programmatic dependent launches: compiled kernels (not the interpreter) on sm_90 or later."""
    if interpreting() or not torch.cuda.is_available():
        return False
    device = torch.device("cuda") if device is None else torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def plan_decode(config: NSAConfig, rows: int, max_len: int, *, target_programs: int | None = None,
                block_n: int | None = None, window_overlap: str = "none",
                pdl: bool = False, combine_columns: int | None = None, top_n: str | None = None,
                score_steps: int | None = None, select_splits: int | None = None) -> DecodePlan:
    """How to split each branch's keys over programs for ``rows = B * K * HK`` token groups
    (``window_overlap``, ``pdl``, ``combine_columns``, ``top_n``: see :class:`DecodePlan`; the
    last two follow the shapes unless given).

    Every branch gets about ``target_programs`` programs (default: :func:`programs_per_sm` per SM
    on CUDA, 2 splits per token group under the interpreter) so that batch 1 at a long context
    still fills the card, but never fewer keys per program than one tile; a large batch gets few
    splits per branch and little partial-merge traffic. The combine kernel likewise gets about
    ``target_programs`` programs (``combine_columns`` Dv slices per query head, unless given) when
    one per query head is fewer: H100, 64k, batch 1, 8 slices 29.6 us per step against 31.0 with
    one program per head; at batch 32 (2048 heads) slices only cost (186 -> 191 us with 4).
    The fused scoring (``score_steps`` tiles per program, unless given) takes at most
    ``FUSED_SCORE_STEPS`` tiles per program, however few programs the other branches get.
    ``select_splits`` (programs per token group of the select kernel, each redoing the top-n)
    overrides the shared split for that kernel.
    """
    c = config
    if target_programs is None:
        if interpreting() or not torch.cuda.is_available():
            target_programs = 2 * rows  # a few splits per branch, and interpreter time stays small
        else:
            target_programs = programs_per_sm(c.head_dim) * torch.cuda.get_device_properties(
                torch.cuda.current_device()).multi_processor_count
    if block_n is None:
        block_n = 16 if interpreting() else 64
    # At most MAX_SPLITS partials per token and branch: the combine loads them as one tile.
    want = min(MAX_SPLITS, max(1, -(-target_programs // max(rows, 1))))

    def split(total: int, unit: int, programs: int = want) -> tuple[int, int]:
        tiles = max(1, -(-total // unit))
        splits = min(programs, tiles)
        chunk = -(-tiles // splits) * unit
        return chunk, max(1, -(-total // chunk))

    cmp_chunk, cmp_splits = split(max(1, c.num_compressed(max_len)), block_n)
    win_chunk, win_splits = split(min(c.window, max_len), block_n)
    if select_splits is not None and select_splits < 1:
        raise ValueError(f"select_splits: programs per token group of the select kernel must be >= 1, "
                         f"got {select_splits}")
    slc_chunk, slc_splits = split(c.select_count, 1, select_splits or want)
    a, b = c.select_block // c.compress_stride, c.compress_block // c.compress_stride
    num_blocks = c.num_select_blocks(max_len)
    # Fused scoring needs tiles that start on selection-block boundaries (a | BLOCK_N) and Eq. 9
    # weights exact in float16 (<= min(a, b) <= 2048); otherwise the scoring kernel reads the
    # compressed keys again in Eq. 9 windows.
    fused = block_n % a == 0 and min(a, b) <= 2048
    if fused:
        score_block_n, nb_step = block_n, block_n // a
        nbt = max(16, pow2(nb_step + 1))
    else:
        score_block_n = max(16, pow2(a + b - 1), block_n)
        nb_step = (score_block_n - b + 1) // a
        nbt = max(16, pow2(nb_step))
    if score_steps is None:
        score_steps = split(num_blocks, nb_step)[0] // nb_step
        if fused:
            score_steps = min(score_steps, FUSED_SCORE_STEPS)
    elif score_steps < 1:
        raise ValueError(f"score_steps: Eq. 9 steps per scoring program must be >= 1, got {score_steps}")
    score_splits = triton.cdiv(triton.cdiv(num_blocks, nb_step), score_steps)
    n_tiles = max(-(-max(1, c.num_compressed(max_len)) // block_n), -(-num_blocks // nb_step))
    warps = decode_warps(c.head_dim)
    if combine_columns is None:
        heads = max(rows, 1) * c.group_size
        combine_columns = min(max(16, pow2(c.v_head_dim)) // 16, pow2(-(-target_programs // heads)))
    return DecodePlan(block_n=block_n, slc_block_n=max(16, pow2(c.select_block)), cmp_chunk=cmp_chunk,
                      cmp_splits=cmp_splits, win_chunk=win_chunk, win_splits=win_splits, slc_chunk=slc_chunk,
                      slc_splits=slc_splits, score_block_n=score_block_n, nb_step=nb_step, nbt=nbt,
                      score_steps=score_steps, score_splits=score_splits, num_blocks=num_blocks,
                      fused=fused, n_tiles=n_tiles, num_warps=warps,
                      num_stages=decode_stages(cmp_chunk, block_n, c.head_dim),
                      combine_warps=combine_warps(max(cmp_splits, win_splits, slc_splits),
                                                  max(1, c.v_head_dim // combine_columns)),
                      window_overlap=window_overlap, pdl=pdl, combine_columns=combine_columns,
                      top_n=top_n or top_n_method(num_blocks, warps))


def top_n_method(num_blocks: int, num_warps: int) -> str:
    """The select kernel's top-n: ``"bitonic"`` while each thread holds at most 4 of the
    (power-of-two padded) block keys, ``"max-removal"`` beyond. H100, CUDA graph, batch 1 / 32,
    the two in one process (docs/PERFORMANCE.md, nineteenth session): 2 keys per thread (16k,
    Dk 128) 24.2 -> 22.2 / 101.2 -> 99.2 us per step with the bitonic top-k, 4 (64k, Dk 192, 8
    warps) 34.7 -> 33.4 / 230.0 -> 228.9, 8 (64k, Dk 128) 29.9 -> 29.7 / 185.5 -> 187.3, 16
    (128k, Dk 128) 35.3 -> 42.1 / 296.2 -> 302.3: its work grows with the keys per thread, the
    removals' 15 reductions do not."""
    keys_per_thread = max(16, pow2(num_blocks)) // (32 * num_warps)
    return "bitonic" if keys_per_thread <= 4 else "max-removal"


def decode_stages(chunk: int, block_n: int, head_dim: int) -> int:
    """Pipeline depth of the range and select kernels' key loops: ``SHORT_CHUNK_STAGES`` for
    chunks of at most two tiles, and for longer ones at head dims up to 128; ``DECODE_STAGES``
    above. H100, batch 32, CUDA graph (nineteenth session, four runs in two sessions): at Dk 128
    2 stages beat 3 by 2-4% (64k 172.8 against 176.2 us per step, 128k 276.4 / 280.5, 16k 92.9 /
    95.3; 178.7 / 186.1 in the eighteenth session), at Dk 192 they lost 8% (240.7 / 223.7). An
    H200 sweep of the sixteenth session had 3 ahead at Dk 128 (204 against 207 us)."""
    if chunk <= 2 * block_n or pow2(head_dim) <= 128:
        return SHORT_CHUNK_STAGES
    return DECODE_STAGES


def decode_warps(head_dim: int) -> int:
    """Warps per decode program. Measured on an H200 (scripts/gpu/tune_kernels.py --only decode,
    64k context): with head dims up to 128, 4 warps beat 8 (batch 32: 0.203 against 0.243 ms at
    Dk=128, 0.139 against 0.187 at Dk=64; batch 1 5-15%); at Dk=192 (padded to 256) 4 warps
    were no faster than 8 (batch 32: 348-350 us either way). Neither spills compiled for sm_90."""
    return 4 if pow2(head_dim) <= 128 else 8


def programs_per_sm(head_dim: int) -> int:
    """Programs per branch per SM that the split plan aims at (batch 1 is capped by MAX_SPLITS
    either way). H200, 64k, batch 32, one process each: at Dk=128 (4-warp programs) 2 per SM took
    141.9 us per step against 146.1 with 4 (the plan sweep: 143 / 147 / 157 with 2 / 4 / 8): longer
    chunks, fewer partials. At Dk=192 (8-warp programs) 4 per SM stays better: 196.8 against 209.2."""
    return 2 if pow2(head_dim) <= 128 else 4


def combine_warps(splits: int, dv: int) -> int:
    """Warps of the combine kernel (one program per query head): as few as keep a branch's
    ``[splits, Dv]`` partials (splits padded to ``splits_pow2``) at <= 64 floats per thread.
    Fewer warps are faster (H200, 64k, batch 32, 5 splits in tiles of 16: 1 warp 190 us per step,
    2 warps 194, 4 warps 204); more floats per thread spill (1 warp at 64 splits x 128: 544 bytes)."""
    return max(1, min(8, splits_pow2(splits) * pow2(dv) // 2048))


def splits_pow2(splits: int) -> int:
    """Tile width over a branch's splits; at least 16 so that few variants get compiled."""
    return max(16, pow2(splits))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


@torch.no_grad()
def nsa_decode_triton(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_slc: torch.Tensor,
                      v_slc: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, gates: torch.Tensor,
                      lengths: torch.Tensor, config: NSAConfig, *, num_new: torch.Tensor | None = None,
                      scale: float | None = None, plan: DecodePlan | None = None, check_values: bool = True,
                      return_scores: bool = False):
    """Triton decode step; arguments and results as :func:`nsa.ops.decode.naive.nsa_decode_reference`.

    ``q`` and the caches are float16, bfloat16 or float32 on CUDA (or CPU under
    ``TRITON_INTERPRET=1``); the key/value last dim must be contiguous. ``plan`` defaults to
    :func:`plan_decode`. ``check_values=False`` skips the host-side checks of ``lengths`` and
    ``num_new`` (needed inside CUDA-graph capture): the caller then guarantees them.
    ``return_scores`` adds a fourth result, the Eq. 10 block scores the top-n ranked, float32
    ``[B, K, HK, NB]`` (``NB = ceil(max_len / l')``), NaN for blocks that were not candidates
    (forced, beyond ``c - 2``, padding rows): they are decoded from the ranking keys.
    """
    num_new = check_decode_inputs(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, lengths, num_new,
                                  config, check_values=check_values)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q must be float16, bfloat16 or float32 for the Triton decode, got {q.dtype}")
    for name, t in (("q", q), ("k_cmp", k_cmp), ("v_cmp", v_cmp), ("k_slc", k_slc), ("v_slc", v_slc),
                    ("k_win", k_win), ("v_win", v_win)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride 1), got strides {t.stride()}")
    c = config
    batch, steps, hq, dk = q.shape
    hk, dv, group = c.num_kv_heads, c.v_head_dim, c.group_size
    rows = batch * steps * hk
    max_len, ring = k_slc.shape[1], k_win.shape[1]
    plan = plan or plan_decode(c, rows, max_len)
    if plan.num_blocks != c.num_select_blocks(max_len):
        raise ValueError(f"plan was made for {plan.num_blocks} selection blocks, the caches hold max_len={max_len} "
                         f"({c.num_select_blocks(max_len)} blocks); build it with plan_decode(config, rows, max_len)")
    gp, dkp, dvp = max(16, pow2(group)), max(16, pow2(dk)), max(16, pow2(dv))
    if plan.combine_columns > dvp // 16:
        raise ValueError(f"plan.combine_columns: {plan.combine_columns} slices of Dv {dv} (padded to {dvp}) would "
                         f"be narrower than 16 columns; accepted: powers of two up to {dvp // 16}")
    if plan.pdl and not supports_pdl(q.device):
        where = f"{q.device}{' (interpreter)' if interpreting() else ''}"
        raise ValueError(f"plan.pdl: programmatic dependent launch needs compiled kernels on a CUDA device "
                         f"of compute capability >= 9.0, got q on {where}; build the plan with pdl=False")
    out = q.new_empty(batch, steps, hq, dv)
    blocks_shape = (batch, steps, hk, c.select_count)
    if rows == 0:
        raise ValueError(f"q must hold at least one token group, got shape {tuple(q.shape)}")
    scale = dk ** -0.5 if scale is None else float(scale)
    qk_scale = scale * LOG2E
    lengths = lengths.contiguous()
    num_new = num_new.contiguous()
    gates = gates if gates.stride(-1) == 1 else gates.contiguous()
    f32 = {"dtype": torch.float32, "device": q.device}

    def partial_buffers(splits: int):
        return (torch.empty(rows, splits, gp, dvp, **f32), torch.empty(rows, splits, gp, **f32),
                torch.empty(rows, splits, dtype=torch.int32, device=q.device))

    parts = {"cmp": partial_buffers(plan.cmp_splits), "win": partial_buffers(plan.win_splits),
             "slc": partial_buffers(plan.slc_splits)}
    precision = _dot_precision(q.dtype)
    q_strides = q.stride()[:3]
    if plan.fused:
        p_tile = torch.empty(rows, plan.n_tiles, gp, plan.nb_step + 1, **f32)
        m_tile = torch.empty(rows, plan.n_tiles, gp, **f32)
    else:
        p_tile = m_tile = torch.empty(1, **f32)
    range_args = (
        q, k_cmp, v_cmp, k_win, v_win, lengths, num_new, *parts["cmp"], *parts["win"], p_tile, m_tile, steps, hk,
        ring, plan.n_tiles, *q_strides,
        *k_cmp.stride()[:3], *v_cmp.stride()[:3], *k_win.stride()[:3], *v_win.stride()[:3], qk_scale,
        plan.cmp_chunk, plan.cmp_splits, plan.win_chunk, plan.win_splits)
    range_meta = {"G": group, "GP": gp, "DK": dk, "DKP": dkp, "DV": dv, "DVP": dvp,
                  "BLOCK": c.compress_block, "STRIDE": c.compress_stride, "WINDOW": c.window,
                  "PRECISION": precision, "BLOCK_N": plan.block_n, "FUSED": plan.fused,
                  "SELECT_BLOCK": c.select_block, "NBT": plan.nbt, "num_warps": plan.num_warps,
                  "num_stages": plan.num_stages, "PDL": plan.pdl}
    # The first kernel follows the caller's kernels: an ordinary launch. The next three each
    # follow a decode kernel in the same stream.
    programmatic = {"launch_pdl": True, "PDL": True} if plan.pdl else {"PDL": False}
    side = None
    if plan.window_overlap == "none":
        _range_kernel[(rows, plan.cmp_splits + plan.win_splits)](*range_args, 0, **range_meta)
    else:
        # The fork point decides what the window runs beside: the compressed pass, or what follows it.
        if plan.window_overlap == "compressed":
            side = streams.fork(q.device)
        _range_kernel[(rows, plan.cmp_splits)](*range_args, 0, **range_meta)
        if plan.window_overlap == "scoring":
            side = streams.fork(q.device)
        with streams.on(side):
            _range_kernel[(rows, plan.win_splits)](*range_args, plan.cmp_splits, **range_meta)
    keys = torch.empty(rows, plan.num_blocks, dtype=torch.int64, device=q.device)
    if plan.fused:
        _score_tiles_kernel[(rows, plan.score_splits)](
            lengths, num_new, parts["cmp"][1], p_tile, m_tile, keys, steps, hk, plan.num_blocks, plan.n_tiles,
            plan.cmp_splits, plan.score_steps, CMP_SPLITS_P=splits_pow2(plan.cmp_splits), G=group, GP=gp,
            BLOCK=c.compress_block, STRIDE=c.compress_stride, SELECT_BLOCK=c.select_block,
            BLOCK_N=plan.block_n, NBT=plan.nbt, num_warps=4, **programmatic)
    else:
        _score_kernel[(rows, plan.score_splits)](
            q, k_cmp, lengths, num_new, parts["cmp"][1], keys, steps, hk, plan.num_blocks, *q_strides,
            *k_cmp.stride()[:3], qk_scale, plan.cmp_splits, plan.score_steps,
            CMP_SPLITS_P=splits_pow2(plan.cmp_splits), G=group, GP=gp, DK=dk, DKP=dkp,
            BLOCK=c.compress_block, STRIDE=c.compress_stride, SELECT_BLOCK=c.select_block,
            PRECISION=precision, BLOCK_N=plan.score_block_n, NB_STEP=plan.nb_step, NBT=plan.nbt,
            num_warps=plan.num_warps, **programmatic)
    blocks = torch.empty(blocks_shape, dtype=torch.int64, device=q.device)
    _select_kernel[(rows, plan.slc_splits)](
        q, k_slc, v_slc, keys, blocks, lengths, num_new, *parts["slc"], steps, hk, plan.num_blocks, *q_strides,
        *k_slc.stride()[:3], *v_slc.stride()[:3], qk_scale, plan.slc_chunk, plan.slc_splits, G=group, GP=gp,
        DK=dk, DKP=dkp, DV=dv, DVP=dvp, SELECT_BLOCK=c.select_block, COUNT=c.select_count,
        COUNTP=max(16, pow2(c.select_count)), NBP=max(16, pow2(plan.num_blocks)),
        BITONIC=plan.top_n == "bitonic", PRECISION=precision,
        BLOCK_N=plan.slc_block_n,
        num_warps=plan.num_warps, num_stages=plan.num_stages, **programmatic)
    reads = torch.empty(3, batch, steps, hk, dtype=torch.int64, device=q.device)
    # Every buffer the window wrote is ready (a CUDA graph capture joins the forked stream here too).
    streams.join(side, q.device)
    _combine_kernel[(rows * group, plan.combine_columns)](
        *parts["cmp"], *parts["slc"], *parts["win"], gates, out, reads, steps, hk, rows,
        *gates.stride()[:3], *out.stride()[:3], plan.cmp_splits, plan.slc_splits, plan.win_splits,
        S_CMP_P=splits_pow2(plan.cmp_splits), S_SLC_P=splits_pow2(plan.slc_splits),
        S_WIN_P=splits_pow2(plan.win_splits), G=group, GP=gp, DV=dv, DVP=dvp, DVC=dvp // plan.combine_columns,
        num_warps=plan.combine_warps,
        **programmatic)
    result = (out, blocks, dict(zip(BRANCH_NAMES, reads.unbind(0))))
    if return_scores:
        high = (keys >> 32).to(torch.int32)
        scores = torch.where((keys >= 0) & (high != 0x7F800000), high.view(torch.float32), float("nan"))
        result += (scores.view(batch, steps, hk, plan.num_blocks),)
    return result


__all__ = ["DecodePlan", "nsa_decode_triton", "plan_decode", "supports_pdl", "top_n_method"]
