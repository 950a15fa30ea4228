"""Backend choice for the NSA ops: which implementation runs, and why (recorded, never silent)."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from nsa.ops.reference import nsa_reference

BACKEND_CHOICES = ("auto", "reference", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TRITON_HEAD_DIM = 256

# name -> callable with nsa_reference's signature; "triton" is added on first use.
_IMPLEMENTATIONS: dict[str, Callable] = {"reference": nsa_reference}


def register_backend(name: str, fn: Callable) -> None:
    """Make ``fn`` (``nsa_reference``'s signature) available as ``backend=name``."""
    _IMPLEMENTATIONS[name] = fn


def triton_interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors (``TRITON_INTERPRET=1``, a Triton switch)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_config_limits(config) -> str | None:
    """Why the Triton kernels cannot run ``config`` (``None`` when they can).

    The selection kernels tile each selected block as one power-of-two key tile of at least 16
    rows (the smallest ``tl.dot`` dimension), and every kernel holds a whole head row in registers.
    """
    lp = config.select_block
    if lp < 16 or lp & (lp - 1):
        return f"select_block={lp}: the Triton kernels need a power of two >= 16"
    # One head row must fit a kernel tile (Dk is split 128 + 64 for 192; nothing above 256).
    for name in ("head_dim", "v_head_dim"):
        if getattr(config, name) > MAX_TRITON_HEAD_DIM:
            return f"{name}={getattr(config, name)}: the Triton kernels take head dims <= {MAX_TRITON_HEAD_DIM}"
    return None


def _triton_status(q: torch.Tensor, config=None) -> tuple[bool, str]:
    if "triton" not in _IMPLEMENTATIONS:
        try:
            from nsa.ops.triton_nsa import nsa_triton
        except ImportError as exc:
            return False, f"Triton kernels unavailable: {exc}"
        register_backend("triton", nsa_triton)
    if "triton" not in _IMPLEMENTATIONS:
        return False, "Triton kernels are not part of this build"
    if not (q.is_cuda or triton_interpreting()):
        return False, f"inputs are on {q.device}; Triton kernels need CUDA (or TRITON_INTERPRET=1)"
    if q.dtype not in TRITON_DTYPES:
        return False, f"Triton kernels take float16, bfloat16 or float32, got {q.dtype}"
    limit = triton_config_limits(config) if config is not None else None
    if limit is not None:
        return False, limit
    return True, "CUDA tensors" if q.is_cuda else "TRITON_INTERPRET=1 (CPU interpreter)"


def resolve_backend(backend: str, q: torch.Tensor, config=None) -> tuple[str, str]:
    """``(name, reason)`` of the backend that will run for ``backend``, these inputs and ``config``."""
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    if backend == "reference":
        return "reference", "requested"
    ok, why = _triton_status(q, config)
    if backend == "triton":
        if not ok:
            raise RuntimeError(f"backend='triton' cannot run: {why}")
        return "triton", "requested"
    if ok and q.is_cuda:
        return "triton", f"auto: {why}"
    return "reference", f"auto: {why if not ok else 'CPU tensors'}"


def run_backend(name: str, *args, **kwargs):
    return _IMPLEMENTATIONS[name](*args, **kwargs)
