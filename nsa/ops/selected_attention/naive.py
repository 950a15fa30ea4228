"""Reference attention over each query's selected blocks."""

from __future__ import annotations

import torch

from nsa.ops.attention_core import chunked_attention, default_scale


def selected_positions_mask(block_indices: torch.Tensor, positions: torch.Tensor, num_keys: int,
                            select_block: int) -> torch.Tensor:
    """Which key positions ``0 .. num_keys-1`` each query reads: in a selected block and ``<= t``.

    Args:
        block_indices: int ``[B, Tq, HK, n]``, ``-1`` padded.
        positions: int ``[Tq]`` absolute query positions.

    Returns:
        bool ``[B, Tq, HK, num_keys]``.
    """
    num_blocks = -(-num_keys // select_block)
    idx = torch.where(block_indices < 0, torch.full_like(block_indices, num_blocks), block_indices)
    idx = idx.clamp(max=num_blocks)
    hit = torch.zeros(*block_indices.shape[:-1], num_blocks + 1, dtype=torch.bool,
                      device=block_indices.device)
    hit.scatter_(-1, idx, True)
    keys = torch.arange(num_keys, device=block_indices.device)
    in_block = hit[..., keys // select_block]
    return in_block & (keys[None, :] <= positions[:, None])[None, :, None, :]


def selected_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor,
                       *, select_block: int, scale: float | None = None, q_offset: int = 0, upcast: bool = True,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over the positions ``<= t`` of its selected blocks.

    Args:
        q: ``[B, Tq, HQ, Dk]``; row ``i`` is absolute position ``q_offset + i``.
        k: ``[B, Tk, HK, Dk]`` selection-branch keys from position 0, ``Tk >= q_offset + Tq``.
        v: ``[B, Tk, HK, Dv]``.
        block_indices: int ``[B, Tq, HK, n]`` from :func:`nsa.ops.select_blocks` (``-1`` padded);
            every query head of a group reads its key/value head's blocks.
        select_block: ``l'``.
        scale: defaults to ``1/sqrt(Dk)``.
        upcast: compute in float32 (float64 stays float64); ``False`` computes in the input dtype.

    Returns:
        ``o [B, Tq, HQ, Dv]`` and ``lse [B, Tq, HQ]`` (float32/float64).
    """
    scale = default_scale(q.shape[-1], scale)

    def plan(start: int, end: int):
        positions = torch.arange(q_offset + start, q_offset + end, device=q.device)
        k_end = q_offset + end
        allowed = selected_positions_mask(block_indices[:, start:end], positions, k_end, select_block)
        return 0, k_end, allowed

    o, lse = chunked_attention(q, k, v, scale, plan, upcast=upcast)
    return o.to(q.dtype), lse
