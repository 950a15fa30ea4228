"""Block selection in Triton: p_cmp -> Eq. 9 -> Eq. 10 group sum -> top-n, in one streaming pass.

Same result as ``select_blocks(selection_block_scores(...))`` of :mod:`nsa.ops.selection.naive`
(``q_offset = 0``), without ever holding a ``[T, num_compressed]`` or ``[T, num_blocks]`` tensor.

One program owns a tile of positions and all ``G`` query heads of one key/value head (the row
layout of :mod:`nsa.ops.compressed_attention.triton`). It walks the selection blocks in steps of
``NB_STEP``; a step loads the ``BLOCK_N`` compressed keys those blocks overlap, recomputes
``p_cmp = exp(q.k*scale - lse)`` with the compressed attention's log-sum-exp (the "second pass
over the compressed keys"), maps it to block scores with the step's slice of Eq. 9 (a second
``tl.dot``, per head), sums those over the group's heads (Eq. 10) and merges the step's blocks
into a running top-n kept in registers.

The merge is built for few block-level instructions per step (the selection kernel used to
spend ~3x the compressed attention's time there): a step's blocks that beat a row's n-th best
enter by one replace-the-minimum pass each (late in a sequence most steps gain none or one), and
steps where some row gains more than ``MAX_INSERTS`` merge by a bitonic ``tl.topk``. With
``MERGE_STEPS`` of 2 or 4 (a sweep candidate; slower when timed) that many steps' blocks merge
at once, for fewer of the merge's serial reductions per block.

Eq. 9 windows overlap: block ``j`` reads compressed tokens ``a*j-(b-1) .. a*j+a-1`` (``a = l'/d``,
``b = l/d``), so consecutive steps share ``b-1`` keys; a step starts its key tile at
``a*j0 - (b-1)`` and covers ``NB_STEP = (BLOCK_N - b + 1) // a`` whole windows.

Ranking uses one int64 per block: the float bits of its score (scores are >= 0, so the bits
order like the floats) above ``2^31 - 1 - j``; so larger keys are better blocks and equal scores
rank the lower index first, exactly the naive stable sort. Forced blocks get the bits of +inf,
blocks that are neither forced nor candidates get ``NO_BLOCK`` and are never picked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa.ops.compressed_attention.triton import (
    LOG2E,
    LOG2E_JIT,
    dot_head_dim,
    load_head_dim,
    pow2,
    tile_base,
    tile_rows,
    visible_count,
)
from nsa.ops.triton_common import (
    SizeTunedKernel,
    dot_precision,
    load_box_split,
    set_kv_tile_rows,
    split_dim,
    tile_descriptors,
)

INDEX_BITS = tl.constexpr(0x7FFFFFFF)
FORCED_KEY_HIGH = tl.constexpr(0x7F800000 << 32)  # float bits of +inf, shifted above the index
# Below every key the running top-n holds (real keys >= 0, empty slots -1 - slot >= -NP).
NO_BLOCK = tl.constexpr(-(1 << 40))
# Top-n slots COUNT..NP-1 (n not a power of two) hold INT64_MAX - slot: never the minimum, so
# never replaced, and above every real key, so a bitonic merge keeps them.
UNUSED_SLOT = tl.constexpr(0x7FFFFFFFFFFFFFFF)
# Steps where some row gains more blocks than this merge by a bitonic top-k, others by one
# insertion pass per gained block. Compiled for sm_90 (G=16, n=16, 8 warps) a pass costs ~90
# instructions per warp, the top-k ~490, the rest of a step ~710.
MAX_INSERTS = tl.constexpr(5)


@triton.jit
def _block_keys(scores, j, cur, in_step, t_ok):
    """Ranking keys ``[BLOCK_T, NBT]`` of blocks ``j`` (forced +inf, candidates by score, else
    ``NO_BLOCK``)."""
    cur = cur[:, None]
    forced = ((j == 0) | (j == cur) | (j == cur - 1)) & in_step
    candidate = (j >= 1) & (j <= cur - 2) & in_step
    # Scores are sums of exp2 >= 0; clamping the bits drops a possible -0.0.
    bits = tl.maximum(scores.to(tl.int32, bitcast=True), 0).to(tl.int64)
    low = INDEX_BITS.value - j.to(tl.int64)
    key = tl.where(candidate, (bits << 32) | low, NO_BLOCK.value)
    key = tl.where(forced, FORCED_KEY_HIGH | low, key)
    return tl.where(t_ok[:, None], key, NO_BLOCK.value)


@triton.jit
def _largest(keys, WIDTH: tl.constexpr, K: tl.constexpr):
    """The ``K`` largest of each row of ``keys [R, WIDTH]`` (all distinct), in descending order.

    Rank counting (``[R, WIDTH, WIDTH]``): used once per program, for the output order, where it
    is cheap and, unlike ``tl.topk``'s xor reductions, fast under the interpreter.
    """
    rank = tl.sum((keys[:, :, None] > keys[:, None, :]).to(tl.int32), axis=1)
    slot = tl.arange(0, K)[None, None, :]
    return tl.sum(tl.where(rank[:, :, None] == slot, keys[:, :, None], 0), axis=1)


# The final ordering ranks by counting ([positions, NP, NP] compares) up to this top-n width; wider
# (n > 64: e.g. n * l' >= T to make selection see everything) that tensor passes Triton's 2^20
# element limit at n = 512, and a bitonic ``tl.sort`` takes over.
RANK_SORT_MAX_WIDTH = tl.constexpr(64)


# p <= 1 is scaled by 2^14 before its fp16 split: the hi part stays below fp16's max, and the
# lo part stays above fp16's subnormals for every p that matters at float32 accuracy.
FP16_SPLIT_SCALE = tl.constexpr(16384.0)
FP16_SPLIT_LOG2 = tl.constexpr(14.0)


@triton.jit
def eq9_dot_scaled(x, w):
    """``x @ w`` for ``x = p * 2^14`` (``p [M, N]`` float32 in ``[0, 1]``, ``w [N, K]`` float16
    integers) to float32 accuracy.

    Two fp16 ``tl.dot``s of ``x = hi + lo`` (``lo`` the fp16-rounded remainder, ``~2^-22`` of
    ``x`` lost): an fp16 left operand comes from the accumulator layout without a shuffle, a
    tf32 one does not, and ``w`` is exact in fp16.
    """
    hi = x.to(tl.float16)
    lo = (x - hi.to(tl.float32)).to(tl.float16)
    acc = tl.dot(hi, w)
    return tl.dot(lo, w, acc)


@triton.jit
def eq9_dot(p, w):
    """``p @ w`` to float32 accuracy (``p`` float32 in ``[0, 1]``; see :func:`eq9_dot_scaled`)."""
    return eq9_dot_scaled(p * FP16_SPLIT_SCALE, w) * (1.0 / FP16_SPLIT_SCALE)


@triton.jit
def _merge_top(top, key, NP: tl.constexpr, NBT: tl.constexpr):
    """The ``NP`` largest of ``top [R, NP]`` and ``key [R, NBT]`` together.

    Bitonic top-k (``tl.topk``): ``O(w log^2 w)`` compare-exchanges with no rank matrices.
    """
    if NBT > NP:
        key = tl.topk(key, NP)
    both = tl.reshape(tl.join(top, key), [top.shape[0], 2 * NP])
    return tl.topk(both, NP)


@triton.jit
def _joined(a, b):
    """``[R, W]`` and ``[R, W]`` as one ``[R, 2W]`` (columns interleaved: a top-n ignores order)."""
    return tl.reshape(tl.join(a, b), [a.shape[0], 2 * a.shape[1]])


@triton.jit
def _step_keys(j0, step, A: tl.constexpr, B: tl.constexpr, BLOCK_T: tl.constexpr, GP: tl.constexpr,
               DK: tl.constexpr, DKA: tl.constexpr, DKB: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_N: tl.constexpr, NB_STEP: tl.constexpr, NBT: tl.constexpr, TMA: tl.constexpr,
               GUARD: tl.constexpr):
    """Ranking keys ``[BLOCK_T, NBT]`` of the step's blocks ``j0 .. j0 + NB_STEP``: its compressed
    keys loaded, ``p_cmp`` recomputed, Eq. 9 and Eq. 10. With ``GUARD`` the step may lie past the
    tile's last block (all ``NO_BLOCK`` then, no work); without, the loop bound rules that out and
    no branch surrounds the loads (Triton pipelines a loop's loads only outside branches).
    ``step`` holds the program's loop invariants (see the kernel)."""
    last_block = step[-1]
    if GUARD:
        if j0 <= last_block:
            key = _step_keys_of(j0, step, A, B, BLOCK_T, GP, DK, DKA, DKB, PRECISION, BLOCK_N, NB_STEP, NBT,
                                TMA)
        else:
            key = tl.full([BLOCK_T, NBT], NO_BLOCK.value, tl.int64)
    else:
        key = _step_keys_of(j0, step, A, B, BLOCK_T, GP, DK, DKA, DKB, PRECISION, BLOCK_N, NB_STEP, NBT, TMA)
    return key


@triton.jit
def _step_keys_of(j0, step, A: tl.constexpr, B: tl.constexpr, BLOCK_T: tl.constexpr, GP: tl.constexpr,
                  DK: tl.constexpr, DKA: tl.constexpr, DKB: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_N: tl.constexpr, NB_STEP: tl.constexpr, NBT: tl.constexpr, TMA: tl.constexpr):
    """:func:`_step_keys` of a step at or before the tile's last block."""
    qa, qb, k_base, k_desc_a, k_desc_b, b, h, stride_kn, qk_scale, lse2, vis, n_vis, min_vis, w, cur, \
        in_step, t_ok, _ = step
    local_k = tl.arange(0, NBT)[None, :]
    local_n = tl.arange(0, BLOCK_N)
    first_col = A * j0 - (B - 1)
    cols = first_col + local_n
    col_ok = (cols >= 0) & (cols < n_vis)
    if TMA:
        # Zero before the first and past the last compressed token; the visible ones' mask
        # below drops the rest.
        ka, kb = load_box_split(k_desc_a, k_desc_b, b, first_col, h, BLOCK_N, DKA, DKB)
    else:
        key_rows = k_base + tl.cast(first_col, tl.int64) * stride_kn + local_n * stride_kn
        ka, kb = load_head_dim(key_rows, col_ok, DK, DKA, DKB)
    s = dot_head_dim(qa, qb, ka, kb, DKB, PRECISION) * qk_scale
    p = tl.exp2(s - lse2[:, None])  # p_cmp * 2^14
    if (first_col < 0) | (first_col + BLOCK_N > min_vis):
        # Rows that see nothing have lse = -inf (exp2 -> inf); where() drops them with the rest.
        p = tl.where((cols[None, :] < vis[:, None]) & col_ok[None, :], p, 0.0)
    # Eq. 9 per head on the tensor cores (it is linear, so it commutes with the group sum),
    # then Eq. 10 over NBT block columns instead of BLOCK_N key columns.
    head_scores = eq9_dot_scaled(p, w)
    scores = tl.sum(tl.reshape(head_scores, [BLOCK_T, GP, NBT]), axis=1)
    key = _block_keys(scores, j0 + local_k, cur, in_step, t_ok)
    return key


@triton.jit
def _select_kernel(Q, K, LSE, OUT, K_DESC_A, K_DESC_B, T, HK,
                   stride_qb, stride_qt, stride_qh, stride_kb, stride_kn, stride_kh,
                   stride_lb, stride_lt, stride_lh, stride_out_b, stride_out_t, stride_out_h, qk_scale,
                   G: tl.constexpr, GP: tl.constexpr, BLOCK: tl.constexpr, STRIDE: tl.constexpr,
                   SELECT_BLOCK: tl.constexpr, COUNT: tl.constexpr, NP: tl.constexpr,
                   DK: tl.constexpr, DKA: tl.constexpr, DKB: tl.constexpr, PRECISION: tl.constexpr,
                   MAX_POSITIONS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB_STEP: tl.constexpr, NBT: tl.constexpr,
                   TMA: tl.constexpr, MERGE_STEPS: tl.constexpr):
    A: tl.constexpr = SELECT_BLOCK // STRIDE
    B: tl.constexpr = BLOCK // STRIDE
    BLOCK_T: tl.constexpr = BLOCK_M // GP
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HK
    h = pid_bh % HK
    t0 = pid_m * BLOCK_T
    pos, g, row_ok, local_t = tile_rows(pid_m, T, G, GP, BLOCK_M)
    q_rows = tile_base(Q, b, t0, h * G, stride_qb, stride_qt, stride_qh) + local_t * stride_qt + g * stride_qh
    qa, qb = load_head_dim(q_rows, row_ok, DK, DKA, DKB)
    lse_rows = tile_base(LSE, b, t0, h * G, stride_lb, stride_lt, stride_lh) + local_t * stride_lt + g * stride_lh
    # Padding rows get lse = +inf, so their p is exactly 0 without a mask. Less 14: the exp2
    # below yields p * 2^14, the input eq9_dot_scaled wants, and the block scores come out 2^14
    # times Eq. 9's, which ranks them identically (a power of two: exact) for one multiply per
    # score fewer.
    lse2 = tl.load(lse_rows, mask=row_ok, other=0.0) * LOG2E_JIT - FP16_SPLIT_LOG2
    lse2 = tl.where(row_ok, lse2, float("inf"))
    vis = tl.where(row_ok, visible_count(pos, BLOCK, STRIDE), 0)
    n_vis = tl.max(vis)
    # Steps whose keys every row sees need no mask (all but the first and the last one or two).
    min_vis = tl.min(tl.where(row_ok, vis, n_vis))
    local_pos = tl.arange(0, BLOCK_T)
    tpos = t0 + local_pos
    t_ok = tpos < T
    cur = tpos // SELECT_BLOCK
    last_block = (tl.minimum(t0 + BLOCK_T, T) - 1) // SELECT_BLOCK
    # Eq. 9 slice of one step: w[i, k] = #{(m, u): a*k + m - u = i - (b-1)}, step-local i and k.
    local_i = tl.arange(0, BLOCK_N)[:, None]
    local_k = tl.arange(0, NBT)[None, :]
    r = local_i - (B - 1) - A * local_k
    w = tl.minimum(B - 1, A - 1 - r) - tl.maximum(0, -r) + 1
    # Exact in float16: w <= min(a, b) <= 2048 (checked by the wrapper).
    w = tl.where(local_k < NB_STEP, tl.maximum(w, 0), 0).to(tl.float16)
    in_step = local_k < NB_STEP
    tl.static_assert((MERGE_STEPS == 1) | (MERGE_STEPS == 2) | (MERGE_STEPS == 4))
    col_np = tl.arange(0, NP)[None, :]
    # Running top-n as an unordered set of distinct keys (empty slots -1 - slot) and its minimum.
    col64 = col_np.to(tl.int64)
    top = tl.broadcast_to(tl.where(col_np < COUNT, -1 - col64, UNUSED_SLOT.value - col64), [BLOCK_T, NP])
    nth_best = tl.min(top, axis=1)
    k_base = tile_base(K, b, 0, h, stride_kb, 0, stride_kh)
    step = (qa, qb, k_base, K_DESC_A, K_DESC_B, b, h, stride_kn, qk_scale, lse2, vis, n_vis, min_vis, w, cur,
            in_step, t_ok, last_block)
    # MERGE_STEPS steps' keys merge into the top-n at once: fewer of the merge's serial
    # reductions per block, for up to MERGE_STEPS - 1 steps past the last one (no work: NO_BLOCK).
    for j0 in range(0, last_block + 1, NB_STEP * MERGE_STEPS):
        key = _step_keys(j0, step, A, B, BLOCK_T, GP, DK, DKA, DKB, PRECISION, BLOCK_N, NB_STEP, NBT, TMA,
                         False)
        if MERGE_STEPS >= 2:
            key = _joined(key, _step_keys(j0 + NB_STEP, step, A, B, BLOCK_T, GP, DK, DKA, DKB, PRECISION,
                                          BLOCK_N, NB_STEP, NBT, TMA, True))
        if MERGE_STEPS == 4:
            later = _joined(_step_keys(j0 + 2 * NB_STEP, step, A, B, BLOCK_T, GP, DK, DKA, DKB, PRECISION,
                                       BLOCK_N, NB_STEP, NBT, TMA, True),
                            _step_keys(j0 + 3 * NB_STEP, step, A, B, BLOCK_T, GP, DK, DKA, DKB, PRECISION,
                                       BLOCK_N, NB_STEP, NBT, TMA, True))
            key = _joined(key, later)
        # Blocks a row gains this step are those beating its n-th best.
        gains = tl.max(tl.sum((key > nth_best[:, None]).to(tl.int32), axis=1))
        if gains > MAX_INSERTS:
            top = _merge_top(top, key, NP, NBT * MERGE_STEPS)
            nth_best = tl.min(top, axis=1)
        else:
            # Each pass moves every row's best remaining block into its top-n if it beats the
            # n-th best (replacing that, the unique minimum); blocks come in descending order,
            # so `gains` passes take all of them.
            for _ in range(gains):
                best = tl.max(key, axis=1)
                enters = best > nth_best
                top = tl.where(enters[:, None] & (top == nth_best[:, None]), best[:, None], top)
                key = tl.where(key == best[:, None], NO_BLOCK.value, key)
                nth_best = tl.min(top, axis=1)
    # Ascending block order, padding last: the largest of -index (unused slots far below).
    valid = (top >= 0) & (top <= (FORCED_KEY_HIGH.value | INDEX_BITS.value))
    order = tl.where(valid, (top & INDEX_BITS.value) - INDEX_BITS.value, -(1 << 40) - col_np.to(tl.int64))
    if NP <= RANK_SORT_MAX_WIDTH:
        order = _largest(order, NP, NP)
    else:
        order = tl.sort(order, dim=1, descending=True)
    chosen = tl.where(order > -(1 << 40), -order, -1)
    out_rows = tile_base(OUT, b, t0, h, stride_out_b, stride_out_t, stride_out_h) + local_pos * stride_out_t
    tl.store(out_rows[:, None] + col_np, chosen, mask=t_ok[:, None] & (col_np < COUNT))


def selection_tiles(block_m: int, block_n: int, *, group_pow2: int, max_positions: int, block: int,
                    stride: int, select_block: int, count_pow2: int) -> dict:
    """Tile sizes of the selection kernel for a requested ``(BLOCK_M, BLOCK_N)``, made legal.

    ``BLOCK_M`` holds 1..``max_positions`` whole positions (and >= 16 rows for ``tl.dot``);
    ``BLOCK_N`` covers at least one Eq. 9 window; ``NBT`` (block slots per step) is a power of two
    no smaller than the top-n width (a step's keys merge with the running top-n) nor than 16 (it
    is the N of the Eq. 9 ``tl.dot``).
    """
    a, b = select_block // stride, block // stride
    block_m = min(max(block_m, 16, group_pow2), max(16, group_pow2 * max_positions))
    block_n = max(block_n, pow2(a + b - 1))
    nb_step = (block_n - b + 1) // a
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "NB_STEP": nb_step, "NBT": max(16, count_pow2, pow2(nb_step))}


