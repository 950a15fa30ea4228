"""The whole NSA function composed from the naive sub-ops (the oracle every backend must equal)."""

from __future__ import annotations

import torch

from nsa.config import NSAConfig
from nsa.ops.combine import combine_branches
from nsa.ops.compressed_attention import compressed_attention
from nsa.ops.reads import branch_reads
from nsa.ops.selected_attention import selected_attention
from nsa.ops.selection import select_blocks, selection_block_scores
from nsa.ops.window_attention import window_attention


def nsa_reference(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_slc: torch.Tensor,
                  v_slc: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, gates: torch.Tensor,
                  config: NSAConfig, *, scale: float | None = None, q_offset: int = 0,
                  win_offset: int = 0, with_reads: bool = True,
                  ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
    """NSA for queries at absolute positions ``q_offset .. q_offset + Tq - 1`` of equal-length sequences.

    Args:
        q: ``[B, Tq, HQ, Dk]`` (RoPE applied).
        k_cmp, v_cmp: ``[B, N, HK, Dk|Dv]`` compressed tokens (phi applied), ``N >= num_cmp(q_offset+Tq)``.
        k_slc, v_slc: ``[B, S, HK, Dk|Dv]`` selection-branch keys/values from position 0, ``S >= q_offset+Tq``.
        k_win, v_win: ``[B, W, HK, Dk|Dv]`` window-branch keys/values from absolute position
            ``win_offset``, covering every key the window reads.
        gates: ``[B, Tq, HQ, 3]`` activated gates (cmp, slc, win).

        with_reads: count the per-branch reads (``False``: ``None`` instead; training skips them).

    Returns:
        ``o [B, Tq, HQ, Dv]`` in ``q``'s dtype, the selected blocks ``[B, Tq, HK, n]`` and the
        per-branch reads ``{"cmp", "slc", "win"} -> int64 [B, Tq, HK]``.
    """
    c = config
    o_cmp, _ = compressed_attention(q, k_cmp, v_cmp, block=c.compress_block, stride=c.compress_stride,
                                    scale=scale, q_offset=q_offset)
    scores = selection_block_scores(q, k_cmp, block=c.compress_block, stride=c.compress_stride,
                                    select_block=c.select_block, scale=scale, q_offset=q_offset)
    blocks = select_blocks(scores, select_block=c.select_block, select_count=c.select_count,
                           q_offset=q_offset)
    o_slc, _ = selected_attention(q, k_slc, v_slc, blocks, select_block=c.select_block, scale=scale,
                                  q_offset=q_offset)
    o_win, _ = window_attention(q, k_win, v_win, window=c.window, scale=scale, q_offset=q_offset,
                                k_offset=win_offset)
    out = combine_branches(o_cmp, o_slc, o_win, gates)
    return out, blocks, branch_reads(blocks, q_offset, config) if with_reads else None
