"""NSA composed from the Triton kernels: the ``"triton"`` backend (prefill and training).

Same signature and semantics as :func:`nsa.ops.reference.nsa_reference`; every kernel here has a
naive twin in its op folder that the tests compare it with.
"""

from __future__ import annotations

import torch

from nsa.config import NSAConfig
from nsa.ops.combine.triton import combine_branches_triton
from nsa.ops.compressed_attention.triton import compressed_attention_triton
from nsa.ops.reads import branch_reads
from nsa.ops.selected_attention.triton import selected_attention_triton
from nsa.ops.selection.triton import select_blocks_triton
from nsa.ops.window_attention.triton import window_attention_triton


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


def nsa_triton(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_slc: torch.Tensor,
               v_slc: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, gates: torch.Tensor,
               config: NSAConfig, *, scale: float | None = None, q_offset: int = 0,
               win_offset: int = 0, with_reads: bool = True,
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
    """Triton NSA over whole sequences (``q_offset == win_offset == 0``); see ``nsa_reference``."""
    if q_offset or win_offset:
        raise NotImplementedError("the Triton backend runs whole sequences (q_offset = 0); "
                                  "incremental decode uses the reference path")
    c = config
    o_cmp, lse = compressed_attention_triton(q, k_cmp, v_cmp, block=c.compress_block,
                                             stride=c.compress_stride, scale=scale)
    blocks = select_blocks_triton(q.detach(), k_cmp.detach(), lse.detach(), block=c.compress_block,
                                  stride=c.compress_stride, select_block=c.select_block,
                                  select_count=c.select_count, scale=scale)
    o_slc, _ = selected_attention_triton(q, k_slc, v_slc, blocks, select_block=c.select_block, scale=scale)
    o_win, _ = window_attention_triton(q, k_win, v_win, window=c.window, scale=scale)
    out = combine_branches_triton(o_cmp, o_slc, o_win, gates)
    return out, blocks, branch_reads(blocks, 0, config) if with_reads else None