def _prune_selection(configs, named_args, **kwargs):
    meta = {**named_args, **kwargs}
    kept, seen = [], set()
    for config in configs:
        tiles = selection_tiles(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], group_pow2=meta["GP"],
                                max_positions=meta["MAX_POSITIONS"], block=meta["BLOCK"],
                                stride=meta["STRIDE"], select_block=meta["SELECT_BLOCK"],
                                count_pow2=meta["NP"])
        ident = (tuple(sorted(tiles.items())), config.kwargs.get("TMA", False),
                 config.kwargs.get("MERGE_STEPS", 1), config.num_warps, config.num_stages, config.maxnreg)
        if ident not in seen:
            seen.add(ident)
            kept.append(triton.Config({**tiles, "TMA": config.kwargs.get("TMA", False),
                                       "MERGE_STEPS": config.kwargs.get("MERGE_STEPS", 1)},
                                      num_warps=config.num_warps, num_stages=config.num_stages,
                                      maxnreg=config.maxnreg, pre_hook=set_key_tile_rows))
    return kept


# NB_STEP/NBT are placeholders: _prune_selection derives them from BLOCK_N and the block sizes.
# maxnreg 128: a step is a serial chain (q.k dot, exp, Eq. 9 dots, merge, barrier) that only
# another program on the SM can overlap; capped at 128 registers a 4-warp program fits four
# times per SM instead of twice or three times (183 registers at G = 4, 135 at G = 16, compiled by
# Triton 3.6 for sm_90), spilling nothing at G = 16 and Dk = 128. Swept on an H100
# at 64k (scripts/gpu/tune_kernels.py --only select, docs/PERFORMANCE.md, thirteenth session):
# 64 rows, 4 warps, capped won at G = 16 (11.9 ms against 12.5 uncapped) and G = 4 (4.7 ms, where
# 64 rows are 16 positions; the 8-position tiles the former cap allowed took 9.8).
# The last config loads the compressed keys by the TMA (the first step's box starts before key 0
# and reads zeros there; where no descriptor can be made the pointer configs run): H100,
# seventeenth session, 64k, G = 16: 11.59 -> 10.68 ms.
def _scoring_config(m, w, s, cap, **constexprs):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": 64, "NB_STEP": 0, "NBT": 0, **constexprs}, num_warps=w,
                         num_stages=s, maxnreg=cap)


