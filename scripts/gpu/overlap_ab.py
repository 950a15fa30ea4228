"""Can a memory-bound pass run beside a compute-bound one? Two CUDA streams against one (GPU only).

    python3 scripts/gpu/overlap_ab.py [--seq-len 65536] [--heads 64/4,16/4] [--parts pairs,schedules]
        [--pairs 'cmp-fwd|sel-fwd,...'] [--no-pinned] [--out FILE]

Selection attention's query passes (forward and dq) are bound by their K/V gathers from L2
(their time does not change with the query heads per key/value head, at ~8 TB/s of gathered
bytes on an H100), and its dK/dV pass by its q/dO gathers from HBM; compressed and window
attention are bound by their tensor-core products. One pass of each kind on the GPU at once would
take ``max`` rather than the sum of their times if the SMs can hold both kernels' programs (the
registers and shared memory each program takes decide that). This times, for each pair that
NSA's dependencies allow to run together (``PAIRS``): each pass alone, the two back to back on one
stream, and the two launched on two streams in either order (``triton.testing.do_bench``
medians, random data, B = 1, bf16, the paper's blocks, the production autotune lists, also with
the compute pass pinned to its options one at a time, since fewer registers per program may leave
room beside it). Then (``schedules``) the three branches' whole backward as the Triton backend
runs it (``nsa.ops.triton_nsa.branch_backward``) under each of its ``BACKWARD_SCHEDULES``. ``--smoke``
runs the plumbing on CPU under ``TRITON_INTERPRET=1`` at T = 256 (one stream: no times that mean
anything).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nsa.config import NSAConfig
from nsa.ops import triton_nsa
from nsa.ops.compressed_attention import triton as cmp_triton
from nsa.ops.selected_attention import triton as sel_triton
from nsa.ops.selection.triton import select_blocks_triton
from nsa.ops.triton_common import softmax_delta
from nsa.ops.window_attention import triton as win_triton

BLOCK, STRIDE, SELECT_BLOCK, COUNT, WINDOW = 32, 16, 64, 16, 512
SMOKE = "--smoke" in sys.argv
DEVICE = "cpu" if SMOKE else "cuda"

# (compute-bound pass, memory-bound pass, the kernel whose options are pinned one at a time): the
# pairs NSA's dependencies allow beside each other. The window's passes depend on nothing but the
# combine's deltas; selection's dK/dV writes no dq, so it may run beside compressed attention's
# backward; selection's dq adds into compressed attention's, so only the window's dK/dV (which
# writes no dq) may run beside it. The next pair needs compressed attention's dq to add into
# selection's: the backward schedule "selection-beside" (nsa.ops.triton_nsa) runs it.
PAIRS = [("win-fwd", "sel-fwd", win_triton._query_kernel), ("win-dkdv", "sel-dq", win_triton._dkdv_kernel),
         ("cmp-bwd", "sel-dkdv", None), ("win-dkdv", "sel-dkdv", win_triton._dkdv_kernel),
         ("cmp-bwd", "sel-dq", None),
         # The forward's: selection attention needs the scoring's blocks, which need compressed
         # attention's lse, so these pairs run together only with the sequence cut into position
         # chunks (chunk c + 1's compressed attention or scoring beside chunk c's selection, not
         # written): they say what that pipeline is worth.
         ("cmp-fwd", "sel-fwd", None), ("scoring", "sel-fwd", None)]


def passes(seq_len: int, hq: int, hk: int, dk: int = 128, dv: int = 128) -> dict:
    """Each pass as a closure over random inputs (the selection from the scoring kernel)."""
    torch.manual_seed(0)
    dt = torch.float32 if SMOKE else torch.bfloat16
    n_cmp = (seq_len - BLOCK) // STRIDE + 1

    def rand(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=dt)

    q, do = rand(1, seq_len, hq, dk), rand(1, seq_len, hq, dv)
    k, v = rand(1, seq_len, hk, dk), rand(1, seq_len, hk, dv)
    kc, vc = rand(1, n_cmp, hk, dk), rand(1, n_cmp, hk, dv)
    scale = dk ** -0.5
    co, clse = cmp_triton.compressed_attention_forward(q, kc, vc, BLOCK, STRIDE, scale)
    cdelta = softmax_delta(co, do, None)
    idx = select_blocks_triton(q, kc, clse, block=BLOCK, stride=STRIDE, select_block=SELECT_BLOCK,
                               select_count=COUNT, scale=scale).to(torch.int32).contiguous()
    so, slse = sel_triton._query_pass(q, k, v, idx, scale, SELECT_BLOCK)
    sdelta = softmax_delta(so, do, None)
    wo, wlse = win_triton._query_pass(q, k, v, WINDOW, scale)
    wdelta = softmax_delta(wo, do, None)
    config = NSAConfig(num_heads=hq, num_kv_heads=hk, head_dim=dk, v_head_dim=dv, compress_block=BLOCK,
                       compress_stride=STRIDE, select_block=SELECT_BLOCK, select_count=COUNT, window=WINDOW)

    def branch_backward(schedule):
        return triton_nsa.branch_backward(q, kc, vc, k, v, k, v, idx, (clse, slse, wlse), [do] * 3,
                                          (cdelta, sdelta, wdelta), config, scale, schedule=schedule)
    schedules = {f"backward:{name}": functools.partial(branch_backward, name)
                 for name in triton_nsa.BACKWARD_SCHEDULES}
    return {
        **schedules,
        "win-fwd": lambda: win_triton._query_pass(q, k, v, WINDOW, scale),
        "win-dkdv": lambda: win_triton._dkdv_pass(q, k, v, do, wlse, wdelta, WINDOW, scale),
        "cmp-bwd": lambda: cmp_triton.compressed_attention_backward(q, kc, vc, clse, do, cdelta, BLOCK,
                                                                    STRIDE, scale),
        "cmp-fwd": lambda: cmp_triton.compressed_attention_forward(q, kc, vc, BLOCK, STRIDE, scale),
        "scoring": lambda: select_blocks_triton(q, kc, clse, block=BLOCK, stride=STRIDE,
                                                select_block=SELECT_BLOCK, select_count=COUNT, scale=scale),
        "sel-fwd": lambda: sel_triton._query_pass(q, k, v, idx, scale, SELECT_BLOCK),
        "sel-dq": lambda: sel_triton._query_pass(q, k, v, idx, scale, SELECT_BLOCK, lse=slse, do=do,
                                                 delta=sdelta),
        "sel-dkdv": lambda: sel_triton._dkdv_pass(q, k, v, idx, do, slse, sdelta, scale, SELECT_BLOCK),
    }


def gradient_difference(want, got) -> float:
    """Largest ``max|got - want| / max|want|`` over the gradients of two ``branch_backward`` results
    ``(dq, (dk, dv) per branch)``; NaN if either holds one."""
    def tensors(result):
        dq, *pairs = result
        return [dq, *(t for pair in pairs for t in pair)]
    diffs = [((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-30)).item()
             for w, g in zip(tensors(want), tensors(got))]
    return float("nan") if any(math.isnan(d) for d in diffs) else max(diffs)


def bench_ms(fn) -> float:
    fn()
    if SMOKE:
        return float("nan")
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=50, rep=400, return_mode="median")


def two_streams(first, second):
    """``first`` then ``second`` launched on two side streams, joined to the current one."""
    if SMOKE:
        return lambda: (first(), second())
    main, s1, s2 = torch.cuda.current_stream(), torch.cuda.Stream(), torch.cuda.Stream()

    def run():
        s1.wait_stream(main)
        s2.wait_stream(main)
        with torch.cuda.stream(s1):
            first()
        with torch.cuda.stream(s2):
            second()
        main.wait_stream(s1)
        main.wait_stream(s2)
    return run


def measure(fns: dict, compute: str, memory: str) -> dict:
    a, b = fns[compute], fns[memory]
    row = {"alone_" + compute: bench_ms(a), "alone_" + memory: bench_ms(b),
           "serial": bench_ms(lambda: (a(), b())), "streams_compute_first": bench_ms(two_streams(a, b)),
           "streams_memory_first": bench_ms(two_streams(b, a))}
    best = min(row["streams_compute_first"], row["streams_memory_first"])
    row["gain_ms"] = row["serial"] - best
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--heads", default="64/4,16/4", help="comma list of query heads / key-value heads")
    parser.add_argument("--parts", default="pairs,schedules", help="comma list: pairs, schedules")
    parser.add_argument("--pairs", help="comma list of 'compute|memory' pairs of PAIRS to time (default all)")
    parser.add_argument("--no-pinned", action="store_true",
                        help="time each pair with the autotuned options only, not each pinned option too")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--smoke", action="store_true", help="CPU plumbing check under the interpreter")
    args = parser.parse_args()
    known = {f"{compute}|{memory}": (compute, memory, pinned) for compute, memory, pinned in PAIRS}
    wanted = [p.strip() for p in args.pairs.split(",")] if args.pairs else list(known)
    unknown = [p for p in wanted if p not in known]
    if unknown:
        parser.error(f"--pairs: unknown pair(s) {unknown}; known: {', '.join(known)}")
    pairs = [known[p] for p in wanted] if "pairs" in args.parts else []
    seq_len = 256 if args.smoke else args.seq_len
    rows = []
    for heads in args.heads.split(","):
        hq, hk = (int(h) for h in heads.split("/"))
        fns = passes(seq_len, hq, hk)
        for schedule in triton_nsa.BACKWARD_SCHEDULES if "schedules" in args.parts else []:
            # Every schedule computes the same gradients (up to the order of the dq adds): a race
            # between the streams would show here.
            diff = gradient_difference(fns["backward:one-stream"](), fns[f"backward:{schedule}"]())
            ms = bench_ms(fns[f"backward:{schedule}"])
            rows.append({"heads": heads, "T": seq_len, "schedule": schedule, "backward_ms": ms,
                         "max_rel_diff_vs_one_stream": diff})
            print(f"{heads} branch backward, schedule {schedule:24} {ms:8.2f} ms  "
                  f"max rel. difference to one-stream {diff:.2e}", flush=True)
        for compute, memory, pinned in pairs:
            options = [None] + (list(pinned.options) if pinned is not None and not args.no_pinned else [])
            for option in options[:2] if args.smoke else options:
                pin = pinned.only(option) if option is not None else contextlib.nullcontext()
                with pin:
                    row = measure(fns, compute, memory)
                row.update(heads=heads, T=seq_len, pair=f"{compute} | {memory}",
                           compute_option="autotuned" if option is None else str(option))
                rows.append(row)
                times = "  ".join(f"{k} {v:.2f}" for k, v in row.items() if isinstance(v, float))
                print(f"{heads} {row['pair']:20} {row['compute_option']:44} {times}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
