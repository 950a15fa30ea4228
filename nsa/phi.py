"""phi: the map from one compression block of ``l`` keys (or values) to one compressed token.

``"mlp"`` is the paper's learnable phi: a learned intra-block position embedding ``[l, D]`` is
added to the ``l`` rows of the block, which is then flattened to ``l*D`` and passed through a
two-layer MLP to ``D``. ``"mean"`` is parameter-free mean pooling (what the peers have).
One phi is shared by every key/value head (like the projections' output layout, heads are a batch
dimension here); the layer holds one phi for keys and one for values.
"""

from __future__ import annotations

import torch
from torch import nn

from nsa.ops.compression import compression_blocks


class BlockCompressor(nn.Module):
    """phi over compression blocks.

    Args:
        kind: ``"mlp"`` or ``"mean"``.
        block: ``l``, rows per block.
        stride: ``d``, distance between block starts.
        dim: ``D``, the head dim of what is compressed (``Dk`` for keys, ``Dv`` for values).
        hidden: MLP hidden width (``"mlp"`` only); default ``4 * D``, which keeps phi a small
            share of the layer (``l*D*4D`` weights) while leaving it wider than its output.
    """

    def __init__(self, kind: str, block: int, stride: int, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        if kind not in ("mlp", "mean"):
            raise ValueError(f"kind must be 'mlp' or 'mean', got {kind!r}")
        if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden <= 0):
            raise ValueError(f"phi_hidden must be a positive int or None, got {hidden!r}")
        self.kind, self.block, self.stride, self.dim = kind, block, stride, dim
        if kind == "mlp":
            hidden = 4 * dim if hidden is None else hidden
            # Small random start: zeros would make every row of a block look alike to the MLP.
            self.position = nn.Parameter(torch.randn(block, dim) * 0.02)
            self.mlp = nn.Sequential(nn.Linear(block * dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def compress_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """``[B, N, l, H, D] -> [B, N, H, D]`` (same dtype)."""
        if self.kind == "mean":
            return blocks.mean(dim=2)
        batch, count, block, heads, dim = blocks.shape
        rows = blocks.permute(0, 1, 3, 2, 4) + self.position.to(blocks.dtype)  # [B, N, H, l, D]
        return self.mlp(rows.reshape(batch, count, heads, block * dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every complete block of a sequence: ``[B, T, H, D] -> [B, num_cmp(T), H, D]``."""
        return self.compress_blocks(compression_blocks(x, self.block, self.stride))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, block={self.block}, stride={self.stride}, dim={self.dim}"
