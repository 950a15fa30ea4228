"""Per-branch token reads, counted from the key ranges each branch actually uses."""

from __future__ import annotations

import torch

from nsa.config import NSAConfig
from nsa.ops.compressed_attention.naive import visible_compressed


def compressed_reads(positions: torch.Tensor, *, block: int, stride: int) -> torch.Tensor:
    """Compressed tokens read by the query at each position: the visible range ``[0, num_cmp(t+1))``."""
    return visible_compressed(positions, block, stride)


def selected_reads(block_indices: torch.Tensor, positions: torch.Tensor, *, select_block: int) -> torch.Tensor:
    """Distinct key positions read by the selection branch: ``|[j*l', (j+1)*l') ∩ [0, t]|`` summed
    over the selected (distinct, non-padding) blocks ``j``.

    Args:
        block_indices: int ``[..., Tq, HK, n]``; positions: int ``[Tq]``.

    Returns:
        int64 ``[..., Tq, HK]``.
    """
    start = block_indices * select_block
    t = positions[:, None, None]
    per_block = (t + 1 - start).clamp(min=0, max=select_block)
    return torch.where(block_indices >= 0, per_block, torch.zeros_like(per_block)).sum(-1)


def window_reads(positions: torch.Tensor, *, window: int) -> torch.Tensor:
    """Keys read by the window branch: the range ``[max(0, t - w + 1), t]``."""
    return positions - (positions - window + 1).clamp(min=0) + 1


def branch_reads(block_indices: torch.Tensor, q_offset: int, config: NSAConfig) -> dict[str, torch.Tensor]:
    """All three branches' reads for queries at ``q_offset ..`` given their selected blocks.

    Args:
        block_indices: int ``[B, Tq, HK, n]``.

    Returns:
        ``{"cmp", "slc", "win"} -> int64 [B, Tq, HK]``.
    """
    shape = block_indices.shape[:3]
    positions = torch.arange(q_offset, q_offset + shape[1], device=block_indices.device)
    per_position = {
        "cmp": compressed_reads(positions, block=config.compress_block, stride=config.compress_stride),
        "win": window_reads(positions, window=config.window),
    }
    return {
        "cmp": per_position["cmp"][None, :, None].expand(shape),
        "slc": selected_reads(block_indices, positions, select_block=config.select_block),
        "win": per_position["win"][None, :, None].expand(shape),
    }
