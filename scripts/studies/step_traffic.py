"""Memory traffic of the PyTorch ops around the kernels in one training step of issue 6's model.

    python scripts/studies/step_traffic.py [--seq-len 512] [--model nsa|dense] [--top 30]
        [--rotary-kernel] [--out FILE]

Runs one forward and backward of ``gpu_config``'s model (bf16 autocast, NSA on the Triton
backend through the CPU interpreter) under a ``TorchDispatchMode`` that records every ATen op
outside the Triton kernels with its input and output bytes and the line of ``nsa/`` that issued
it (backward ops have no Python frame: ``?``). Bytes are scaled linearly to the GPU run's batch
(16 x 8,192 tokens); that overstates ops whose size does not grow with the batch (RoPE tables,
weight casts), which are small. Views cost nothing and are left out.

Why: on the H200 the NSA step's PyTorch element-wise ops took ~12 of its 54 ms of kernel time
(docs/PERFORMANCE.md, eighth session). Bytes moved are what such ops cost, and they can be
counted without a GPU. ``--rotary-kernel`` routes RoPE through the Triton rotation (as CUDA
does) and adds that kernel's own reads and writes to the total.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime import interpreter

from nsa.models.lm import RetrievalLM
from nsa.models.train import gpu_config

GPU_TOKENS = 16 * 8192
FREE_OPS = {"view", "_unsafe_view", "as_strided", "t", "transpose", "permute", "expand", "slice", "select",
            "unsqueeze", "squeeze", "detach", "alias", "empty", "empty_like", "new_empty", "empty_strided",
            "split", "split_with_sizes", "unbind", "reshape", "_reshape_alias", "lift_fresh", "is_same_size"}


class KernelDepth:
    """Counts nesting inside interpreted Triton launches (their NumPy work is not PyTorch glue)."""

    depth = 0

    @classmethod
    def install(cls) -> None:
        run = interpreter.InterpretedFunction.run

        def counted(self, *args, **kwargs):
            cls.depth += 1
            try:
                return run(self, *args, **kwargs)
            finally:
                cls.depth -= 1

        interpreter.InterpretedFunction.run = counted


def tensor_bytes(values) -> int:
    return sum(t.numel() * t.element_size() for t in values if isinstance(t, torch.Tensor))


class Traffic(TorchDispatchMode):
    """``(op @ nsa line) -> [calls, output bytes, input bytes]`` of every costly op outside kernels."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if KernelDepth.depth or name in FREE_OPS:
            return out
        where = next((f"{Path(frame.filename).relative_to(ROOT)}:{frame.lineno}"
                      for frame in reversed(traceback.extract_stack()[:-1])
                      if frame.filename.startswith(str(ROOT / "nsa"))), "?")
        entry = self.ops[f"{name} @ {where}"]
        entry[0] += 1
        entry[1] += tensor_bytes(out if isinstance(out, (tuple, list)) else [out])
        entry[2] += tensor_bytes(args)
        return out


def route_rope_through_kernel(kernel_bytes: list[int]) -> None:
    import nsa.ops.rotary.triton as rotary
    import nsa.rope

    launch = rotary._rotate

    def counted(x, cos, sin, sign):
        out = launch(x, cos, sin, sign)
        kernel_bytes.append(tensor_bytes([x, out]))
        return out

    rotary._rotate = counted
    nsa.rope.rotate_half = rotary.rotate_half_triton


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--model", choices=("nsa", "dense"), default="nsa")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--rotary-kernel", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    KernelDepth.install()
    kernel_bytes: list[int] = []
    if args.rotary_kernel:
        route_rope_through_kernel(kernel_bytes)
    config = gpu_config()
    torch.manual_seed(0)
    backend = "triton" if args.model == "nsa" else "auto"
    model = RetrievalLM(config.model.replace(attention=args.model, backend=backend))
    vocab = config.task.vocab_size
    tokens = torch.randint(0, vocab, (1, args.seq_len))
    positions = torch.randint(0, args.seq_len, (1, 4))
    answers = torch.randint(0, vocab, (1, 4))
    scale = GPU_TOKENS / args.seq_len
    phases = {}
    with torch.autocast("cpu", dtype=torch.bfloat16), Traffic() as forward:
        logits = model(tokens, logits_at=positions)
    loss = F.cross_entropy(logits.flatten(0, 1), answers.flatten())
    with Traffic() as backward:
        loss.backward()
    for phase, traffic in (("forward", forward), ("backward", backward)):
        rows = sorted(((name, calls, out * scale / 1e6, inp * scale / 1e6)
                       for name, (calls, out, inp) in traffic.ops.items()), key=lambda r: -(r[2] + r[3]))
        phases[phase] = {"total_mb": sum(r[2] + r[3] for r in rows), "ops": rows}
    kernel_mb = sum(kernel_bytes) * scale / 1e6
    for phase, data in phases.items():
        print(f"== {phase}: {data['total_mb']:,.0f} MB moved by PyTorch ops (scaled to 16 x 8192 tokens)")
        for name, calls, out_mb, in_mb in data["ops"][:args.top]:
            print(f"  {name:58s} calls {calls:4d}  out {out_mb:8.1f} MB  in {in_mb:8.1f} MB")
    total = sum(d["total_mb"] for d in phases.values())
    print(f"step: {total:,.0f} MB in PyTorch ops" + (f" + {kernel_mb:,.0f} MB in the rotary kernel"
                                                      if args.rotary_kernel else ""))
    if args.out:
        args.out.write_text(json.dumps({"seq_len": args.seq_len, "model": args.model,
                                        "rotary_kernel": args.rotary_kernel, "rotary_kernel_mb": kernel_mb,
                                        **phases}, indent=1))


if __name__ == "__main__":
    main()
