"""Rotary position embedding (RoPE, rotate-half convention) at explicit absolute positions.

Positions are passed explicitly (not implied by the row index) so that a packed batch restarts
at 0 per sequence and a decode step rotates its new tokens at ``S_old .. S_old + K - 1``. Angles
are always formed in float64, so prefill and decode produce bit-identical rotations for the same
absolute position.
"""

from __future__ import annotations

import torch

from nsa.ops.attention_core import compute_dtype


def check_rope_dim(head_dim: int, name: str = "head_dim") -> None:
    """RoPE rotates pairs ``(i, i + D/2)``; an odd ``D`` leaves one coordinate unpaired."""
    if head_dim % 2:
        raise ValueError(f"{name} must be even for RoPE (it rotates pairs of coordinates), got {head_dim}")


def rope_inverse_frequencies(head_dim: int, theta: float, device: torch.device | str | None = None,
                             ) -> torch.Tensor:
    """float64 ``[D/2]``: ``theta ** (-2i / D)``."""
    check_rope_dim(head_dim)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim
    return 1.0 / (float(theta) ** exponents)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, *, theta: float = 10000.0) -> torch.Tensor:
    """Rotate ``x`` by its absolute positions (rotate-half: pairs ``(i, i + D/2)``).

    Args:
        x: ``[B, T, H, D]``, ``D`` even, any float dtype.
        positions: integer ``[T]`` (shared by the batch) or ``[B, T]`` absolute positions.
        theta: RoPE base.

    Returns:
        ``[B, T, H, D]`` in ``x``'s dtype, computed in float32 (float64 for float64 input).
    """
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [B, T, H, D], got shape {tuple(x.shape)}")
    head_dim = x.shape[-1]
    check_rope_dim(head_dim)
    if positions.dim() == 1:
        positions = positions[None]
    if positions.shape[-1] != x.shape[1] or positions.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"positions must be [T] or [B, T] for x of shape {tuple(x.shape)}, "
                         f"got {tuple(positions.shape)}")
    inv_freq = rope_inverse_frequencies(head_dim, theta, device=x.device)
    angles = positions.to(device=x.device, dtype=torch.float64)[..., None] * inv_freq  # [B|1, T, D/2]
    dtype = compute_dtype(x.dtype)
    cos = torch.cos(angles).to(dtype)[:, :, None, :]
    sin = torch.sin(angles).to(dtype)[:, :, None, :]
    xc = x.to(dtype)
    first, second = xc[..., : head_dim // 2], xc[..., head_dim // 2:]
    rotated = torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)
    return rotated.to(x.dtype)
