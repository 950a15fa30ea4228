"""How much the block lists of neighbouring positions overlap: what a position tile of the
selection kernels loads per position."""

from __future__ import annotations

import math

import torch


def distinct_blocks_per_list(selected: torch.Tensor, tile: int, start: int = 0) -> float:
    """Distinct blocks of a tile of ``tile`` consecutive positions over one position's list length.

    Per batch row, key/value head and tile (positions ``start + k*tile`` on; a last partial tile
    is left out): the tile's distinct selected blocks divided by its valid entries per position,
    averaged. 1 means the tile's positions selected the same blocks (a union walk loads each once
    for all of them); ``tile`` means they share none. Issue 6's trained model gave 2.1-2.2 at
    tile 4 and 3.2-3.9 at tile 16 (docs/PERFORMANCE.md); random lists give about 2.8 and 5.4.

    Args:
        selected: int ``[B, T, HK, n]`` ascending block indices, ``-1`` padded
            (``NSAInfo.selected_blocks``).
        tile: positions per tile, >= 1.
        start: first position of the first tile.

    Returns:
        the mean ratio, ``nan`` when no whole tile fits in ``T - start`` positions.
    """
    if selected.dim() != 4:
        raise ValueError(f"selected must be [B, T, HK, n], got shape {tuple(selected.shape)}")
    if tile < 1 or not 0 <= start:
        raise ValueError(f"tile must be >= 1 and start >= 0, got tile={tile}, start={start}")
    batch, length, num_kv, n = selected.shape
    tiles = max(0, length - start) // tile
    if tiles == 0:
        return math.nan
    x = selected[:, start:start + tiles * tile].reshape(batch, tiles, tile, num_kv, n)
    x = x.permute(0, 1, 3, 2, 4).reshape(-1, tile * n).to(torch.int64)
    empty = torch.iinfo(torch.int64).max
    x = torch.sort(torch.where(x < 0, empty, x), dim=1).values
    distinct = ((x[:, 1:] != x[:, :-1]) & (x[:, 1:] != empty)).sum(1) + (x[:, 0] != empty).long()
    per_list = (x != empty).sum(1).double() / tile
    return float((distinct.double() / per_list.clamp(min=1)).mean())
