"""The NSA prefill's measured floor, forward and backward, at each length beside dense cuDNN
(GPU only).

    python3 scripts/gpu/prefill_floor.py [--seq-lens 8192,65536] [--head-dims 128/128]
        [--no-backward] [--out FILE]

For each length (B = 1, HQ = 64, HK = 4, bf16, the paper's blocks, random data) times, in one
process, the pieces of :func:`nsa.bench.floor.prefill_floor`: selection's gathers of the blocks
the backend chose (no arithmetic; best launch shape), compressed attention's and scoring's
products and the window's at cuDNN's rate, one output copy for the gate sum; with the backward,
selection's dK/dV reads (each key block's readers' q and dO rows) and the branches' backward at
cuDNN's rate; then the backend's forward (and backward) and dense causal SDPA. The tables printed
last give each floor (the sum of its pieces), the largest ratio over cuDNN it allows, and the
ratio the backend reaches. ``--out`` writes every row as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nsa.bench.floor import floor_summary, prefill_floor

# (name, floor_summary arguments) of each table printed.
DIRECTIONS = (("forward", {}), ("backward", {"floor": "backward floor", "nsa": "nsa backward",
                                             "baseline": "sdpa-cudnn causal backward"}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", default="8192,65536")
    parser.add_argument("--head-dims", default="128/128", help="comma list of Dk/Dv (powers of two)")
    parser.add_argument("--backward", action=argparse.BooleanOptionalAction, default=True,
                        help="also the backward's floor (default on)")
    parser.add_argument("--out", type=Path, help="write every row as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (the floor is measured with cuDNN and the GPU's kernels)")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    rows, found_by_shape = [], []
    for dims in args.head_dims.split(","):
        dk, dv = (int(d) for d in dims.split("/"))
        for seq_len in (int(t) for t in args.seq_lens.split(",")):
            found = prefill_floor(seq_len, dk, dv, backward=args.backward)
            print(f"\nT={seq_len} d={dk}/{dv}")
            for r in found:
                print(f"  {r.name:34s} {r.ms:9.3f} ms  {r.what}", flush=True)
            rows += [{**asdict(r), "head_dims": dims} for r in found]
            found_by_shape.append((seq_len, dims, found))
    for direction, names in DIRECTIONS[:2 if args.backward else 1]:
        print(f"\n{direction}:\n| T | Dk/Dv | floor ms | NSA ms | cuDNN ms | most x cuDNN (floor) "
              "| NSA x cuDNN |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for seq_len, dims, found in found_by_shape:
            s = floor_summary(found, **names)
            print(f"| {seq_len} | {dims} | {s['floor_ms']:.2f} | {s['nsa_ms']:.2f} | "
                  f"{s['baseline_ms']:.2f} | {s['max_ratio']:.2f} | {s['nsa_ratio']:.2f} |")
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