_SELECT_CONFIGS = [_scoring_config(64, 4, 2, 128), _scoring_config(128, 8, 2, 128),
                   _scoring_config(64, 4, 2, None), _scoring_config(64, 4, 2, 128, TMA=True)]
# Timed beside it and slower (same run, ms): TMA at 3 stages 12.25, on 8 warps 12.12; 2 or 4
# steps' blocks merged into the top-n at once (MERGE_STEPS; under the 128-register cap the merges
# spill) 15.92 / 17.48 uncapped, 4 with TMA 18.76 / 20.39. Kept for tune_kernels.py sweeps.
SELECT_CANDIDATES = [_scoring_config(64, 4, 3, 128, TMA=True), _scoring_config(128, 8, 2, 128, TMA=True),
                     _scoring_config(64, 4, 2, 128, MERGE_STEPS=2),
                     _scoring_config(64, 4, 2, None, MERGE_STEPS=2),
                     _scoring_config(64, 4, 2, 128, TMA=True, MERGE_STEPS=4),
                     _scoring_config(64, 4, 2, None, TMA=True, MERGE_STEPS=4)]


def set_key_tile_rows(nargs: dict) -> None:
    """Autotune ``pre_hook``: the compressed keys' descriptors get the config's ``BLOCK_N`` rows."""
    set_kv_tile_rows(nargs, names=("K_DESC_A", "K_DESC_B"))


