"""One side CUDA stream per device, for kernels that may run beside the current stream's.

Used where a pass bound by memory can share the SMs with one bound by the tensor cores (the
decode step's window splits; the prefill backward's selection dK/dV). :func:`fork` makes the side
stream wait for everything queued so far on the current stream, :func:`join` makes the current
stream wait for the side stream. Tensors allocated under :func:`on` belong to the side stream's
pool; reusing them is safe without ``record_stream`` because every fork waits for the current
stream first, i.e. for the work that used them. Both are capturable in a CUDA graph (the fork and
join become the graph's edges). On CPU tensors (the interpreter) there is no side stream: ``fork``
returns ``None`` and the launches stay sequential.
"""

from __future__ import annotations

import contextlib

import torch

_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def fork(device: torch.device) -> torch.cuda.Stream | None:
    """The device's side stream, made to wait for the work queued so far on the current stream
    (``None`` for a CPU device)."""
    if device.type != "cuda":
        return None
    side = _SIDE_STREAMS.get(device)
    if side is None:
        side = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    return side


def on(side: torch.cuda.Stream | None):
    """Launches inside go to ``side`` (nothing changes for ``None``)."""
    return torch.cuda.stream(side) if side is not None else contextlib.nullcontext()


def join(side: torch.cuda.Stream | None, device: torch.device) -> None:
    """The current stream waits for everything queued so far on ``side``."""
    if side is not None:
        torch.cuda.current_stream(device).wait_stream(side)


def record(side: torch.cuda.Stream | None) -> torch.cuda.Event | None:
    """An event at the end of the work queued so far on ``side`` (``None`` without a side stream)."""
    return side.record_event() if side is not None else None


def wait(event: torch.cuda.Event | None, device: torch.device) -> None:
    """The current stream waits for ``event`` (nothing for ``None``)."""
    if event is not None:
        torch.cuda.current_stream(device).wait_event(event)
