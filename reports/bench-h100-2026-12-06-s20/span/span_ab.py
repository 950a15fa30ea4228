"""Selection dK/dV on the GPU: items over the whole sequence against items within spans of positions
launched span by span (invert_selection's span), random selections with the forced blocks."""
import json, os, sys, time
sys.path.insert(0, os.getcwd())
import torch, triton, triton.testing
from nsa.ops.selected_attention import triton as st
from nsa.ops.triton_common import softmax_delta
DEV = os.environ.get("DEV", "cuda")
OUT = os.environ.get("OUT", "/tmp")
bench = (lambda fn: triton.testing.do_bench(fn, warmup=20, rep=150, return_mode="median")) if DEV == "cuda" else (lambda fn: (fn(), 0.0)[1])
SHAPES = [(65536, 64, 128), (8192, 64, 128), (65536, 16, 128)] if DEV == "cuda" else [(1100, 16, 32)]
SPANS = [None, 16384, 8192, 4096, 2048] if DEV == "cuda" else [None, 64, 32]
rows = []

def selection(T, hk, n=16, bs=64):
    nb = triton.cdiv(T, bs)
    t_blk = torch.arange(T, device=DEV) // bs
    scores = torch.rand(1, T, hk, nb, device=DEV)
    col = torch.arange(nb, device=DEV)[None, None, None, :]
    forced = (col == 0) | (col == t_blk[None, :, None, None]) | (col == t_blk[None, :, None, None] - 1)
    scores = torch.where(forced, 2.0, scores).masked_fill(col > t_blk[None, :, None, None], -1.0)
    top = scores.topk(n, dim=-1)
    return torch.where(top.values < 0, -1, top.indices).to(torch.int32).contiguous()

print(torch.cuda.get_device_name() if DEV == "cuda" else "cpu", torch.__version__, triton.__version__, flush=True)
t0 = time.time()
for T, hq, dk in SHAPES:
    torch.manual_seed(0)
    hk, dv, dt = 4, 128 if DEV == "cuda" else 32, torch.bfloat16 if DEV == "cuda" else torch.float32
    q = torch.randn(1, T, hq, dk, device=DEV, dtype=dt)
    k = torch.randn(1, T, hk, dk, device=DEV, dtype=dt); v = torch.randn(1, T, hk, dv, device=DEV, dtype=dt)
    do = torch.randn(1, T, hq, dv, device=DEV, dtype=dt)
    idx = selection(T, hk)
    sc = dk ** -0.5
    o, lse = st.selected_attention_forward(q, k, v, idx, 64, sc)
    delta = softmax_delta(o, do, None)
    ref = None
    for span in SPANS:
        s = T if span is None else span
        inv = st.invert_selection(idx, T, 64, span=s)
        r = {"T": T, "heads": f"{hq}/{hk}", "span": s, "items": int((inv.item_len > 0).sum()),
             "invert_ms": bench(lambda: st.invert_selection(idx, T, 64, span=s)),
             "dkdv_ms": bench(lambda: st._dkdv_pass(q, k, v, idx, do, lse, delta, sc, 64, inv))}
        got = st._dkdv_pass(q, k, v, idx, do, lse, delta, sc, 64, inv)
        if ref is None:
            ref = got
        r["max_rel_diff"] = max(((x.float() - y.float()).abs().max() / y.float().abs().max()).item() for x, y in zip(got, ref))
        r["nan"] = any(bool(torch.isnan(x).any()) for x in got)
        r["chosen"] = st._dkdv_kernel.chosen(T) if hasattr(st._dkdv_kernel, "chosen") else None
        rows.append(r); print(json.dumps(r), flush=True)
    del q, k, v, do, o, lse, delta, idx, ref
    if DEV == "cuda":
        torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(OUT, "span_ab.json"), "w"), indent=1)
print("\n| T | heads | span | items | invert ms | dK/dV + reduce ms | max rel diff |")
for r in rows:
    print(f"| {r['T']} | {r['heads']} | {r['span']} | {r['items']} | {r['invert_ms']:.3f} | {r['dkdv_ms']:.3f} | {r['max_rel_diff']:.1e} |")
print("elapsed", round(time.time() - t0, 1))
