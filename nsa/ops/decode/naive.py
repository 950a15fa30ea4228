"""Reference decode step over the per-branch caches of a batch of sequences of different lengths.

The caches are the tensors of :class:`nsa.cache.NSACache` (or any tensors with its layout). For
each sequence the step runs :func:`nsa.ops.reference.nsa_reference` on the cached keys with
``q_offset = S_old`` and the window keys gathered from the ring, so it is the prefill function by
construction; the Triton decode kernels are compared with it.
"""

from __future__ import annotations

import torch

from nsa.config import NSAConfig
from nsa.ops.reference import nsa_reference

BRANCH_NAMES = ("cmp", "slc", "win")


def _fail(name: str, what: str) -> None:
    raise ValueError(f"{name} {what}")


def check_decode_inputs(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_slc: torch.Tensor,
                        v_slc: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, gates: torch.Tensor,
                        lengths: torch.Tensor, num_new: torch.Tensor | None, config: NSAConfig, *,
                        check_values: bool = True) -> torch.Tensor:
    """Validate a decode step's arguments (see :func:`nsa_decode_reference`); return ``num_new``.

    ``check_values=False`` skips the checks that read ``lengths``/``num_new`` on the host (they
    would synchronise a CUDA stream and break graph capture).
    """
    if not isinstance(config, NSAConfig):
        raise TypeError(f"config must be an nsa.NSAConfig, got {type(config).__name__}")
    tensors = {"q": q, "k_cmp": k_cmp, "v_cmp": v_cmp, "k_slc": k_slc, "v_slc": v_slc, "k_win": k_win,
               "v_win": v_win, "gates": gates}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            _fail(name, f"must be a 4-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
        if t.device != q.device:
            _fail(name, f"must be on q's device {q.device}, got {t.device}")
    batch, steps, hq, dk = q.shape
    hk, dv = config.num_kv_heads, config.v_head_dim
    if (hq, dk) != (config.num_heads, config.head_dim):
        _fail("q", f"must be [B, K, HQ={config.num_heads}, Dk={config.head_dim}], got {tuple(q.shape)}")
    for name, dim in (("k_cmp", dk), ("v_cmp", dv), ("k_slc", dk), ("v_slc", dv), ("k_win", dk), ("v_win", dv)):
        t = tensors[name]
        if t.shape[0] != batch or t.shape[2] != hk or t.shape[3] != dim:
            _fail(name, f"must be [B={batch}, *, HK={hk}, {dim}], got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    for a, b in (("k_cmp", "v_cmp"), ("k_slc", "v_slc"), ("k_win", "v_win")):
        if tensors[a].shape[1] != tensors[b].shape[1]:
            _fail(b, f"must have as many slots as {a} ({tensors[a].shape[1]}), got {tensors[b].shape[1]}")
    if tuple(gates.shape) != (batch, steps, hq, 3):
        _fail("gates", f"must be [B={batch}, K={steps}, HQ={hq}, 3], got {tuple(gates.shape)}")
    max_len, ring = k_slc.shape[1], k_win.shape[1]
    if k_cmp.shape[1] < config.num_compressed(max_len):
        _fail("k_cmp", f"must hold num_cmp(max_len={max_len}) = {config.num_compressed(max_len)} "
                       f"compressed tokens, got {k_cmp.shape[1]}")
    # The step's first query reads back w - 1 tokens, its last is K - 1 tokens later.
    need = min(config.window + steps - 1, max_len)
    if ring < need:
        _fail("k_win", f"ring has {ring} slots; a step of K={steps} tokens needs min(w + K - 1, max_len) = "
                       f"{need} (a w-slot ring written before the step serves K = 1 only)")
    if not isinstance(lengths, torch.Tensor) or lengths.shape != (batch,) or lengths.dtype not in (
            torch.int32, torch.int64):
        _fail("lengths", f"must be an int32/int64 tensor [B={batch}] (lengths after the step)")
    if num_new is None:
        num_new = torch.full((batch,), steps, dtype=lengths.dtype, device=lengths.device)
    elif not isinstance(num_new, torch.Tensor) or num_new.shape != (batch,) or num_new.dtype not in (
            torch.int32, torch.int64):
        _fail("num_new", f"must be an int32/int64 tensor [B={batch}] of new tokens per sequence")
    if lengths.device != q.device or num_new.device != q.device:
        _fail("lengths", f"and num_new must be on q's device {q.device}")
    if check_values:
        new, total = num_new.tolist(), lengths.tolist()
        for index, (count, length) in enumerate(zip(new, total)):
            if not 0 <= count <= steps:
                _fail(f"num_new[{index}]", f"must be in [0, K={steps}], got {count}")
            if not count <= length <= max_len:
                _fail(f"lengths[{index}]", f"must be in [num_new={count}, max_len={max_len}], got {length}")
    return num_new


def window_ring_segment(ring: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Positions ``start .. end - 1`` of a ring ``[L, ...]`` that stores position ``p`` at slot ``p % L``."""
    return ring[torch.arange(start, end, device=ring.device) % ring.shape[0]]


@torch.no_grad()
def nsa_decode_reference(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_slc: torch.Tensor,
                         v_slc: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, gates: torch.Tensor,
                         lengths: torch.Tensor, config: NSAConfig, *, num_new: torch.Tensor | None = None,
                         scale: float | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One decode step of ``K`` (or fewer) new tokens per sequence, read from the caches.

    Sequence ``b`` has ``lengths[b]`` tokens after the step, the last ``num_new[b]`` of them new;
    query row ``i < num_new[b]`` is position ``lengths[b] - num_new[b] + i``. Rows past
    ``num_new[b]`` are padding: output 0, blocks ``-1``, reads 0.

    Args:
        q: ``[B, K, HQ, Dk]`` rotated queries of the new tokens (float16/bfloat16/float32/float64).
        k_cmp, v_cmp: ``[B, Nc, HK, Dk|Dv]`` emitted compressed tokens (``Nc >= num_cmp(max_len)``;
            the first ``num_cmp(lengths[b])`` are read).
        k_slc, v_slc: ``[B, max_len, HK, Dk|Dv]`` selection-branch keys/values, position-indexed.
        k_win, v_win: ``[B, R, HK, Dk|Dv]`` window ring, position ``p`` at slot ``p % R``; it must
            hold every position the step reads: ``R >= min(w + K - 1, max_len)`` (a ``w``-slot ring
            already holding the new token serves ``K = 1``).
        gates: ``[B, K, HQ, 3]`` activated gates (cmp, slc, win).
        lengths: int32/int64 ``[B]`` sequence lengths after the step.
        config: the layer's :class:`~nsa.NSAConfig`.
        num_new: int32/int64 ``[B]`` new tokens per sequence, ``0 .. K`` (default ``K``).
        scale: softmax scale, default ``1/sqrt(Dk)``.

    Returns:
        ``o [B, K, HQ, Dv]`` in ``q``'s dtype, selected blocks int64 ``[B, K, HK, n]`` (ascending,
        ``-1`` padded) and reads ``{"cmp", "slc", "win"} -> int64 [B, K, HK]``.
    """
    num_new = check_decode_inputs(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, lengths, num_new,
                                  config)
    c = config
    batch, steps, hq, _ = q.shape
    hk = c.num_kv_heads
    out = q.new_zeros(batch, steps, hq, c.v_head_dim)
    blocks = torch.full((batch, steps, hk, c.select_count), -1, dtype=torch.int64, device=q.device)
    reads = {b: torch.zeros(batch, steps, hk, dtype=torch.int64, device=q.device) for b in BRANCH_NAMES}
    for index, (count, length) in enumerate(zip(num_new.tolist(), lengths.tolist())):
        if count == 0:
            continue
        old = length - count
        win_start = max(0, old - c.window + 1)
        seq = slice(index, index + 1)
        visible = c.num_compressed(length)
        o, sel, rd = nsa_reference(
            q[seq, :count], k_cmp[seq, :visible], v_cmp[seq, :visible], k_slc[seq, :length],
            v_slc[seq, :length], window_ring_segment(k_win[index], win_start, length)[None],
            window_ring_segment(v_win[index], win_start, length)[None], gates[seq, :count], c,
            scale=scale, q_offset=old, win_offset=win_start)
        out[index, :count] = o[0]
        blocks[index, :count] = sel[0]
        for branch in BRANCH_NAMES:
            reads[branch][index, :count] = rd[branch][0]
    return out, blocks, reads


__all__ = ["check_decode_inputs", "nsa_decode_reference", "window_ring_segment"]
