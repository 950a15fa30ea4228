"""Device time of every CUDA kernel in one NSA forward + backward (Triton backend, GPU only).

    python3 scripts/gpu/profile_prefill_kernels.py [--seq-lens 65536] [--heads 64/4,16/4]
        [--head-dims 128/128] [--gate-paths lse,stored]
        [--schedules one-stream,selection-dkdv-beside,selection-beside] [--tma-loads on,off]
        [--one-kv on,off] [--out FILE]

``nsa bench``'s breakdown times each branch alone; this runs the whole op (``nsa_attention``,
B = 1, bf16, the paper's blocks, random data, after a warm-up call that autotunes) under the
torch profiler and lists each kernel's mean device time per forward + backward, slowest first,
so that a backward's two passes (dQ and dK/dV) and the glue between kernels show separately.
Before that it times the forward and the backward (``nsa bench``'s medians, which also include
what is not a kernel: launches, allocations) and takes the peak memory of one forward +
backward as ``nsa bench`` does. ``--out`` writes everything as JSON.

``--gate-paths`` picks the backward's gate handling (``nsa.ops.triton_nsa``): ``lse`` (the
random gates are >= 0, so each branch reads the gated sum's dO with its gate folded into its
lse) and/or ``stored`` (one gate made negative, which takes the path that stores ``g_b * dO``
per branch), both in one process for an A/B. ``--schedules`` runs the backward under each of
``nsa.ops.triton_nsa.BACKWARD_SCHEDULES`` (which passes share the GPU on a side stream), likewise.
``--tma-loads off`` runs with ``nsa.ops.triton_common.TMA_LOADS`` off: every kernel on its
pointer-load configs (autotuned apart from the TMA ones), likewise. ``--one-kv off`` runs with
``nsa.ops.triton_nsa.SHARED_KV_FORWARD`` and ``SHARED_KV_BACKWARD`` off: forward and backward as
if selection and window read different key/value tensors (``nsa_attention`` gives both one ``k,
v``; with them on, the window's forward and dq pass take selection's forced blocks and its dK/dV
add to selection's).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nsa.bench.decode import kernel_times_us
from nsa.bench.prefill import _time_fwd_bwd, bench_config, nsa_inputs
from nsa.functional import nsa_attention
from nsa.ops import triton_common, triton_nsa

GATE_PATHS = ("lse", "stored")
ON_OFF = {"on": True, "off": False}


@contextlib.contextmanager
def setting(module, name: str, value):
    """``module.<name>`` is ``value`` inside the block (the Triton backend's backward schedule,
    ``nsa.ops.triton_common.TMA_LOADS``)."""
    default = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, default)


def profile(seq_len: int, head_dim: int, v_head_dim: int, num_heads: int,
            num_kv_heads: int, gate_path: str = "lse") -> tuple[dict[str, float], dict[str, float]]:
    """Kernel times (us per forward + backward) and ``{"fwd_ms", "bwd_ms", "peak_gib"}``."""
    config = bench_config(head_dim, v_head_dim, num_heads, num_kv_heads)
    x = nsa_inputs(config, seq_len)
    if gate_path == "stored":
        with torch.no_grad():
            x["gates"][0, 0, 0, 0] = -0.5  # one negative gate: no logarithm, g_b * dO stored
    grad = torch.randn(1, seq_len, num_heads, v_head_dim, device="cuda", dtype=torch.bfloat16)

    def forward():
        return nsa_attention(x["q"], x["k"], x["v"], x["gates"], config, backend="triton")

    def forward_backward():
        torch.autograd.grad(forward(), list(x.values()), grad)

    fwd, bwd, _, peak = _time_fwd_bwd(forward, list(x.values()))
    return kernel_times_us(forward_backward, repeats=5), {"fwd_ms": fwd, "bwd_ms": bwd, "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", default="65536")
    parser.add_argument("--heads", default="64/4,16/4", help="comma list of query heads / key-value heads")
    parser.add_argument("--head-dims", default="128/128")
    parser.add_argument("--gate-paths", default="lse",
                        help="comma list of the backward's gate paths to profile: lse, stored")
    parser.add_argument("--schedules", default=triton_nsa.BACKWARD_SCHEDULE,
                        help="comma list of backward schedules: " + ", ".join(triton_nsa.BACKWARD_SCHEDULES))
    parser.add_argument("--tma-loads", default="on", help="comma list: on, off (TMA tile loads, see above)")
    parser.add_argument("--one-kv", default="on",
                        help="comma list: on, off (the backward's work shared by selection and window, "
                             "see above)")
    parser.add_argument("--out", type=Path, help="write the tables as JSON here")
    args = parser.parse_args()
    gate_paths, schedules, tma = args.gate_paths.split(","), args.schedules.split(","), args.tma_loads.split(",")
    one_kv = args.one_kv.split(",")
    for option, given, accepted in (("--gate-paths", gate_paths, GATE_PATHS),
                                    ("--schedules", schedules, triton_nsa.BACKWARD_SCHEDULES),
                                    ("--tma-loads", tma, tuple(ON_OFF)), ("--one-kv", one_kv, tuple(ON_OFF))):
        unknown = sorted(set(given) - set(accepted))
        if unknown:
            parser.error(f"{option}: unknown {unknown}; accepted: {', '.join(accepted)}")
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    tables = {}
    for dims in args.head_dims.split(","):
        dk, dv = (int(d) for d in dims.split("/"))
        for seq_len in (int(t) for t in args.seq_lens.split(",")):
            runs = ((h, g, m, t, s) for h in args.heads.split(",") for g in gate_paths for m in schedules
                    for t in tma for s in one_kv)
            for heads, gate_path, schedule, loads, shared in runs:
                hq, hk = (int(h) for h in heads.split("/"))
                with (setting(triton_nsa, "BACKWARD_SCHEDULE", schedule),
                      setting(triton_common, "TMA_LOADS", ON_OFF[loads]),
                      setting(triton_nsa, "SHARED_KV_FORWARD", ON_OFF[shared]),
                      setting(triton_nsa, "SHARED_KV_BACKWARD", ON_OFF[shared])):
                    times, timings = profile(seq_len, dk, dv, hq, hk, gate_path)
                label = (f"T={seq_len} heads={hq}/{hk} d={dk}/{dv} gates={gate_path} schedule={schedule} "
                         f"tma={loads} one_kv={shared}")
                tables[label] = {"kernels_us": times, "timings_ms": timings}
                total = sum(times.values())
                print(f"\n{label}: " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()), flush=True)
                print(f"{total / 1000:.2f} ms of kernels per forward + backward")
                for name, us in sorted(times.items(), key=lambda kv: -kv[1]):
                    print(f"  {us / 1000:8.3f} ms {100 * us / total:5.1f}%  {name[:100]}")
    if args.out:
        args.out.write_text(json.dumps(tables, indent=1))


if __name__ == "__main__":
    main()
