"""Window attention on the GPU, session-start module against this tree: dK/dV (one masked loop), forward and dq
(ONE_RUN options pinned beside the autotuned lists)."""
import importlib.util, json, os, sys
sys.path.insert(0, os.getcwd())
import torch, triton, triton.testing
from nsa.ops.window_attention import triton as win
from nsa.ops.triton_common import softmax_delta
spec = importlib.util.spec_from_file_location("win_before", ".gpu-before/win_before.py")
before = importlib.util.module_from_spec(spec); sys.modules["win_before"] = before; spec.loader.exec_module(before)
OUT = os.environ.get("OUT", "/tmp")
bench = lambda fn: triton.testing.do_bench(fn, warmup=30, rep=200, return_mode="median")
ONE = [(64, 4, 2, {"TMA": True, "ONE_RUN": True}), (64, 4, 3, {"BN": 32, "TMA": True, "ONE_RUN": True}),
       (128, 8, 2, {"TMA": True, "ONE_RUN": True})]
rows = []
print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
for T, dk, hq in ((65536, 128, 64), (8192, 128, 64), (65536, 128, 16), (65536, 192, 64)):
    torch.manual_seed(0)
    hk, dv = 4, 128
    q = torch.randn(1, T, hq, dk, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, T, hk, dk, device="cuda", dtype=torch.bfloat16); v = torch.randn(1, T, hk, dv, device="cuda", dtype=torch.bfloat16)
    sc = dk ** -0.5
    o, lse = before._query_pass(q, k, v, 512, sc)
    do = torch.randn_like(o); delta = softmax_delta(o, do, None)
    a = (q, k, v, do, lse, delta, 512, sc)
    dkdv_ref = before._dkdv_pass(*a)
    dq_ref = before._query_pass(q, k, v, 512, sc, lse=lse, do=do, delta=delta)
    r = {"T": T, "dk": dk, "heads": f"{hq}/{hk}",
         "dkdv_before": bench(lambda: before._dkdv_pass(*a)), "dkdv_after": bench(lambda: win._dkdv_pass(*a)),
         "fwd_before": bench(lambda: before._query_pass(q, k, v, 512, sc)),
         "fwd_after": bench(lambda: win._query_pass(q, k, v, 512, sc)),
         "dq_before": bench(lambda: before._query_pass(q, k, v, 512, sc, lse=lse, do=do, delta=delta)),
         "dq_after": bench(lambda: win._query_pass(q, k, v, 512, sc, lse=lse, do=do, delta=delta))}
    got = win._dkdv_pass(*a)
    r["dkdv_maxdiff"] = max((x.float() - y.float()).abs().max().item() for x, y in zip(got, dkdv_ref))
    r["dkdv_chosen"] = win._dkdv_kernel.chosen(T) if hasattr(win._dkdv_kernel, "chosen") else None
    for opt in ONE:
        with win._query_kernel.only(opt):
            r[f"fwd {opt}"] = bench(lambda: win._query_pass(q, k, v, 512, sc))
            r[f"dq {opt}"] = bench(lambda: win._query_pass(q, k, v, 512, sc, lse=lse, do=do, delta=delta))
            o2, _ = win._query_pass(q, k, v, 512, sc)
            dq2 = win._query_pass(q, k, v, 512, sc, lse=lse, do=do, delta=delta)
            r[f"{opt} maxdiff o/dq"] = [(o2.float() - o.float()).abs().max().item(), (dq2.float() - dq_ref.float()).abs().max().item()]
    rows.append(r); print(json.dumps(r), flush=True)
    del q, k, v, o, do, lse, delta; torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(OUT, "win_q_ab.json"), "w"), indent=1)
print("\n| T | Dk | heads | dK/dV before / after | fwd before / after / ONE_RUN 64x64 s2, 64x32 s3, 128x64 s2 | dq before / after / same three |")
for r in rows:
    f = " / ".join(f"{r[f'fwd {o}']:.3f}" for o in ONE); d = " / ".join(f"{r[f'dq {o}']:.3f}" for o in ONE)
    print(f"| {r['T']} | {r['dk']} | {r['heads']} | {r['dkdv_before']:.3f} / {r['dkdv_after']:.3f} | "
          f"{r['fwd_before']:.3f} / {r['fwd_after']:.3f} / {f} | {r['dq_before']:.3f} / {r['dq_after']:.3f} / {d} |")
