"""The NSA decode step's measured floor beside the Triton step and dense SDPA (GPU only).

    python3 scripts/gpu/decode_floor.py [--contexts 65536] [--batches 1,32] [--head-dims 128/128]
        [--out FILE]

For each context and batch (HQ = 64, HK = 4, bf16, the paper's config, one new token per
sequence) times, in one process, :func:`nsa.bench.floor.decode_floor`: the tiles of keys and
values the spec says a step reads, loaded with no arithmetic on a persistent grid (several grid
shapes), all at once with no order, as two launches of a CUDA graph (compressed tiles, then the
chosen blocks and the window: the top-n needs every block's score), and as one launch with a
grid barrier between the phases; then ``nsa bench decode``'s Triton step and the best dense SDPA.
The table printed last gives the floor (the faster of the two ordered forms), the largest ratio
over dense it allows and the ratio the step reaches. ``--out`` writes every row as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nsa.bench.floor import decode_floor, floor_summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="65536")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--head-dims", default="128/128", help="comma list of Dk/Dv (powers of two)")
    parser.add_argument("--out", type=Path, help="write every row as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (the floor is measured with the GPU's kernels and CUDA graphs)")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    rows, summaries = [], []
    for dims in args.head_dims.split(","):
        dk, dv = (int(d) for d in dims.split("/"))
        for context in (int(c) for c in args.contexts.split(",")):
            for batch in (int(b) for b in args.batches.split(",")):
                found = decode_floor(context, batch, dk, dv)
                print(f"\ncontext={context} batch={batch} d={dk}/{dv}")
                for r in found:
                    print(f"  {r.name:30s} {1000 * r.ms:9.1f} us  {r.what}", flush=True)
                rows += [{**asdict(r), "batch": batch, "head_dims": dims} for r in found]
                summaries.append((context, batch, dims, floor_summary(found, "nsa step", "dense step")))
    print("\n| context | batch | Dk/Dv | floor us | NSA step us | dense us | most x dense (floor) "
          "| NSA x dense |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for context, batch, dims, s in summaries:
        print(f"| {context} | {batch} | {dims} | {1000 * s['floor_ms']:.1f} | {1000 * s['nsa_ms']:.1f} | "
              f"{1000 * s['baseline_ms']:.1f} | {s['max_ratio']:.2f} | {s['nsa_ratio']:.2f} |")
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
