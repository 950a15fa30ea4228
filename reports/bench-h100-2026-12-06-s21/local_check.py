"""Selection's local blocks in the window's backward (LOCAL_BLOCKS_IN_WINDOW) on a GPU: gradients
against the float32 reference at 4k and against the other path at 64k (one k, v for selection and
window, as nsa_attention passes them). Prints relative RMS errors."""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nsa.bench.prefill import bench_config, nsa_inputs  # noqa: E402
from nsa.functional import nsa_attention  # noqa: E402
from nsa.ops import triton_nsa  # noqa: E402
from nsa.ops.reference import nsa_reference  # noqa: E402
from nsa.functional import _mean_pooled  # noqa: E402

NAMES = ("dq", "dk", "dv", "dgates")


def rel_rms(a, b):
    a, b = a.float(), b.float()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def grads(x, config, grad, local, dtype=None):
    triton_nsa.SHARED_KV_BACKWARD = local
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (x["q"], x["k"], x["v"], x["gates"])]
    out = nsa_attention(*leaves, config, backend="triton")
    return out, torch.autograd.grad(out, leaves, grad.to(out.dtype))


def reference(x, config, grad):
    leaves = [t.detach().float().requires_grad_() for t in (x["q"], x["k"], x["v"], x["gates"])]
    q, k, v, g = leaves
    k_cmp, v_cmp = _mean_pooled(k, v, config)
    out, _, _ = nsa_reference(q, k_cmp, v_cmp, k, v, k, v, g, config, with_reads=False)
    return out, torch.autograd.grad(out, leaves, grad.float())


print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
for heads in ((64, 4), (16, 4)):
    config = bench_config(128, 128, *heads)
    x = nsa_inputs(config, 4096)
    grad = torch.randn(1, 4096, heads[0], 128, device="cuda", dtype=torch.bfloat16)
    ref_out, ref = reference(x, config, grad)
    for local in (True, False):
        out, got = grads(x, config, grad, local)
        errs = " ".join(f"{n} {rel_rms(g, r):.2e}" for n, g, r in zip(NAMES, got, ref))
        finite = all(torch.isfinite(g).all().item() for g in got)
        print(f"T=4096 heads={heads} local={local}: out {rel_rms(out, ref_out):.2e} {errs} finite={finite}",
              flush=True)
    del ref
    torch.cuda.empty_cache()
config = bench_config(128, 128, 64, 4)
x = nsa_inputs(config, 65536)
grad = torch.randn(1, 65536, 64, 128, device="cuda", dtype=torch.bfloat16)
t0 = time.time()
_, on = grads(x, config, grad, True)
_, off = grads(x, config, grad, False)
print("T=65536 heads=(64, 4) local on vs off: " + " ".join(f"{n} {rel_rms(a, b):.2e}" for n, a, b in
                                                         zip(NAMES, on, off)), f"({time.time() - t0:.0f} s)", flush=True)
triton_nsa.SHARED_KV_BACKWARD = True
