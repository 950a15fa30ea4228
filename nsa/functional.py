"""`nsa_attention`: the public functional NSA op. All argument checking lives here."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

import torch

from nsa.backends import resolve_backend, run_backend
from nsa.config import NSAConfig, num_compressed
from nsa.ops.compression import compress_mean_strided

BRANCHES = ("cmp", "slc", "win")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class NSAInfo:
    """What one NSA call did, for observability.

    Attributes:
        selected_blocks: int64 ``[B, T, HK, n]``: ascending block indices, ``-1`` padded.
        reads: ``{"cmp", "slc", "win"} -> int64 [B, T, HK]``: key positions (compressed tokens
            for ``cmp``) each query's branch read, counted from the ranges used.
        backend: the backend that ran (``"reference"`` or ``"triton"``).
        backend_reason: why that backend was chosen.
        gate_stats: ``{branch: (mean, std)}`` of the gates over the batch.
        backward_path: what the backward shares between branches: for the Triton backend
            :func:`nsa.ops.triton_nsa.shared_kv_backward`'s reason (a negative gate, found in the
            backward, keeps selection's forced blocks in its own dq pass); empty for the reference.
        forward_path: likewise for the forward (:func:`nsa.ops.triton_nsa.shared_kv_forward`'s
            reason: whether the window's forward computed selection's forced blocks).
    """

    selected_blocks: torch.Tensor
    reads: dict[str, torch.Tensor]
    backend: str
    backend_reason: str
    gate_stats: dict[str, tuple[float, float]] = field(default_factory=dict)
    backward_path: str = ""
    forward_path: str = ""


def compressed_cu_seqlens(cu_seqlens: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """Offsets of each sequence's compressed tokens in a packed ``[1, sum num_cmp(len_i), H, D]``."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    counts = [num_compressed(n, block, stride) for n in lengths]
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=cu_seqlens.dtype,
                        device=cu_seqlens.device)


