"""Rotary position embedding (RoPE, rotate-half convention) at explicit absolute positions.

Positions are passed explicitly (not implied by the row index) so that a packed batch restarts
at 0 per sequence and a decode step rotates its new tokens at ``S_old .. S_old + K - 1``. Angles
are always formed in float64, so prefill and decode produce bit-identical rotations for the same
absolute position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nsa.ops.attention_core import compute_dtype
from nsa.ops.rotary import rotate_half


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


ROPE_SCALING_METHODS = ("yarn", "linear")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE at contexts beyond the one a model was trained at, without retraining.

    A rotary pair whose wavelength exceeds the trained context has only met a part of its angle
    range in training; at longer contexts it produces angles the model never saw.

    - ``"linear"``: position interpolation (Chen et al., 2023): every frequency divided by
      ``factor``, so positions ``0 .. factor * original_context`` span the trained angles.
    - ``"yarn"``: YaRN (Peng et al., 2023), "NTK-by-parts" plus a temperature: pairs that rotate
      more than ``beta_fast`` times within ``original_context`` keep their frequency (they have met
      every angle), pairs that rotate less than ``beta_slow`` times are interpolated like
      ``"linear"``, those in between by a linear ramp; the attention logits are multiplied by
      ``(0.1 ln(factor) + 1) ** 2`` (:attr:`query_scale`, applied to the queries, so it holds for
      NSA's compressed keys too, which pass through phi after RoPE).

    Attributes:
        method: ``"yarn"`` or ``"linear"``.
        factor: target context / ``original_context`` (``>= 1``).
        original_context: the context the model was trained at (tokens).
        beta_fast, beta_slow: YaRN's ramp bounds, in rotations within ``original_context``.
    """

    method: str
    factor: float
    original_context: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in ROPE_SCALING_METHODS:
            raise ValueError(f"RopeScaling.method must be one of {ROPE_SCALING_METHODS}, got {self.method!r}")
        if not float(self.factor) >= 1:
            raise ValueError(f"RopeScaling.factor must be >= 1 (target / trained context), "
                             f"got {self.factor!r}")
        if isinstance(self.original_context, bool) or not isinstance(self.original_context, int) or \
                self.original_context <= 0:
            raise ValueError(f"RopeScaling.original_context must be a positive int, "
                             f"got {self.original_context!r}")
        if not 0 < self.beta_slow < self.beta_fast:
            raise ValueError(f"RopeScaling needs 0 < beta_slow < beta_fast, "
                             f"got beta_slow={self.beta_slow!r}, beta_fast={self.beta_fast!r}")

    @classmethod
    def for_context(cls, method: str, context: int, original_context: int) -> RopeScaling | None:
        """The scaling that stretches ``original_context`` to ``context``; ``None`` when
        ``method == "none"`` or ``context <= original_context`` (RoPE as trained)."""
        if method != "none" and method not in ROPE_SCALING_METHODS:
            raise ValueError(f"method must be 'none' or one of {ROPE_SCALING_METHODS}, got {method!r}")
        if method == "none" or context <= original_context:
            return None
        return cls(method, context / original_context, original_context)

    def inverse_frequencies(self, inv_freq: torch.Tensor) -> torch.Tensor:
        """float64 ``[D/2]``: RoPE's ``inv_freq`` as used at the extended context."""
        interpolated = inv_freq / self.factor
        if self.method == "linear":
            return interpolated
        rotations = self.original_context * inv_freq / (2 * math.pi)
        keep = ((rotations - self.beta_slow) / (self.beta_fast - self.beta_slow)).clamp(0, 1)
        return interpolated * (1 - keep) + inv_freq * keep

    @property
    def query_scale(self) -> float:
        """Multiplier of the queries (hence of every attention logit)."""
        return (0.1 * math.log(self.factor) + 1) ** 2 if self.method == "yarn" else 1.0


def apply_rope(x: torch.Tensor, positions: torch.Tensor, *, theta: float = 10000.0,
               scaling: RopeScaling | None = None) -> torch.Tensor:
    """Rotate ``x`` by its absolute positions (rotate-half: pairs ``(i, i + D/2)``).

    Args:
        x: ``[B, T, H, D]``, ``D`` even, any float dtype.
        positions: integer ``[T]`` (shared by the batch) or ``[B, T]`` absolute positions.
        theta: RoPE base.
        scaling: frequencies for a context beyond the trained one (:class:`RopeScaling`); its
            logit temperature is the caller's (:attr:`RopeScaling.query_scale`), not applied here.

    Returns:
        ``[B, T, H, D]`` in ``x``'s dtype, computed in float32 (float64 for float64 input). On
        CUDA (float16, bfloat16, float32) the rotation is one Triton kernel,
        :func:`nsa.ops.rotary.triton.rotate_half_triton`, forward and backward; elsewhere
        :func:`nsa.ops.rotary.rotate_half`. Both round the same float32 products once (a fused
        multiply-add may differ in the last float32 bit).
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
    if scaling is not None:
        inv_freq = scaling.inverse_frequencies(inv_freq)
    angles = positions.to(device=x.device, dtype=torch.float64)[..., None] * inv_freq  # [B|1, T, D/2]
    dtype = compute_dtype(x.dtype)
    cos, sin = torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)
    if x.is_cuda and dtype == torch.float32:
        # The same float32 arithmetic in one pass (nsa.ops.rotary.triton says what it saves).
        from nsa.ops.rotary.triton import rotate_half_triton

        return rotate_half_triton(x, cos, sin)
    return rotate_half(x, cos, sin)


def apply_rope_queries(q: torch.Tensor, positions: torch.Tensor, *, theta: float = 10000.0,
                       scaling: RopeScaling | None = None) -> torch.Tensor:
    """:func:`apply_rope` for queries: with ``scaling``, also its logit temperature
    (:attr:`RopeScaling.query_scale`)."""
    rotated = apply_rope(q, positions, theta=theta, scaling=scaling)
    return rotated if scaling is None or scaling.query_scale == 1.0 else rotated * scaling.query_scale
