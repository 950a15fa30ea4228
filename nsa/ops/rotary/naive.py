"""Reference rotation of RoPE (rotate-half convention) given its cos/sin tables."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair ``(x[..., i], x[..., i + D/2])`` by the angle whose cos/sin are given.

    Args:
        x: ``[B, T, H, D]``, ``D`` even; any float dtype.
        cos, sin: ``[B | 1, T, D/2]`` in the dtype to compute in (float32, or float64).

    Returns:
        ``[B, T, H, D]`` in ``x``'s dtype (computed in ``cos``'s dtype, then rounded).
    """
    half = x.shape[-1] // 2
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xc = x.to(cos.dtype)
    first, second = xc[..., :half], xc[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1).to(x.dtype)
