"""NSA composed from the Triton kernels: the ``"triton"`` backend (prefill and training).

Same signature and semantics as :func:`nsa.ops.reference.nsa_reference`; every kernel here has a
naive twin in its op folder that the tests compare it with.
"""

from __future__ import annotations

import torch

from nsa.config import NSAConfig
from nsa.ops import streams
from nsa.ops.combine.triton import combine_backward, combine_forward, gate_folded_lse
from nsa.ops.compressed_attention.triton import (
    compressed_attention_backward_dkdv,
    compressed_attention_backward_dq,
    compressed_attention_forward,
)
from nsa.ops.reads import branch_reads
from nsa.ops.selected_attention.triton import (
    invert_selection,
    selected_attention_backward_dkdv,
    selected_attention_backward_dq,
    selected_attention_forward,
)
from nsa.ops.selection.triton import select_blocks_triton
from nsa.ops.window_attention.triton import (
    SelectionForcedBlocks,
    window_attention_backward_dkdv,
    window_attention_backward_dq,
    window_attention_forward,
    window_attention_forward_with_forced,
)


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


class _NegativeGates:
    """Whether any gate is negative, found in the forward and read in the backward without
    stalling: the flag is copied to pinned host memory behind the forward's kernels, and by the
    time autograd reaches this node's backward those have long finished (later layers' backward
    kernels run first), so the wait is for an event already passed. Under CUDA graph capture
    (no host waits allowed) the answer is "maybe", which takes the path that is right for all."""

    def __init__(self, gates: torch.Tensor):
        self._flag, self._ready = None, None
        if not gates.is_cuda:
            self._flag = (gates < 0).any()
        elif not torch.cuda.is_current_stream_capturing():
            self._flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            self._flag.copy_((gates < 0).any(), non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()

    def any(self) -> bool:
        if self._flag is None or (self._ready is not None and torch.cuda.is_current_stream_capturing()):
            return True
        if self._ready is not None:
            self._ready.synchronize()
        return bool(self._flag)


class _NSATriton(torch.autograd.Function):
    """The three branches and their gated sum as one autograd node, so that the backward can
    share work between them: the combine kernel hands each branch its ``delta`` (no separate
    pass over ``O`` and ``dO`` per branch); with gates >= 0 (the spec's sigmoid gates) every
    branch reads the gated sum's ``dO`` with its gate folded into its lse (no ``g_b * dO``
    stored per branch); and the selection and window dq kernels add their query gradient to
    compressed attention's in place (no ``[B, T, HQ, Dk]`` sums between kernels). The kernels
    are the branch ops' own (each also has its autograd op, which the tests compare with this
    one). Gate columns: (cmp, slc, win), as :func:`combine_forward` reads them."""

    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, config: NSAConfig, scale: float):
        c = config
        o_cmp, lse_cmp = compressed_attention_forward(q, k_cmp, v_cmp, c.compress_block, c.compress_stride,
                                                      scale)
        blocks = select_blocks_triton(q, k_cmp, lse_cmp, block=c.compress_block, stride=c.compress_stride,
                                      select_block=c.select_block, select_count=c.select_count, scale=scale)
        idx = blocks.to(torch.int32).contiguous()
        if shared_kv_forward(k_slc, v_slc, k_win, v_win)[0]:
            # Selection's forced blocks in the window's forward, their keys loaded once per tile of
            # positions; selection's walk completes that softmax with the blocks it chose.
            o_win, lse_win, *forced = window_attention_forward_with_forced(q, k_win, v_win, c.window, scale,
                                                                           c.select_block)
        else:
            o_win, lse_win = window_attention_forward(q, k_win, v_win, c.window, scale)
            forced = None
        o_slc, lse_slc = selected_attention_forward(q, k_slc, v_slc, idx, c.select_block, scale,
                                                    forced=forced)
        out = combine_forward(o_cmp, o_slc, o_win, gates)
        ctx.save_for_backward(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, idx, o_cmp, o_slc, o_win,
                              lse_cmp, lse_slc, lse_win)
        ctx.config, ctx.scale = config, scale
        ctx.one_kv, ctx.forced_in_window, _ = shared_kv_backward(k_slc, v_slc, k_win, v_win, config)
        ctx.negative_gates = _NegativeGates(gates) if any(ctx.needs_input_grad) else None
        ctx.mark_non_differentiable(blocks)
        return out, blocks

    @staticmethod
    def backward(ctx, grad_out, _grad_blocks):
        (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, idx, o_cmp, o_slc, o_win,
         lse_cmp, lse_slc, lse_win) = ctx.saved_tensors
        c, scale = ctx.config, ctx.scale
        outputs, lses = (o_cmp, o_slc, o_win), (lse_cmp, lse_slc, lse_win)
        forced_in_window = ctx.forced_in_window
        if ctx.negative_gates.any():
            # dO_b = g_b * dO stored per branch (3 x [B, T, HQ, Dv]), as the branch ops' backward.
            *branch_do, d_gates, deltas = combine_backward(grad_out, *outputs, gates)
            forced_in_window = False  # selection's and window's dO differ
        else:
            # Each branch reads the gated sum's dO itself, its gate folded into its lse: no
            # [B, T, HQ, Dv] gradient per branch is written or held (gate_folded_lse).
            grad_out = grad_out.contiguous()
            _, _, _, d_gates, deltas = combine_backward(grad_out, *outputs, gates, branch_grads=False)
            branch_do = [grad_out] * 3
            lses = tuple(gate_folded_lse(lse, gates[..., i]) for i, lse in enumerate(lses))
        dq, (dk_cmp, dv_cmp), (dk_slc, dv_slc), (dk_win, dv_win) = branch_backward(
            q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, idx, lses, branch_do, deltas, c, scale,
            one_kv=ctx.one_kv, forced_in_window=forced_in_window)
        # With one_kv the selection gradients hold the window's too (the same tensors: autograd
        # adds nothing for the window's None).
        return dq, dk_cmp, dv_cmp, dk_slc, dv_slc, dk_win, dv_win, d_gates, None, None


