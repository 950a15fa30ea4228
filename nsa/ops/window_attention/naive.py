"""Reference sliding-window attention."""

from __future__ import annotations

import torch

from nsa.ops.attention_core import chunked_attention, default_scale


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int,
                     scale: float | None = None, q_offset: int = 0, k_offset: int = 0, upcast: bool = True,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the query at ``t`` over keys ``max(0, t - window + 1) .. t``.

    Args:
        q: ``[B, Tq, HQ, Dk]``; row ``i`` is absolute position ``q_offset + i``.
        k: ``[B, Tk, HK, Dk]``; row ``j`` is absolute position ``k_offset + j`` (a decode window
            cache starts past 0). It must hold every position the queries read.
        v: ``[B, Tk, HK, Dv]``.
        window: ``w``, current token included.
        scale: defaults to ``1/sqrt(Dk)``.
        upcast: compute in float32 (float64 stays float64); ``False`` computes in the input dtype.

    Returns:
        ``o [B, Tq, HQ, Dv]`` and ``lse [B, Tq, HQ]`` (float32/float64).
    """
    scale = default_scale(q.shape[-1], scale)

    def plan(start: int, end: int):
        first = max(k_offset, q_offset + start - window + 1)
        last = q_offset + end  # exclusive
        keys = torch.arange(first, last, device=q.device)
        positions = torch.arange(q_offset + start, q_offset + end, device=q.device)
        allowed = (keys[None, :] <= positions[:, None]) & (keys[None, :] > positions[:, None] - window)
        return first - k_offset, last - k_offset, allowed[None, :, None, :]

    o, lse = chunked_attention(q, k, v, scale, plan, upcast=upcast)
    return o.to(q.dtype), lse
