"""Reference compressed-token attention with its causal rule and log-sum-exp."""

from __future__ import annotations

import torch

from nsa.ops.attention_core import chunked_attention, default_scale


def visible_compressed(positions: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """How many compressed tokens a query at each absolute position sees: ``num_cmp(t + 1)``.

    Block ``i`` is visible to ``t`` iff ``i*stride + block - 1 <= t``.
    """
    return torch.where(positions + 1 >= block, (positions + 1 - block) // stride + 1,
                       torch.zeros_like(positions))


def compressed_attention(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, *, block: int,
                         stride: int, scale: float | None = None, q_offset: int = 0, upcast: bool = True,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over the compressed tokens visible to it.

    Args:
        q: ``[B, Tq, HQ, Dk]``; row ``i`` is the query at absolute position ``q_offset + i``.
        k_cmp: ``[B, N, HK, Dk]`` compressed keys, token ``i`` built from ``[i*stride, i*stride+block)``.
        v_cmp: ``[B, N, HK, Dv]``.
        block, stride: ``l`` and ``d``.
        scale: defaults to ``1/sqrt(Dk)``.
        upcast: compute in float32 (float64 stays float64); ``False`` computes in the input dtype.
        q_offset: absolute position of the first query.

    Returns:
        ``o [B, Tq, HQ, Dv]`` (exactly 0 for a query that sees no compressed token) and
        ``lse [B, Tq, HQ]`` in float32/float64 (``-inf`` there).
    """
    scale = default_scale(q.shape[-1], scale)
    device = q.device

    def plan(start: int, end: int):
        positions = torch.arange(q_offset + start, q_offset + end, device=device)
        visible = visible_compressed(positions, block, stride)
        k_end = int(visible.max().item()) if len(visible) else 0
        allowed = torch.arange(k_end, device=device)[None, :] < visible[:, None]
        return 0, k_end, allowed[None, :, None, :]

    o, lse = chunked_attention(q, k_cmp, v_cmp, scale, plan, upcast=upcast)
    return o.to(q.dtype), lse
