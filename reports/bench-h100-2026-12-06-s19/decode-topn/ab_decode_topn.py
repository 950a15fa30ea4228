"""One-off A/B (GPU): the decode step with the select kernel's top-n as a bitonic top-k (this
tree) against 15 removals of the maximum (commit 902624c's module, loaded beside), one process,
random bf16 caches, default plans, CUDA graphs, medians of do_bench (L2 emptied per call),
the two alternated twice. Also each module's kernels (eager, profiler) and their results compared.

    python3 .gpu-before/ab_decode_topn.py [--out DIR]
"""
import argparse
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
parser.add_argument("--shapes", default="65536:1:128/128,65536:32:128/128,16384:1:128/128,131072:1:128/128,"
                    "131072:32:128/128,65536:1:192/128,65536:32:192/128,16384:32:128/128")
args = parser.parse_args()
rows = []
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
    res = {"context": context, "batch": batch, "dims": dims}
    fns, outs = {}, {}
    for name, mod in (("removals", old), ("bitonic", new)):
        plan = mod.plan_decode(config, batch * config.num_kv_heads, cache.max_len)

        def step(mod=mod, plan=plan):
            return mod.nsa_decode_triton(q, cache.k_cmp, cache.v_cmp, cache.k_slc, cache.v_slc, cache.k_win,
                                         cache.v_win, gates, cache.lengths, config, num_new=num_new, plan=plan,
                                         check_values=False)
        outs[name] = step()
        if DEVICE == "cpu":
            continue
        fns[name], captured, why = decode_bench.graphed(step)
        res[f"{name}_graph"] = captured
        kernels = decode_bench.kernel_times_us(step)
        res[f"{name}_kernels_us"] = kernels
        res[f"{name}_select_us"] = kernels.get("_select_kernel")
    res["same_output"] = bool(torch.equal(outs["removals"][0], outs["bitonic"][0]))
    res["same_blocks"] = bool(torch.equal(outs["removals"][1], outs["bitonic"][1]))
    if DEVICE == "cpu":
        print(json.dumps(res), flush=True)
        continue
    for rep in range(2):
        for name in ("removals", "bitonic"):
            res.setdefault(f"{name}_us_reps", []).append(do_bench(fns[name], warmup=100, rep=500, return_mode="median") * 1e3)
    for name in ("removals", "bitonic"):
        res[f"{name}_us"] = min(res[f"{name}_us_reps"])
    rows.append(res)
    print(json.dumps(res), flush=True)
args.out.mkdir(parents=True, exist_ok=True)
(args.out / "ab_decode_topn.json").write_text(json.dumps(rows, indent=1))
print(f"\n{'context':>8} {'B':>3} {'dims':>8} {'removals us':>12} {'bitonic us':>11} {'ratio':>6} "
      f"{'sel old':>8} {'sel new':>8} same")
for r in rows:
    print(f"{r['context']:>8} {r['batch']:>3} {r['dims']:>8} {r['removals_us']:>12.1f} {r['bitonic_us']:>11.1f} "
          f"{r['removals_us'] / r['bitonic_us']:>6.3f} {r['removals_select_us'] or 0:>8.1f} "
          f"{r['bitonic_select_us'] or 0:>8.1f} {r['same_output'] and r['same_blocks']}")
