"""One-off A/B (GPU): the decode step under commit 902624c's module (loaded beside) and this
tree's, default plans, then this tree's plan variants: the fused scoring's tiles per program
(score_steps), the select kernel's programs per token group (select_splits), the key loops'
pipeline depth, the top-n method. One process, random bf16 caches, CUDA graphs, medians of
do_bench (L2 emptied per call), every variant timed twice in alternating passes.

    python3 .gpu-before/ab_decode_plan.py [--out DIR] [--shapes 65536:32:128/128,...]
"""
import argparse
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a TRITON_INTERPRET=1 smoke run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nsa.bench import decode as decode_bench  # noqa: E402
from nsa.ops.decode import triton as new  # noqa: E402

spec = importlib.util.spec_from_file_location("decode_902624c", Path(__file__).with_name("decode_triton_902624c.py"))
old = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = old  # its dataclass looks its module up
spec.loader.exec_module(old)

parser = argparse.ArgumentParser()
parser.add_argument("--out", type=Path, default=Path("."))
parser.add_argument("--shapes", default="65536:32:128/128,65536:1:128/128,131072:32:128/128,16384:32:128/128,"
                    "65536:32:192/128,131072:1:128/128")
parser.add_argument("--reps", type=int, default=2)
parser.add_argument("--combos", action="store_true", help="time combinations of the winners instead")
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
    old_plan = old.plan_decode(config, rows, cache.max_len)
    base = new.plan_decode(config, rows, cache.max_len)
    other_top_n = "bitonic" if base.top_n == "max-removal" else "max-removal"
    plans = {"old module": (old, old_plan), "new default": (new, base)}
    if args.combos:
        combos = (("s4", {"score_steps": 4}, 3), ("s2 st2", {"score_steps": 2}, 2), ("s4 st2", {"score_steps": 4}, 2),
                  ("s4 sel2", {"score_steps": 4, "select_splits": 2}, 3),
                  ("s4 st2 bitonic", {"score_steps": 4, "top_n": "bitonic"}, 2),
                  ("s4 bitonic", {"score_steps": 4, "top_n": "bitonic"}, 3))
        for label, kwargs, stages in combos:
            plan = new.plan_decode(config, rows, cache.max_len, **kwargs)
            plans[label] = (new, dataclasses.replace(plan, num_stages=stages))
    else:
        for label, kwargs in (("score_steps=shared", {"score_steps": old_plan.score_steps}),
                              ("score_steps=1", {"score_steps": 1}), ("score_steps=4", {"score_steps": 4}),
                              ("select_splits=1", {"select_splits": 1}), ("select_splits=2", {"select_splits": 2}),
                              ("select_splits=4", {"select_splits": 4}),
                              (f"top_n={other_top_n}", {"top_n": other_top_n})):
            plans[label] = (new, new.plan_decode(config, rows, cache.max_len, **kwargs))
        plans["stages=2"] = (new, dataclasses.replace(base, num_stages=2))
        plans["stages=2 select_splits=1"] = (new, dataclasses.replace(plans["select_splits=1"][1], num_stages=2))
    res = {"context": context, "batch": batch, "dims": dims, "variants": {}}
    fns, outs = {}, {}
    for label, (mod, plan) in plans.items():

        def step(mod=mod, plan=plan):
            return mod.nsa_decode_triton(q, cache.k_cmp, cache.v_cmp, cache.k_slc, cache.v_slc, cache.k_win,
                                         cache.v_win, gates, cache.lengths, config, num_new=num_new, plan=plan,
                                         check_values=False)
        outs[label] = step()
        entry = {"plan": {k: v for k, v in dataclasses.asdict(plan).items()
                          if k in ("score_steps", "score_splits", "slc_splits", "num_stages", "top_n",
                                   "cmp_splits", "win_splits")}, "us_reps": []}
        ref = outs["old module"]
        entry["same_blocks"] = bool(torch.equal(ref[1], outs[label][1]))
        entry["max_abs_diff"] = (ref[0].float() - outs[label][0].float()).abs().max().item()
        res["variants"][label] = entry
        if DEVICE == "cpu":
            continue
        fns[label], captured, why = decode_bench.graphed(step)
        entry["graph"] = captured
        if label in ("old module", "new default"):
            entry["kernels_us"] = decode_bench.kernel_times_us(step)
    if DEVICE == "cuda":
        for _ in range(args.reps):
            for label in plans:
                res["variants"][label]["us_reps"].append(
                    do_bench(fns[label], warmup=50, rep=300, return_mode="median") * 1e3)
        for entry in res["variants"].values():
            entry["us"] = min(entry["us_reps"])
    rows_out.append(res)
    print(json.dumps(res), flush=True)
args.out.mkdir(parents=True, exist_ok=True)
(args.out / ("ab_decode_combos.json" if args.combos else "ab_decode_plan.json")).write_text(json.dumps(rows_out, indent=1))
if DEVICE == "cuda":
    for r in rows_out:
        v = r["variants"]
        print(f"\nT={r['context']} B={r['batch']} {r['dims']}  (old module {v['old module']['us']:.1f} us)")
        for label, e in v.items():
            print(f"  {label:28} {e['us']:8.1f} us  x{v['old module']['us'] / e['us']:.3f}  "
                  f"reps {' '.join(f'{x:.1f}' for x in e['us_reps'])}  blocks same {e['same_blocks']} "
                  f"diff {e['max_abs_diff']:.1e}  {e['plan']}")