def _check_tensor(name: str, x: torch.Tensor, ndim: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def _check_pair(name: str, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, config: NSAConfig,
                length: int | None) -> None:
    _check_tensor(f"{name} keys", k, 4, "[B, T, HK, Dk]")
    _check_tensor(f"{name} values", v, 4, "[B, T, HK, Dv]")
    want_k = (q.shape[0], length, config.num_kv_heads, config.head_dim)
    want_v = (q.shape[0], length, config.num_kv_heads, config.v_head_dim)
    for label, x, want in ((f"{name} keys", k, want_k), (f"{name} values", v, want_v)):
        if length is None:
            want = (want[0], x.shape[1], *want[2:])
        if tuple(x.shape) != want:
            raise ValueError(f"{label} must have shape [B, T, HK, D] = {list(want)} for this q and config, "
                             f"got {list(x.shape)}")
        if x.device != q.device:
            raise ValueError(f"{label} must be on q's device {q.device}, got {x.device}")
        if x.dtype != q.dtype:
            raise TypeError(f"{label} must have q's dtype {q.dtype}, got {x.dtype}")


def check_inputs(q, k, v, gates, config, compressed_kv, selection_kv, window_kv, cu_seqlens) -> None:
    """Validate every argument of :func:`nsa_attention`; raise naming the argument and the rule."""
    if not isinstance(config, NSAConfig):
        raise TypeError(f"config must be an nsa.NSAConfig, got {type(config).__name__}")
    _check_tensor("q", q, 4, "[B, T, HQ, Dk]")
    batch, seq_len, heads, dim = q.shape
    if heads != config.num_heads or dim != config.head_dim:
        raise ValueError(f"q must be [B, T, num_heads={config.num_heads}, head_dim={config.head_dim}], "
                         f"got {list(q.shape)}")
    _check_pair("k/v", k, v, q, config, seq_len)
    for name, pair in (("selection_kv", selection_kv), ("window_kv", window_kv)):
        if pair is not None:
            _check_pair(name, *pair, q, config, seq_len)
    _check_tensor("gates", gates, 4, "[B, T, HQ, 3]")
    if tuple(gates.shape) != (batch, seq_len, heads, 3):
        raise ValueError(f"gates must be [B, T, HQ, 3] = {[batch, seq_len, heads, 3]}, got {list(gates.shape)}")
    if gates.device != q.device:
        raise ValueError(f"gates must be on q's device {q.device}, got {gates.device}")
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (
                torch.int32, torch.int64):
            raise ValueError("cu_seqlens must be a 1-D int32/int64 tensor [N + 1] of sequence offsets")
        if batch != 1:
            raise ValueError(f"with cu_seqlens, q must be packed as [1, total, HQ, Dk], got batch {batch}")
        if cu_seqlens.device != q.device:
            raise ValueError(f"cu_seqlens must be on q's device {q.device}, got {cu_seqlens.device}")
        offsets = cu_seqlens.tolist()
        if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != seq_len or any(
                b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at total={seq_len}, "
                             f"got {offsets}")
    if compressed_kv is None:
        if config.phi != "mean":
            raise ValueError("config.phi='mlp' needs compressed_kv=(k_cmp, v_cmp) from the learned phi "
                             "(nsa.NSAAttention computes it); only phi='mean' compresses k, v itself")
    else:
        if cu_seqlens is None:
            want = num_compressed(seq_len, config.compress_block, config.compress_stride)
        else:
            want = int(compressed_cu_seqlens(cu_seqlens, config.compress_block, config.compress_stride)[-1])
        _check_pair("compressed_kv", *compressed_kv, q, config, want)


def nsa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor,
                  config: NSAConfig, *, compressed_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                  selection_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                  window_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                  cu_seqlens: torch.Tensor | None = None, scale: float | None = None,
                  backend: str = "auto", return_info: bool = False,
                  ) -> torch.Tensor | tuple[torch.Tensor, NSAInfo]:
    """Native Sparse Attention (causal), as fixed by ``NSA_SPEC.md``.

    Args:
        q: ``[B, T, HQ, Dk]``, RoPE applied; float16, bfloat16, float32 or float64.
        k: ``[B, T, HK, Dk]`` keys, used by every branch not given its own below.
        v: ``[B, T, HK, Dv]`` values, likewise.
        gates: ``[B, T, HQ, 3]`` activated gates, order (cmp, slc, win).
        config: the :class:`~nsa.NSAConfig`.
        compressed_kv: ``(k_cmp, v_cmp)``, each ``[B, num_cmp(T), HK, Dk|Dv]``, from a learned phi;
            with ``cu_seqlens``, packed ``[1, sum_i num_cmp(len_i), HK, D]``
            (see :func:`compressed_cu_seqlens`). Default: mean pooling of ``k, v``
            (``config.phi == "mean"`` only).
        selection_kv: ``(k_slc, v_slc)`` ``[B, T, HK, Dk|Dv]``, the selection branch's own keys/values.
        window_kv: ``(k_win, v_win)`` ``[B, T, HK, Dk|Dv]``, the window branch's own keys/values.
        cu_seqlens: int ``[N + 1]`` offsets of N packed sequences (FlashAttention's varlen
            layout); tensors are then ``[1, total, H, D]``.
        scale: softmax scale, default ``1/sqrt(Dk)``.
        backend: ``"auto"`` (Triton on CUDA when available, else reference), ``"reference"`` or
            ``"triton"``.
        return_info: also return an :class:`NSAInfo`.

    Returns:
        ``o [B, T, HQ, Dv]`` in ``q``'s dtype, and the :class:`NSAInfo` when ``return_info``.
    """
    check_inputs(q, k, v, gates, config, compressed_kv, selection_kv, window_kv, cu_seqlens)
    name, reason = resolve_backend(backend, q, config)
    k_slc, v_slc = selection_kv if selection_kv is not None else (k, v)
    k_win, v_win = window_kv if window_kv is not None else (k, v)
    if cu_seqlens is None or q.shape[1] == 0:
        # One call on the tensors as given (also when every packed sequence is empty, for the
        # shapes): concatenating a single whole piece copied the output, and the reads cost
        # ~0.7 GB more per training step of issue 6's model (counted by
        # scripts/studies/step_traffic.py).
        if compressed_kv is None:
            compressed_kv = _mean_pooled(k, v, config)
        out, blocks, reads = run_backend(name, q, *compressed_kv, k_slc, v_slc, k_win, v_win, gates, config,
                                         scale=scale, with_reads=return_info)
    else:
        out, blocks, reads = _packed(name, q, k, v, gates, config, compressed_kv, k_slc, v_slc, k_win, v_win,
                                     cu_seqlens, scale, return_info)
    if not return_info:
        return out
    g = gates.detach().float()
    backward_path = forward_path = ""
    if name == "triton":
        from nsa.ops.triton_nsa import shared_kv_backward, shared_kv_forward

        backward_path = shared_kv_backward(k_slc, v_slc, k_win, v_win, config)[2]
        forward_path = shared_kv_forward(k_slc, v_slc, k_win, v_win)[1]
    info = NSAInfo(
        selected_blocks=blocks, reads=reads, backend=name, backend_reason=reason,
        gate_stats={b: (g[..., i].mean().item(), g[..., i].std().item() if g[..., i].numel() > 1 else 0.0)
                    for i, b in enumerate(BRANCHES)},
        backward_path=backward_path, forward_path=forward_path,
    )
    return out, info


