"""One-off A/B (GPU): the decode step with the top-n in the select kernel (default plan) against
DecodePlan.rank_in_scoring (the last scoring program of each token group writes it), and a race
check: the ranked step replayed many times in a CUDA graph, its blocks and output compared
bitwise with the default plan's after every replay. One process, random bf16 caches, medians of
do_bench (L2 emptied per call), variants timed twice in alternating passes.

    python3 .gpu-before/ab_rank.py [--out DIR] [--shapes 65536:32:128/128,...] [--replays N]
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a TRITON_INTERPRET=1 smoke run
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nsa.bench import decode as decode_bench  # noqa: E402
from nsa.ops.decode.triton import nsa_decode_triton, plan_decode  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out", type=Path, default=Path("."))
parser.add_argument("--shapes", default="65536:32:128/128,65536:1:128/128,131072:32:128/128,16384:32:128/128,"
                    "65536:32:192/128,16384:1:128/128,131072:1:128/128")
parser.add_argument("--replays", type=int, default=300)
args = parser.parse_args()
rows_out = []
for shape in args.shapes.split(","):
    context, batch, dims = shape.split(":")
    context, batch = int(context), int(batch)
    dk, dv = map(int, dims.split("/"))
    config = decode_bench.paper_config(dk, dv)
    torch.manual_seed(context + batch + dk)
    dt = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    cache = decode_bench.filled_cache(config, batch, context, dt, device=DEVICE)
    q = torch.randn(batch, 1, config.num_heads, dk, dtype=dt, device=DEVICE)
    gates = torch.rand(batch, 1, config.num_heads, 3, dtype=dt, device=DEVICE)
    num_new = torch.ones(batch, dtype=torch.int64, device=DEVICE)
    rows = batch * config.num_kv_heads
    base = plan_decode(config, rows, cache.max_len)
    plans = {"default": base, "rank": dataclasses.replace(base, rank_in_scoring=True),
             "rank pdl": dataclasses.replace(base, rank_in_scoring=True, pdl=DEVICE == "cuda"),
             "rank window-beside-scoring": dataclasses.replace(base, rank_in_scoring=True,
                                                               window_overlap="scoring"),
             "rank other top-n": dataclasses.replace(
                 base, rank_in_scoring=True, top_n="bitonic" if base.top_n == "max-removal" else "max-removal")}
    res = {"context": context, "batch": batch, "dims": dims, "variants": {}}
    fns, outs = {}, {}
    for label, plan in plans.items():

        def step(plan=plan):
            return nsa_decode_triton(q, cache.k_cmp, cache.v_cmp, cache.k_slc, cache.v_slc, cache.k_win,
                                     cache.v_win, gates, cache.lengths, config, num_new=num_new, plan=plan,
                                     check_values=False)
        outs[label] = step()
        entry = {"same_blocks": bool(torch.equal(outs["default"][1], outs[label][1])),
                 "same_output": bool(torch.equal(outs["default"][0], outs[label][0])), "us_reps": []}
        res["variants"][label] = entry
        if DEVICE == "cpu":
            continue
        fns[label], captured, why = decode_bench.graphed(step)
        entry["graph"] = captured
        if label in ("default", "rank"):
            entry["kernels_us"] = decode_bench.kernel_times_us(step)
        if label == "rank" and captured:
            # Race check: every replay's blocks and output against the default plan's, bitwise.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                graph_out = step()
            bad = 0
            for _ in range(args.replays):
                graph.replay()
                bad += int(not (torch.equal(graph_out[1], outs["default"][1])
                                and torch.equal(graph_out[0], outs["default"][0])))
            entry["replays"], entry["replays_differing"] = args.replays, bad
    if DEVICE == "cuda":
        for _ in range(2):
            for label in plans:
                res["variants"][label]["us_reps"].append(
                    do_bench(fns[label], warmup=50, rep=300, return_mode="median") * 1e3)
        for entry in res["variants"].values():
            entry["us"] = min(entry["us_reps"])
    rows_out.append(res)
    print(json.dumps(res), flush=True)
args.out.mkdir(parents=True, exist_ok=True)
(args.out / "ab_rank.json").write_text(json.dumps(rows_out, indent=1))
if DEVICE == "cuda":
    for r in rows_out:
        v = r["variants"]
        print(f"\nT={r['context']} B={r['batch']} {r['dims']}")
        for label, e in v.items():
            print(f"  {label:28} {e['us']:8.1f} us  x{v['default']['us'] / e['us']:.3f}  same blocks "
                  f"{e['same_blocks']} output {e['same_output']}  replays differing "
                  f"{e.get('replays_differing', '-')}/{e.get('replays', '-')}  "
                  f"select {e.get('kernels_us', {}).get('_select_kernel', '-')}")
