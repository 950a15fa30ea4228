"""NSA composed from the Triton kernels: the ``"triton"`` backend (prefill and training).

Same signature and semantics as :func:`nsa.ops.reference.nsa_reference`; every kernel here has a
naive twin in its op folder that the tests compare it with.
"""

from __future__ import annotations

import contextlib

import torch

from nsa.config import NSAConfig
from nsa.ops.combine.triton import combine_backward, combine_forward
from nsa.ops.compressed_attention.triton import (
    compressed_attention_dkdv,
    compressed_attention_dq,
    compressed_attention_forward,
)
from nsa.ops.reads import branch_reads
from nsa.ops.selected_attention.triton import (
    selected_attention_dkdv,
    selected_attention_dq,
    selected_attention_forward,
)
from nsa.ops.selection.triton import select_blocks_triton
from nsa.ops.window_attention.triton import window_attention_backward, window_attention_forward


def autotuned_tiles(seq_len: int) -> dict[str, list[str]]:
    """The tile configs the prefill kernels' autotuners chose for ``seq_len``'s size class, by
    kernel (empty lists for kernels not launched there yet; the query kernels of selection and
    window attention list the forward's and the dq pass's choices). For benchmark rows and
    tuning notes: which tiles a timing ran on."""
    from nsa.ops.compressed_attention import triton as compressed
    from nsa.ops.selected_attention import triton as selected
    from nsa.ops.selection import triton as selection
    from nsa.ops.window_attention import triton as window

    kernels = {"compressed-fwd": compressed._cmp_fwd_tuned, "compressed-dkdv": compressed._cmp_bwd_dkdv_tuned,
               "compressed-dq": compressed._cmp_bwd_dq_tuned, "selection-scoring": selection._select_tuned,
               "selected-query": selected._query_kernel, "selected-dkdv": selected._dkdv_kernel,
               "window-query": window._query_kernel, "window-dkdv": window._dkdv_kernel}
    return {name: kernel.chosen(seq_len) for name, kernel in kernels.items()}


# The selection branch is bound by its gathers (L2 traffic) while compressed and window attention
# are bound by their matrix products, so on CUDA the selection passes run on a second stream, beside
# the others: the GPU can hold programs of both kernels on an SM at once. Kept as a switch for A/B
# timing (scripts/gpu/profile_prefill_kernels.py --serial); results are the same either way (the
# dq passes are ordered by an event; see _NSATriton.backward).
CONCURRENT_BRANCHES = True
_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream | None:
    """The second stream for ``device`` (one per device, reused), or None off CUDA / when disabled."""
    if not (CONCURRENT_BRANCHES and device.type == "cuda"):
        return None
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


@contextlib.contextmanager
def _beside(side: torch.cuda.Stream | None):
    """Work in the block goes to ``side`` once it has caught up with the current stream (inline
    when ``side`` is None)."""
    if side is None:
        yield
        return
    side.wait_stream(torch.cuda.current_stream(side.device))
    with torch.cuda.stream(side):
        yield


def _join(side: torch.cuda.Stream | None, *made_beside: torch.Tensor) -> None:
    """The current stream waits for ``side``; tensors allocated there are marked as used here too
    (so the caching allocator does not hand their memory to ``side`` while this stream reads it)."""
    if side is None:
        return
    main = torch.cuda.current_stream(side.device)
    main.wait_stream(side)
    for tensor in made_beside:
        tensor.record_stream(main)


class _NSATriton(torch.autograd.Function):
    """The three branches and their gated sum as one autograd node, so that the backward can
    share work between them: the combine kernel hands each branch its ``delta`` (no separate
    pass over ``O`` and ``dO`` per branch), the three dq passes add into one tensor in place (no
    ``[B, T, HQ, Dk]`` sums between kernels), and selection runs beside the other branches
    (:data:`CONCURRENT_BRANCHES`). The kernels are the branch ops' own (each also has its autograd
    op, which the tests compare with this one)."""

    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, config: NSAConfig, scale: float):
        c = config
        side = _side_stream(q.device)
        o_cmp, lse_cmp = compressed_attention_forward(q, k_cmp, v_cmp, c.compress_block, c.compress_stride,
                                                      scale)
        blocks = select_blocks_triton(q, k_cmp, lse_cmp, block=c.compress_block, stride=c.compress_stride,
                                      select_block=c.select_block, select_count=c.select_count, scale=scale)
        idx = blocks.to(torch.int32).contiguous()
        with _beside(side):
            o_win, lse_win = window_attention_forward(q, k_win, v_win, c.window, scale)
        o_slc, lse_slc = selected_attention_forward(q, k_slc, v_slc, idx, c.select_block, scale)
        _join(side, o_win, lse_win)
        out = combine_forward(o_cmp, o_slc, o_win, gates)
        ctx.save_for_backward(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, idx, o_cmp, o_slc, o_win,
                              lse_cmp, lse_slc, lse_win)
        ctx.config, ctx.scale = config, scale
        ctx.mark_non_differentiable(blocks)
        return out, blocks

    @staticmethod
    def backward(ctx, grad_out, _grad_blocks):
        (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, idx, o_cmp, o_slc, o_win,
         lse_cmp, lse_slc, lse_win) = ctx.saved_tensors
        c, scale = ctx.config, ctx.scale
        side = _side_stream(q.device)
        d_cmp, d_slc, d_win, d_gates, deltas = combine_backward(grad_out, o_cmp, o_slc, o_win, gates)
        slc_args = (q, k_slc, v_slc, idx, lse_slc, d_slc, deltas[1], c.select_block, scale)
        cmp_args = (q, k_cmp, v_cmp, lse_cmp, d_cmp, deltas[0], c.compress_block, c.compress_stride, scale)
        # Selection's dq writes dq first (beside compressed dK/dV); every later dq pass adds to it.
        with _beside(side):
            dq = selected_attention_dq(*slc_args)
            dq_written = torch.cuda.current_stream(q.device).record_event() if side is not None else None
            dk_slc, dv_slc = selected_attention_dkdv(*slc_args)
        dk_cmp, dv_cmp = compressed_attention_dkdv(*cmp_args)
        if dq_written is not None:
            torch.cuda.current_stream(q.device).wait_event(dq_written)
        dq = compressed_attention_dq(*cmp_args, dq=dq)
        dq, dk_win, dv_win = window_attention_backward(q, k_win, v_win, lse_win, d_win, deltas[2], c.window,
                                                       scale, dq=dq)
        _join(side, dq, dk_slc, dv_slc)
        return dq, dk_cmp, dv_cmp, dk_slc, dv_slc, dk_win, dv_win, d_gates, None, None


def nsa_triton(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_slc: torch.Tensor,
               v_slc: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, gates: torch.Tensor,
               config: NSAConfig, *, scale: float | None = None, q_offset: int = 0,
               win_offset: int = 0, with_reads: bool = True,
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
    """Triton NSA over whole sequences (``q_offset == win_offset == 0``); see ``nsa_reference``."""
    if q_offset or win_offset:
        raise NotImplementedError("the Triton backend runs whole sequences (q_offset = 0); "
                                  "incremental decode uses the reference path")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    # Contiguous: q, the outputs and every dq pass share one set of strides.
    tensors = (x.contiguous() for x in (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates))
    out, blocks = _NSATriton.apply(*tensors, config, scale)
    return out, blocks, branch_reads(blocks, 0, config) if with_reads else None
