"""Reference block selection: p_cmp (Eq. 8) -> Eq. 9 -> Eq. 10 group sum -> top-n."""

from __future__ import annotations

import torch

from nsa.ops.attention_core import compute_dtype, default_scale, masked_softmax, score_elements_per_chunk
from nsa.ops.compressed_attention.naive import visible_compressed


def eq9_weights(num_cmp: int, num_blocks: int, *, block: int, stride: int, select_block: int,
                device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Eq. 9 as a matrix ``W [num_cmp, num_blocks]`` with ``p_slc = p_cmp @ W``.

    Geometric-overlap convention: with ``a = l'/d`` and ``b = l/d``,
    ``W[i, j] = #{(m, u) : 0 <= m < a, 0 <= u < b, a*j + m - u = i}``, which equals the number
    of tokens compressed block ``i`` shares with selection block ``j``, divided by ``d``.
    """
    a, b = select_block // stride, block // stride
    weights = torch.zeros(num_cmp, num_blocks, dtype=dtype, device=device)
    j = torch.arange(num_blocks, device=device)
    for m in range(a):
        for u in range(b):
            i = a * j + m - u
            ok = (i >= 0) & (i < num_cmp)
            weights[i[ok], j[ok]] += 1
    return weights


def selection_block_scores(q: torch.Tensor, k_cmp: torch.Tensor, *, block: int, stride: int,
                           select_block: int, num_blocks: int | None = None,
                           scale: float | None = None, q_offset: int = 0) -> torch.Tensor:
    """Importance of every selection block for every query, shared within a GQA group.

    ``p_cmp(t) = softmax(q_t . K_cmp * scale)`` over the compressed tokens visible to ``t``
    (Eq. 8), mapped to selection blocks by :func:`eq9_weights` (Eq. 9) and summed over the
    ``G`` query heads of each key/value head (Eq. 10).

    Args:
        q: ``[B, Tq, HQ, Dk]``; row ``i`` is absolute position ``q_offset + i``.
        k_cmp: ``[B, N, HK, Dk]`` compressed keys of the compression branch.
        block, stride, select_block: ``l``, ``d``, ``l'``.
        num_blocks: selection blocks to score; default ``ceil((q_offset + Tq) / l')``.
        scale: defaults to ``1/sqrt(Dk)``.
        q_offset: absolute position of the first query.

    Returns:
        ``[B, Tq, HK, num_blocks]`` in float32 (float64 for float64 inputs); blocks with no
        visible compressed token score 0.
    """
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k_cmp.shape[2]
    group = num_heads // num_kv_heads
    scale = default_scale(head_dim, scale)
    if num_blocks is None:
        num_blocks = -(-(q_offset + q_len) // select_block)
    dtype = compute_dtype(q.dtype)
    q, k_cmp = q.to(dtype), k_cmp.to(dtype)
    weights = eq9_weights(k_cmp.shape[1], num_blocks, block=block, stride=stride,
                          select_block=select_block, device=q.device, dtype=dtype)
    chunk = max(1, score_elements_per_chunk(q.device) // max(1, batch * num_heads * max(k_cmp.shape[1], num_blocks)))
    out = []
    for start in range(0, q_len, chunk):
        end = min(q_len, start + chunk)
        positions = torch.arange(q_offset + start, q_offset + end, device=q.device)
        visible = visible_compressed(positions, block, stride)
        allowed = torch.arange(k_cmp.shape[1], device=q.device)[None, :] < visible[:, None]
        qg = q[:, start:end].reshape(batch, end - start, num_kv_heads, group, head_dim)
        scores = torch.einsum("bqhgd,bkhd->bqhgk", qg, k_cmp) * scale
        p_cmp, _ = masked_softmax(scores, allowed[None, :, None, None, :])
        out.append((p_cmp @ weights).sum(dim=3))
    if not out:
        return q.new_zeros(batch, 0, num_kv_heads, num_blocks)
    return torch.cat(out, dim=1)


def select_blocks(block_scores: torch.Tensor, *, select_block: int, select_count: int,
                  q_offset: int = 0) -> torch.Tensor:
    """Top-n selection blocks per query and key/value head.

    Forced: block 0, the current block ``c = t // l'`` and ``c - 1``; they count toward ``n``.
    The other slots take the best-scoring blocks among ``1 .. c-2`` (ties to the lower index).
    Fewer candidates than slots leaves ``-1`` padding.

    Args:
        block_scores: ``[B, Tq, HK, NB]`` from :func:`selection_block_scores`, ``NB >= c + 1``.
        select_block, select_count: ``l'`` and ``n``.
        q_offset: absolute position of the first query.

    Returns:
        int64 ``[B, Tq, HK, n]``: ascending block indices, then ``-1`` padding.
    """
    batch, q_len, num_kv_heads, num_blocks = block_scores.shape
    device = block_scores.device
    current = (torch.arange(q_offset, q_offset + q_len, device=device) // select_block)[:, None]
    j = torch.arange(num_blocks, device=device)[None, :]
    forced = (j == 0) | (j == current) | (j == current - 1)
    candidate = (j >= 1) & (j <= current - 2)
    ranked = torch.where(candidate[None, :, None, :], block_scores.to(torch.float64),
                         torch.full((), float("-inf"), dtype=torch.float64, device=device))
    ranked = torch.where(forced[None, :, None, :], torch.full((), float("inf"), dtype=torch.float64,
                                                               device=device), ranked)
    # Stable sort keeps the lower index first among equal scores.
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :select_count]
    top = torch.gather(ranked, -1, order)
    chosen = torch.where(top > float("-inf"), order, torch.full_like(order, num_blocks))
    chosen = torch.sort(chosen, dim=-1).values
    chosen = torch.where(chosen == num_blocks, torch.full_like(chosen, -1), chosen)
    if chosen.shape[-1] < select_count:
        pad = chosen.new_full((*chosen.shape[:-1], select_count - chosen.shape[-1]), -1)
        chosen = torch.cat([chosen, pad], dim=-1)
    return chosen