def _mean_pooled(k: torch.Tensor, v: torch.Tensor, config: NSAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The default compressed tokens (``phi = "mean"``) of ``k`` and ``v``."""
    return (compress_mean_strided(k, config.compress_block, config.compress_stride),
            compress_mean_strided(v, config.compress_block, config.compress_stride))


def _packed(name, q, k, v, gates, config, compressed_kv, k_slc, v_slc, k_win, v_win, cu_seqlens, scale,
            with_reads):
    """:func:`nsa_attention` over packed sequences (at least one non-empty): one backend call per
    non-empty sequence, joined."""
    offsets = cu_seqlens.tolist()
    bounds = list(pairwise(offsets))
    cmp_bounds = list(pairwise(compressed_cu_seqlens(cu_seqlens, config.compress_block,
                                                     config.compress_stride).tolist()))
    outputs, blocks, reads = [], [], {b: [] for b in BRANCHES}
    for (start, end), (cmp_start, cmp_end) in zip(bounds, cmp_bounds):
        if end == start:
            continue  # an empty sequence adds no rows; the kernels' backward is not asked for T = 0
        piece = slice(start, end)
        if compressed_kv is None:
            k_cmp, v_cmp = _mean_pooled(k[:, piece], v[:, piece], config)
        else:
            k_cmp, v_cmp = (t[:, cmp_start:cmp_end] for t in compressed_kv)
        # One slice of a tensor both branches read, so that they still read one (the Triton
        # forward and backward then share work between them: nsa.ops.triton_nsa.shared_kv_forward
        # and shared_kv_backward).
        k_slc_piece, v_slc_piece = k_slc[:, piece], v_slc[:, piece]
        k_win_piece = k_slc_piece if k_win is k_slc else k_win[:, piece]
        v_win_piece = v_slc_piece if v_win is v_slc else v_win[:, piece]
        o, sel, rd = run_backend(name, q[:, piece], k_cmp, v_cmp, k_slc_piece, v_slc_piece, k_win_piece,
                                 v_win_piece, gates[:, piece], config, scale=scale, with_reads=with_reads)
        outputs.append(o)
        blocks.append(sel)
        if with_reads:
            for branch in BRANCHES:
                reads[branch].append(rd[branch])
    joined_reads = {b: torch.cat(reads[b], dim=1) for b in BRANCHES} if with_reads else None
    return torch.cat(outputs, dim=1), torch.cat(blocks, dim=1), joined_reads
