"""Per-branch token reads, counted from the key ranges each branch actually uses."""

from __future__ import annotations

import torch

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
