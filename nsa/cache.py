"""`NSACache`: preallocated per-branch decode caches for a batch of sequences of different lengths.

Layout (``E_k = HK * Dk * itemsize``, ``E_v = HK * Dv * itemsize``; see docs/DECODE.md):

- compression: ``k_cmp, v_cmp [B, num_cmp(max_len), HK, D]``, the emitted compressed tokens
  (phi applied), plus ``k_tail, v_tail [B, l, HK, D]``, a ring (slot ``p % l``) of the last ``l``
  raw rotated compression keys/values, which is all the next blocks still need;
- selection: ``k_slc, v_slc [B, max_len, HK, D]``, every token;
- window: ``k_win, v_win [B, min(w, max_len), HK, D]``, a ring (slot ``p % slots``) of the last
  ``w`` tokens, so its size does not grow with the context.

``lengths`` (int64 ``[B]``) is each sequence's current length ``S``. Appending the token that
makes the length ``S`` emits compressed block ``(S - l) // d`` exactly when ``S >= l`` and
``(S - l) % d == 0``.

Two ways to append: :meth:`NSACache.append` (one sequence, any number of tokens; reads its length
on the host) and :meth:`NSACache.append_one` (one token for every sequence at once, indices and
emission computed on the device: no host synchronisation, CUDA-graph capturable).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from nsa.config import NSAConfig
from nsa.ops.compression import compression_blocks

# (k_blocks [1, N, l, HK, Dk], v_blocks [1, N, l, HK, Dv]) -> (k_cmp [1, N, HK, Dk], v_cmp [1, N, HK, Dv])
Compressor = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class StepView:
    """Everything one sequence's step attends to, after its new tokens were appended.

    Attributes:
        q_offset: ``S_old``, absolute position of the step's first new token.
        k_cmp, v_cmp: ``[1, num_cmp(S_new), HK, Dk|Dv]`` views of the emitted compressed tokens.
        k_slc, v_slc: ``[1, S_new, HK, Dk|Dv]`` views of the selection cache.
        k_win, v_win: ``[1, S_new - win_offset, HK, Dk|Dv]``: the window keys the step's queries
            read (the ring's old tokens then the new ones), from absolute position ``win_offset``.
        win_offset: ``max(0, S_old - w + 1)``.
    """

    q_offset: int
    k_cmp: torch.Tensor
    v_cmp: torch.Tensor
    k_slc: torch.Tensor
    v_slc: torch.Tensor
    k_win: torch.Tensor
    v_win: torch.Tensor
    win_offset: int


class NSACache:
    """Per-branch NSA decode caches, preallocated for ``batch_size`` sequences of up to ``max_len``.

    Build with :meth:`allocate` (or ``NSAAttention.new_cache``). The cache stores detached tensors:
    decode is an inference path and gradients do not flow into cached keys.
    """

    def __init__(self, config: NSAConfig, batch_size: int, max_len: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        if not isinstance(config, NSAConfig):
            raise TypeError(f"config must be an nsa.NSAConfig, got {type(config).__name__}")
        for name, value in (("batch_size", batch_size), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.config, self.batch_size, self.max_len = config, batch_size, max_len
        self.dtype = dtype
        c, hk, dk, dv = config, config.num_kv_heads, config.head_dim, config.v_head_dim
        self.window_slots = min(c.window, max_len)

        def buffer(length: int, dim: int) -> torch.Tensor:
            return torch.zeros(batch_size, length, hk, dim, dtype=dtype, device=device)

        self.k_cmp, self.v_cmp = buffer(c.num_compressed(max_len), dk), buffer(c.num_compressed(max_len), dv)
        self.k_tail, self.v_tail = buffer(c.compress_block, dk), buffer(c.compress_block, dv)
        self.k_slc, self.v_slc = buffer(max_len, dk), buffer(max_len, dv)
        self.k_win, self.v_win = buffer(self.window_slots, dk), buffer(self.window_slots, dv)
        # "cuda" and "cuda:0" compare unequal; keep the resolved device the buffers landed on.
        self.device = self.k_slc.device
        self.lengths = torch.zeros(batch_size, dtype=torch.int64, device=self.k_slc.device)
        # Set by append_one for a sequence that was already full (it cannot raise without a sync).
        self.overflowed = torch.zeros(batch_size, dtype=torch.bool, device=self.k_slc.device)

    @classmethod
    def allocate(cls, config: NSAConfig, batch_size: int, max_len: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> NSACache:
        """An empty cache (every length 0) for ``batch_size`` sequences of at most ``max_len`` tokens."""
        return cls(config, batch_size, max_len, dtype=dtype, device=device)

    def reset(self, index: int | None = None) -> None:
        """Empty one sequence's slot (continuous batching reuses it), or every slot."""
        if index is None:
            self.lengths.zero_()
            self.overflowed.zero_()
        else:
            self._check_index(index)
            self.lengths[index] = 0
            self.overflowed[index] = False

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.batch_size:
            raise IndexError(f"sequence index must be in [0, {self.batch_size}), got {index}")

    def check_room(self, counts: list[int]) -> None:
        """Raise if appending ``counts[i]`` tokens to sequence ``i`` would pass ``max_len``."""
        if len(counts) != self.batch_size:
            raise ValueError(f"the cache holds {self.batch_size} sequences, got new-token counts for "
                             f"{len(counts)}")
        for index, (length, count) in enumerate(zip(self.lengths.tolist(), counts)):
            if count < 0:
                raise ValueError(f"new-token count of sequence {index} must be >= 0, got {count}")
            if length + count > self.max_len:
                raise ValueError(f"sequence {index} would reach {length + count} tokens, more than the "
                                 f"cache's max_len={self.max_len} (it holds {length}); "
                                 "allocate a larger cache")

    def append(self, index: int, k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_slc: torch.Tensor,
               v_slc: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor,
               compress: Compressor) -> StepView:
        """Append ``K`` new tokens to sequence ``index`` and return what its step attends to.

        Args:
            index: which sequence of the batch.
            k_cmp, v_cmp: ``[K, HK, Dk|Dv]`` raw compression-branch keys (RoPE applied) / values.
            k_slc, v_slc, k_win, v_win: ``[K, HK, Dk|Dv]`` the other branches' keys/values.
            compress: phi over the blocks emitted by this step (see :data:`Compressor`).

        Returns:
            The :class:`StepView` after appending (``S_new = S_old + K``).
        """
        self._check_index(index)
        c = self.config
        count = k_slc.shape[0]
        old = int(self.lengths[index])
        new = old + count
        if new > self.max_len:
            raise ValueError(f"sequence {index} would reach {new} tokens, more than the cache's "
                             f"max_len={self.max_len}; allocate a larger cache")
        k_cmp, v_cmp, k_slc, v_slc, k_win, v_win = (
            t.detach().to(self.dtype) for t in (k_cmp, v_cmp, k_slc, v_slc, k_win, v_win))
        self.k_slc[index, old:new] = k_slc
        self.v_slc[index, old:new] = v_slc
        self._emit_compressed(index, old, new, k_cmp, v_cmp, compress)
        k_win_seg, v_win_seg, win_offset = self._window_segment(index, old, k_win, v_win)
        self._write_ring(self.k_win[index], self.v_win[index], old, k_win, v_win)
        self.lengths[index] = new
        emitted = c.num_compressed(new)
        return StepView(q_offset=old, k_cmp=self.k_cmp[index:index + 1, :emitted],
                        v_cmp=self.v_cmp[index:index + 1, :emitted],
                        k_slc=self.k_slc[index:index + 1, :new], v_slc=self.v_slc[index:index + 1, :new],
                        k_win=k_win_seg[None], v_win=v_win_seg[None], win_offset=win_offset)

    def append_one(self, k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_slc: torch.Tensor, v_slc: torch.Tensor,
                   k_win: torch.Tensor, v_win: torch.Tensor, compress: Compressor) -> torch.Tensor:
        """Append one new token to every sequence at once, without host synchronisation.

        The graph-capturable counterpart of :meth:`append` for the common serving step: every
        write index is computed on the device from ``lengths`` (``index_put`` at
        ``[b, S_old[b] % slots]``), and compression emission is a mask, not a host decision: phi
        runs on one candidate block per sequence on every call (the last ``l`` raw tokens, read
        from the tail ring after the write) and its result lands in slot ``(S - l) // d`` only
        where ``S >= l`` and ``(S - l) % d == 0`` (elsewhere the slot is rewritten with what it
        held). The work and every shape depend on the cache's shapes only, never on the lengths.
        ``lengths`` is updated in place (its storage stays the same, as a captured graph needs).

        A sequence already at ``max_len`` cannot be refused without reading its length on the
        host: its writes are dropped (its cache and length are unchanged), ``overflowed[b]`` is
        set for the caller to inspect whenever it synchronises anyway, and the step's output for
        it is meaningless. Where a sync is acceptable, :meth:`check_room` before the step raises
        instead.

        Args:
            k_cmp, v_cmp: ``[B, HK, Dk|Dv]`` raw compression-branch keys (RoPE applied at position
                ``lengths[b]``) / values of each sequence's new token.
            k_slc, v_slc, k_win, v_win: ``[B, HK, Dk|Dv]`` the other branches' keys/values.
            compress: phi (see :data:`Compressor`), called once with ``[B, 1, l, HK, D]`` blocks.

        Returns:
            int64 ``[B]``: each new token's position, i.e. the lengths before the step (a new tensor).
        """
        c, batch = self.config, self.batch_size
        hk, dk, dv = c.num_kv_heads, c.head_dim, c.v_head_dim
        named = (("k_cmp", k_cmp, dk), ("v_cmp", v_cmp, dv), ("k_slc", k_slc, dk), ("v_slc", v_slc, dv),
                 ("k_win", k_win, dk), ("v_win", v_win, dv))
        for name, t, dim in named:
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (batch, hk, dim):
                raise ValueError(f"{name} must be a tensor [B={batch}, HK={hk}, {dim}] (one new token per "
                                 f"sequence), got {tuple(getattr(t, 'shape', ()))}")
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device}, the cache on {self.device}")
        k_cmp, v_cmp, k_slc, v_slc, k_win, v_win = (t.detach().to(self.dtype) for _, t, _ in named)
        old = self.lengths.clone()
        room = old < self.max_len
        self.overflowed |= ~room
        rows = torch.arange(batch, device=self.device)
        # Clamped so that a full sequence's (dropped) write still indexes inside the buffers.
        position = old.clamp(max=self.max_len - 1)

        def put(buffer: torch.Tensor, slot: torch.Tensor, value: torch.Tensor, keep: torch.Tensor) -> None:
            # Rows where `keep` is off rewrite their current contents: a masked write without a
            # data-dependent shape (a boolean index would need a sync).
            buffer[rows, slot] = torch.where(keep[:, None, None], value, buffer[rows, slot])

        put(self.k_slc, position, k_slc, room)
        put(self.v_slc, position, v_slc, room)
        put(self.k_win, position % self.window_slots, k_win, room)
        put(self.v_win, position % self.window_slots, v_win, room)
        block, stride = c.compress_block, c.compress_stride
        put(self.k_tail, position % block, k_cmp, room)
        put(self.v_tail, position % block, v_cmp, room)
        new = old + room.to(old.dtype)
        slots = self.k_cmp.shape[1]
        if slots:  # a cache shorter than l never emits (a static fact, known from the shapes)
            start = new - block  # first position of the block that ends with the new token
            ring = (start[:, None] + torch.arange(block, device=self.device)) % block  # [B, l], >= 0
            k_out, v_out = compress(self.k_tail[rows[:, None], ring][:, None],
                                    self.v_tail[rows[:, None], ring][:, None])
            emit = room & (start >= 0) & (start % stride == 0)
            slot = (start // stride).clamp(0, slots - 1)
            put(self.k_cmp, slot, k_out[:, 0].detach().to(self.dtype), emit)
            put(self.v_cmp, slot, v_out[:, 0].detach().to(self.dtype), emit)
        self.lengths.copy_(new)
        return old

    def _ring_read(self, ring: torch.Tensor, start: int, end: int) -> torch.Tensor:
        slots = torch.arange(start, end, device=ring.device) % ring.shape[0]
        return ring[slots]

    def _write_ring(self, k_ring: torch.Tensor, v_ring: torch.Tensor, old: int, k_new: torch.Tensor,
                    v_new: torch.Tensor) -> None:
        # Only the last `slots` new tokens survive; writing them alone keeps the scatter collision-free.
        keep = min(k_new.shape[0], k_ring.shape[0])
        first = old + k_new.shape[0] - keep
        slots = torch.arange(first, first + keep, device=k_ring.device) % k_ring.shape[0]
        k_ring[slots] = k_new[k_new.shape[0] - keep:]
        v_ring[slots] = v_new[v_new.shape[0] - keep:]

    def _window_segment(self, index: int, old: int, k_new: torch.Tensor, v_new: torch.Tensor,
                        ) -> tuple[torch.Tensor, torch.Tensor, int]:
        # The step's first query (position `old`) reaches back to old - w + 1; later queries only
        # need newer keys, which are the new tokens themselves.
        start = max(0, old - self.config.window + 1)
        k_old = self._ring_read(self.k_win[index], start, old)
        v_old = self._ring_read(self.v_win[index], start, old)
        return torch.cat([k_old, k_new]), torch.cat([v_old, v_new]), start

    def _emit_compressed(self, index: int, old: int, new: int, k_new: torch.Tensor, v_new: torch.Tensor,
                         compress: Compressor) -> None:
        c = self.config
        block, stride = c.compress_block, c.compress_stride
        first_block, end_block = c.num_compressed(old), c.num_compressed(new)
        if end_block > first_block:
            # Blocks not yet emitted start at first_block*d >= old - l + 1, so the tail ring (last l
            # raw tokens) plus the new tokens cover all of them.
            start = first_block * stride
            k_seg = torch.cat([self._ring_read(self.k_tail[index], start, old), k_new])
            v_seg = torch.cat([self._ring_read(self.v_tail[index], start, old), v_new])
            k_blocks = compression_blocks(k_seg[None], block, stride)
            v_blocks = compression_blocks(v_seg[None], block, stride)
            if k_blocks.shape[1] != end_block - first_block:
                raise AssertionError("compression emission count mismatch (cache bookkeeping bug)")
            k_out, v_out = compress(k_blocks, v_blocks)
            self.k_cmp[index, first_block:end_block] = k_out[0].detach().to(self.dtype)
            self.v_cmp[index, first_block:end_block] = v_out[0].detach().to(self.dtype)
        self._write_ring(self.k_tail[index], self.v_tail[index], old, k_new, v_new)

    # ----- memory accounting -------------------------------------------------------------------

    def entry_bytes(self) -> int:
        """Bytes of one cached token (key + value, every kv head): ``HK * (Dk + Dv) * itemsize``."""
        c = self.config
        return c.num_kv_heads * (c.head_dim + c.v_head_dim) * self.dtype.itemsize

    def bytes_per_token(self) -> dict[str, float]:
        """Cache bytes each branch adds per token of context (long-context slope).

        ``cmp``: one compressed token per ``d`` tokens, ``entry/d``; ``slc``: ``entry``; ``win``: 0
        (a fixed ring of ``w`` tokens; see :meth:`fixed_bytes`).
        """
        entry = self.entry_bytes()
        return {"cmp": entry / self.config.compress_stride, "slc": float(entry), "win": 0.0}

    def fixed_bytes(self) -> dict[str, int]:
        """Per-sequence bytes that do not grow with the context: the raw tail and the window ring."""
        entry = self.entry_bytes()
        return {"cmp": self.config.compress_block * entry, "slc": 0, "win": self.window_slots * entry}

    def used_bytes(self, seq_len: int) -> dict[str, int]:
        """Bytes one sequence of length ``seq_len`` occupies per branch (what a paged cache would hold)."""
        c, entry = self.config, self.entry_bytes()
        return {"cmp": (c.num_compressed(seq_len) + min(seq_len, c.compress_block)) * entry,
                "slc": seq_len * entry, "win": min(seq_len, self.window_slots) * entry}

    def allocated_bytes(self) -> dict[str, int]:
        """Bytes this cache allocated per branch, all sequences together."""
        def size(*tensors: torch.Tensor) -> int:
            return sum(t.numel() * t.element_size() for t in tensors)

        return {"cmp": size(self.k_cmp, self.v_cmp, self.k_tail, self.v_tail),
                "slc": size(self.k_slc, self.v_slc), "win": size(self.k_win, self.v_win)}

    def __repr__(self) -> str:
        return (f"NSACache(batch_size={self.batch_size}, max_len={self.max_len}, dtype={self.dtype}, "
                f"device={self.device}, lengths={self.lengths.tolist()})")


__all__ = ["Compressor", "NSACache", "StepView"]
