"""Masked softmax attention over an explicit key set: the primitive every naive branch uses.

Each branch's reference picks, for a chunk of queries, the slice of keys it may read and a
boolean mask over that slice; this module turns that into outputs and log-sum-exp. Queries are
processed in chunks so that no ``T x T`` tensor ever exists.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def score_elements_per_chunk(device: torch.device) -> int:
    """Upper bound on the elements of one chunk's score tensor: a few hundred MiB on a CPU, a few
    GiB on a GPU (where fewer, larger chunks keep a 64k-token reference call to seconds)."""
    return 1 << 28 if device.type == "cuda" else 1 << 24


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the references compute in: float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim restricted to ``allowed`` entries.

    Returns ``(probs, lse)`` with ``lse`` lacking the last dim. A row with nothing allowed gets
    all-zero probabilities and ``lse = -inf``; its gradients stay finite (no NaN).
    """
    if scores.shape[-1] == 0:
        # No keys at all (e.g. every query of a chunk precedes the first compressed block):
        # amax over an empty dim would raise.
        return scores, scores.new_full(scores.shape[:-1], float("-inf"))
    scores = scores.masked_fill(~allowed, float("-inf"))
    # A fully masked row would give (-inf) - (-inf) = NaN; shift it by 0 instead.
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    has_keys = denom > 0
    safe_denom = torch.where(has_keys, denom, torch.ones_like(denom))
    lse = torch.where(has_keys, row_max + torch.log(safe_denom), torch.full_like(denom, float("-inf")))
    return weights / safe_denom, lse.squeeze(-1)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention restricted to ``allowed`` keys, grouped-query aware.

    Args:
        q: ``[B, Tq, HQ, Dk]``.
        k: ``[B, Tk, HK, Dk]``, ``HQ % HK == 0``.
        v: ``[B, Tk, HK, Dv]``.
        allowed: bool, broadcastable to ``[B, Tq, HK, Tk]``; a query head reads what its
            key/value head's row allows.
        scale: multiplies ``q . k``.

    Returns:
        ``o [B, Tq, HQ, Dv]`` and ``lse [B, Tq, HQ]`` (natural log). A query with no allowed
        key gets ``o = 0`` and ``lse = -inf``, with finite gradients.
    """
    batch, q_len, num_heads, _ = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    qg = q.reshape(batch, q_len, num_kv_heads, group, q.shape[-1])
    scores = torch.einsum("bqhgd,bkhd->bhgqk", qg, k) * scale
    mask = allowed.expand(batch, q_len, num_kv_heads, k.shape[1]).permute(0, 2, 1, 3).unsqueeze(2)
    probs, lse = masked_softmax(scores, mask)
    o = torch.einsum("bhgqk,bkhd->bqhgd", probs, v)
    lse = lse.permute(0, 3, 1, 2).reshape(batch, q_len, num_heads)
    return o.reshape(batch, q_len, num_heads, v.shape[-1]), lse


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      plan: Callable[[int, int], tuple[int, int, torch.Tensor]], *, upcast: bool = True,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run :func:`masked_attention` chunk by chunk over the queries.

    ``plan(q_start, q_end)`` returns ``(k_start, k_end, allowed)``: the key slice the query rows
    ``[q_start, q_end)`` may read and the mask over it (broadcastable to
    ``[B, q_end - q_start, HK, k_end - k_start]``). ``upcast=False`` computes in the input dtype
    (the "same low precision" baseline that kernel tolerances are measured against).
    """
    dtype = compute_dtype(q.dtype) if upcast else q.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    batch, q_len, num_heads, _ = q.shape
    per_query = max(1, batch * num_heads * max(k.shape[1], 1))
    chunk = max(1, min(q_len, score_elements_per_chunk(q.device) // per_query))
    outputs, lses = [], []
    for start in range(0, q_len, chunk):
        end = min(q_len, start + chunk)
        k_start, k_end, allowed = plan(start, end)
        o, lse = masked_attention(q[:, start:end], k[:, k_start:k_end], v[:, k_start:k_end],
                                  allowed, scale)
        outputs.append(o)
        lses.append(lse)
    if not outputs:
        return (q.new_zeros(batch, 0, num_heads, v.shape[-1]), q.new_zeros(batch, 0, num_heads))
    return torch.cat(outputs, dim=1), torch.cat(lses, dim=1)


def default_scale(head_dim: int, scale: float | None) -> float:
    """``1 / sqrt(Dk)`` unless given."""
    return head_dim ** -0.5 if scale is None else float(scale)
