"""Reference gate combination of the three branch outputs."""

from __future__ import annotations

import torch


def combine_branches(o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor,
                     gates: torch.Tensor) -> torch.Tensor:
    """``o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win`` per query head.

    Args:
        o_cmp, o_slc, o_win: ``[B, T, HQ, Dv]``.
        gates: ``[B, T, HQ, 3]`` already activated, order (cmp, slc, win).

    Returns:
        ``[B, T, HQ, Dv]`` in ``o_cmp``'s dtype (summed in float32 or float64).
    """
    acc = torch.float64 if o_cmp.dtype == torch.float64 else torch.float32
    g = gates.to(acc)
    out = (g[..., 0:1] * o_cmp.to(acc) + g[..., 1:2] * o_slc.to(acc) + g[..., 2:3] * o_win.to(acc))
    return out.to(o_cmp.dtype)
