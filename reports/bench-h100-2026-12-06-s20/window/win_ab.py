"""Window dK/dV on the GPU: the session-start module against the new one (32-bit step offsets; ONE_RUN options)."""
import importlib.util, json, os, sys
sys.path.insert(0, os.getcwd())
import torch, triton, triton.testing
from nsa.ops.window_attention import triton as win
from nsa.ops.triton_common import softmax_delta
spec = importlib.util.spec_from_file_location("win_before", ".gpu-before/win_before.py")
before = importlib.util.module_from_spec(spec); sys.modules["win_before"] = before; spec.loader.exec_module(before)
OUT = os.environ.get("OUT", "/tmp")
bench = lambda fn: triton.testing.do_bench(fn, warmup=30, rep=200, return_mode="median")
PROD = (32, 8, 3, {"KEYS_AS_M": True, "BN": 128})
ONE = [(32, 8, 3, {"KEYS_AS_M": True, "BN": 128, "ONE_RUN": True}), (32, 8, 2, {"KEYS_AS_M": True, "BN": 128, "ONE_RUN": True}),
       (64, 4, 2, {"KEYS_AS_M": True, "ONE_RUN": True})]
rows = []
print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
for T, dk, hq in ((65536, 128, 64), (8192, 128, 64), (65536, 128, 16), (65536, 192, 64)):
    torch.manual_seed(0)
    hk, dv = 4, 128
    q = torch.randn(1, T, hq, dk, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, T, hk, dk, device="cuda", dtype=torch.bfloat16); v = torch.randn(1, T, hk, dv, device="cuda", dtype=torch.bfloat16)
    sc = dk ** -0.5
    o, lse = win._query_pass(q, k, v, 512, sc)
    do = torch.randn_like(o); delta = softmax_delta(o, do, None)
    a = (q, k, v, do, lse, delta, 512, sc)
    ref = before._dkdv_pass(*a)
    r = {"T": T, "dk": dk, "heads": f"{hq}/{hk}", "before_autotuned": bench(lambda: before._dkdv_pass(*a)),
         "after_autotuned": bench(lambda: win._dkdv_pass(*a))}
    with before._dkdv_kernel.only(PROD):
        r["before_prod"] = bench(lambda: before._dkdv_pass(*a))
    for opt in [PROD, *ONE]:
        with win._dkdv_kernel.only(opt):
            r[f"after {opt}"] = bench(lambda: win._dkdv_pass(*a))
            got = win._dkdv_pass(*a)
            r[f"after {opt} bitwise"] = all(torch.equal(x, y) for x, y in zip(got, ref))
    rows.append(r); print(json.dumps(r), flush=True)
    del q, k, v, o, do, lse, delta; torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(OUT, "win_ab.json"), "w"), indent=1)
print("\n| T | Dk | heads | before (prod opt) | after prod opt | ONE_RUN 32x128 s3 | s2 | 64x64 |")
for r in rows:
    vals = [r["before_prod"], r[f"after {PROD}"], *(r[f"after {o}"] for o in ONE)]
    print(f"| {r['T']} | {r['dk']} | {r['heads']} | " + " | ".join(f"{x:.3f}" for x in vals) + " |")
