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


def nsa_triton(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_slc: torch.Tensor,
               v_slc: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, gates: torch.Tensor,
               config: NSAConfig, *, scale: float | None = None, q_offset: int = 0,
               win_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
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
    reads = branch_reads(blocks, 0, config)
    return out, blocks, reads
