"""Reference compression: cut keys/values into overlapping blocks and pool them (mean phi)."""

from __future__ import annotations

import torch

from nsa.config import num_compressed


def compression_blocks(x: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """The overlapping compression blocks of a sequence, as a view.

    Args:
        x: ``[B, T, H, D]``.
        block: ``l``; block ``i`` covers positions ``[i*stride, i*stride + block)``.
        stride: ``d``.

    Returns:
        ``[B, N, block, H, D]`` with ``N = num_cmp(T)`` (only complete blocks exist).
    """
    batch, seq_len, heads, dim = x.shape
    count = num_compressed(seq_len, block, stride)
    if count == 0:
        return x.new_zeros(batch, 0, block, heads, dim)
    # unfold puts the window dim last: [B, N, H, D, block] -> [B, N, block, H, D]
    return x.unfold(1, block, stride)[:, :count].permute(0, 1, 4, 2, 3)


def compress_mean(x: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """Mean-pooling phi: ``[B, T, H, D] -> [B, num_cmp(T), H, D]``, same dtype."""
    blocks = compression_blocks(x, block, stride)
    return blocks.mean(dim=2) if blocks.shape[1] else x.new_zeros(x.shape[0], 0, *x.shape[2:])
