"""Decode step over the per-branch caches: reference (``naive``) and Triton kernels (``triton``)."""

from __future__ import annotations

import torch

from nsa.config import NSAConfig
from nsa.ops.decode.naive import check_decode_inputs, nsa_decode_reference, window_ring_segment

DECODE_BACKENDS = ("auto", "reference", "triton")
TRITON_DECODE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def resolve_decode(backend: str, q: torch.Tensor) -> tuple[str, str]:
    """``(name, reason)`` of the decode implementation that runs for ``backend`` and ``q``.

    ``auto`` takes the Triton kernels for CUDA tensors of a dtype they support and the reference
    otherwise; ``triton`` also runs CPU tensors under ``TRITON_INTERPRET=1``.
    """
    if backend not in DECODE_BACKENDS:
        raise ValueError(f"backend must be one of {DECODE_BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference", "requested"
    from nsa.backends import triton_interpreting

    if q.dtype not in TRITON_DECODE_DTYPES:
        why = f"no incremental-decode kernels for {q.dtype} (they take float16, bfloat16, float32)"
    elif not (q.is_cuda or triton_interpreting()):
        why = f"inputs are on {q.device}; the decode kernels need CUDA (or TRITON_INTERPRET=1)"
    else:
        why = ""
    if backend == "triton":
        if why:
            raise RuntimeError(f"backend='triton' has {why}" if why.startswith("no ") else
                               f"backend='triton' cannot run: {why}")
        return "triton", "requested"
    if not why and q.is_cuda:
        return "triton", "auto: CUDA tensors"
    # The reason string is part of the layer's recorded info (tests compare it): keep it fixed.
    return "reference", "auto: decode runs the reference path"


def nsa_decode(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_slc: torch.Tensor,
               v_slc: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, gates: torch.Tensor,
               lengths: torch.Tensor, config: NSAConfig, *, num_new: torch.Tensor | None = None,
               scale: float | None = None, backend: str = "auto", return_backend: bool = False):
    """One NSA decode step for a batch of sequences of different lengths (see
    :func:`nsa.ops.decode.naive.nsa_decode_reference` for every argument's shape and dtype).

    Returns ``(o, selected_blocks, reads)``, and ``(name, reason)`` of the backend that ran as a
    fourth item when ``return_backend``.
    """
    name, reason = resolve_decode(backend, q)
    if name == "triton":
        from nsa.ops.decode.triton import nsa_decode_triton

        result = nsa_decode_triton(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, lengths, config,
                                   num_new=num_new, scale=scale)
    else:
        result = nsa_decode_reference(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, lengths, config,
                                      num_new=num_new, scale=scale)
    return (*result, (name, reason)) if return_backend else result


__all__ = ["DECODE_BACKENDS", "check_decode_inputs", "nsa_decode", "nsa_decode_reference", "resolve_decode",
           "window_ring_segment"]
