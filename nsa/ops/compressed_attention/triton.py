"""Compressed-token attention in Triton: forward with log-sum-exp, FlashAttention-2 style backward.

Same function as :func:`nsa.ops.compressed_attention.naive.compressed_attention` (``q_offset = 0``):
query ``t`` reads compressed token ``i`` iff ``i*stride + block - 1 <= t``; a query that sees none
gets ``o = 0``, ``lse = -inf`` and zero gradients.

Layout of a program's query tile (shared with the block-selection kernel): the ``G`` query heads
of one key/value head are folded into the M dimension of every ``tl.dot``. Row ``r`` of a tile is
position ``t0 + r // GP`` and head ``h*G + r % GP``, where ``GP`` is ``G`` rounded up to a power of
two (rows with ``r % GP >= G`` are padding and are masked). So each K/V tile is loaded once for
the whole group, as in the paper's kernel, and a tile holds ``BLOCK_M // GP`` positions.

Head dims: ``Dk`` is carried as two power-of-two column blocks (192 = 128 + 64, see
:func:`~nsa.ops.triton_common.split_dim`) so no ``q.k`` work is spent on padding; ``Dv`` is
padded to a power of two.
Backward: ``delta = rowsum(dO * O)``, then a dK/dV pass over key tiles (its query range cut into
equal chunks whose float32 partials are summed in chunk order) and a dQ pass over query tiles; no
atomics, so gradients are deterministic. 64-bit arithmetic is confined to scalar tile bases.

Argument checking is :mod:`nsa.functional`'s job; these wrappers only assume well-formed input.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from nsa.ops.triton_common import (
    SizeTunedKernel,
    dkdv_tile,
    dot_precision,
    interpreting,
    kv_tile_descriptors,
    load_box,
    load_box_split,
    set_box_rows,
    set_kv_tile_rows,
    softmax_delta,
    split_dim,
    tile_descriptors,
)

LOG2E = 1.4426950408889634
# Kernels may only read constexpr globals.
LOG2E_JIT = tl.constexpr(LOG2E)
LN2_JIT = tl.constexpr(0.6931471805599453)



def pow2(n: int) -> int:
    """Smallest power of two ``>= max(n, 1)``."""
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def group_configs(tiles, pre_hook=set_kv_tile_rows):
    """Autotune configs from ``(BLOCK_M, BLOCK_N, num_warps, num_stages[, constexprs])`` tuples;
    ``TMA`` is off unless a tuple turns it on. ``pre_hook`` sizes the kernel's tensor descriptors
    to the config's tiles (the forward's and dq's key/value tiles by default, the dK/dV pass's
    query tiles with :func:`set_query_tile_rows`); ``None`` for a kernel without ``TMA``."""
    def config(m, n, w, s, other):
        kwargs = {"BLOCK_M": m, "BLOCK_N": n, **({"TMA": False} if pre_hook else {}), **other}
        return triton.Config(kwargs, num_warps=w, num_stages=s, pre_hook=pre_hook)
    return [config(m, n, w, s, other[0] if other else {}) for m, n, w, s, *other in tiles]


def set_query_tile_rows(nargs: dict) -> None:
    """Autotune ``pre_hook`` of the dK/dV pass: its q and dO descriptors' boxes get the config's
    ``BLOCK_M // GP`` positions (placeholders are left alone)."""
    set_box_rows(nargs, ("Q_DESC_A", "Q_DESC_B", "DO_DESC"), nargs["BLOCK_M"] // nargs["GP"])


def prune_group_rows(configs, named_args, **kwargs):
    """Drop configs whose tile cannot hold one position's ``GP`` heads, or exceeds 16 positions
    per tile when ``MAX_POSITIONS`` caps it (the block-selection kernel does)."""
    gp = named_args.get("GP", kwargs.get("GP"))
    cap = named_args.get("MAX_POSITIONS", kwargs.get("MAX_POSITIONS", 1 << 30))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] >= gp and c.kwargs["BLOCK_M"] // gp <= cap]
    if not kept:  # very large groups: one position per tile
        base = configs[0]
        kept = [triton.Config({**base.kwargs, "BLOCK_M": gp}, num_warps=base.num_warps,
                              num_stages=base.num_stages, pre_hook=base.pre_hook)]
    return kept


