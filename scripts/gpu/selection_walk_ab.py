"""Selection attention's position tiles, before and after the pipelined union walk, in one process.

    python3 scripts/gpu/selection_walk_ab.py BEFORE_FILE [--shapes train,g4-64k,g16-64k]
        [--local-every 256] [--local-noise 0.8] [--out FILE] [--smoke]

BEFORE_FILE is an earlier ``nsa/ops/selected_attention/triton.py`` (``git show
1d5fcce:nsa/ops/selected_attention/triton.py > selection_before.py`` for the walk that skipped
listed blocks inside the loop); it is loaded beside the current module and uses the current
``nsa.ops.triton_common``. For every shape, selection pattern and option of the query kernel's
autotune list (pinned one at a time), it times forward and dq of both (``do_bench`` medians),
checks that they agree bit for bit (both walk a tile's blocks in the order its lists first name
them) and reports the tile's distinct blocks per position's list. Autotuned (unpinned) rows
give the production choice of each. Prints a table last; ``--out`` writes the rows as JSON.

Selection patterns: ``random`` (top-n of random scores: neighbouring positions share little
beyond the forced blocks) and ``local`` (scores interpolated between random anchors every
``--local-every`` positions, plus ``--local-noise`` times independent noise per position:
neighbours select alike, as a trained model's do). The defaults match the overlap the seventh
session measured on issue 6's trained model at 8k (docs/PERFORMANCE.md, "Selection: how much
neighbouring positions share blocks"): distinct blocks per list 2.08-2.23 / 3.23-3.86 /
4.02-5.26 in tiles of 4 / 16 / 64 positions; this pattern gives 2.16 / 3.56 / 4.72 there
(positions 4096-8191), ``random`` 2.80 / 5.44 / 6.03.
``--smoke`` runs tiny shapes on the CPU through the Triton interpreter (no timings of worth).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

SHAPES = {  # name: (batch, seq_len, query heads, kv heads, head dim)
    "train": (16, 8192, 8, 2, 32),      # issue 6's gpu_config model at 8k
    "g4-64k": (1, 65536, 16, 4, 128),   # issue 3's layout with 4 query heads per kv head
    "g16-64k": (1, 65536, 64, 4, 128),  # issue 3's benchmark (one position per program by default)
    "smoke": (1, 96, 4, 1, 16),
}
SELECT_BLOCK, SELECT_COUNT = 64, 16


def selection(pattern: str, batch: int, seq_len: int, num_kv: int, every: int, noise: float,
              select_block: int, select_count: int, device):
    """int32 ``[B, T, HK, n]`` block lists from :func:`nsa.ops.select_blocks` on synthetic scores."""
    import torch
    import torch.nn.functional as F

    from nsa.ops import select_blocks

    num_blocks = -(-seq_len // select_block)
    gen = torch.Generator(device=device).manual_seed(11)
    if pattern == "random":
        scores = torch.rand(batch, seq_len, num_kv, num_blocks, generator=gen, device=device)
    else:
        anchors = torch.randn(batch * num_kv, num_blocks, seq_len // every + 2, generator=gen, device=device)
        smooth = F.interpolate(anchors, size=seq_len, mode="linear", align_corners=True)
        scores = smooth.view(batch, num_kv, num_blocks, seq_len).permute(0, 3, 1, 2)
        scores = scores + noise * torch.randn(scores.shape, generator=gen, device=device)
    chosen = select_blocks(scores.contiguous(), select_block=select_block, select_count=select_count)
    return chosen.to(torch.int32)


def timed(fn, device) -> float:
    """Median milliseconds (``do_bench``) on a GPU; one wall-clock call on the CPU."""
    import triton

    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=100)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def passes(module, q, k, v, idx, do, select_block):
    """``forward()`` and ``dq()`` of ``module``'s query kernel (dq from the forward's o, lse)."""
    scale = q.shape[-1] ** -0.5
    o, lse = module._query_pass(q, k, v, idx, scale, select_block)
    delta = module.softmax_delta(o, do, None)

    def forward():
        return module._query_pass(q, k, v, idx, scale, select_block)

    def dq():
        return module._query_pass(q, k, v, idx, scale, select_block, lse=lse, do=do, delta=delta)
    return forward, dq


def compare(modules, q, k, v, idx, do, select_block, device, option) -> dict:
    """One row: both modules' forward and dq with ``option`` pinned (``None``: autotuned)."""
    import contextlib

    row = {"option": "autotuned" if option is None else "x".join(map(str, option[:3]))}
    outputs = {}
    for label, module in modules.items():
        pin = contextlib.nullcontext() if option is None else module._query_kernel.only(option)
        with pin:
            forward, dq = passes(module, q, k, v, idx, do, select_block)
            outputs[label] = (forward()[0], dq())
            row[f"{label}_fwd_ms"] = timed(forward, device)
            row[f"{label}_dq_ms"] = timed(dq, device)
            if option is None:
                row[f"{label}_chosen"] = module._query_kernel.chosen(q.shape[1])
    (o_a, dq_a), (o_b, dq_b) = outputs["before"], outputs["after"]
    row["bitwise_equal"] = bool(o_a.equal(o_b) and dq_a.equal(dq_b))
    row["max_abs_diff"] = float(max((o_a.float() - o_b.float()).abs().max(),
                                    (dq_a.float() - dq_b.float()).abs().max()))
    row["finite"] = bool(o_b.isfinite().all() and dq_b.isfinite().all())
    for part in ("fwd", "dq"):
        row[f"{part}_speedup"] = row[f"before_{part}_ms"] / max(row[f"after_{part}_ms"], 1e-9)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path, help="an earlier nsa/ops/selected_attention/triton.py")
    parser.add_argument("--shapes", default="train,g4-64k,g16-64k", help=f"comma list of {sorted(SHAPES)}")
    parser.add_argument("--patterns", default="random,local")
    parser.add_argument("--local-every", type=int, default=256, help="anchor spacing of the local pattern")
    parser.add_argument("--local-noise", type=float, default=0.8,
                        help="per-position noise of the local pattern")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    args = parser.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined
        args.shapes = "smoke"
    unknown = sorted(set(args.shapes.split(",")) - set(SHAPES))
    if unknown:
        parser.error(f"--shapes: unknown {unknown}; known: {sorted(SHAPES)}")
    if not args.before.is_file():
        parser.error(f"BEFORE_FILE: {args.before} is not a file")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import torch

    from nsa.ops import distinct_blocks_per_list
    from nsa.ops.selected_attention import triton as after

    spec = importlib.util.spec_from_file_location("selection_before", args.before)
    before = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(before)
    modules = {"before": before, "after": after}
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    select_block, select_count = (16, 4) if args.smoke else (SELECT_BLOCK, SELECT_COUNT)
    rows = []
    for shape in args.shapes.split(","):
        batch, seq_len, heads, num_kv, dim = SHAPES[shape]
        gen = torch.Generator(device=device).manual_seed(3)
        q, do, k, v = (torch.randn(batch, seq_len, h, dim, generator=gen, device=device, dtype=dtype)
                       for h in (heads, heads, num_kv, num_kv))
        for pattern in args.patterns.split(","):
            idx = selection(pattern, batch, seq_len, num_kv, args.local_every, args.local_noise, select_block,
                            select_count, device)
            overlap = {f"distinct_per_list_tile{t}": distinct_blocks_per_list(idx, t) for t in (4, 16)}
            for option in [*after._query_kernel.options, None]:
                row = {"shape": shape, "pattern": pattern, "G": heads // num_kv, "dim": dim, **overlap,
                       **compare(modules, q, k, v, idx, do, select_block, device, option)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)",
              "torch": torch.__version__, "triton": __import__("triton").__version__,
              "before": str(args.before), "rows": rows}
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))
    print(f"{result['device']}, torch {result['torch']}, triton {result['triton']}")
    print("| shape | pattern | distinct/list (4, 16) | option | fwd before -> after ms "
          "| dq before -> after ms | speed-up fwd / dq | bitwise |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['pattern']} | {r['distinct_per_list_tile4']:.2f}, "
              f"{r['distinct_per_list_tile16']:.2f} | {r['option']} | {r['before_fwd_ms']:.3f} -> "
              f"{r['after_fwd_ms']:.3f} | {r['before_dq_ms']:.3f} -> {r['after_dq_ms']:.3f} | "
              f"{r['fwd_speedup']:.2f}x / {r['dq_speedup']:.2f}x | {r['bitwise_equal']} |")
    return 0 if all(r["finite"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