# How the branches' backward passes share the GPU (branch_backward). Selection's passes are bound
# by their gathers (dq: K/V from L2; dK/dV: q/dO from HBM), compressed attention's by its
# products, so one of each may run at once on a side stream (nsa.ops.streams). Measured on an H100
# at 64/4 heads, 64k (scripts/gpu/overlap_ab.py, fifteenth session): compressed attention's
# backward beside selection's dK/dV 42.6 ms with the dK/dV kernel launched first, 47.0 the other
# way round, against 46.7 one after the other (the first kernel to start holds the SMs: the
# compressed kernels take every register of theirs); the whole backward 77.40 -> 74.10 ms.
#   "one-stream": every pass on the current stream.
#   "selection-dkdv-beside": selection's dK/dV on the side stream, first.
#   "selection-beside" (the default): selection's dq (written first) then its dK/dV on the side
#       stream, beside compressed attention's dK/dV; compressed attention's dq then adds to
#       selection's. The three branches' backward in one process (overlap_ab.py --parts schedules,
#       H200, sixteenth session): 64/4 heads 74.15 / 72.42 / 71.17 ms in the order above, 16/4
#       28.29 / 28.20 / 27.79; peak 4.71 GiB against 4.34 (64/4; selection's dq is held from the
#       start of the backward).
BACKWARD_SCHEDULES = ("one-stream", "selection-dkdv-beside", "selection-beside")
BACKWARD_SCHEDULE = "selection-beside"


def branch_backward(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, idx, lses, branch_do, deltas,
                    config: NSAConfig, scale: float, schedule: str | None = None, one_kv: bool = False,
                    forced_in_window: bool = False):
    """``dq`` and each branch's ``(dk, dv)`` (cmp, slc, win) from each branch's lse, output gradient
    and delta (``branch_do`` is a list; its entries are dropped once read, so that a stored
    per-branch gradient goes early). ``schedule``: one of :data:`BACKWARD_SCHEDULES`
    (default :data:`BACKWARD_SCHEDULE`).

    ``one_kv``: selection and window read one key/value tensor; the window's dK/dV are added to
    selection's in place (returned as selection's; the window's are ``(None, None)``).
    ``forced_in_window`` (with ``one_kv``, both branches reading the same ``dO``): selection's dq
    pass leaves out its forced blocks (0, ``c - 1``, ``c``), whose share the window's dq pass
    computes: for the local ones from the scores and ``dO V^T`` it already holds, for block 0
    once per tile of positions instead of once per position (:func:`shared_kv_backward` says
    when these apply).
    """
    schedule = BACKWARD_SCHEDULE if schedule is None else schedule
    if schedule not in BACKWARD_SCHEDULES:
        raise ValueError(f"schedule: {schedule!r} is not one of {BACKWARD_SCHEDULES}")
    if forced_in_window and not one_kv:
        raise ValueError("forced_in_window: needs one_kv (selection and window reading one key/value tensor)")
    c = config
    cmp_args = (q, k_cmp, v_cmp, lses[0], branch_do[0], deltas[0], c.compress_block, c.compress_stride, scale)
    sel_args = (q, k_slc, v_slc, idx, lses[1], branch_do[1], deltas[1], c.select_block, scale)
    win_args = (q, k_win, v_win, lses[2], branch_do[2], deltas[2], c.window, scale)
    forced = SelectionForcedBlocks(lses[1], deltas[1], c.select_block) if forced_in_window else None
    # Inverted (a sort and a few small kernels) on the current stream, before the fork, so that
    # the side stream's first launch is an attention kernel, ahead of compressed attention's.
    inverted = invert_selection(idx, q.shape[1], c.select_block)
    side = None if schedule == "one-stream" else streams.fork(q.device)
    if schedule == "selection-beside":
        with streams.on(side):
            dq = selected_attention_backward_dq(*sel_args, skip_forced=forced_in_window)
            selection_dq_done = streams.record(side)
            dk_slc, dv_slc = selected_attention_backward_dkdv(*sel_args, inverted)
        dk_cmp, dv_cmp = compressed_attention_backward_dkdv(*cmp_args)
        streams.wait(selection_dq_done, q.device)
        dq = compressed_attention_backward_dq(*cmp_args, dq=dq)
    else:
        with streams.on(side):
            dk_slc, dv_slc = selected_attention_backward_dkdv(*sel_args, inverted)
        dk_cmp, dv_cmp = compressed_attention_backward_dkdv(*cmp_args)
        dq = compressed_attention_backward_dq(*cmp_args)
        dq = selected_attention_backward_dq(*sel_args, dq=dq, skip_forced=forced_in_window)
    cmp_args, branch_do[0] = None, None
    dq = window_attention_backward_dq(*win_args, dq=dq, forced=forced)
    if one_kv:
        streams.join(side, q.device)  # selection's dk, dv, written on the side stream, are added to
        dk_slc, dv_slc = window_attention_backward_dkdv(*win_args, add_to=(dk_slc, dv_slc))
        dk_win, dv_win = None, None
    else:
        dk_win, dv_win = window_attention_backward_dkdv(*win_args)
    # Selection's inputs (sel_args, inverted) live until here, after the join, so that the
    # allocator cannot hand their memory to the current stream while the side one reads them.
    streams.join(side, q.device)
    return dq, (dk_cmp, dv_cmp), (dk_slc, dv_slc), (dk_win, dv_win)


