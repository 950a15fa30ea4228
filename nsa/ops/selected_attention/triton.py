"""Selection attention in Triton (forward and backward), organised per GQA group.

Forward and dq: a program owns ``BT`` consecutive positions x the ``G`` query heads of one
key/value head (``BLOCK_M`` rows) and walks the selected blocks. With ``BT = 1`` (the paper's
kernel, used when ``G >= 16``) every row reads the same block list and each block is loaded once
for the whole group. With ``BT > 1`` (small ``G``, so the dot still has >= 16 rows) the program
walks the union of its positions' lists, each block once (a vector of the tile's list entries
is deduplicated before the loop, so ``BT`` is a power of two and ``BT * n`` at most
``UNION_ENTRIES``), and each row keeps only the blocks its own position selected.

dk/dv (deterministic, no atomics): the selections are inverted on the GPU (one sort of
``(kv head, block, position)`` keys), giving for every key block the ascending list of query
positions that selected it. The list is cut into chunks of ``CHUNK`` positions; one program per
chunk loads its key block once and accumulates over the chunk's queries in list order, writing
fp32 partial sums (or, for a block of one chunk, its dk/dv); a second kernel adds each block's
partials in chunk order. Same inputs, same bits. Block 0 (forced for every query) is what the
chunking balances: it would otherwise be one program over all ``T`` queries.
"""

from __future__ import annotations

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
    softmax_delta,
    softmax_finish,
    split_acc,
    split_dim,
    store_or_add_rows_split,
    store_rows,
    store_rows_split,
)

# Query positions per dk/dv program: bounds the work of the block every query selects.
CHUNK = 1024
# List entries (positions x padded list width) of a union-walking tile, at most: the kernel holds
# them as one vector and compares it with each earlier position's list (compiled for sm_90, 1,024
# entries spilled; 256 did not).
UNION_ENTRIES = 256