@triton.jit
def tile_rows(pid_m, T, G: tl.constexpr, GP: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows of query tile ``pid_m``: positions, group-local heads, validity, tile-local positions."""
    rows = tl.arange(0, BLOCK_M)
    local_t = rows // GP
    pos = pid_m * (BLOCK_M // GP) + local_t
    g = rows % GP
    return pos, g, (g < G) & (pos < T), local_t


@triton.jit
def tile_base(X, b, t0, h0, stride_b, stride_t, stride_h):
    """Scalar pointer to ``X[b, t0, h0]``: the only 64-bit offset arithmetic (T up to 128k);
    element offsets inside a tile stay 32-bit, which keeps pointer tensors out of registers."""
    return X + tl.cast(b, tl.int64) * stride_b + tl.cast(t0, tl.int64) * stride_t + tl.cast(h0, tl.int64) * stride_h


@triton.jit
def visible_count(pos, BLOCK: tl.constexpr, STRIDE: tl.constexpr):
    """``num_cmp(pos + 1)``: compressed tokens visible to the query at ``pos``."""
    return tl.where(pos + 1 >= BLOCK, (pos + 1 - BLOCK) // STRIDE + 1, 0)


@triton.jit
def load_head_dim(row_ptrs, row_ok, D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr):
    """Rows ``[R, D]`` as two power-of-two column blocks ``[0, DA)`` and ``[DA, DA + DB)``.

    Splitting (192 = 128 + 64) instead of padding to a power of two (256) saves a quarter of the
    ``q.k`` work at Dk=192. With ``DB == 0`` the second block is the first again, never used.
    """
    da = tl.arange(0, DA)
    xa = tl.load(row_ptrs[:, None] + da[None, :], mask=row_ok[:, None] & (da < D)[None, :], other=0.0)
    if DB > 0:
        db = DA + tl.arange(0, DB)
        xb = tl.load(row_ptrs[:, None] + db[None, :], mask=row_ok[:, None] & (db < D)[None, :], other=0.0)
    else:
        xb = xa
    return xa, xb


@triton.jit
def store_head_dim(row_ptrs, row_ok, xa, xb, D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr):
    """Store the two column blocks of :func:`load_head_dim`."""
    da = tl.arange(0, DA)
    tl.store(row_ptrs[:, None] + da[None, :], xa, mask=row_ok[:, None] & (da < D)[None, :])
    if DB > 0:
        db = DA + tl.arange(0, DB)
        tl.store(row_ptrs[:, None] + db[None, :], xb, mask=row_ok[:, None] & (db < D)[None, :])


@triton.jit
def dot_head_dim(xa, xb, ya, yb, DB: tl.constexpr, PRECISION: tl.constexpr):
    """``x @ y^T`` over a split head dim: ``[M, D] x [N, D] -> [M, N]`` float32."""
    s = tl.dot(xa, tl.trans(ya), input_precision=PRECISION)
    if DB > 0:
        s = tl.dot(xb, tl.trans(yb), s, input_precision=PRECISION)
    return s


@triton.jit
def _load_kv_tile(k_base, v_base, descs, start, vis, stride_kn, stride_vn, DK: tl.constexpr, DV: tl.constexpr,
                  DKA: tl.constexpr, DKB: tl.constexpr, DVP: tl.constexpr, BLOCK_N: tl.constexpr,
                  MASK: tl.constexpr, TMA: tl.constexpr):
    """Compressed keys (two head-dim blocks) and values ``start .. start + BLOCK_N`` of one kv head.

    With ``TMA``, ``descs = (k_desc_a, k_desc_b, v_desc, b, h)`` (:func:`kv_tile_descriptors`):
    tokens past the visible ones are then loaded too, finite, for the caller's mask to drop (its
    ``p`` is 0 there), and zeros past the last compressed token."""
    if TMA:
        k_desc_a, k_desc_b, v_desc, b, h = descs
        ka, kb = load_box_split(k_desc_a, k_desc_b, b, start, h, BLOCK_N, DKA, DKB)
        return ka, kb, load_box(v_desc, b, start, h, BLOCK_N, DVP)
    local = tl.arange(0, BLOCK_N)
    dv = tl.arange(0, DVP)
    # Only tiles past the fully-visible prefix can run past the last compressed token.
    if MASK:
        col_ok = start + local < tl.max(vis)
    else:
        col_ok = local >= 0
    ka, kb = load_head_dim(k_base + tl.cast(start, tl.int64) * stride_kn + local * stride_kn, col_ok, DK, DKA, DKB)
    v = tl.load(v_base + tl.cast(start, tl.int64) * stride_vn + local[:, None] * stride_vn + dv[None, :],
                mask=col_ok[:, None] & (dv < DV)[None, :], other=0.0)
    return ka, kb, v


@triton.jit
def _fwd_step(qa, qb, acc, m_i, l_i, k_base, v_base, descs, start, vis, stride_kn, stride_vn, qk_scale,
              DK: tl.constexpr, DV: tl.constexpr, DKA: tl.constexpr, DKB: tl.constexpr, DVP: tl.constexpr,
              BLOCK_N: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    cols = start + tl.arange(0, BLOCK_N)
    ka, kb, v = _load_kv_tile(k_base, v_base, descs, start, vis, stride_kn, stride_vn, DK, DV, DKA, DKB, DVP,
                              BLOCK_N, MASK, TMA)
    s = dot_head_dim(qa, qb, ka, kb, DKB, PRECISION) * qk_scale
    if MASK:
        s = tl.where(cols[None, :] < vis[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASK:
        # A row that has seen no key yet keeps max -inf; shift by 0 so exp2 gives 0, not NaN.
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new_safe = m_new
    p = tl.exp2(s - m_new_safe[:, None])
    alpha = tl.exp2(m_i - m_new_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _cmp_fwd_kernel(Q, K, V, O, LSE, K_DESC_A, K_DESC_B, V_DESC, T, HK,
                    stride_qb, stride_qt, stride_qh, stride_kb, stride_kn, stride_kh,
                    stride_vb, stride_vn, stride_vh, stride_ob, stride_ot, stride_oh,
                    stride_lb, stride_lt, stride_lh, qk_scale,
                    G: tl.constexpr, GP: tl.constexpr, BLOCK: tl.constexpr, STRIDE: tl.constexpr,
                    DK: tl.constexpr, DV: tl.constexpr, DKA: tl.constexpr, DKB: tl.constexpr, DVP: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    # Later tiles see more keys; launching them first evens out the tail of the grid.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HK
    h = pid_bh % HK
    BLOCK_T: tl.constexpr = BLOCK_M // GP
    t0 = pid_m * BLOCK_T
    pos, g, row_ok, local_t = tile_rows(pid_m, T, G, GP, BLOCK_M)
    dv = tl.arange(0, DVP)
    q_rows = tile_base(Q, b, t0, h * G, stride_qb, stride_qt, stride_qh) + local_t * stride_qt + g * stride_qh
    qa, qb = load_head_dim(q_rows, row_ok, DK, DKA, DKB)
    vis = tl.where(row_ok, visible_count(pos, BLOCK, STRIDE), 0)
    # Keys below n_full are visible to every row of the tile: no mask there.
    n_full = (visible_count(t0, BLOCK, STRIDE) // BLOCK_N) * BLOCK_N
    n_end = visible_count(tl.minimum(t0 + BLOCK_T, T) - 1, BLOCK, STRIDE)
    k_base = tile_base(K, b, 0, h, stride_kb, 0, stride_kh)
    v_base = tile_base(V, b, 0, h, stride_vb, 0, stride_vh)
    acc = tl.zeros([BLOCK_M, DVP], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    descs = (K_DESC_A, K_DESC_B, V_DESC, b, h)
    for start in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _fwd_step(qa, qb, acc, m_i, l_i, k_base, v_base, descs, start, vis, stride_kn,
                                  stride_vn, qk_scale, DK, DV, DKA, DKB, DVP, BLOCK_N, False, PRECISION, TMA)
    for start in range(n_full, n_end, BLOCK_N):
        acc, m_i, l_i = _fwd_step(qa, qb, acc, m_i, l_i, k_base, v_base, descs, start, vis, stride_kn,
                                  stride_vn, qk_scale, DK, DV, DKA, DKB, DVP, BLOCK_N, True, PRECISION, TMA)
    has_keys = l_i > 0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * LN2_JIT, float("-inf"))
    o_rows = tile_base(O, b, t0, h * G, stride_ob, stride_ot, stride_oh) + local_t * stride_ot + g * stride_oh
    tl.store(o_rows[:, None] + dv[None, :], o.to(O.dtype.element_ty), mask=row_ok[:, None] & (dv < DV)[None, :])
    lse_rows = tile_base(LSE, b, t0, h * G, stride_lb, stride_lt, stride_lh) + local_t * stride_lt + g * stride_lh
    tl.store(lse_rows, lse, mask=row_ok)


# Few configs: each costs a compile per (G, head dims) on first use. The lists hold the winners
# of scripts/gpu/tune_kernels.py (H200, G=16, bf16, 8k and 64k, 2026-11-29) plus a fallback; the
# sweep's numbers are in docs/PERFORMANCE.md ("Tile sweep"). Each list holds a small tile
# that fits Hopper's 227 KiB of shared memory in float32 at Dk=192 (compiled for sm_90: 144, 84
# and 128 KiB). The fast tiles barely fit float32 at Dk=128 (forward 225 KiB, dK/dV 209 KiB at
# best) and not at Dk=192, and a list with no config that fits would fail instead of running slowly.
# The best tiles again with their key/value tiles (query tiles in dK/dV) loaded by the
# tensor-memory accelerator (TMA): fewer registers (compiled for sm_90 at 128/128, the forward's
# 128 x 64 tile 210 -> 145, dq's 218 -> 180) and no per-thread address arithmetic. Timed on an
# H100 (seventeenth session, tune_kernels.py, 64k, 64/4 heads): forward 10.27 -> 9.16 ms
# (128 x 128, 3 stages), dq 12.81 -> 11.28 (128 x 64, 3 stages); in dK/dV they lost (19.73
# against 19.04), so DKDV_TMA_TILES stay sweep candidates. The launchers pass descriptors where
# they can and autotune over the pointer configs only where none can be made.
FWD_TMA_TILES = [(256, 64, 8, 2, {"TMA": True}), (128, 128, 8, 3, {"TMA": True}),
                 (128, 64, 8, 3, {"TMA": True})]
_FWD_CONFIGS = group_configs([(256, 64, 8, 2), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 2),
                              *FWD_TMA_TILES])
_cmp_fwd_tuned = SizeTunedKernel(_cmp_fwd_kernel, _FWD_CONFIGS, key=["G", "DK", "DV", "BLOCK", "STRIDE", "PRECISION"],
                                 prune_configs_by={"early_config_prune": prune_group_rows})


@triton.jit
def _load_query_tile(Q, DO, LSE, DELTA, descs, b, t0, h0, g, local_t, row_ok, stride_qb, stride_qt, stride_qh,
                     stride_ob, stride_ot, stride_oh, stride_lb, stride_lt, stride_lh,
                     DK: tl.constexpr, DV: tl.constexpr, DKA: tl.constexpr, DKB: tl.constexpr,
                     DVP: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, BLOCK_M: tl.constexpr,
                     TMA: tl.constexpr):
    """q (two head-dim blocks), dO, lse*log2(e) and delta of a query tile; padding rows load zeros,
    so they add nothing.

    With ``TMA`` and ``G == GP`` (a tile's rows are then whole ``[positions, G]`` boxes of ``q``
    and ``dO``), q and dO come through ``descs = (q_desc_a, q_desc_b, do_desc)``
    (:func:`query_tile_descriptors`), zero past ``T``; lse and delta by pointers."""
    if TMA and G == GP:
        q_desc_a, q_desc_b, do_desc = descs
        qa, qb = load_box_split(q_desc_a, q_desc_b, b, t0, h0, BLOCK_M, DKA, DKB)
        do = load_box(do_desc, b, t0, h0, BLOCK_M, DVP)
    else:
        dv = tl.arange(0, DVP)
        q_rows = (tile_base(Q, b, t0, h0, stride_qb, stride_qt, stride_qh) + local_t * stride_qt
                  + g * stride_qh)
        qa, qb = load_head_dim(q_rows, row_ok, DK, DKA, DKB)
        do_rows = (tile_base(DO, b, t0, h0, stride_ob, stride_ot, stride_oh) + local_t * stride_ot
                   + g * stride_oh)
        do = tl.load(do_rows[:, None] + dv[None, :], mask=row_ok[:, None] & (dv < DV)[None, :], other=0.0)
    row_off = local_t * stride_lt + g * stride_lh
    lse2 = tl.load(tile_base(LSE, b, t0, h0, stride_lb, stride_lt, stride_lh) + row_off,
                   mask=row_ok, other=0.0) * LOG2E_JIT
    delta = tl.load(tile_base(DELTA, b, t0, h0, stride_lb, stride_lt, stride_lh) + row_off, mask=row_ok, other=0.0)
    return qa, qb, do, lse2, delta


@triton.jit
def _dkdv_step(ka, kb, v, dk_acc_a, dk_acc_b, dv_acc, cols, pid_m, Q, DO, LSE, DELTA, descs, T, b, h,
               stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh,
               stride_lb, stride_lt, stride_lh, qk_scale,
               G: tl.constexpr, GP: tl.constexpr, BLOCK: tl.constexpr, STRIDE: tl.constexpr,
               DK: tl.constexpr, DV: tl.constexpr, DKA: tl.constexpr, DKB: tl.constexpr, DVP: tl.constexpr,
               BLOCK_M: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    pos, g, row_ok, local_t = tile_rows(pid_m, T, G, GP, BLOCK_M)
    qa, qb, do, lse2, delta = _load_query_tile(Q, DO, LSE, DELTA, descs, b, pid_m * (BLOCK_M // GP), h * G, g,
                                               local_t, row_ok, stride_qb, stride_qt, stride_qh, stride_ob,
                                               stride_ot, stride_oh, stride_lb, stride_lt, stride_lh, DK, DV,
                                               DKA, DKB, DVP, G, GP, BLOCK_M, TMA)
    # Rows before the key's first reader have lse = -inf (exp2 -> inf); the mask drops them.
    allowed_t = cols[:, None] * STRIDE + BLOCK - 1 <= pos[None, :]
    return dkdv_tile(qa, qb, do, lse2, delta, ka, kb, v, allowed_t, allowed_t, qk_scale, dk_acc_a, dk_acc_b,
                     dv_acc, DKB, PRECISION, MASK, True)


def chunk_slot_start(n, chunk_len, num_chunks, BLOCK, STRIDE):
    """Where key row ``n``'s float32 dK/dV partials start in a (batch, kv head)'s slots, and the
    first chunk with a partial: ``(slot_start, first_chunk)``.

    Query positions are cut into chunks of ``chunk_len`` (a multiple of ``STRIDE``); row ``n``
    has one slot per chunk from ``first_chunk = (n*STRIDE + BLOCK - 1) // chunk_len`` (the chunk
    of its first reader) to ``num_chunks - 1``, rows one after another. The slots before row
    ``n`` are ``sum_{m<n} num_chunks - first_chunk(m)``, with ``first_chunk(m) = (m + o) // c``
    (``o = (BLOCK - 1) // STRIDE``, ``c = chunk_len // STRIDE``) summed in closed form. Plain
    integer arithmetic: the host sizes the buffer with it, kernels run it as
    :func:`chunk_slot_start_jit`.
    """
    c = chunk_len // STRIDE
    o = (BLOCK - 1) // STRIDE
    q_hi = (o + n) // c
    q_lo = o // c
    # sum_{i < M} i // c = c * q * (q - 1) / 2 + q * (M % c), q = M // c
    below_hi = c * q_hi * (q_hi - 1) // 2 + q_hi * ((o + n) % c)
    below_lo = c * q_lo * (q_lo - 1) // 2 + q_lo * (o % c)
    return n * num_chunks - (below_hi - below_lo), (o + n) // c


chunk_slot_start_jit = triton.jit(chunk_slot_start)


@triton.jit
def _cmp_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK_PART, DV_PART, Q_DESC_A, Q_DESC_B, DO_DESC, T, N, HK,
                         CHUNK_LEN, SLOTS,
                         stride_qb, stride_qt, stride_qh, stride_kb, stride_kn, stride_kh,
                         stride_vb, stride_vn, stride_vh, stride_ob, stride_ot, stride_oh,
                         stride_lb, stride_lt, stride_lh, qk_scale, scale,
                         G: tl.constexpr, GP: tl.constexpr, BLOCK: tl.constexpr, STRIDE: tl.constexpr,
                         DK: tl.constexpr, DV: tl.constexpr, DKA: tl.constexpr, DKB: tl.constexpr,
                         DVP: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    # Program (key tile, b*HK + h, chunk) sums over the query tiles of positions [chunk*CHUNK_LEN,
    # (chunk+1)*CHUNK_LEN) (CHUNK_LEN is a multiple of BLOCK_T: a tile is in one chunk) into its
    # rows' float32 slots (chunk_slot_start); _cmp_dkdv_reduce_kernel adds them in chunk order.
    # Every chunk holds the same work for every tile it reaches, so the grid's programs are of
    # one size (but each tile's first) and launching the last chunks first leaves no long tail.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    num_chunks = tl.num_programs(2)
    pid_s = num_chunks - 1 - tl.program_id(2)
    b = pid_bh // HK
    h = pid_bh % HK
    BLOCK_T: tl.constexpr = BLOCK_M // GP
    local = tl.arange(0, BLOCK_N)
    cols = pid_n * BLOCK_N + local
    # A tile whose first reader comes after this chunk has nothing to add (its loads are skipped).
    first_reader = pid_n * BLOCK_N * STRIDE + BLOCK - 1
    # (Broadcast before the &: the interpreter rejects a mask built from a 0-d comparison.)
    col_ok = (cols < N) & (local * 0 + first_reader // CHUNK_LEN <= pid_s)
    dv = tl.arange(0, DVP)
    v_mask = col_ok[:, None] & (dv < DV)[None, :]
    k_rows = tile_base(K, b, pid_n * BLOCK_N, h, stride_kb, stride_kn, stride_kh) + local * stride_kn
    ka, kb = load_head_dim(k_rows, col_ok, DK, DKA, DKB)
    v = tl.load(tile_base(V, b, pid_n * BLOCK_N, h, stride_vb, stride_vn, stride_vh) + local[:, None] * stride_vn
                + dv[None, :], mask=v_mask, other=0.0)
    dk_acc_a = tl.zeros([BLOCK_N, DKA], dtype=tl.float32)
    # Unused (and compiled away) when DKB == 0.
    dk_acc_b = tl.zeros([BLOCK_N, DKB if DKB > 0 else 16], dtype=tl.float32)
    dv_acc = tl.zeros([BLOCK_N, DVP], dtype=tl.float32)
    last_col = tl.minimum(pid_n * BLOCK_N + BLOCK_N, N) - 1
    # From tile m_full on, every row reads every key of this tile.
    m_start = first_reader // BLOCK_T
    m_end = tl.cdiv(T, BLOCK_T)
    m_full = tl.minimum(tl.cdiv(last_col * STRIDE + BLOCK - 1, BLOCK_T), m_end)
    chunk_start = pid_s * (CHUNK_LEN // BLOCK_T)
    chunk_end = (pid_s + 1) * (CHUNK_LEN // BLOCK_T)
    descs = (Q_DESC_A, Q_DESC_B, DO_DESC)
    for pid_m in range(tl.maximum(m_start, chunk_start), tl.minimum(m_full, chunk_end)):
        dk_acc_a, dk_acc_b, dv_acc = _dkdv_step(
            ka, kb, v, dk_acc_a, dk_acc_b, dv_acc, cols, pid_m, Q, DO, LSE, DELTA, descs, T, b, h,
            stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh, stride_lb, stride_lt, stride_lh,
            qk_scale, G, GP, BLOCK, STRIDE, DK, DV, DKA, DKB, DVP, BLOCK_M, True, PRECISION, TMA)
    for pid_m in range(tl.maximum(m_full, chunk_start), tl.minimum(m_end, chunk_end)):
        dk_acc_a, dk_acc_b, dv_acc = _dkdv_step(
            ka, kb, v, dk_acc_a, dk_acc_b, dv_acc, cols, pid_m, Q, DO, LSE, DELTA, descs, T, b, h,
            stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh, stride_lb, stride_lt, stride_lh,
            qk_scale, G, GP, BLOCK, STRIDE, DK, DV, DKA, DKB, DVP, BLOCK_M, False, PRECISION, TMA)
    # Partials are float32 [B*HK, SLOTS, D]; a row's slot for this chunk follows its first one
    # (rows whose first reader comes after this chunk have none). Computed here, not held
    # through the loops: the accumulators already fill the registers.
    slot_start, first_chunk = chunk_slot_start_jit(cols, CHUNK_LEN, num_chunks, BLOCK, STRIDE)
    slot = slot_start + pid_s - first_chunk
    col_ok = col_ok & (first_chunk <= pid_s)
    v_mask = col_ok[:, None] & (dv < DV)[None, :]
    dk_part = DK_PART + tl.cast(pid_bh, tl.int64) * SLOTS * DK + slot * DK
    store_head_dim(dk_part, col_ok, dk_acc_a * scale, dk_acc_b * scale, DK, DKA, DKB)
    dv_part = DV_PART + tl.cast(pid_bh, tl.int64) * SLOTS * DV + slot * DV
    tl.store(dv_part[:, None] + dv[None, :], dv_acc, mask=v_mask)


@triton.jit
def _cmp_dkdv_reduce_kernel(DK_PART, DV_PART, DK_OUT, DV_OUT, N, HK, CHUNK_LEN, NUM_CHUNKS, SLOTS,
                            stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
                            BLOCK: tl.constexpr, STRIDE: tl.constexpr, DK: tl.constexpr,
                            DV: tl.constexpr, DKP: tl.constexpr, DVP: tl.constexpr, ROWS: tl.constexpr,
                            UNROLL: tl.constexpr):
    """dk, dv of ``ROWS`` key rows of one (batch, kv head): their chunks' partials added in chunk
    order, rounded once to the gradients' dtype. ``UNROLL`` chunks' loads per step are issued
    together (Triton does not pipeline this loop: each step would wait out its loads' latency)."""
    pid_bh = tl.program_id(1)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    slot_start, first_chunk = chunk_slot_start_jit(rows, CHUNK_LEN, NUM_CHUNKS, BLOCK, STRIDE)
    ck = tl.arange(0, DKP)
    cv = tl.arange(0, DVP)
    dk_base = DK_PART + tl.cast(pid_bh, tl.int64) * SLOTS * DK
    dv_base = DV_PART + tl.cast(pid_bh, tl.int64) * SLOTS * DV
    dk_acc = tl.zeros([ROWS, DKP], dtype=tl.float32)
    dv_acc = tl.zeros([ROWS, DVP], dtype=tl.float32)
    for chunk0 in range(tl.min(tl.where(row_ok, first_chunk, NUM_CHUNKS)), NUM_CHUNKS, UNROLL):
        for u in tl.static_range(UNROLL):
            chunk = chunk0 + u
            # (Broadcast before the &: the interpreter rejects a mask built from a 0-d comparison.)
            has = row_ok & (first_chunk <= chunk) & (first_chunk * 0 + chunk < NUM_CHUNKS)
            slot = slot_start + chunk - first_chunk
            dk_acc += tl.load(dk_base + slot[:, None] * DK + ck[None, :],
                              mask=has[:, None] & (ck < DK)[None, :], other=0.0)
            dv_acc += tl.load(dv_base + slot[:, None] * DV + cv[None, :],
                              mask=has[:, None] & (cv < DV)[None, :], other=0.0)
    b = pid_bh // HK
    h = pid_bh % HK
    dk_rows = tile_base(DK_OUT, b, tl.program_id(0) * ROWS, h, stride_kb, stride_kn, stride_kh)
    dk_rows += tl.arange(0, ROWS) * stride_kn
    tl.store(dk_rows[:, None] + ck[None, :], dk_acc.to(DK_OUT.dtype.element_ty),
             mask=row_ok[:, None] & (ck < DK)[None, :])
    dv_rows = tile_base(DV_OUT, b, tl.program_id(0) * ROWS, h, stride_vb, stride_vn, stride_vh)
    dv_rows += tl.arange(0, ROWS) * stride_vn
    tl.store(dv_rows[:, None] + cv[None, :], dv_acc.to(DV_OUT.dtype.element_ty),
             mask=row_ok[:, None] & (cv < DV)[None, :])


@triton.jit
def _dq_step(qa, qb, do, lse2, delta, dq_acc_a, dq_acc_b, k_base, v_base, descs, start, vis, stride_kn,
             stride_vn, qk_scale, DK: tl.constexpr, DV: tl.constexpr, DKA: tl.constexpr, DKB: tl.constexpr,
             DVP: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr,
             TMA: tl.constexpr):
    cols = start + tl.arange(0, BLOCK_N)
    ka, kb, v = _load_kv_tile(k_base, v_base, descs, start, vis, stride_kn, stride_vn, DK, DV, DKA, DKB, DVP,
                              BLOCK_N, MASK, TMA)
    p = tl.exp2(dot_head_dim(qa, qb, ka, kb, DKB, PRECISION) * qk_scale - lse2[:, None])
    if MASK:
        p = tl.where(cols[None, :] < vis[:, None], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = (p * (dp - delta[:, None])).to(ka.dtype)
    dq_acc_a += tl.dot(ds, ka, input_precision=PRECISION)
    if DKB > 0:
        dq_acc_b += tl.dot(ds, kb, input_precision=PRECISION)
    return dq_acc_a, dq_acc_b


@triton.jit
def _cmp_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, K_DESC_A, K_DESC_B, V_DESC, T, HK,
                       stride_qb, stride_qt, stride_qh, stride_kb, stride_kn, stride_kh,
                       stride_vb, stride_vn, stride_vh, stride_ob, stride_ot, stride_oh,
                       stride_lb, stride_lt, stride_lh, qk_scale, scale,
                       G: tl.constexpr, GP: tl.constexpr, BLOCK: tl.constexpr, STRIDE: tl.constexpr,
                       DK: tl.constexpr, DV: tl.constexpr, DKA: tl.constexpr, DKB: tl.constexpr, DVP: tl.constexpr,
                       PRECISION: tl.constexpr, DQ_ADD: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    """dq of a tile of query rows (written, or with ``DQ_ADD`` added to what ``DQ`` holds: another
    branch's dq, one float32 sum rounded once)."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HK
    h = pid_bh % HK
    BLOCK_T: tl.constexpr = BLOCK_M // GP
    t0 = pid_m * BLOCK_T
    pos, g, row_ok, local_t = tile_rows(pid_m, T, G, GP, BLOCK_M)
    # Loaded once per program: by pointers (TMA here is the key/value tiles').
    qa, qb, do, lse2, delta = _load_query_tile(Q, DO, LSE, DELTA, None, b, t0, h * G, g, local_t, row_ok,
                                               stride_qb, stride_qt, stride_qh, stride_ob, stride_ot,
                                               stride_oh, stride_lb, stride_lt, stride_lh, DK, DV, DKA, DKB,
                                               DVP, G, GP, BLOCK_M, False)
    vis = tl.where(row_ok, visible_count(pos, BLOCK, STRIDE), 0)
    n_full = (visible_count(t0, BLOCK, STRIDE) // BLOCK_N) * BLOCK_N
    n_end = visible_count(tl.minimum(t0 + BLOCK_T, T) - 1, BLOCK, STRIDE)
    k_base = tile_base(K, b, 0, h, stride_kb, 0, stride_kh)
    v_base = tile_base(V, b, 0, h, stride_vb, 0, stride_vh)
    dq_acc_a = tl.zeros([BLOCK_M, DKA], dtype=tl.float32)
    # Unused (and compiled away) when DKB == 0.
    dq_acc_b = tl.zeros([BLOCK_M, DKB if DKB > 0 else 16], dtype=tl.float32)
    descs = (K_DESC_A, K_DESC_B, V_DESC, b, h)
    for start in range(0, n_full, BLOCK_N):
        dq_acc_a, dq_acc_b = _dq_step(qa, qb, do, lse2, delta, dq_acc_a, dq_acc_b, k_base, v_base, descs,
                                      start, vis, stride_kn, stride_vn, qk_scale, DK, DV, DKA, DKB, DVP,
                                      BLOCK_N, False, PRECISION, TMA)
    for start in range(n_full, n_end, BLOCK_N):
        dq_acc_a, dq_acc_b = _dq_step(qa, qb, do, lse2, delta, dq_acc_a, dq_acc_b, k_base, v_base, descs,
                                      start, vis, stride_kn, stride_vn, qk_scale, DK, DV, DKA, DKB, DVP,
                                      BLOCK_N, True, PRECISION, TMA)
    # DQ is allocated like Q, so Q's strides address it. (Not triton_common's store_or_add_rows_split,
    # whose int64 address per row raised this kernel's spills, sm_90: 64 -> 80 bytes at 128/128.)
    dq_rows = tile_base(DQ, b, t0, h * G, stride_qb, stride_qt, stride_qh) + local_t * stride_qt + g * stride_qh
    dq_a, dq_b = dq_acc_a * scale, dq_acc_b * scale
    if DQ_ADD:
        held_a, held_b = load_head_dim(dq_rows, row_ok, DK, DKA, DKB)
        dq_a += held_a.to(tl.float32)
        if DKB > 0:
            dq_b += held_b.to(tl.float32)
    store_head_dim(dq_rows, row_ok, dq_a.to(DQ.dtype.element_ty), dq_b.to(DQ.dtype.element_ty), DK, DKA, DKB)


# dK/dV: the key tile is the M of its four dots, so it must be wide enough for Hopper's
# warp-group MMA (M >= 64 per warp group): 128 keys x (32 or 64) query rows is 1.8x faster at 64k
# than the former 32 keys x 128 rows (whole backward 72 -> 40 ms, H200). Its two [128, D] float32
# accumulators take 128 registers per thread at 8 warps. All configs share DKDV_KEY_TILE, which
# the query split below assumes.
DKDV_KEY_TILE = 128
# The float32 fallback's narrower key tile only leaves the query split sized for 128-key tiles
# (fewer programs than intended), never a wrong result.
DKDV_TMA_TILES = [(64, DKDV_KEY_TILE, 8, 3, {"TMA": True}), (32, DKDV_KEY_TILE, 8, 3, {"TMA": True}),
                  (64, DKDV_KEY_TILE, 8, 2, {"TMA": True})]
_DKDV_CONFIGS = group_configs([(64, DKDV_KEY_TILE, 8, 3), (32, DKDV_KEY_TILE, 8, 3), (32, 32, 4, 2)],
                              pre_hook=set_query_tile_rows)
DQ_TMA_TILES = [(128, 128, 8, 2, {"TMA": True}), (128, 64, 8, 3, {"TMA": True}),
                (64, 64, 4, 2, {"TMA": True})]
_DQ_CONFIGS = group_configs([(128, 128, 8, 2), (64, 64, 4, 2), (128, 64, 8, 3), (64, 32, 4, 2),
                             *DQ_TMA_TILES])
_TUNE_KEY = ["G", "DK", "DV", "BLOCK", "STRIDE", "PRECISION"]
_cmp_bwd_dkdv_tuned = SizeTunedKernel(_cmp_bwd_dkdv_kernel, _DKDV_CONFIGS, key=_TUNE_KEY,
                                      prune_configs_by={"early_config_prune": prune_group_rows})
_cmp_bwd_dq_tuned = SizeTunedKernel(_cmp_bwd_dq_kernel, _DQ_CONFIGS, key=_TUNE_KEY,
                                    prune_configs_by={"early_config_prune": prune_group_rows})

# Interpreter tiles: small enough that the tests' short sequences cross several key and query
# tiles (masked and unmasked loops both run), large enough to keep numpy busy.
INTERPRET_TILES = {"BLOCK_M": 32, "BLOCK_N": 16, "TMA": False}


def _interpret_tiles(gp: int) -> dict:
    return {**INTERPRET_TILES, "BLOCK_M": max(INTERPRET_TILES["BLOCK_M"], gp)}


def _query_descriptors(q: torch.Tensor, do: torch.Tensor, consts: dict) -> tuple[tuple, bool]:
    """The dK/dV pass's q and dO tensor descriptors (``[1, positions, GP, cols]`` boxes; positions
    set per config by :func:`set_query_tile_rows`, under the interpreter here) and ``True``, or
    the tensors in their place and ``False`` where there are none (no config reads them, or the
    TMA cannot serve the tensors)."""
    gp, interpreted = consts["GP"], _interpret_tiles(consts["GP"])
    descs = tile_descriptors((q, do), [1, interpreted["BLOCK_M"] // gp, gp],
                             [consts["DKA"], max(consts["DKB"], 16), consts["DVP"]], [0, 0, 1],
                             _cmp_bwd_dkdv_tuned.reads_descriptors(interpreted))
    return ((q, q, do), False) if descs is None else (descs, True)


def _kv_descriptors(tuned: SizeTunedKernel, k_cmp: torch.Tensor, v_cmp: torch.Tensor,
                    consts: dict) -> tuple[tuple, bool]:
    """The key/value tensor descriptors of the forward or dq kernel (``tuned``;
    :func:`kv_tile_descriptors`, rows set per config by ``set_kv_tile_rows``, under the interpreter
    here) and ``True``, or the tensors in their place and ``False`` where there are none (no config
    of ``tuned`` reads them, or the TMA cannot serve the tensors)."""
    descs = kv_tile_descriptors(k_cmp, v_cmp, INTERPRET_TILES["BLOCK_N"], (consts["DKA"], consts["DKB"]),
                                consts["DVP"], tuned.reads_descriptors(_interpret_tiles(consts["GP"])))
    return ((k_cmp, k_cmp, v_cmp), False) if descs is None else (descs, True)


def _shape_constants(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, block: int,
                     stride: int) -> dict:
    group = q.shape[2] // k_cmp.shape[2]
    dka, dkb = split_dim(q.shape[3])
    return {"G": group, "GP": pow2(group), "BLOCK": block, "STRIDE": stride, "DK": q.shape[3], "DV": v_cmp.shape[3],
                "DKA": dka, "DKB": dkb, "DVP": max(16, pow2(v_cmp.shape[3])), "PRECISION": dot_precision(q.dtype)}


def _strides3(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def compressed_attention_forward(q, k_cmp, v_cmp, block: int, stride: int, scale: float):
    """``o, lse`` (no autograd): the forward kernel alone; ``lse`` contiguous."""
    batch, seq_len, num_heads, _ = q.shape
    num_kv = k_cmp.shape[2]
    o = q.new_empty(batch, seq_len, num_heads, v_cmp.shape[3])
    lse = torch.empty(batch, seq_len, num_heads, dtype=torch.float32, device=q.device)
    if seq_len == 0 or batch == 0:
        return o, lse
    consts = _shape_constants(q, k_cmp, v_cmp, block, stride)
    gp = consts["GP"]

    def grid(meta):
        return (triton.cdiv(seq_len, meta["BLOCK_M"] // gp), batch * num_kv)

    descs, tma = _kv_descriptors(_cmp_fwd_tuned, k_cmp, v_cmp, consts)
    args = (q, k_cmp, v_cmp, o, lse, *descs, seq_len, num_kv, *_strides3(q),
            *_strides3(k_cmp), *_strides3(v_cmp), *_strides3(o), *_strides3(lse), scale * LOG2E)
    _cmp_fwd_tuned.launch(seq_len, grid, args, consts, _interpret_tiles(gp), tma)
    return o, lse


# Programs per SM wanted from the dK/dV pass: one runs at a time at its tiles (8 warps, 240-255
# registers a thread compiled for sm_90), so this many waves of equal chunks leave at most a sixteenth of the pass
# to the grid's tail. (Five query splits, the former rule of four programs per SM, left the
# heaviest programs a fifth of the work each: 20% over the balanced time at 64k, 64/4 heads.)
DKDV_WAVES = 16
# Query tile rows the chunks stay aligned to (BLOCK_M of any config, a power of two).
DKDV_MAX_TILE_ROWS = 128
# Key rows per program of the partials' reduction, and chunks whose loads it issues together.
# The chunks are added one after another (at 8k the 16 waves wanted give 64 chunks of 128
# positions), so each program's time is its loop's latency: four chunks' loads in flight per step
# instead of one (8 rows: [8, 256] + [8, 128] float32 sums and four chunks' loads at Dk = 192
# compile without spills; 32 rows, the former tile, with one chunk per step used 255 registers).
# Unmeasured on a GPU; the sums and their order are unchanged.
REDUCE_ROWS = 8
REDUCE_UNROLL = 4


def _dkdv_programs(seq_len: int, num_cmp: int, heads: int, block: int, stride: int, key_tile: int,
                   chunk_len: int) -> int:
    """Programs of the dK/dV pass that have work: per key tile, the chunks from its first reader's."""
    num_chunks = triton.cdiv(seq_len, chunk_len)
    return heads * sum(num_chunks - chunk_slot_start(n, chunk_len, num_chunks, block, stride)[1]
                       for n in range(0, num_cmp, key_tile))


@functools.lru_cache(maxsize=256)
def _balanced_chunk_len(seq_len: int, num_cmp: int, heads: int, block: int, stride: int, key_tile: int,
                        align: int, wanted: int) -> int:
    chunk = align
    while (chunk * 2 < seq_len
           and _dkdv_programs(seq_len, num_cmp, heads, block, stride, key_tile, chunk * 2) >= wanted):
        chunk *= 2
    return chunk


def dkdv_chunk_len(seq_len: int, num_cmp: int, heads: int, block: int, stride: int, group_pow2: int,
                   device: torch.device, key_tile: int = DKDV_KEY_TILE) -> int:
    """Query positions per chunk of the dK/dV pass (programs own ``key_tile`` keys x one chunk).

    The longest chunk, a power-of-two multiple of ``lcm(stride, tile positions)``, that still
    gives ``DKDV_WAVES`` programs with work per SM over ``heads`` (batch x kv heads): long chunks
    mean fewer float32 partials (each key row has one per chunk from its first reader's), short
    ones an even grid. Under the interpreter the shortest, so the tests cross several chunks.
    """
    if interpreting():
        return math.lcm(stride, _interpret_tiles(group_pow2)["BLOCK_M"] // group_pow2)
    align = math.lcm(stride, DKDV_MAX_TILE_ROWS)
    wanted = DKDV_WAVES * torch.cuda.get_device_properties(device).multi_processor_count
    return _balanced_chunk_len(seq_len, num_cmp, heads, block, stride, key_tile, align, wanted)


def compressed_attention_backward(q, k_cmp, v_cmp, lse, do, delta, block: int, stride: int, scale: float,
                                  dq=None):
    """``dq, dk_cmp, dv_cmp`` (no autograd) from ``do`` and ``delta`` (:func:`softmax_delta`'s,
    float32 ``[B, T, HQ]``); ``do`` and ``lse`` contiguous, ``dq`` strided like ``q``. With ``dq``
    given (strided like ``q``) the query gradient is added to it in place (a float32 sum rounded
    once) and returned."""
    dk, dv = compressed_attention_backward_dkdv(q, k_cmp, v_cmp, lse, do, delta, block, stride, scale)
    dq = compressed_attention_backward_dq(q, k_cmp, v_cmp, lse, do, delta, block, stride, scale, dq=dq)
    return dq, dk, dv


def _common_args(q, k_cmp, v_cmp, do, delta, block: int, stride: int, scale: float):
    """The constexprs and the stride/scale arguments both backward kernels take."""
    # do/lse/delta share one set of row strides (contiguous).
    return (_shape_constants(q, k_cmp, v_cmp, block, stride),
            (*_strides3(q), *_strides3(k_cmp), *_strides3(v_cmp), *_strides3(do), *_strides3(delta),
             scale * LOG2E, scale))


def compressed_attention_backward_dkdv(q, k_cmp, v_cmp, lse, do, delta, block: int, stride: int,
                                       scale: float):
    """The ``dk_cmp, dv_cmp`` of :func:`compressed_attention_backward` alone (its key pass)."""
    batch, seq_len, _, _ = q.shape
    num_kv, num_cmp = k_cmp.shape[2], k_cmp.shape[1]
    if seq_len == 0 or batch == 0 or num_cmp == 0:
        return torch.zeros_like(k_cmp), torch.zeros_like(v_cmp)
    consts, common = _common_args(q, k_cmp, v_cmp, do, delta, block, stride, scale)
    heads = batch * num_kv
    chunk_len = dkdv_chunk_len(seq_len, num_cmp, heads, block, stride, consts["GP"], q.device)
    num_chunks = triton.cdiv(seq_len, chunk_len)
    slots = chunk_slot_start(num_cmp, chunk_len, num_chunks, block, stride)[0]
    dk_part = torch.empty(heads, slots, consts["DK"], dtype=torch.float32, device=q.device)
    dv_part = torch.empty(heads, slots, consts["DV"], dtype=torch.float32, device=q.device)
    descs, tma = _query_descriptors(q, do, consts)
    dkdv_args = (q, k_cmp, v_cmp, do, lse, delta, dk_part, dv_part, *descs, seq_len, num_cmp, num_kv,
                 chunk_len, slots, *common)

    def dkdv_grid(meta):
        tile_positions = meta["BLOCK_M"] // consts["GP"]
        if chunk_len % tile_positions:
            raise ValueError(f"dK/dV chunks of {chunk_len} positions split query tiles of {tile_positions} "
                             f"(BLOCK_M {meta['BLOCK_M']} > DKDV_MAX_TILE_ROWS {DKDV_MAX_TILE_ROWS}?)")
        return (triton.cdiv(num_cmp, meta["BLOCK_N"]), heads, num_chunks)

    _cmp_bwd_dkdv_tuned.launch(seq_len, dkdv_grid, dkdv_args, consts, _interpret_tiles(consts["GP"]), tma)
    dk, dv = torch.empty_like(k_cmp), torch.empty_like(v_cmp)
    _cmp_dkdv_reduce_kernel[(triton.cdiv(num_cmp, REDUCE_ROWS), heads)](
        dk_part, dv_part, dk, dv, num_cmp, num_kv, chunk_len, num_chunks, slots, *_strides3(dk), *_strides3(dv),
        BLOCK=block, STRIDE=stride, DK=consts["DK"], DV=consts["DV"], DKP=pow2(consts["DK"]),
        DVP=consts["DVP"], ROWS=REDUCE_ROWS, UNROLL=REDUCE_UNROLL)
    return dk, dv


def compressed_attention_backward_dq(q, k_cmp, v_cmp, lse, do, delta, block: int, stride: int, scale: float,
                                     dq=None):
    """The ``dq`` of :func:`compressed_attention_backward` alone (its query pass); with ``dq``
    given, added to it in place."""
    batch, seq_len, _, _ = q.shape
    num_kv, num_cmp = k_cmp.shape[2], k_cmp.shape[1]
    dq_add = dq is not None
    if dq_add and dq.stride() != q.stride():
        raise ValueError(f"dq: strides {dq.stride()} differ from q's {q.stride()}; the kernel addresses "
                         "both alike")
    # The dq kernel writes every row of q's shape through q's strides, whatever they are.
    dq = dq if dq_add else torch.empty_strided(q.shape, q.stride(), dtype=q.dtype, device=q.device)
    if seq_len == 0 or batch == 0 or num_cmp == 0:
        return dq if dq_add else dq.zero_()
    consts, common = _common_args(q, k_cmp, v_cmp, do, delta, block, stride, scale)
    gp = consts["GP"]
    descs, tma = _kv_descriptors(_cmp_bwd_dq_tuned, k_cmp, v_cmp, consts)
    dq_args = (q, k_cmp, v_cmp, do, lse, delta, dq, *descs, seq_len, num_kv, *common)

    def dq_grid(meta):
        return (triton.cdiv(seq_len, meta["BLOCK_M"] // gp), batch * num_kv)

    # In place (restored after each of autotuning's timed launches) when it adds to another's dq.
    _cmp_bwd_dq_tuned.launch(seq_len, dq_grid, dq_args, {**consts, "DQ_ADD": dq_add}, _interpret_tiles(gp),
                             tma, restore=("DQ",) if dq_add else ())
    return dq


class _CompressedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, block, stride, scale):
        o, lse = compressed_attention_forward(q, k_cmp, v_cmp, block, stride, scale)
        ctx.save_for_backward(q, k_cmp, v_cmp, o, lse)
        ctx.config = (block, stride, scale)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k_cmp, v_cmp, o, lse = ctx.saved_tensors
        do = do.contiguous()
        dq, dk, dv = compressed_attention_backward(q, k_cmp, v_cmp, lse, do, softmax_delta(o, do, None),
                                                   *ctx.config)
        return dq, dk, dv, None, None, None


def compressed_attention_triton(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, *, block: int,
                                stride: int, scale: float | None = None,
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over compressed tokens, differentiable w.r.t. ``q``, ``k_cmp``, ``v_cmp``.

    Args:
        q: ``[B, T, HQ, Dk]`` float16/bfloat16/float32, row ``t`` is the query at position ``t``;
            last dim contiguous.
        k_cmp: ``[B, N, HK, Dk]``, same dtype, ``HQ % HK == 0``; token ``i`` built from
            positions ``[i*stride, i*stride + block)``.
        v_cmp: ``[B, N, HK, Dv]``, same dtype.
        block, stride: ``l`` and ``d``.
        scale: softmax scale, default ``1/sqrt(Dk)``.

    Returns:
        ``o [B, T, HQ, Dv]`` in ``q.dtype`` (0 where a query sees no compressed token) and
        ``lse [B, T, HQ]`` float32, natural log (``-inf`` there); ``lse`` is not differentiable.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k_cmp, v_cmp = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k_cmp, v_cmp))
    return _CompressedAttention.apply(q, k_cmp, v_cmp, block, stride, scale)
