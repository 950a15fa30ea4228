"""Mean-pooling phi with a backward of strided slice adds.

The forward is :func:`nsa.ops.compression.naive.compress_mean` (one reduction). Its autograd
backward goes through ``unfold``'s, which scatters element by element: 0.7 ms of a 64k-token
backward at 4 key/value heads on an H100 (fourteenth session's profile), for a 64 MB gradient.
With ``d | l`` every position lies in ``l / d`` consecutive blocks at the same offset within a
``d``-chunk, so the gradient is ``l / d`` broadcast adds of the block gradients over
``d``-chunks, each one pass over memory.
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
        ``i`` that cover it (0 past the last block).
    """
    _require_stride_divides(block, stride, "compress_mean_backward")
    batch, seq_len, heads, dim = shape
    count = grad.shape[1]
    dx = grad.new_zeros(batch, seq_len, heads, dim)
    if count == 0:
        return dx
    covered = (count - 1) * stride + block
    # [B, covered/d, d, H, D]: chunk j of d positions lies in blocks j - l/d + 1 .. j.
    chunks = dx[:, :covered].view(batch, covered // stride, stride, heads, dim)
    share = (grad / block).unsqueeze(2)
    for shift in range(block // stride):
        chunks[:, shift:shift + count] += share
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
