"""`NSAAttention`: the Native Sparse Attention layer (projections, RoPE, learned phi, gates) with
training/prefill over whole or packed sequences and incremental decode through an `NSACache`."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from nsa.cache import NSACache
from nsa.config import NSAConfig
from nsa.functional import BRANCHES, NSAInfo, nsa_attention
from nsa.ops.decode import resolve_decode
from nsa.ops.reference import nsa_reference
from nsa.phi import BlockCompressor
from nsa.rope import RopeScaling, apply_rope, apply_rope_queries, check_rope_dim


@dataclass
class NSADecodeInfo(NSAInfo):
    """What one cache step did; tensors follow ``x``'s layout (``[B, K, ...]`` or ``[1, total_new, ...]``).

    Attributes (besides :class:`~nsa.NSAInfo`'s):
        selected_blocks: int64 ``[.., HK, n]`` per new token (ascending, ``-1`` padded).
        reads: ``{"cmp", "slc", "win"} -> int64 [.., HK]``: key positions (compressed tokens for
            ``cmp``) each new token's branch read, counted from the index ranges the step used.
        positions: int64 ``[..]`` absolute position of every new token.
        lengths: int64 ``[num_sequences]`` cache lengths after the step.
        step: how the cache was appended to: ``"batched"`` (one token per sequence, every
            sequence at once on the device, :meth:`NSAAttention.decode_step`) or
            ``"per-sequence"`` (a host loop over the sequences: multi-token and packed steps,
            the reference backend), or ``"per-sequence+prefill"`` (the same, where some sequence
            came with an empty cache and more than ``TRITON_STEP_TOKENS`` tokens: its tokens ran
            through the training (prefill) kernels, then filled its cache).
    """

    positions: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    step: str = ""


# Tokens per sequence in one Triton decode launch; longer cache steps run as several.
TRITON_STEP_TOKENS = 64
# forward(x, cache=...) takes the batched step (decode_step) when every sequence gets one token
# and the Triton backend runs; False forces the per-sequence loop (tests compare the two).
BATCHED_STEP = True


def resolve_decode_backend(backend: str, x: torch.Tensor) -> tuple[str, str]:
    """``(name, reason)`` of the implementation that runs a cache step (:func:`nsa.ops.decode.resolve_decode`):
    ``auto`` takes the Triton decode kernels for CUDA tensors, the reference otherwise."""
    return resolve_decode(backend, x)


def _check_cu_seqlens(cu_seqlens: torch.Tensor, x: torch.Tensor) -> list[int]:
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (
            torch.int32, torch.int64):
        raise ValueError("cu_seqlens must be a 1-D int32/int64 tensor [N + 1] of sequence offsets")
    if x.shape[0] != 1:
        raise ValueError(f"with cu_seqlens, x must be packed as [1, total, d_model], got batch {x.shape[0]}")
    offsets = cu_seqlens.tolist()
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != x.shape[1] or any(
            b < a for a, b in pairwise(offsets)):
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at total={x.shape[1]}, "
                         f"got {offsets}")
    return offsets


class NSAAttention(nn.Module):
    """Native Sparse Attention layer.

    Args:
        d_model: width of the layer's input and output.
        config: the :class:`~nsa.NSAConfig` (``config.head_dim`` must be even for RoPE).
        rope_theta: RoPE base.
        rope_scaling: RoPE beyond the trained context (:class:`~nsa.rope.RopeScaling`, e.g. YaRN);
            ``None``: RoPE as trained. An attribute: set it to evaluate or decode a trained layer at
            a longer context (prefill and decode rotate alike).
        phi_hidden: hidden width of the learned phi MLP (``config.phi == "mlp"``); default ``4 * D``.
        bias: bias on the q/k/v and output projections (the gate always has one).

    Parameters: ``q_proj`` (``d_model -> HQ*Dk``); ``k_proj[branch]``, ``v_proj[branch]`` for each
    branch ``cmp, slc, win`` (``d_model -> HK*Dk`` / ``HK*Dv``); ``phi_k``, ``phi_v`` (learned phi of
    the compression branch's keys / values); ``gate_proj`` (``d_model -> HQ*3``, zero-initialised, so
    sigmoid gates start at 0.5 and softmax gates at 1/3); ``o_proj`` (``HQ*Dv -> d_model``).
    """

    def __init__(self, d_model: int, config: NSAConfig, *, rope_theta: float = 10000.0,
                 rope_scaling: RopeScaling | None = None, phi_hidden: int | None = None,
                 bias: bool = False) -> None:
        super().__init__()
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model <= 0:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        if not isinstance(config, NSAConfig):
            raise TypeError(f"config must be an nsa.NSAConfig, got {type(config).__name__}")
        check_rope_dim(config.head_dim, "config.head_dim")
        if not float(rope_theta) > 0:
            raise ValueError(f"rope_theta must be positive, got {rope_theta!r}")
        if rope_scaling is not None and not isinstance(rope_scaling, RopeScaling):
            raise TypeError(f"rope_scaling must be an nsa.rope.RopeScaling or None, "
                            f"got {type(rope_scaling).__name__}")
        self.d_model, self.config, self.rope_theta = d_model, config, float(rope_theta)
        self.rope_scaling = rope_scaling
        hq, hk, dk, dv = config.num_heads, config.num_kv_heads, config.head_dim, config.v_head_dim
        self.q_proj = nn.Linear(d_model, hq * dk, bias=bias)
        self.k_proj = nn.ModuleDict({b: nn.Linear(d_model, hk * dk, bias=bias) for b in BRANCHES})
        self.v_proj = nn.ModuleDict({b: nn.Linear(d_model, hk * dv, bias=bias) for b in BRANCHES})
        block, stride = config.compress_block, config.compress_stride
        self.phi_k = BlockCompressor(config.phi, block, stride, dk, phi_hidden)
        self.phi_v = BlockCompressor(config.phi, block, stride, dv, phi_hidden)
        self.gate_proj = nn.Linear(d_model, hq * 3)
        nn.init.zeros_(self.gate_proj.weight)
        nn.init.zeros_(self.gate_proj.bias)
        self.o_proj = nn.Linear(hq * dv, d_model, bias=bias)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, rope_theta={self.rope_theta}, rope_scaling={self.rope_scaling}, "
                f"config={self.config}")

    # ----- pieces ------------------------------------------------------------------------------

    def new_cache(self, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> NSACache:
        """An empty :class:`NSACache` for this layer; dtype/device default to the parameters'."""
        weight = self.q_proj.weight
        return NSACache.allocate(self.config, batch_size, max_len, dtype=dtype or weight.dtype,
                                 device=device if device is not None else weight.device)

    def project(self, x: torch.Tensor, positions: torch.Tensor,
                ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Queries, per-branch keys/values and activated gates of ``x``.

        Args:
            x: ``[B, T, d_model]``.
            positions: int64 ``[T]`` or ``[B, T]`` absolute positions (RoPE).

        Returns:
            ``q [B, T, HQ, Dk]`` (rotated), ``{branch: (k [B, T, HK, Dk] rotated, v [B, T, HK, Dv])}``
            and ``gates [B, T, HQ, 3]`` (cmp, slc, win), all in ``x``'s dtype.
        """
        c = self.config
        batch, seq_len, _ = x.shape
        hq, hk, dk, dv = c.num_heads, c.num_kv_heads, c.head_dim, c.v_head_dim
        q, *keys_values, logits = F.linear(x, *self.input_projection()).split(
            [hq * dk, *[hk * dk] * len(BRANCHES), *[hk * dv] * len(BRANCHES), hq * 3], dim=-1)
        # Each RoPE call writes a new contiguous tensor, so q and the keys reach the kernels
        # contiguous; the values are column slices of the projection (the kernels copy the two
        # small ones that they need contiguous).
        q = apply_rope_queries(q.view(batch, seq_len, hq, dk), positions, theta=self.rope_theta,
                               scaling=self.rope_scaling)
        kv = {}
        for i, branch in enumerate(BRANCHES):
            k = keys_values[i].view(batch, seq_len, hk, dk)
            v = keys_values[len(BRANCHES) + i].view(batch, seq_len, hk, dv)
            kv[branch] = (apply_rope(k, positions, theta=self.rope_theta, scaling=self.rope_scaling), v)
        logits = logits.view(batch, seq_len, hq, 3)
        gates = torch.sigmoid(logits) if c.gate == "sigmoid" else torch.softmax(logits, dim=-1)
        return q, kv, gates

    def input_projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight and bias of every projection of the layer's input as one linear map.

        Output columns: ``q`` (``HQ*Dk``), the keys of ``cmp, slc, win`` (``HK*Dk`` each), their
        values (``HK*Dv`` each), the gate logits (``HQ*3``). Why one map: the input is read (and,
        under autocast, cast) once instead of eight times, and backward runs one matmul for the
        input's gradient instead of eight plus their float32 sum (counted for issue 6's training
        model: ~3 GB less per step in forward alone). The parameters stay the separate modules (state
        dicts unchanged).
        """
        layers = [self.q_proj, *(self.k_proj[b] for b in BRANCHES), *(self.v_proj[b] for b in BRANCHES),
                  self.gate_proj]
        weight = torch.cat([layer.weight for layer in layers])
        if all(layer.bias is None for layer in layers):
            return weight, None  # no zero bias to build and add
        bias = torch.cat([layer.bias if layer.bias is not None else layer.weight.new_zeros(layer.out_features)
                          for layer in layers])
        return weight, bias

    def compress_blocks(self, k_blocks: torch.Tensor, v_blocks: torch.Tensor,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """phi: ``[B, N, l, HK, Dk|Dv]`` raw (rotated) blocks -> ``[B, N, HK, Dk|Dv]`` compressed tokens."""
        return self.phi_k.compress_blocks(k_blocks), self.phi_v.compress_blocks(v_blocks)

    def _check_x(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor [B, T, d_model], got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"x must be 3-D [B, T, d_model] (or packed [1, total, d_model] with "
                             f"cu_seqlens), got shape {tuple(x.shape)}")
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x's last dim must be d_model={self.d_model}, got shape {tuple(x.shape)}")
        weight = self.q_proj.weight
        if x.dtype != weight.dtype:
            raise TypeError(f"x must have the layer's parameter dtype {weight.dtype}, got {x.dtype}")
        if x.device != weight.device:
            raise ValueError(f"x must be on the layer's device {weight.device}, got {x.device}")

    # ----- forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                cache: NSACache | None = None, backend: str = "auto", return_info: bool = False,
                ) -> torch.Tensor | tuple[torch.Tensor, NSAInfo]:
        """NSA over ``x``; with ``cache``, append ``x``'s tokens to the cached sequences.

        Args:
            x: ``[B, T, d_model]``, or packed ``[1, total, d_model]`` with ``cu_seqlens``; the
                parameters' dtype and device.
            cu_seqlens: int32/int64 ``[N + 1]`` offsets of the packed sequences (FlashAttention's
                varlen layout). Without a cache each sequence starts at position 0; with one,
                entry ``i`` counts sequence ``i``'s new tokens (``N == cache.batch_size``, 0 allowed).
            cache: an :class:`NSACache` (``new_cache``); without ``cu_seqlens`` ``x`` is
                ``[cache.batch_size, K, d_model]``, ``K`` new tokens per sequence. Prefilling an empty
                cache is the same call. The cache path is for inference: it stores detached tensors.
            backend: ``"auto"``, ``"reference"`` or ``"triton"``; cache steps on CUDA take the Triton
                decode kernels under ``"auto"`` (``nsa.ops.decode``).
            return_info: also return an :class:`~nsa.NSAInfo` (an :class:`NSADecodeInfo` for cache steps).

        Returns:
            ``[B, T, d_model]`` (``x``'s shape and dtype), and the info when ``return_info``.
        """
        self._check_x(x)
        offsets = _check_cu_seqlens(cu_seqlens, x) if cu_seqlens is not None else None
        if cache is not None:
            return self._step(x, offsets, cache, backend, return_info)
        return self._prefill(x, cu_seqlens, offsets, backend, return_info)

    @torch.no_grad()
    def decode_step(self, x: torch.Tensor, cache: NSACache, *, return_info: bool = False, check: bool = False,
                    ) -> torch.Tensor | tuple[torch.Tensor, NSADecodeInfo]:
        """One decode step of one new token per sequence, with no host synchronisation.

        Every sequence of ``cache`` gets one token: RoPE positions are ``cache.lengths`` (read on
        the device), the caches are appended for all sequences at once by
        :meth:`NSACache.append_one` (write indices and compression emission computed on the
        device; phi runs on one candidate block per sequence every step), ``cache.lengths`` is
        advanced in place, then the Triton decode kernels run (four launches, ``check_values=False``).
        Shapes and launches depend only on ``x``'s and the cache's shapes, so the step can be
        captured in a CUDA graph and replayed (docs/DECODE.md, "The graph-capturable layer
        step"). Same function as ``forward(x, cache=cache, backend="triton")``, which takes this
        path for such steps.

        Args:
            x: ``[cache.batch_size, 1, d_model]``, the parameters' dtype (float16, bfloat16 or
                float32) and device (CUDA, or CPU under ``TRITON_INTERPRET=1``).
            cache: the layer's :class:`NSACache` (``new_cache``), same dtype and device as ``x``.
            return_info: also return an :class:`NSADecodeInfo` (tensors only: ``gate_stats`` is
                left empty, since host floats would need a sync).
            check: read the lengths on the host first and raise if a sequence is full (a sync: not
                for capture). Without it a full sequence's token is dropped and
                ``cache.overflowed`` records it (see :meth:`NSACache.append_one`).

        Returns:
            ``[B, 1, d_model]`` in ``x``'s dtype, and the info when ``return_info``.
        """
        self._check_x(x)
        if x.shape[1] != 1:
            raise ValueError(f"decode_step takes one new token per sequence, x must be [B, 1, d_model], got "
                             f"shape {tuple(x.shape)}; forward(x, cache=...) runs multi-token steps")
        self._check_cache(cache, x, x.shape[0], packed=False)
        _, reason = resolve_decode_backend("triton", x)  # raises when the kernels cannot run here
        if check:
            cache.check_room([1] * cache.batch_size)
        return self._batched_step(x, cache, reason, return_info, gate_stats=False)

    def _batched_step(self, x, cache, reason, return_info, gate_stats):
        """:meth:`decode_step` after its checks; nothing here may read a tensor on the host."""
        from nsa.ops.decode.triton import nsa_decode_triton, plan_decode

        c = self.config
        batch = x.shape[0]
        positions = cache.lengths.clone()
        q, kv, gates = self.project(x, positions[:, None])
        cache.append_one(*(t[:, 0] for b in BRANCHES for t in kv[b]), compress=self.compress_blocks)
        # One token per sequence: the w-slot ring, written before the kernels run, holds every
        # window key they read. The plan depends on shapes only.
        plan = plan_decode(c, batch * c.num_kv_heads, cache.max_len)
        num_new = torch.ones(batch, dtype=torch.int64, device=x.device)
        o, blocks, reads = nsa_decode_triton(q, cache.k_cmp, cache.v_cmp, cache.k_slc, cache.v_slc, cache.k_win,
                                             cache.v_win, gates, cache.lengths, c, num_new=num_new, plan=plan,
                                             check_values=False)
        out = self.o_proj(o.reshape(batch, 1, c.num_heads * c.v_head_dim))
        if not return_info:
            return out
        info = NSADecodeInfo(selected_blocks=blocks, reads=reads, backend="triton", backend_reason=reason,
                             gate_stats=_gate_stats(gates) if gate_stats else {}, positions=positions[:, None],
                             lengths=cache.lengths.clone(), step="batched")
        return out, info

    def _prefill(self, x, cu_seqlens, offsets, backend, return_info):
        c = self.config
        batch, seq_len, _ = x.shape
        if offsets is None:
            positions = torch.arange(seq_len, device=x.device)
        else:
            starts = torch.tensor(offsets[:-1], device=x.device)
            counts = torch.tensor([b - a for a, b in pairwise(offsets)], device=x.device)
            positions = torch.arange(seq_len, device=x.device) - torch.repeat_interleave(starts, counts)
        q, kv, gates = self.project(x, positions)
        k_cmp, v_cmp = kv["cmp"]
        if offsets is None:
            compressed = (self.phi_k(k_cmp), self.phi_v(v_cmp))
        else:
            pieces = [(self.phi_k(k_cmp[:, a:b]), self.phi_v(v_cmp[:, a:b])) for a, b in pairwise(offsets)]
            compressed = (torch.cat([p[0] for p in pieces], dim=1), torch.cat([p[1] for p in pieces], dim=1))
        result = nsa_attention(q, *kv["slc"], gates, c, compressed_kv=compressed, selection_kv=kv["slc"],
                               window_kv=kv["win"], cu_seqlens=cu_seqlens, backend=backend,
                               return_info=return_info)
        o, info = result if return_info else (result, None)
        out = self.o_proj(o.reshape(batch, seq_len, c.num_heads * c.v_head_dim))
        return (out, info) if return_info else out

    def _check_cache(self, cache: NSACache, x: torch.Tensor, num_sequences: int, packed: bool) -> None:
        if not isinstance(cache, NSACache):
            raise TypeError(f"cache must be an nsa.NSACache (layer.new_cache), got {type(cache).__name__}")
        if cache.config != self.config:
            raise ValueError(f"cache was allocated for config {cache.config}, the layer has {self.config}")
        if cache.batch_size != num_sequences:
            where = "cu_seqlens describes" if packed else "x has batch"
            raise ValueError(f"cache batch mismatch: the cache holds {cache.batch_size} sequences, "
                             f"{where} {num_sequences}")
        if cache.dtype != x.dtype:
            raise TypeError(f"cache dtype {cache.dtype} must equal x's dtype {x.dtype}")
        if cache.device != x.device:
            raise ValueError(f"cache is on {cache.device}, x on {x.device}")

    def _step(self, x, offsets, cache, backend, return_info):
        c = self.config
        batch, seq_len, _ = x.shape
        packed = offsets is not None
        if not packed:
            offsets = list(range(0, batch * seq_len + 1, seq_len)) if seq_len else [0] * (batch + 1)
        counts = [b - a for a, b in pairwise(offsets)]
        self._check_cache(cache, x, len(counts), packed)
        cache.check_room(counts)
        name, reason = resolve_decode_backend(backend, x)
        if name == "triton" and BATCHED_STEP and all(n == 1 for n in counts):
            # One token each (x [B, 1, d] or packed [1, B, d]): the device-side batched step.
            result = self._batched_step(x.reshape(batch * seq_len, 1, self.d_model), cache, reason, return_info,
                                        gate_stats=True)
            if not return_info:
                return result.reshape(x.shape)
            out, info = result
            hk = c.num_kv_heads
            info.selected_blocks = info.selected_blocks.reshape(batch, seq_len, hk, c.select_count)
            info.reads = {b: r.reshape(batch, seq_len, hk) for b, r in info.reads.items()}
            info.positions = info.positions.reshape(batch, seq_len)
            return out.reshape(x.shape), info
        tokens = x.reshape(1, batch * seq_len, self.d_model)
        old_lengths = cache.lengths.tolist()
        positions = torch.cat([torch.arange(n, device=x.device) + s for n, s in zip(counts, old_lengths)])
        q, kv, gates = self.project(tokens, positions[None])
        step = "per-sequence"
        if name == "triton":
            fresh = [i for i, (n, s) in enumerate(zip(counts, old_lengths)) if s == 0 and n > TRITON_STEP_TOKENS]
            outputs, blocks, reads = self._triton_step(q, kv, gates, offsets, cache, fresh)
            step += "+prefill" if fresh else ""
        else:
            outputs, blocks, reads = [], [], {b: [] for b in BRANCHES}
            for index, (start, end) in enumerate(pairwise(offsets)):
                if start == end:
                    continue
                view = cache.append(index, *(t[0, start:end] for b in BRANCHES for t in kv[b]),
                                    compress=self.compress_blocks)
                o, sel, rd = nsa_reference(q[:, start:end], view.k_cmp, view.v_cmp, view.k_slc, view.v_slc,
                                           view.k_win, view.v_win, gates[:, start:end], c,
                                           q_offset=view.q_offset, win_offset=view.win_offset)
                outputs.append(o)
                blocks.append(sel)
                for branch in BRANCHES:
                    reads[branch].append(rd[branch])
        o = torch.cat(outputs, dim=1) if outputs else q.new_zeros(1, 0, c.num_heads, c.v_head_dim)
        out = self.o_proj(o.reshape(batch, seq_len, c.num_heads * c.v_head_dim))
        if not return_info:
            return out

        def layout(parts: list[torch.Tensor], tail: tuple[int, ...]) -> torch.Tensor:
            packed = torch.cat(parts, dim=1) if parts else torch.zeros(
                1, 0, *tail, dtype=torch.int64, device=x.device)
            return packed.reshape(batch, seq_len, *tail)

        hk = c.num_kv_heads
        info = NSADecodeInfo(selected_blocks=layout(blocks, (hk, c.select_count)),
                             reads={b: layout(reads[b], (hk,)) for b in BRANCHES},
                             backend=name, backend_reason=reason, gate_stats=_gate_stats(gates),
                             positions=positions.reshape(batch, seq_len), lengths=cache.lengths.clone(),
                             step=step)
        return out, info

    def _triton_step(self, q, kv, gates, offsets, cache, fresh):
        """Append every sequence's tokens and run the Triton decode kernels over the caches, in
        sub-steps of at most ``TRITON_STEP_TOKENS`` tokens per sequence (a long chunk into a
        non-empty cache is then a chunked prefill: the same function, with bounded scratch memory).

        The sequences in ``fresh`` (an empty cache and more than ``TRITON_STEP_TOKENS`` tokens) are a
        plain prefill: the training kernels compute their outputs over their own tokens in one
        call, then their caches are filled; 64-token decode launches would take ~1000 launches
        (and host round trips) for a 64k prompt.

        Returns per-sequence pieces like the reference loop: outputs ``[1, K_i, HQ, Dv]``, blocks
        ``[1, K_i, HK, n]`` and reads ``[1, K_i, HK]`` per branch, for sequences with ``K_i > 0``.
        """
        counts = [b - a for a, b in pairwise(offsets)]
        pieces = {i: ([], [], {b: [] for b in BRANCHES}) for i, n in enumerate(counts) if n}
        for index in fresh:
            outs, blocks, reads = pieces[index]
            o, info = self._prefill_into_cache(q, kv, gates, offsets[index], offsets[index + 1], index, cache)
            outs.append(o)
            blocks.append(info.selected_blocks)
            for branch in BRANCHES:
                reads[branch].append(info.reads[branch])
        chunked = [(a, a) if i in fresh else (a, b) for i, (a, b) in enumerate(pairwise(offsets))]
        for first in range(0, max(b - a for a, b in chunked), TRITON_STEP_TOKENS):
            spans = [(a + first, min(b, a + first + TRITON_STEP_TOKENS)) for a, b in chunked]
            o, sel, rd = self._triton_substep(q, kv, gates, [(a, max(a, b)) for a, b in spans], cache)
            for index, (start, end) in enumerate(spans):
                if start < end:
                    outs, blocks, reads = pieces[index]
                    outs.append(o[index:index + 1, :end - start])
                    blocks.append(sel[index:index + 1, :end - start])
                    for branch in BRANCHES:
                        reads[branch].append(rd[branch][index:index + 1, :end - start])
        done = [pieces[i] for i in sorted(pieces)]
        return ([torch.cat(p[0], dim=1) for p in done], [torch.cat(p[1], dim=1) for p in done],
                {b: [torch.cat(p[2][b], dim=1) for p in done] for b in BRANCHES})

    def _prefill_into_cache(self, q, kv, gates, start, end, index, cache):
        """One sequence's tokens ``start:end`` into its empty cache: Triton prefill kernels, then append."""
        piece = slice(start, end)
        k_cmp, v_cmp = kv["cmp"]
        compressed = (self.phi_k(k_cmp[:, piece]), self.phi_v(v_cmp[:, piece]))
        o, info = nsa_attention(q[:, piece], *(t[:, piece] for t in kv["slc"]), gates[:, piece], self.config,
                                compressed_kv=compressed, selection_kv=tuple(t[:, piece] for t in kv["slc"]),
                                window_kv=tuple(t[:, piece] for t in kv["win"]), backend="triton",
                                return_info=True)
        cache.append(index, *(t[0, piece] for b in BRANCHES for t in kv[b]), compress=self.compress_blocks)
        return o, info

    def _triton_substep(self, q, kv, gates, spans, cache):
        c = self.config
        counts = [end - start for start, end in spans]
        steps, batch = max(counts), len(counts)
        windows = {}
        for index, (start, end) in enumerate(spans):
            if start < end:
                view = cache.append(index, *(t[0, start:end] for b in BRANCHES for t in kv[b]),
                                    compress=self.compress_blocks)
                windows[index] = (view.win_offset, view.k_win[0], view.v_win[0])
        q_step = q.new_zeros(batch, steps, *q.shape[2:])
        gates_step = gates.new_zeros(batch, steps, *gates.shape[2:])
        for index, (start, end) in enumerate(spans):
            q_step[index, :end - start] = q[0, start:end]
            gates_step[index, :end - start] = gates[0, start:end]
        if steps == 1:
            k_ring, v_ring = cache.k_win, cache.v_win
        else:
            # The cache's w-slot ring already dropped what a K-token step's first queries read;
            # the appended window segments rebuild a ring of w + K - 1 slots for this step.
            slots = min(c.window + steps - 1, cache.max_len)
            k_ring = cache.k_win.new_zeros(batch, slots, *cache.k_win.shape[2:])
            v_ring = cache.v_win.new_zeros(batch, slots, *cache.v_win.shape[2:])
            for index, (first, k_seg, v_seg) in windows.items():
                ring_slots = torch.arange(first, first + k_seg.shape[0], device=q.device) % slots
                k_ring[index, ring_slots] = k_seg
                v_ring[index, ring_slots] = v_seg
        from nsa.ops.decode.triton import nsa_decode_triton

        return nsa_decode_triton(q_step, cache.k_cmp, cache.v_cmp, cache.k_slc, cache.v_slc, k_ring, v_ring,
                                 gates_step, cache.lengths, c, num_new=torch.tensor(counts, device=q.device))


def _gate_stats(gates: torch.Tensor) -> dict[str, tuple[float, float]]:
    g = gates.detach().float()
    return {b: (g[..., i].mean().item() if g.numel() else float("nan"),
                g[..., i].std().item() if g[..., i].numel() > 1 else 0.0) for i, b in enumerate(BRANCHES)}
