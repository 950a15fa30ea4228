"""Triton gate combination: one pass over the three branch outputs instead of a dozen.

The eager form (``g0*o0 + g1*o1 + g2*o2`` with float32 upcasts) reads and writes the
``[B, T, HQ, Dv]`` tensors several times; at 64k tokens and 64 heads that is ~12 ms on an H200,
as much as a whole attention branch. Here the forward reads each output once and writes once;
the backward reads ``do`` and the three outputs once and writes the three input gradients and
``dgates``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS_PER_PROGRAM = 16


@triton.jit
def _combine_fwd_kernel(o_cmp, o_slc, o_win, gates, out, n_rows, D: tl.constexpr, BLOCK_D: tl.constexpr,
                        ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    g0 = tl.load(gates + rows * 3, mask=row_ok, other=0.0).to(tl.float32)
    g1 = tl.load(gates + rows * 3 + 1, mask=row_ok, other=0.0).to(tl.float32)
    g2 = tl.load(gates + rows * 3 + 2, mask=row_ok, other=0.0).to(tl.float32)
    acc = g0[:, None] * tl.load(o_cmp + offs, mask=mask, other=0.0).to(tl.float32)
    acc += g1[:, None] * tl.load(o_slc + offs, mask=mask, other=0.0).to(tl.float32)
    acc += g2[:, None] * tl.load(o_win + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + offs, acc.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _branch_backward(grad, src, dst, gates, d_gates, deltas, rows, n_rows, offs, mask, row_ok,
                     BRANCH: tl.constexpr, BRANCH_GRADS: tl.constexpr):
    o = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
    d_gate = tl.sum(grad * o, axis=1)
    tl.store(d_gates + rows * 3 + BRANCH, d_gate.to(d_gates.dtype.element_ty), mask=row_ok)
    if BRANCH_GRADS:
        g = tl.load(gates + rows * 3 + BRANCH, mask=row_ok, other=0.0).to(tl.float32)
        d_branch = (g[:, None] * grad).to(dst.dtype.element_ty)
        tl.store(dst + offs, d_branch, mask=mask)
        # The branch's softmax term rowsum(dO_b * O_b), from dO_b as stored (what its kernels read).
        tl.store(deltas + BRANCH * n_rows + rows, tl.sum(d_branch.to(tl.float32) * o, axis=1), mask=row_ok)
    else:
        # Kernels that read the ungated dO (gate folded into lse) take rowsum(dO * O_b).
        tl.store(deltas + BRANCH * n_rows + rows, d_gate, mask=row_ok)


@triton.jit
def _combine_bwd_kernel(do, o_cmp, o_slc, o_win, gates, d_cmp, d_slc, d_win, d_gates, deltas, n_rows,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
                        BRANCH_GRADS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    grad = tl.load(do + offs, mask=mask, other=0.0).to(tl.float32)
    _branch_backward(grad, o_cmp, d_cmp, gates, d_gates, deltas, rows, n_rows, offs, mask, row_ok, BRANCH=0,
                     BRANCH_GRADS=BRANCH_GRADS)
    _branch_backward(grad, o_slc, d_slc, gates, d_gates, deltas, rows, n_rows, offs, mask, row_ok, BRANCH=1,
                     BRANCH_GRADS=BRANCH_GRADS)
    _branch_backward(grad, o_win, d_win, gates, d_gates, deltas, rows, n_rows, offs, mask, row_ok, BRANCH=2,
                     BRANCH_GRADS=BRANCH_GRADS)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(-1, x.shape[-1])


def combine_forward(o_cmp, o_slc, o_win, gates) -> torch.Tensor:
    """``out`` (no autograd) of ``[B, T, HQ, Dv]`` branch outputs and ``[B, T, HQ, 3]`` gates."""
    shape = o_cmp.shape
    o_cmp, o_slc, o_win, g = _rows(o_cmp), _rows(o_slc), _rows(o_win), _rows(gates)
    out = torch.empty_like(o_cmp)
    n_rows, dim = o_cmp.shape
    _combine_fwd_kernel[(triton.cdiv(n_rows, ROWS_PER_PROGRAM),)](
        o_cmp, o_slc, o_win, g, out, n_rows, D=dim, BLOCK_D=triton.next_power_of_2(dim),
        ROWS=ROWS_PER_PROGRAM)
    return out.view(shape)


def combine_backward(grad_out, o_cmp, o_slc, o_win, gates, branch_grads: bool = True):
    """Gradients of :func:`combine_forward` (no autograd), and each branch's softmax term.

    Returns:
        ``d_cmp, d_slc, d_win`` like the outputs (contiguous; ``None`` without ``branch_grads``),
        ``d_gates`` like ``gates``, and ``deltas`` float32 ``[3, B, T, HQ]``, the ``delta`` the
        attention backward kernels need (:func:`nsa.ops.triton_common.softmax_delta`), made here
        where the rows are already in registers: ``rowsum(d_b * o_b)`` with ``branch_grads``,
        else ``rowsum(grad_out * o_b)`` (``d_gates`` before rounding), for kernels that read
        ``grad_out`` itself with the gate folded into their lse (:func:`gate_folded_lse`).
    """
    shape, gate_shape = o_cmp.shape, gates.shape
    o_cmp, o_slc, o_win, g, grad_out = (_rows(x) for x in (o_cmp, o_slc, o_win, gates, grad_out))
    # Not written without branch_grads (o_cmp only fills the kernel's argument).
    d_cmp, d_slc, d_win = (torch.empty_like(o_cmp) if branch_grads else o_cmp for _ in range(3))
    d_gates = torch.empty_like(g)
    n_rows, dim = o_cmp.shape
    deltas = torch.empty(3, *shape[:-1], dtype=torch.float32, device=o_cmp.device)
    _combine_bwd_kernel[(triton.cdiv(n_rows, ROWS_PER_PROGRAM),)](
        grad_out, o_cmp, o_slc, o_win, g, d_cmp, d_slc, d_win, d_gates, deltas, n_rows, D=dim,
        BLOCK_D=triton.next_power_of_2(dim), ROWS=ROWS_PER_PROGRAM, BRANCH_GRADS=branch_grads)
    branch = (d_cmp.view(shape), d_slc.view(shape), d_win.view(shape)) if branch_grads else (None, None, None)
    return *branch, d_gates.view(gate_shape), deltas


def gate_folded_lse(lse: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``lse - ln(gate)``, float32 contiguous, ``+inf`` where ``gate == 0``; for ``gate >= 0``.

    An attention backward given the gated sum's ``dO``, this lse and ``rowsum(dO * o)`` as delta
    computes the branch's gradients for ``dO_b = gate * dO`` exactly: its recomputed
    probabilities come out as ``gate * p`` (``exp(s - lse + ln gate)``), and ``ds = gate * p *
    (dO v - rowsum(dO o))`` is the gated ``ds``; rows with a zero gate (``+inf``) contribute
    nothing, as the kernels already treat such rows. Negative gates have no logarithm: callers
    take the stored ``dO_b`` path for them (:mod:`nsa.ops.triton_nsa` checks).
    """
    g = gate.float()
    return torch.where(g > 0, lse - torch.log(g), torch.full_like(lse, float("inf"))).contiguous()


class _CombineBranches(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o_cmp, o_slc, o_win, gates):
        ctx.save_for_backward(o_cmp, o_slc, o_win, gates)
        return combine_forward(o_cmp, o_slc, o_win, gates)

    @staticmethod
    def backward(ctx, grad_out):
        return combine_backward(grad_out, *ctx.saved_tensors)[:4]


def combine_branches_triton(o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor,
                            gates: torch.Tensor) -> torch.Tensor:
    """Fused ``g_cmp * o_cmp + g_slc * o_slc + g_win * o_win`` (see :func:`nsa.ops.combine_branches`).

    Args:
        o_cmp, o_slc, o_win: ``[B, T, HQ, Dv]``, one dtype (fp16, bf16 or fp32).
        gates: ``[B, T, HQ, 3]`` activated gates (cmp, slc, win), any float dtype.

    Returns:
        ``[B, T, HQ, Dv]`` in ``o_cmp``'s dtype, summed in float32; differentiable in all inputs.
    """
    return _CombineBranches.apply(o_cmp, o_slc, o_win, gates)
