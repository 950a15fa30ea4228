"""One-off A/B (GPU): compressed attention's dK/dV pass, equal query chunks (this tree) against
the five query splits of commit 88d0537 (its module loaded beside), one process, random bf16.

    python3 .gpu-before/ab_dkdv_chunks.py [--out DIR]
"""
import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nsa.config import num_compressed  # noqa: E402
from nsa.ops.compressed_attention import triton as new  # noqa: E402
from nsa.ops.triton_common import softmax_delta  # noqa: E402

spec = importlib.util.spec_from_file_location("cmp_88d0537", Path(__file__).with_name("cmp_triton_88d0537.py"))
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)

parser = argparse.ArgumentParser()
parser.add_argument("--out", type=Path, default=Path("."))
parser.add_argument("--whole", default="65536:64/4,8192:64/4,65536:16/4")
parser.add_argument("--shapes", default="65536:64/4:128/128,65536:16/4:128/128,8192:64/4:128/128,"
                    "65536:64/4:192/128,131072:64/4:128/128,16384:64/4:128/128")
args = parser.parse_args()
BLOCK, STRIDE = 32, 16
rows = []
for shape in args.shapes.split(","):
    seq_len, heads, dims = shape.split(":")
    seq_len = int(seq_len)
    hq, hk = map(int, heads.split("/"))
    dk, dv = map(int, dims.split("/"))
    gen = torch.Generator(device="cuda").manual_seed(seq_len + hq)
    n = num_compressed(seq_len, BLOCK, STRIDE)
    q = torch.randn(1, seq_len, hq, dk, device="cuda", dtype=torch.bfloat16, generator=gen)
    kc = torch.randn(1, n, hk, dk, device="cuda", dtype=torch.bfloat16, generator=gen)
    vc = torch.randn(1, n, hk, dv, device="cuda", dtype=torch.bfloat16, generator=gen)
    do = torch.randn(1, seq_len, hq, dv, device="cuda", dtype=torch.bfloat16, generator=gen)
    scale = dk ** -0.5
    o, lse = new.compressed_attention_forward(q, kc, vc, BLOCK, STRIDE, scale)
    delta = softmax_delta(o, do, None)
    res = {"T": seq_len, "heads": heads, "dims": dims}
    outs = {}
    for name, mod in (("splits", old), ("chunks", new)):
        fn = lambda mod=mod: mod.compressed_attention_backward_dkdv(q, kc, vc, lse, do, delta, BLOCK, STRIDE, scale)
        outs[name] = fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        res[f"{name}_extra_peak_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        res[f"{name}_ms"] = do_bench(fn, warmup=50, rep=300)
        res[f"{name}_config"] = mod._cmp_bwd_dkdv_tuned.chosen(seq_len)
    for i, g in enumerate(("dk", "dv")):
        a, b = outs["splits"][i].float(), outs["chunks"][i].float()
        res[f"{g}_rel_diff"] = ((a - b).norm() / a.norm()).item()
        assert torch.isfinite(b).all()
    res["chunk_len"] = new.dkdv_chunk_len(seq_len, n, hk, BLOCK, STRIDE, new.pow2(hq // hk), q.device)
    res["speedup"] = res["splits_ms"] / res["chunks_ms"]
    rows.append(res)
    print(json.dumps(res), flush=True)
    del q, kc, vc, do, o, lse, delta, outs
    torch.cuda.empty_cache()
(args.out / "ab_dkdv_chunks.json").write_text(json.dumps(rows, indent=1))
print(f"{'T':>7} {'heads':>5} {'dims':>7} {'splits ms':>9} {'chunks ms':>9} {'x':>5} {'chunk':>6} "
      f"{'MiB old/new':>12} {'dk diff':>8}")
for r in rows:
    print(f"{r['T']:>7} {r['heads']:>5} {r['dims']:>7} {r['splits_ms']:>9.3f} {r['chunks_ms']:>9.3f} "
          f"{r['speedup']:>5.2f} {r['chunk_len']:>6} {r['splits_extra_peak_MiB']:>5.0f}/{r['chunks_extra_peak_MiB']:<6.0f} "
          f"{r['dk_rel_diff']:>8.1e}")

# The whole op (nsa_attention, forward + backward), the backward's dK/dV pass swapped in place.
from nsa.bench.prefill import _time_fwd_bwd, bench_config, nsa_inputs  # noqa: E402
from nsa.functional import nsa_attention  # noqa: E402
from nsa.ops import triton_nsa  # noqa: E402

whole = []
for shape in args.whole.split(","):
    seq_len, heads = shape.split(":")
    hq, hk = map(int, heads.split("/"))
    config = bench_config(128, 128, hq, hk)
    x = nsa_inputs(config, int(seq_len))
    fwd = lambda: nsa_attention(x["q"], x["k"], x["v"], x["gates"], config, backend="triton")
    res = {"T": int(seq_len), "heads": heads}
    for name, fn in (("chunks", new.compressed_attention_backward_dkdv),
                     ("splits", old.compressed_attention_backward_dkdv),
                     ("chunks_again", new.compressed_attention_backward_dkdv)):
        triton_nsa.compressed_attention_backward_dkdv = fn
        f, b, fb, peak = _time_fwd_bwd(fwd, list(x.values()))
        res[name] = {"fwd_ms": f, "bwd_ms": b, "fwd_bwd_ms": fb, "peak_gib": peak}
    triton_nsa.compressed_attention_backward_dkdv = new.compressed_attention_backward_dkdv
    whole.append(res)
    print(json.dumps(res), flush=True)
    del x
    torch.cuda.empty_cache()
(args.out / "ab_dkdv_chunks_whole.json").write_text(json.dumps(whole, indent=1))
print(f"{'T':>7} {'heads':>5} {'bwd splits':>10} {'bwd chunks':>10} {'again':>6} {'peak GiB old/new':>16}")
for r in whole:
    print(f"{r['T']:>7} {r['heads']:>5} {r['splits']['bwd_ms']:>10.2f} {r['chunks']['bwd_ms']:>10.2f} "
          f"{r['chunks_again']['bwd_ms']:>6.2f} {r['splits']['peak_gib']:>7.2f}/{r['chunks']['peak_gib']:.2f}")
