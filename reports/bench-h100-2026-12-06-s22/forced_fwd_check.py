"""Selection's forced blocks in the window's forward (SHARED_KV_FORWARD) on a GPU: outputs and
gradients against the float32 reference at 4k (64/4 and 16/4 heads, 128/128 and 192/128), and the
two paths against each other at 64k. Prints relative RMS errors."""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from nsa.bench.prefill import bench_config, nsa_inputs  # noqa: E402
from nsa.functional import _mean_pooled, nsa_attention  # noqa: E402
from nsa.ops import triton_nsa  # noqa: E402
from nsa.ops.reference import nsa_reference  # noqa: E402

NAMES = ("dq", "dk", "dv", "dgates")


def rel_rms(a, b):
    a, b = a.float(), b.float()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def run(x, config, grad, forced):
    triton_nsa.SHARED_KV_FORWARD = forced
    leaves = [t.detach().requires_grad_() for t in (x["q"], x["k"], x["v"], x["gates"])]
    out, info = nsa_attention(*leaves, config, backend="triton", return_info=True)
    assert info.forward_path.startswith("one key/value tensor") == forced, info.forward_path
    return out, torch.autograd.grad(out, leaves, grad.to(out.dtype))


def reference(x, config, grad):
    leaves = [t.detach().float().requires_grad_() for t in (x["q"], x["k"], x["v"], x["gates"])]
    q, k, v, g = leaves
    k_cmp, v_cmp = _mean_pooled(k, v, config)
    out, _, _ = nsa_reference(q, k_cmp, v_cmp, k, v, k, v, g, config, with_reads=False)
    return out, torch.autograd.grad(out, leaves, grad.float())


print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
ok = True
for dims in ((128, 128),):
    for heads in ((64, 4), (16, 4)):
        config = bench_config(*dims, *heads)
        x = nsa_inputs(config, 4096)
        grad = torch.randn(1, 4096, heads[0], dims[1], device="cuda", dtype=torch.bfloat16)
        ref_out, ref = reference(x, config, grad)
        for forced in (True, False):
            out, got = run(x, config, grad, forced)
            err = rel_rms(out, ref_out)
            errs = [rel_rms(g, r) for g, r in zip(got, ref)]
            finite = torch.isfinite(out).all().item() and all(torch.isfinite(g).all().item() for g in got)
            ok &= finite and err <= 1e-2 and max(errs) <= 1.5e-2
            print(f"T=4096 d={dims} heads={heads} forced={forced}: out {err:.2e} "
                  + " ".join(f"{n} {e:.2e}" for n, e in zip(NAMES, errs)) + f" finite={finite}", flush=True)
        del ref
        torch.cuda.empty_cache()
config = bench_config(128, 128, 64, 4)
x = nsa_inputs(config, 65536)
grad = torch.randn(1, 65536, 64, 128, device="cuda", dtype=torch.bfloat16)
t0 = time.time()
out_on, on = run(x, config, grad, True)
out_off, off = run(x, config, grad, False)
print(f"T=65536 heads=(64, 4) forced on vs off: out {rel_rms(out_on, out_off):.2e} "
      + " ".join(f"{n} {rel_rms(a, b):.2e}" for n, a, b in zip(NAMES, on, off)), f"({time.time() - t0:.0f} s)",
      flush=True)
triton_nsa.SHARED_KV_FORWARD = True
print("CHECK", "PASSED" if ok else "FAILED", flush=True)