# Whether the forward and the backward share work between selection and window where they read
# one key/value tensor (shared_kv_forward, shared_kv_backward); off only to time the other way
# (profile_prefill_kernels.py --one-kv).
SHARED_KV_FORWARD = True
SHARED_KV_BACKWARD = True


def _not_shared(switch: str, k_slc, v_slc, k_win, v_win) -> str:
    """Why selection and window share no work (``switch``, this module's flag, is off, or they
    read different key/value tensors); empty when they read one."""
    if not globals()[switch]:
        return f"turned off (nsa.ops.triton_nsa.{switch})"
    if not (k_slc is k_win and v_slc is v_win):
        return "selection and window read different key/value tensors"
    return ""


def shared_kv_forward(k_slc: torch.Tensor, v_slc: torch.Tensor, k_win: torch.Tensor,
                      v_win: torch.Tensor) -> tuple[bool, str]:
    """``(forced_in_window, why)``: whether the window's forward computes selection's softmax over
    its forced blocks (0, ``c - 1``, ``c``), which selection's forward then completes with the
    blocks it chose: where both read one key/value tensor (the same objects), at any window."""
    why_not = _not_shared("SHARED_KV_FORWARD", k_slc, v_slc, k_win, v_win)
    if why_not:
        return False, why_not
    return True, "one key/value tensor: selection's forced blocks in the window's forward"


def shared_kv_backward(k_slc: torch.Tensor, v_slc: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor,
                       config: NSAConfig) -> tuple[bool, bool, str]:
    """``(one_kv, forced_in_window, why)`` for :func:`branch_backward`.

    ``one_kv`` when selection and window read one key/value tensor (the same objects, as
    :func:`nsa.nsa_attention` passes its ``k, v`` by default; the layer's separate projections do
    not); ``forced_in_window`` when besides the window holds both local blocks (``w >= 2 l'``). The
    backward also requires no negative gate for the latter (each branch then reads the same dO)."""
    why_not = _not_shared("SHARED_KV_BACKWARD", k_slc, v_slc, k_win, v_win)
    if why_not:
        return False, False, why_not
    if config.window < 2 * config.select_block:
        return True, False, (f"one key/value tensor; selection's forced blocks in its own dq pass: window="
                             f"{config.window} < 2 x select_block={config.select_block}")
    return True, True, "one key/value tensor: selection's forced blocks in the window's dq pass"


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
    # Contiguous: q, the outputs and every dq pass share one set of strides. One copy of a tensor
    # that two branches read, so that they still read one (shared_kv_backward).
    copies: dict[int, torch.Tensor] = {}
    for x in (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates):
        if id(x) not in copies:
            copies[id(x)] = x.contiguous()
    tensors = [copies[id(x)] for x in (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates)]
    out, blocks = _NSATriton.apply(*tensors, config, scale)
    return out, blocks, branch_reads(blocks, 0, config) if with_reads else None