_select_tuned = SizeTunedKernel(_select_kernel, _SELECT_CONFIGS,
                                key=["G", "DK", "BLOCK", "STRIDE", "SELECT_BLOCK", "COUNT", "PRECISION"],
                                prune_configs_by={"early_config_prune": _prune_selection})

# Positions per tile, at most: bounds the block-level work per step ([positions, NBT] keys, the
# [positions, 2*NP] top-k), which is spread thinly over the warps and costs instructions, not
# registers. More positions also mean more merges (any row gaining a block triggers one), but
# fewer steps: with 4 heads per group 16 positions (64 rows) took 5.5 ms at 64k against 9.8 for 8
# and 6.3 for 32 (H100, thirteenth session).
MAX_POSITIONS = 16
# Interpreter tiles: short test sequences still cross several steps and query tiles.
INTERPRET_TILES = {"BLOCK_M": 64, "BLOCK_N": 32, "TMA": False, "MERGE_STEPS": 1}


def select_blocks_triton(q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, *, block: int, stride: int,
                         select_block: int, select_count: int, scale: float | None = None) -> torch.Tensor:
    """Top-n selection blocks per query and key/value head, streamed over the compressed keys.

    Equals ``select_blocks(selection_block_scores(q, k_cmp, ...), ...)`` of the naive code, except
    where two blocks' scores tie within rounding.

    Args:
        q: ``[B, T, HQ, Dk]`` float16/bfloat16/float32 (no gradient flows through selection).
        k_cmp: ``[B, N, HK, Dk]`` compressed keys, same dtype, ``HQ % HK == 0``.
        lse: ``[B, T, HQ]`` float32 natural-log log-sum-exp of ``q`` over its visible compressed
            keys, as returned by :func:`compressed_attention_triton` (``-inf`` where none).
        block, stride, select_block: ``l``, ``d``, ``l'`` (``d | l``, ``d | l'``, ``l <= l'``).
        select_count: ``n``, forced blocks 0, ``c`` and ``c-1`` included.
        scale: softmax scale, default ``1/sqrt(Dk)``.

    Returns:
        int64 ``[B, T, HK, n]``: ascending block indices, then ``-1`` padding.
    """
    batch, seq_len, num_heads, head_dim = q.shape
    num_kv = k_cmp.shape[2]
    if min(block, select_block) // stride > 2048:
        # The Eq. 9 weights (at most min(l, l') / d) must be exact in float16 for its tl.dot.
        raise ValueError(f"select_blocks_triton: min(block={block}, select_block={select_block}) / "
                         f"stride={stride} must be <= 2048")
    scale = head_dim ** -0.5 if scale is None else float(scale)
    out = torch.empty(batch, seq_len, num_kv, select_count, dtype=torch.int64, device=q.device)
    if batch == 0 or seq_len == 0:
        return out
    q = q.detach()
    k_cmp = k_cmp.detach()
    q, k_cmp = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k_cmp))
    lse = lse.detach().float()
    group = num_heads // num_kv
    dka, dkb = split_dim(head_dim)
    consts = {"G": group, "GP": pow2(group), "BLOCK": block, "STRIDE": stride, "SELECT_BLOCK": select_block,
                  "COUNT": select_count, "NP": pow2(select_count), "DK": head_dim, "DKA": dka, "DKB": dkb,
                  "PRECISION": dot_precision(q.dtype), "MAX_POSITIONS": MAX_POSITIONS}
    gp = consts["GP"]

    def grid(meta):
        return (triton.cdiv(seq_len, meta["BLOCK_M"] // gp), batch * num_kv)

    interpret_tiles = selection_tiles(INTERPRET_TILES["BLOCK_M"], INTERPRET_TILES["BLOCK_N"], group_pow2=gp,
                                      max_positions=MAX_POSITIONS, block=block, stride=stride,
                                      select_block=select_block, count_pow2=consts["NP"])
    interpret_tiles.update(TMA=INTERPRET_TILES.get("TMA", False),
                           MERGE_STEPS=INTERPRET_TILES.get("MERGE_STEPS", 1))
    descs = tile_descriptors((k_cmp,), [1, INTERPRET_TILES["BLOCK_N"], 1], [dka, max(dkb, 16)], [0, 0],
                             _select_tuned.reads_descriptors(interpret_tiles))
    tma = descs is not None
    args = (q, k_cmp, lse, out, *(descs if tma else (k_cmp, k_cmp)), seq_len, num_kv,
            q.stride(0), q.stride(1), q.stride(2),
            k_cmp.stride(0), k_cmp.stride(1), k_cmp.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
            out.stride(0), out.stride(1), out.stride(2), scale * LOG2E)
    _select_tuned.launch(seq_len, grid, args, consts, interpret_tiles, tma)
    return out
