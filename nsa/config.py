"""`NSAConfig`: the validated hyper-parameters of one NSA attention layer.

Field names are part of the public contract (the CLI, the suites and outside checks
build configs by these names); defaults are the paper's (see ../shared/NSA_SPEC.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

PHI_CHOICES = ("mlp", "mean")
GATE_CHOICES = ("sigmoid", "softmax")


@dataclass(frozen=True)
class NSAConfig:
    """Hyper-parameters of Native Sparse Attention.

    Attributes:
        num_heads: query heads ``HQ``.
        num_kv_heads: key/value heads ``HK``; ``HQ % HK == 0`` and ``G = HQ // HK``.
        head_dim: query/key head dim ``Dk``.
        v_head_dim: value head dim ``Dv`` (``None`` means ``head_dim``).
        compress_block: compression block length ``l``.
        compress_stride: compression stride ``d`` (divides ``l`` and ``l'``).
        select_block: selection block length ``l'`` (``l <= l'``).
        select_count: selected blocks per query ``n``, forced blocks included (>= 3).
        window: sliding window ``w``, current token included.
        phi: compression function, ``"mlp"`` (learned) or ``"mean"`` (parameter-free).
        gate: gate activation, ``"sigmoid"`` (per branch) or ``"softmax"`` (over branches).
    """

    num_heads: int = 64
    num_kv_heads: int = 4
    head_dim: int = 192
    v_head_dim: int | None = None
    compress_block: int = 32
    compress_stride: int = 16
    select_block: int = 64
    select_count: int = 16
    window: int = 512
    phi: str = "mlp"
    gate: str = "sigmoid"

    def __post_init__(self) -> None:
        if self.v_head_dim is None:
            object.__setattr__(self, "v_head_dim", self.head_dim)
        for name in ("num_heads", "num_kv_heads", "head_dim", "v_head_dim", "compress_block",
                     "compress_stride", "select_block", "select_count", "window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"NSAConfig.{name} must be an int, got {value!r} ({type(value).__name__})")
            if value <= 0:
                raise ValueError(f"NSAConfig.{name} must be positive, got {value}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"NSAConfig.num_heads must be divisible by num_kv_heads, "
                f"got num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}")
        if self.compress_block % self.compress_stride:
            raise ValueError(
                f"NSAConfig.compress_stride must divide compress_block, "
                f"got compress_stride={self.compress_stride}, compress_block={self.compress_block}")
        if self.select_block % self.compress_stride:
            raise ValueError(
                f"NSAConfig.compress_stride must divide select_block, "
                f"got compress_stride={self.compress_stride}, select_block={self.select_block}")
        if self.compress_block > self.select_block:
            raise ValueError(
                f"NSAConfig.compress_block must be <= select_block, "
                f"got compress_block={self.compress_block}, select_block={self.select_block}")
        if self.select_count < 3:
            raise ValueError(
                f"NSAConfig.select_count must be >= 3 (block 0 and the two local blocks are forced), "
                f"got {self.select_count}")
        if self.phi not in PHI_CHOICES:
            raise ValueError(f"NSAConfig.phi must be one of {PHI_CHOICES}, got {self.phi!r}")
        if self.gate not in GATE_CHOICES:
            raise ValueError(f"NSAConfig.gate must be one of {GATE_CHOICES}, got {self.gate!r}")

    @property
    def group_size(self) -> int:
        """Query heads per key/value head, ``G = HQ // HK``."""
        return self.num_heads // self.num_kv_heads

    def num_compressed(self, seq_len: int) -> int:
        """Compressed tokens of a length-``seq_len`` prefix: ``0 if S < l else (S - l) // d + 1``."""
        return num_compressed(seq_len, self.compress_block, self.compress_stride)

    def num_select_blocks(self, seq_len: int) -> int:
        """Selection blocks touched by a length-``seq_len`` prefix (the last may be partial)."""
        return -(-seq_len // self.select_block)

    def decode_reads(self, seq_len: int) -> int:
        """The spec's decode reads formula ``num_cmp(S) + min(n*l', S) + min(w, S)``."""
        return (self.num_compressed(seq_len) + min(self.select_count * self.select_block, seq_len)
                + min(self.window, seq_len))

    def replace(self, **changes) -> NSAConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def num_compressed(seq_len: int, block: int, stride: int) -> int:
    """``num_cmp(S) = 0 if S < l else (S - l) // d + 1``."""
    return 0 if seq_len < block else (seq_len - block) // stride + 1
