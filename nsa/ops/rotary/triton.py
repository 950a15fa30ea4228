"""RoPE's rotation in Triton: one read and one write of the rotated tensor, forward and backward.

The reference (:func:`nsa.ops.rotary.naive.rotate_half`) upcasts, slices, multiplies, adds and
concatenates: about ten float32 passes forward and as many backward (its slices' gradients are
zero-filled full tensors). Issue 6's training model spent more memory traffic in RoPE than in any
other element-wise op (about 12 of 78 GB per step at 16 x 8k tokens). This kernel reads ``x``
(any strides with a contiguous last dim, e.g. a column slice of a fused projection) and the
cos/sin tables, and writes a contiguous result; the backward is the same kernel rotating the
gradient by the negative angle (a rotation's transpose).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa.ops.triton_common import last_dim_contiguous

ROTARY_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _rotate_kernel(X, COS, SIN, OUT, T, H,
                   stride_xb, stride_xt, stride_xh, stride_cb, stride_ct, stride_ob, stride_ot, stride_oh,
                   SIGN: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    i = tl.arange(0, HALF_PAD)
    mask = (t < T)[:, None] & (i < HALF)[None, :]
    rows = t.to(tl.int64)[:, None]
    x_first = X + b * stride_xb + h * stride_xh + rows * stride_xt + i[None, :]
    first = tl.load(x_first, mask=mask, other=0.0).to(tl.float32)
    second = tl.load(x_first + HALF, mask=mask, other=0.0).to(tl.float32)
    table = b * stride_cb + rows * stride_ct + i[None, :]
    cos = tl.load(COS + table, mask=mask, other=0.0)
    sin = tl.load(SIN + table, mask=mask, other=0.0) * SIGN
    out_first = OUT + b * stride_ob + h * stride_oh + rows * stride_ot + i[None, :]
    tl.store(out_first, (first * cos - second * sin).to(OUT.dtype.element_ty), mask=mask)
    tl.store(out_first + HALF, (second * cos + first * sin).to(OUT.dtype.element_ty), mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    batch, seq_len, heads, dim = x.shape
    x = last_dim_contiguous(x)
    out = torch.empty(batch, seq_len, heads, dim, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    half = dim // 2
    half_pad = triton.next_power_of_2(half)
    # ~2k elements of each half per program: enough to hide latency, small enough for short T.
    block_t = max(16, min(256, 2048 // half_pad))
    table_batch_stride = cos.stride(0) if cos.shape[0] > 1 else 0
    grid = (triton.cdiv(seq_len, block_t), batch * heads)
    _rotate_kernel[grid](x, cos, sin, out, seq_len, heads, x.stride(0), x.stride(1), x.stride(2),
                         table_batch_stride, cos.stride(1), out.stride(0), out.stride(1), out.stride(2),
                         SIGN=sign, HALF=half, HALF_PAD=half_pad, BLOCK_T=block_t, num_warps=4)
    return out


class _RotateHalf(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, -1.0), None, None


def rotate_half_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`~nsa.ops.rotary.naive.rotate_half` in one pass; differentiable w.r.t. ``x``.

    Args:
        x: ``[B, T, H, D]`` float16/bfloat16/float32, ``D`` even, last dim contiguous (other
            strides free).
        cos, sin: float32 ``[B | 1, T, D/2]``, contiguous (no gradient flows into them).

    Returns:
        contiguous ``[B, T, H, D]`` in ``x``'s dtype, computed in float32.
    """
    if x.dtype not in ROTARY_DTYPES:
        raise TypeError(f"rotate_half_triton: x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"rotate_half_triton: x must be [B, T, H, D] with D even, got {tuple(x.shape)}")
    want = (x.shape[1], x.shape[-1] // 2)
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dtype != torch.float32 or table.dim() != 3 or tuple(table.shape[1:]) != want or (
                table.shape[0] not in (1, x.shape[0])):
            raise ValueError(f"rotate_half_triton: {name} must be float32 [B|1, T, D/2] = [B|1, {want[0]}, "
                             f"{want[1]}], got {table.dtype} {tuple(table.shape)}")
    return _RotateHalf.apply(x, cos.contiguous(), sin.contiguous())