@triton.jit
def forced_block(blk, pos, BS: tl.constexpr):
    """Whether block ``blk`` is forced for the query at ``pos`` (block 0 and the local blocks
    ``pos // BS - 1`` and ``pos // BS``; ``blk`` and ``pos`` broadcast together)."""
    return (blk == 0) | (blk >= pos // BS - 1)


@triton.jit
def _sel_query_kernel(q, k, v, idx, o, lse, do, delta, dq, k_desc_a, k_desc_b, v_desc,
                      sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sib, sit, sih,
                      sob, sot, soh, slb, slt, slh,
                      T, NSEL, qk_scale, scale,
                      HK: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                      DK_A: tl.constexpr, DK_B: tl.constexpr, DV_PAD: tl.constexpr, BS: tl.constexpr,
                      N_PAD: tl.constexpr,
                      BACKWARD: tl.constexpr, DQ_ADD: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr,
                      BLOCK_M: tl.constexpr, TMA: tl.constexpr, SKIP_FORCED: tl.constexpr):
    """Forward (o, lse) or, with BACKWARD, dq; both walk each position's selected blocks.

    ``SKIP_FORCED`` leaves out each position's forced blocks 0, ``c - 1`` and ``c`` (``c = t //
    BS``), which the window's passes took on: in the forward the softmax starts from their
    share, read from ``o, lse`` where the window's forward wrote it (then overwritten with the
    whole); in dq the window's pass adds theirs (``SelectionForcedBlocks``). The lists are
    ascending with the forced blocks in them, so those are the first and the last entries of
    each.

    ``o``/``do``/``dq`` share the strides ``sob, sot, soh`` (dq uses ``q``'s shape; see the
    launcher), ``lse``/``delta`` share ``slb, slt, slh``. With ``TMA`` the key/value blocks come
    through the tensor descriptors ``k_desc_a, k_desc_b, v_desc`` (:func:`_block_descriptors`).
    """
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b32 = pid_bh // HK
    b = b32.to(tl.int64)
    h = pid_bh % HK
    t0 = pid_t * BT
    r, row_pos, row_ok = row_layout(t0, T, G, BT, BLOCK_M)
    head = h * G + r % G
    qa, qb = load_rows_split(q + b * sqb, row_pos, head, sqt, sqh, row_ok, DK, DK_A, DK_B)
    idx_base = idx + b * sib + h * sih
    slot = tl.arange(0, N_PAD)
    row_sel = tl.load(idx_base + row_pos.to(tl.int64)[:, None] * sit + slot[None, :],
                      mask=row_ok[:, None] & (slot[None, :] < NSEL), other=-1)
    if SKIP_FORCED:
        row_sel = tl.where(forced_block(row_sel, row_pos[:, None], BS), -1, row_sel)
    k_base = k + b * skb + h * skh
    v_base = v + b * svb + h * svh
    descs = (k_desc_a, k_desc_b, v_desc, b32, h)
    kk = tl.arange(0, BS)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    lse_rows = b * slb + row_pos.to(tl.int64) * slt + head * slh
    if BACKWARD:
        do_t = load_rows(do + b * sob, row_pos, head, sot, soh, row_ok, DV, DV_PAD)
        lse2 = tl.load(lse + lse_rows, mask=row_ok, other=0.0) * 1.4426950408889634
        delta_t = tl.load(delta + lse_rows, mask=row_ok, other=0.0)
        acc, acc_b = split_acc(BLOCK_M, DK_A, DK_B)
    else:
        if SKIP_FORCED:
            # The forced blocks' normalised softmax as the online softmax's state: running max
            # their lse (base 2), sum 1, accumulator their output.
            m_i = tl.load(lse + lse_rows, mask=row_ok, other=float("-inf")) * 1.4426950408889634
            l_i = tl.where(row_ok, 1.0, 0.0)
            acc = load_rows(o + b * sob, row_pos, head, sot, soh, row_ok, DV, DV_PAD).to(tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, DV_PAD], dtype=tl.float32)
        acc_b, do_t, lse2, delta_t = acc, acc, l_i, l_i  # the backward's operands, unused here
    if BT == 1:
        # One position: every row shares the list, -1 padding sits at its end. SKIP_FORCED leaves
        # out block 0 (the first entry, forced) and the local blocks (the last valid ones).
        n_valid = tl.max(tl.sum((row_sel >= 0).to(tl.int32), axis=1), axis=0)
        first = 1 if SKIP_FORCED else 0
        for s in range(first, first + n_valid):
            blk = tl.load(idx_base + t0.to(tl.int64) * sit + s)
            kpos = blk * BS + kk
            allowed = kpos[None, :] <= row_pos[:, None]
            m_i, l_i, acc, acc_b = attend_keys_at(blk * BS, kpos, allowed, qa, qb, k_base, v_base, descs, T,
                                                  skt, svt, qk_scale, m_i, l_i, acc, acc_b, lse2, delta_t,
                                                  do_t, DK, DV, DK_A, DK_B, DV_PAD, BS, PREC, BACKWARD, True,
                                                  TMA)
    else:
        # The union of the tile's lists, each block once, in the order the lists first name it.
        # The entries (position, slot) of the tile as one vector; an entry is new when no earlier
        # position of the tile lists its block (one list has no repeats), and the s-th new entry
        # is the s-th block walked. The loop has no branch: Triton pipelines its K/V loads only
        # then (a skip-if-listed-before branch around them, the former walk, exposed every load's
        # latency; compiled for sm_90 it had no asynchronous copies).
        entry = tl.arange(0, BT * N_PAD)
        entry_pos = t0 + entry // N_PAD
        entry_slot = entry % N_PAD
        entry_blk = tl.load(idx_base + entry_pos.to(tl.int64) * sit + entry_slot,
                            mask=(entry_pos < T) & (entry_slot < NSEL), other=-1)
        if SKIP_FORCED:
            entry_blk = tl.where(forced_block(entry_blk, entry_pos, BS), -1, entry_blk)
        listed_before = tl.zeros([BT * N_PAD], dtype=tl.int32)
        for earlier in tl.static_range(0, BT - 1):
            earlier_pos = tl.minimum(t0 + earlier, T - 1)
            earlier_list = tl.load(idx_base + earlier_pos.to(tl.int64) * sit + slot, mask=slot < NSEL,
                                   other=-1)
            if SKIP_FORCED:
                # (A block local to an earlier position may be another one's non-local pick.)
                earlier_list = tl.where(forced_block(earlier_list, earlier_pos, BS), -1, earlier_list)
            hits = tl.sum((entry_blk[:, None] == earlier_list[None, :]).to(tl.int32), axis=1)
            listed_before += tl.where(entry // N_PAD > earlier, hits, 0)
        new = ((entry_blk >= 0) & (listed_before == 0)).to(tl.int32)
        walk_rank = tl.where(new > 0, tl.cumsum(new, axis=0) - 1, -1)
        for s in range(0, tl.sum(new, axis=0)):
            blk = tl.sum(tl.where(walk_rank == s, entry_blk, 0), axis=0)
            kpos = blk * BS + kk
            member = tl.sum((row_sel == blk).to(tl.int32), axis=1) > 0
            allowed = (kpos[None, :] <= row_pos[:, None]) & member[:, None]
            m_i, l_i, acc, acc_b = attend_keys_at(blk * BS, kpos, allowed, qa, qb, k_base, v_base, descs, T,
                                                  skt, svt, qk_scale, m_i, l_i, acc, acc_b, lse2, delta_t,
                                                  do_t, DK, DV, DK_A, DK_B, DV_PAD, BS, PREC, BACKWARD, True,
                                                  TMA)
    if BACKWARD:
        store_or_add_rows_split(dq + b * sqb, acc * scale, acc_b * scale, row_pos, head, sqt, sqh, row_ok,
                                DK, DK_A, DK_B, DQ_ADD)
    else:
        out, lse_t = softmax_finish(m_i, l_i, acc)
        store_rows(o + b * sob, out, row_pos, head, sot, soh, row_ok, DV, DV_PAD)
        tl.store(lse + lse_rows, lse_t, mask=row_ok)


@triton.jit
def _sel_dkdv_kernel(q, k, v, do, lse, delta, qpos, item_group, item_start, item_len,
                     dk_part, dv_part, group_items, dk, dv,
                     sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh, slb, slt, slh,
                     T, NB, qk_scale, scale,
                     HK: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                     DK_A: tl.constexpr, DK_B: tl.constexpr, DV_PAD: tl.constexpr, BS: tl.constexpr,
                     PREC: tl.constexpr, BT: tl.constexpr, BLOCK_M: tl.constexpr, KEYS_AS_M: tl.constexpr):
    """Partial dk/dv of one key block over one chunk of the queries that selected it (with
    ``KEYS_AS_M`` the block is the M of the dots: :func:`nsa.ops.triton_common.dkdv_tile`); a
    block's only chunk writes its dk/dv itself (the reduction then skips the block)."""
    item = tl.program_id(0).to(tl.int64)
    group = tl.load(item_group + item)
    start = tl.load(item_start + item)
    length = tl.load(item_len + item)
    bh = group // NB
    blk = group % NB
    b = (bh // HK).to(tl.int64)
    h = bh % HK
    kk = tl.arange(0, BS)
    kpos = blk * BS + kk
    ka, kb = load_rows_split(k + b * skb + h * skh, kpos, kk * 0, skt, 0, kpos < T, DK, DK_A, DK_B)
    vb = load_block(v + b * svb + h * svh, kpos, T, svt, DV, DV_PAD)
    dk_acc, dk_acc_b = split_acc(BS, DK_A, DK_B)
    dv_acc = tl.zeros([BS, DV_PAD], dtype=tl.float32)
    r = tl.arange(0, BLOCK_M)
    head = h * G + r % G
    for c in range(0, length, BT):
        entry = c + r // G
        row_ok = (r < BT * G) & (entry < length)
        row_pos = tl.load(qpos + start + entry, mask=row_ok, other=0)
        qa, qb = load_rows_split(q + b * sqb, row_pos, head, sqt, sqh, row_ok, DK, DK_A, DK_B)
        do_t = load_rows(do + b * sob, row_pos, head, sot, soh, row_ok, DV, DV_PAD)
        lse_rows = b * slb + row_pos.to(tl.int64) * slt + head * slh
        lse2 = tl.load(lse + lse_rows, mask=row_ok, other=0.0) * 1.4426950408889634
        delta_t = tl.load(delta + lse_rows, mask=row_ok, other=0.0)
        allowed = (kpos[None, :] <= row_pos[:, None]) & row_ok[:, None]
        allowed_t = (kpos[:, None] <= row_pos[None, :]) & row_ok[None, :]
        dk_acc, dk_acc_b, dv_acc = dkdv_tile(qa, qb, do_t, lse2, delta_t, ka, kb, vb, allowed, allowed_t,
                                             qk_scale, dk_acc, dk_acc_b, dv_acc, DK_B, PREC, True, KEYS_AS_M)
    if (tl.load(group_items + group) == 1) & (length > 0):
        # Most blocks at long T (those past the first few hundred) have one chunk: rounded once
        # into dk/dv here, no float32 partials written and read back. (The spare items past the
        # last, of length 0, name the last group too: they must not write its dk/dv.)
        store_rows_split(dk + b * skb + h * skh, dk_acc * scale, dk_acc_b * scale, kpos, kk * 0, skt, 0,
                         kpos < T, DK, DK_A, DK_B)
        store_rows_split(dv + b * svb + h * svh, dv_acc, dv_acc, kpos, kk * 0, svt, 0, kpos < T, DV, DV_PAD,
                         0)
    else:
        store_rows_split(dk_part + item * (BS * DK), dk_acc * scale, dk_acc_b * scale, kk, kk * 0, DK, 0,
                         kk < BS, DK, DK_A, DK_B)
        store_rows_split(dv_part + item * (BS * DV), dv_acc, dv_acc, kk, kk * 0, DV, 0, kk < BS, DV, DV_PAD,
                         0)


@triton.jit
def _sel_reduce_kernel(dk_part, dv_part, group_first_item, group_items, dk, dv,
                       skb, skt, skh, svb, svt, svh, T, NB,
                       HK: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, DK_PAD: tl.constexpr,
                       DV_PAD: tl.constexpr, BS: tl.constexpr):
    """dk/dv of one key block: its chunks' partials added in chunk order (0 if never selected; a
    block of one chunk was written by the dK/dV kernel)."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    group = bh.to(tl.int64) * NB + blk
    first = tl.load(group_first_item + group)
    count = tl.load(group_items + group)
    kk = tl.arange(0, BS)
    ck = tl.arange(0, DK_PAD)
    cv = tl.arange(0, DV_PAD)
    dk_acc = tl.zeros([BS, DK_PAD], dtype=tl.float32)
    dv_acc = tl.zeros([BS, DV_PAD], dtype=tl.float32)
    for i in range(0, tl.where(count == 1, 0, count)):
        item = (first + i).to(tl.int64)
        dk_acc += tl.load(dk_part + item * (BS * DK) + kk[:, None] * DK + ck[None, :],
                          mask=ck[None, :] < DK, other=0.0)
        dv_acc += tl.load(dv_part + item * (BS * DV) + kk[:, None] * DV + cv[None, :],
                          mask=cv[None, :] < DV, other=0.0)
    b = (bh // HK).to(tl.int64)
    h = bh % HK
    kpos = (blk * BS + kk).to(tl.int64)
    # (Broadcast before the &: the interpreter rejects a mask built from a 0-d comparison.)
    ok = (kpos < T) & (kk * 0 + count != 1)
    tl.store(dk + b * skb + h * skh + kpos[:, None] * skt + ck[None, :], dk_acc.to(dk.dtype.element_ty),
             mask=ok[:, None] & (ck[None, :] < DK))
    tl.store(dv + b * svb + h * svh + kpos[:, None] * svt + cv[None, :], dv_acc.to(dv.dtype.element_ty),
             mask=ok[:, None] & (cv[None, :] < DV))


# (rows, warps, stages): one position per program for G >= 16, position tiles below.
# scripts/gpu/tune_kernels.py (H200, G=16): 2 warps beat 4 by 7% at 8k and 64k (fwd and dq).
# (16, 1, 2): 4 positions on one warp at G = 4, the fastest forward of the thirteenth
# session's sweep at 16/4 heads, 64k (13.5 ms against 14.6, H100).
# (16, 2, 3): the fastest dq at 16/4 (fourteenth session, H100, 64k: 13.8 ms against 14.4).
_POINTER_OPTIONS = [(16, 2, 2), (16, 4, 2), (64, 4, 2), (16, 1, 2), (16, 2, 3)]
# The walks with the blocks loaded by the tensor-memory accelerator (TMA), which tune_kernels.py
# sweeps. H100, 64k, sixteenth session (--only sel-query): at 64/4 heads the forward 16.25 ms on
# (16, 1, 2) against 16.79 for the best pointer option, dq 16.48 on (16, 2, 3) against 17.22; at
# 16/4 13.11 against 13.61 and 13.24 against 13.98. Those two and the runner-up (16, 4, 3) are in
# the autotune list; (16, 1, 2)'s dq took 26.6 ms (autotuning keeps it for the forward only).
TMA_OPTIONS = [(16, 2, 2, {"TMA": True}), (16, 2, 3, {"TMA": True}), (16, 1, 2, {"TMA": True}),
               (16, 4, 3, {"TMA": True}), (16, 2, 4, {"TMA": True})]
_TMA_PRODUCTION = [TMA_OPTIONS[1], TMA_OPTIONS[2], TMA_OPTIONS[3]]
# Where no tensor descriptor can be made (see _block_descriptors) the pointer options run.
_query_kernel = GroupTunedKernel(_sel_query_kernel, _POINTER_OPTIONS + _TMA_PRODUCTION,
                                 key=["G", "DK", "DV", "BS", "BACKWARD"], extra={"TMA": False})


def _block_descriptors(k: torch.Tensor, v: torch.Tensor, meta: dict, wanted: bool = True):
    """:func:`kv_tile_descriptors` of one selection block (``BS`` rows) of ``k`` and ``v``."""
    return kv_tile_descriptors(k, v, meta["BS"], (meta["DK_A"], meta["DK_B"]), meta["DV_PAD"], wanted)


# Short (each config is one more compile on first use); (64, 4, 2) won the tile sweep at 8k and
# 64k (12.4 ms against 17.6 for the former choice at 64k, H200). Compiled for sm_90 at Dk = Dv =
# 128 it spills 392 bytes per thread (two [64, 128] float32 accumulators on 4 warps). At 16/4
# heads (thirteenth session, H100, 64k) a third stage won (4.1 ms against 4.5), and (64, 8, 2),
# which holds the accumulators without spilling, took 8.0.
# Keys as the M of the dots (KEYS_AS_M; see the window kernel's dK/dV list) never won here:
# H100, fourteenth session, 64k, 64/4 heads 13.83 ms at best against 13.45 (16/4: 4.47 against
# 4.13), so no option of the list uses it (tune_kernels.py still sweeps it).
_dkdv_kernel = GroupTunedKernel(_sel_dkdv_kernel, [(64, 4, 2), (64, 4, 3), (128, 8, 2), (128, 8, 1)],
                                key=["G", "DK", "DV", "BS"], extra={"KEYS_AS_M": False})


def _common(q, k, v, select_block):
    batch, seq_len, num_heads, dk = q.shape
    num_kv = k.shape[2]
    dv = v.shape[-1]
    dk_a, dk_b = split_dim(dk)
    return dict(HK=num_kv, G=num_heads // num_kv, DK=dk, DV=dv, DK_A=dk_a, DK_B=dk_b,
                DV_PAD=triton.next_power_of_2(dv), BS=select_block, PREC=dot_precision(q.dtype))


def _query_pass(q, k, v, idx, scale, select_block, *, lse=None, do=None, delta=None, dq=None,
                skip_forced=False, forced=None):
    """Forward when ``do is None`` (returns o, lse; completing ``forced = (o, lse)``, the forced
    blocks' softmax, in place), else dq (added to ``dq`` when given; without the forced blocks'
    share with ``skip_forced``)."""
    batch, seq_len, num_heads, _ = q.shape
    meta = _common(q, k, v, select_block)
    backward = do is not None
    dq_add = dq is not None
    if backward:
        dq = dq if dq_add else torch.empty_like(q)
        o = do  # unused by the dq pass; do's strides are the output's
    else:
        if forced is not None:
            o, lse = forced  # completed in place
            skip_forced = True
        else:
            o = q.new_empty(batch, seq_len, num_heads, v.shape[-1])
            lse = torch.empty(batch, seq_len, num_heads, dtype=torch.float32, device=q.device)
        do, delta, dq = o, lse, q  # unused in the forward
    n = idx.shape[-1]
    n_pad = triton.next_power_of_2(max(n, 1))
    max_positions = max(1, UNION_ENTRIES // n_pad)
    descriptors = _block_descriptors(k, v, meta, _query_kernel.reads_descriptors())
    tma = descriptors is not None
    descriptors = descriptors if tma else (k, k, v)  # placeholders: the TMA options do not run

    def grid(cfg):
        return (triton.cdiv(seq_len, cfg["BT"]), batch * meta["HK"])

    # In place (restored after each of autotuning's timed launches): dq when it adds to another
    # branch's (DQ_ADD); o and lse in the forward that completes the window's forced blocks.
    restore = ("dq",) if dq_add else ("o", "lse") if forced is not None else ()
    _query_kernel(grid, q, k, v, idx, o, lse, do, delta, dq, *descriptors,
                  *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *idx.stride()[:3],
                  *o.stride()[:3], *lse.stride(),
                  seq_len, n, scale * LOG2E, scale, N_PAD=n_pad, BACKWARD=backward, DQ_ADD=dq_add,
                  SKIP_FORCED=skip_forced, seq_len=seq_len, max_positions=max_positions, tma=tma,
                  restore=restore, **meta)
    return dq if backward else (o, lse)


def invert_selection(idx: torch.Tensor, seq_len: int, select_block: int, chunk: int = CHUNK,
                     key_dtype: torch.dtype | None = None):
    """For every (batch, kv head, key block): the ascending query positions that selected it.

    Args:
        idx: int ``[B, T, HK, n]`` block indices, ``-1`` padded, distinct within a list.
        key_dtype: the integer type of the sort keys ``group * T + t`` (``groups * T`` when the
            slot is padding): ``torch.int32`` when they fit (half the radix passes and the bytes
            of ``torch.int64``), else ``torch.int64``; given only to test one or the other.

    Returns:
        ``qpos`` int32 ``[B*T*HK*n]`` positions grouped by ``(b*HK + h)*NB + block``; per work
        item (a chunk of at most ``chunk`` positions of one group) int32 ``item_group,
        item_start, item_len``; per group int32 ``group_first_item, group_items``. No host sync:
        the item count is the bound ``B*T*HK*n/chunk + groups``; spare items have length 0.
    """
    batch, _, num_kv, n = idx.shape
    nb = triton.cdiv(seq_len, select_block)
    groups = batch * num_kv * nb
    fits_int32 = groups * seq_len <= torch.iinfo(torch.int32).max
    if key_dtype is None:
        key_dtype = torch.int32 if fits_int32 else torch.int64
    elif key_dtype not in (torch.int32, torch.int64) or (key_dtype == torch.int32 and not fits_int32):
        raise ValueError(f"key_dtype: {key_dtype} cannot hold the sort keys up to {groups * seq_len} "
                         f"({groups} groups x T={seq_len}); accepted: torch.int64, or torch.int32 below 2^31")
    dev = idx.device
    t = torch.arange(seq_len, device=dev, dtype=key_dtype)[None, :, None, None]
    bh = (torch.arange(batch, device=dev, dtype=key_dtype)[:, None, None, None] * num_kv
          + torch.arange(num_kv, device=dev, dtype=key_dtype)[None, None, :, None])
    blk = idx.to(key_dtype)
    # (A Python scalar for the padding keeps key_dtype and needs no host-to-device copy.)
    key = torch.where(blk >= 0, ((bh * nb + blk) * seq_len + t), groups * seq_len).flatten()
    key = torch.sort(key).values
    qpos = (key % seq_len).to(torch.int32)
    # Group boundaries by binary search in the sorted keys (no atomics, unlike bincount).
    bounds = torch.searchsorted(key // seq_len, torch.arange(groups + 1, device=dev, dtype=key_dtype))
    group_start = bounds[:-1]
    counts = bounds[1:] - group_start
    items_per_group = (counts + chunk - 1) // chunk
    items_end = torch.cumsum(items_per_group, 0)
    group_first_item = items_end - items_per_group
    max_items = key.numel() // chunk + groups + 1
    item_ids = torch.arange(max_items, device=dev)
    item_group = torch.searchsorted(items_end, item_ids, right=True).clamp(max=groups - 1)
    local = item_ids - group_first_item[item_group]
    item_start = group_start[item_group] + local * chunk
    item_len = (counts[item_group] - local * chunk).clamp(0, chunk)
    i32 = torch.int32
    return (qpos, item_group.to(i32), item_start.to(i32), item_len.to(i32), group_first_item.to(i32),
            items_per_group.to(i32))


def _dkdv_pass(q, k, v, idx, do, lse, delta, scale, select_block, inverted=None):
    batch, seq_len, _, _ = q.shape
    meta = _common(q, k, v, select_block)
    inverted = invert_selection(idx, seq_len, select_block, CHUNK) if inverted is None else inverted
    qpos, item_group, item_start, item_len, group_first, group_items = inverted
    items = item_group.numel()
    dk_part = torch.empty(items, select_block, meta["DK"], dtype=torch.float32, device=q.device)
    dv_part = torch.empty(items, select_block, meta["DV"], dtype=torch.float32, device=q.device)
    nb = triton.cdiv(seq_len, select_block)
    dk, dv = torch.empty_like(k), torch.empty_like(v)  # contiguous like k, v: their strides address them
    _dkdv_kernel(lambda cfg: (items,), q, k, v, do, lse, delta, qpos, item_group, item_start, item_len,
                 dk_part, dv_part, group_items, dk, dv, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                 *do.stride()[:3], *lse.stride(), seq_len, nb, scale * LOG2E, scale, seq_len=seq_len, **meta)
    _sel_reduce_kernel[(nb, batch * meta["HK"])](
        dk_part, dv_part, group_first, group_items, dk, dv, *dk.stride()[:3], *dv.stride()[:3],
        seq_len, nb, HK=meta["HK"], DK=meta["DK"], DV=meta["DV"],
        DK_PAD=triton.next_power_of_2(meta["DK"]),
        DV_PAD=meta["DV_PAD"], BS=select_block)
    return dk, dv


class _SelectedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, select_block, scale):
        o, lse = selected_attention_forward(q, k, v, idx, select_block, scale)
        ctx.save_for_backward(q, k, v, idx, o, lse)
        ctx.select_block, ctx.scale = select_block, scale
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, idx, o, lse = ctx.saved_tensors
        do = do.contiguous()
        dq, dk, dv = selected_attention_backward(q, k, v, idx, lse, do, softmax_delta(o, do, dlse),
                                                 ctx.select_block, ctx.scale)
        return dq, dk, dv, None, None, None


def selected_attention_forward(q, k, v, idx, select_block: int, scale: float,
                               forced=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``o, lse`` of contiguous ``q, k, v`` and int32 ``idx`` (no autograd): the forward kernel alone.

    ``forced = (o, lse)``: the softmax over each query's forced blocks alone (0, ``c - 1``, ``c``;
    :func:`nsa.ops.window_attention.triton.window_attention_forward_with_forced` over the same
    ``k, v``), ``[B, T, HQ, Dv]`` in ``q.dtype`` and float32 ``[B, T, HQ]``, contiguous: the walk
    then reads only the other blocks, and the whole softmax is written over those two tensors,
    which are returned. ``idx`` lists are then as :func:`nsa.ops.select_blocks` returns them
    (ascending, the forced blocks in them)."""
    if forced is not None:
        o, lse = forced
        batch, seq_len, num_heads, _ = q.shape
        want_o, want_lse = (batch, seq_len, num_heads, v.shape[-1]), (batch, seq_len, num_heads)
        got = (tuple(o.shape), o.dtype, tuple(lse.shape), lse.dtype)
        contiguous = o.is_contiguous() and lse.is_contiguous()
        if got != (want_o, q.dtype, want_lse, torch.float32) or not contiguous:
            raise ValueError(f"forced: (o, lse) contiguous, o {want_o} {q.dtype} and lse {want_lse} float32; "
                             f"got o {tuple(o.shape)} {o.dtype}, lse {tuple(lse.shape)} {lse.dtype}")
    return _query_pass(q, k, v, idx, scale, select_block, forced=forced)


def selected_attention_backward(q, k, v, idx, lse, do, delta, select_block: int, scale: float, dq=None):
    """``dq, dk, dv`` (no autograd) from contiguous ``q, k, v``, int32 ``idx``, ``do`` (strided like
    the output), ``lse`` and ``delta`` float32 ``[B, T, HQ]`` (:func:`softmax_delta`'s). With ``dq``
    given the query gradient is added to it in place (a float32 sum rounded once) and returned."""
    dq = selected_attention_backward_dq(q, k, v, idx, lse, do, delta, select_block, scale, dq=dq)
    dk, dv = selected_attention_backward_dkdv(q, k, v, idx, lse, do, delta, select_block, scale)
    return dq, dk, dv


def selected_attention_backward_dq(q, k, v, idx, lse, do, delta, select_block: int, scale: float, dq=None,
                                   skip_forced: bool = False):
    """The ``dq`` of :func:`selected_attention_backward` alone (its query pass); ``skip_forced``
    leaves out the forced blocks 0, ``c - 1``, ``c`` (lists as :func:`nsa.ops.select_blocks`
    returns them: ascending, forced blocks included; their share then comes from the window's
    dq pass)."""
    return _query_pass(q, k, v, idx, scale, select_block, lse=lse, do=do, delta=delta, dq=dq,
                       skip_forced=skip_forced)


def selected_attention_backward_dkdv(q, k, v, idx, lse, do, delta, select_block: int, scale: float,
                                     inverted=None):
    """The ``dk, dv`` of :func:`selected_attention_backward` alone (the selections inverted, then
    one pass per key block): reads no ``dq``, so it may run beside another branch's backward.
    ``inverted``: :func:`invert_selection` of ``idx`` when the caller already ran it."""
    return _dkdv_pass(q, k, v, idx, do, lse, delta, scale, select_block, inverted)


def selected_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor,
                              *, select_block: int, scale: float | None = None,
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over the positions ``<= t`` of its selected blocks (Triton).

    Same function as :func:`nsa.ops.selected_attention.naive.selected_attention` with
    ``q_offset = 0``; differentiable w.r.t. ``q, k, v`` (and through ``lse``). Deterministic.

    Args:
        q: ``[B, T, HQ, Dk]`` float16/bfloat16/float32.
        k: ``[B, T, HK, Dk]``, ``HQ % HK == 0``, same dtype.
        v: ``[B, T, HK, Dv]``, same dtype.
        block_indices: int ``[B, T, HK, n]``: per query and kv head, distinct ascending block
            indices then ``-1`` padding (as :func:`nsa.ops.select_blocks` returns).
        select_block: ``l'``, a power of two >= 16.
        scale: defaults to ``1/sqrt(Dk)``.

    Returns:
        ``o [B, T, HQ, Dv]`` in ``q.dtype`` and ``lse [B, T, HQ]`` float32 (natural log; ``-inf``
        and ``o = 0`` for a query that reads no key).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    # Contiguous so that o, do and dq (and q) share one set of strides in the kernels.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    idx = block_indices.to(torch.int32).contiguous()
    return _SelectedAttention.apply(q, k, v, idx, select_block, scale)
