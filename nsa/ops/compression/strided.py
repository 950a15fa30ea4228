"""Mean-pooling phi with a backward that writes its gradient in one pass.

The forward is :func:`nsa.ops.compression.naive.compress_mean` (one reduction). Its autograd
backward goes through ``unfold``'s, which scatters element by element: 0.7 ms of a 64k-token
backward at 4 key/value heads on an H100 (fourteenth session's profile), for a 64 MB gradient.
With ``d | l`` every position lies in ``l / d`` consecutive blocks at the same offset within a
``d``-chunk, so chunk ``j``'s gradient is the sum of blocks ``j - l/d + 1 .. j``'s: a sliding sum
over the small block gradient (``[B, N, H, D]``), then one broadcast write of the whole
gradient. (``l / d`` broadcast adds into a zeroed gradient, its former form, passed over the
64 MB ``l / d + 1`` times: 0.50 ms with the zeroing for k and v at 64k, twenty-first session.)
"""

from __future__ import annotations

import torch

from nsa.ops.compression.naive import compress_mean


def _require_stride_divides(block: int, stride: int, caller: str) -> None:
    if block % stride:
        raise ValueError(f"{caller}: stride={stride} must divide block={block}")


def compress_mean_backward(grad: torch.Tensor, shape: torch.Size, block: int, stride: int) -> torch.Tensor:
    """Gradient of :func:`compress_mean` w.r.t. its input.

    Args:
        grad: ``[B, N, H, D]``, the gradient of the compressed tokens.
        shape: the input's ``[B, T, H, D]``.
        block, stride: ``l`` and ``d``, ``d | l``.

    Returns:
        ``[B, T, H, D]`` in ``grad.dtype``: position ``t`` gets ``sum(grad[i]) / l`` over the blocks
        ``i`` that cover it (summed in at least float32, 0 past the last block).
    """
    _require_stride_divides(block, stride, "compress_mean_backward")
    batch, seq_len, heads, dim = shape
    count = grad.shape[1]
    dx = grad.new_empty(batch, seq_len, heads, dim)
    covered = 0 if count == 0 else (count - 1) * stride + block
    dx[:, covered:].zero_()
    if count == 0:
        return dx
    span = block // stride
    # Chunk j of d positions lies in blocks j - span + 1 .. j (those that exist): with span - 1
    # zero blocks on either side, chunk j sums padded blocks j .. j + span - 1.
    share = grad.to(torch.promote_types(grad.dtype, torch.float32)) / block
    share = torch.nn.functional.pad(share, (0, 0, 0, 0, span - 1, span - 1))
    chunk_sums = share.unfold(1, span, 1).sum(-1)  # [B, count + span - 1, H, D]
    dx[:, :covered].view(batch, count + span - 1, stride, heads, dim).copy_(chunk_sums.unsqueeze(2))
    return dx


class _CompressMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, block, stride):
        ctx.shape, ctx.block, ctx.stride = x.shape, block, stride
        return compress_mean(x, block, stride)

    @staticmethod
    def backward(ctx, grad):
        return compress_mean_backward(grad.contiguous(), ctx.shape, ctx.block, ctx.stride), None, None


def compress_mean_strided(x: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """:func:`compress_mean` (``[B, T, H, D] -> [B, num_cmp(T), H, D]``, same dtype, ``d | l``)
    with :func:`compress_mean_backward` as its backward."""
    _require_stride_divides(block, stride, "compress_mean_strided")
    return _CompressMean.apply(x, block, stride)
