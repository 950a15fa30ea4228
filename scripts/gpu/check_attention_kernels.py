"""GPU check of the selection- and window-attention Triton kernels at real sizes: parity, then timing.

Run on one CUDA GPU (made for an H200), no arguments needed:

    python scripts/gpu/check_attention_kernels.py

For T in 64k, 32k, 16k, 8k (64k first, so autotuning settles on the size that matters),
B=1, HQ=64, HK=4, (Dk, Dv) in {(128, 128), (192, 128)}, bf16, l'=64, n=16, w=512:

* bitwise determinism of a second forward + backward, and parity of
  ``selected_attention_triton`` and ``window_attention_triton``, forward (o, lse) and
  backward (dq, dk, dv), against a float32 PyTorch reference (TF32 off). The reference runs on
  ``--samples`` query positions (random, plus the first and last): ``do`` is zero elsewhere, so
  the full dq/dk/dv of the kernels are exactly the gradients of the sampled queries and are
  compared whole. Criterion: relative RMS error <= 1e-2 and <= twice that of the same PyTorch
  code run in bf16 (FlashAttention's criterion). Block indices come from ``select_blocks`` on
  random scores (forced blocks included), i.e. the real top-n rule on a worst case for locality;
* timing with ``triton.testing.do_bench``: each op's forward and backward, the backward's
  kernels one by one (delta, dq, inverted index, dk/dv partials + reduction), and dense causal
  torch SDPA forward/backward with the FLASH_ATTENTION and CUDNN_ATTENTION backends (k/v expanded
  to HQ heads; a backend that refuses a shape is reported, not fatal), with peak memory.

Prints a short table last; details go to ``$OUT/check_attention_kernels.json`` when ``OUT`` is
set. Exit status 1 if any parity check fails. Cases run in priority order within a time budget
(``--budget``, default 150 s); cases left are reported as not run.

``--smoke`` runs tiny shapes on CPU under ``TRITON_INTERPRET=1`` (no timing): a check of the
script itself. ``--resources`` needs no GPU either: it compiles every autotune config of the six
kernels for sm_90 (Triton's bundled ptxas) and prints registers, spill bytes, shared memory and
asynchronous copies (:mod:`nsa.ops.compile_check`, which covers every prefill kernel).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nsa.ops.selected_attention import triton as sel_triton  # noqa: E402
from nsa.ops.selection.naive import select_blocks  # noqa: E402
from nsa.ops.triton_common import softmax_delta  # noqa: E402
from nsa.ops.window_attention import triton as win_triton  # noqa: E402

REL_RMS_MAX = 1e-2


def reference(q, k, v, do, key_pos, key_ok, positions, scale, dtype):
    """Attention of the sampled queries over explicit key sets, forward and backward, in ``dtype``.

    Args:
        q: ``[T, HQ, Dk]``; k ``[T, HK, Dk]``; v ``[T, HK, Dv]``; do ``[S, HQ, Dv]``.
        key_pos: int64 ``[S, HK, L]`` key positions per sampled query and kv head (any value
            where ``key_ok`` is false); key_ok: bool ``[S, HK, L]``.
        positions: int64 ``[S]`` the sampled query positions.

    Returns float32 ``o [S, HQ, Dv], lse [S, HQ], dq [T, HQ, Dk], dk [T, HK, Dk], dv [T, HK, Dv]``.
    """
    num_kv = k.shape[1]
    group = q.shape[1] // num_kv
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    qd, kd, vd = leaves
    heads = torch.arange(num_kv, device=q.device)[None, :, None]
    pos = key_pos.clamp(0, k.shape[0] - 1)
    ks = kd[pos, heads]  # [S, HK, L, Dk]
    vs = vd[pos, heads]
    qs = qd[positions].reshape(len(positions), num_kv, group, -1)
    scores = torch.einsum("shgd,shld->shgl", qs, ks).float() * scale
    scores = scores.masked_fill(~key_ok[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).to(dtype)
    o = torch.einsum("shgl,shld->shgd", probs, vs).reshape(len(positions), q.shape[1], -1)
    o.backward(do.to(dtype))
    return (o.detach().float(), lse.detach().reshape(len(positions), -1), *(x.grad.float() for x in leaves))


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.float(), ref.float()
    if not torch.isfinite(x).all():
        return float("inf")
    return float((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30))


def selected_keys(idx, positions, select_block):
    """Key positions and validity ``[S, HK, n*l']`` of the selected blocks of the sampled queries."""
    blocks = idx[0, positions].long()  # [S, HK, n]
    offs = torch.arange(select_block, device=idx.device)
    key_pos = (blocks[..., None] * select_block + offs).flatten(-2)
    key_ok = (blocks[..., None] >= 0).expand(*blocks.shape, select_block).flatten(-2)
    return key_pos, key_ok & (key_pos <= positions[:, None, None])


def window_keys(positions, num_kv, window):
    key_pos = positions[:, None] - window + 1 + torch.arange(window, device=positions.device)
    key_pos = key_pos[:, None, :].expand(-1, num_kv, -1)
    return key_pos, key_pos >= 0


def bench(fn, rep, device) -> float:
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return triton.testing.do_bench(fn, warmup=10, rep=rep)


def peak_mib(fn, device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def check_op(name, op, q, k, v, key_pos, key_ok, positions, scale, rep):
    """Parity (sampled queries) and timing of one op; returns a result dict."""
    device = q.device
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    o, lse = op(*leaves)
    do = torch.zeros_like(o)
    do_s = torch.randn(len(positions), o.shape[2], o.shape[3], device=device, dtype=o.dtype)
    do[0, positions] = do_s
    grads = torch.autograd.grad(o, leaves, do)
    # Determinism: a second forward + backward must reproduce every bit.
    o_again = op(*leaves)[0]
    grads_again = torch.autograd.grad(o_again, leaves, do)
    deterministic = torch.equal(o, o_again) and all(torch.equal(a, b) for a, b in zip(grads, grads_again))
    del o_again, grads_again
    ref = reference(q[0], k[0], v[0], do_s, key_pos, key_ok, positions, scale, torch.float32)
    low = reference(q[0], k[0], v[0], do_s, key_pos, key_ok, positions, scale, q.dtype)
    got = (o[0, positions].detach(), lse[0, positions].detach(), *(g[0] for g in grads))
    errors = {}
    ok = True
    for label, x, r, lo in zip(("o", "lse", "dq", "dk", "dv"), got, ref, low):
        err, torch_err = rel_rms(x, r), rel_rms(lo, r)
        passed = err <= REL_RMS_MAX and err <= 2 * torch_err + 1e-6
        if label == "lse":  # kept in float32 by both: only the absolute bound applies
            passed = err <= REL_RMS_MAX
        errors[label] = {"rel_rms": err, "torch_low_precision_rel_rms": torch_err, "pass": passed}
        ok &= passed
    result = {"op": name, "parity": ok and deterministic, "deterministic": deterministic, "errors": errors}
    # Timing: forward without autograd, backward from a retained graph, and its pieces.
    with torch.no_grad():
        result["fwd_ms"] = bench(lambda: op(q, k, v), rep, device)
    o, lse = op(*leaves)
    do_full = torch.randn_like(o)
    result["bwd_ms"] = bench(lambda: torch.autograd.grad(o, leaves, do_full, retain_graph=True), rep, device)
    result["fwd_bwd_peak_mib"] = peak_mib(lambda: torch.autograd.grad(op(*leaves)[0], leaves, do_full), device)
    return result, (o.detach(), lse.detach(), do_full)


def backward_pieces(kind, q, k, v, o, lse, do, idx, window, select_block, scale, rep):
    device = q.device
    delta = softmax_delta(o, do, None)
    pieces = {"delta_ms": bench(lambda: softmax_delta(o, do, None), rep, device)}
    if kind == "sel":
        pieces["dq_ms"] = bench(lambda: sel_triton._query_pass(q, k, v, idx, scale, select_block, lse=lse,
                                                               do=do, delta=delta), rep, device)
        pieces["invert_ms"] = bench(lambda: sel_triton.invert_selection(idx, q.shape[1], select_block,
                                                                        sel_triton.CHUNK), rep, device)
        pieces["dkdv_incl_invert_ms"] = bench(lambda: sel_triton._dkdv_pass(q, k, v, idx, do, lse, delta, scale,
                                                                            select_block), rep, device)
    else:
        pieces["dq_ms"] = bench(lambda: win_triton._query_pass(q, k, v, window, scale, lse=lse, do=do,
                                                               delta=delta), rep, device)
        pieces["dkdv_ms"] = bench(lambda: win_triton._dkdv_pass(q, k, v, do, lse, delta, window, scale),
                                  rep, device)
    return pieces


def sdpa_dense(q, k, v, rep) -> dict:
    """Dense causal SDPA, FLASH_ATTENTION and CUDNN_ATTENTION backends; k/v expanded to HQ heads."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2).detach().requires_grad_()
    kh = k.repeat_interleave(group, dim=2).transpose(1, 2).detach().requires_grad_()
    vh = v.repeat_interleave(group, dim=2).transpose(1, 2).detach().requires_grad_()
    out = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                def fwd():
                    return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
                with torch.no_grad():
                    fwd_ms = triton.testing.do_bench(fwd, warmup=1, rep=rep)
                o = fwd()
                do = torch.randn_like(o)
                bwd_ms = triton.testing.do_bench(
                    lambda: torch.autograd.grad(o, (qh, kh, vh), do, retain_graph=True), warmup=1, rep=rep)
            out[name] = {"fwd_ms": fwd_ms, "bwd_ms": bwd_ms}
        except Exception as exc:  # a backend refusing a shape is a finding, not a crash
            out[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    return out


def run_case(seq_len, dk, dv, args, device) -> dict:
    gen = torch.Generator(device=device).manual_seed(seq_len + dk)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    hq, hk, select_block, n, window = args.heads, args.kv_heads, args.select_block, args.select_count, args.window
    q = torch.randn(1, seq_len, hq, dk, device=device, dtype=dtype, generator=gen)
    k = torch.randn(1, seq_len, hk, dk, device=device, dtype=dtype, generator=gen)
    v = torch.randn(1, seq_len, hk, dv, device=device, dtype=dtype, generator=gen)
    scale = dk ** -0.5
    num_blocks = triton.cdiv(seq_len, select_block)
    scores = torch.rand(1, seq_len, hk, num_blocks, device=device, generator=gen)
    idx = select_blocks(scores, select_block=select_block, select_count=n).to(torch.int32)
    del scores
    samples = min(args.samples, seq_len)
    positions = torch.randperm(seq_len, device=device, generator=gen)[:samples]
    positions[:2] = torch.tensor([0, seq_len - 1], device=device)
    positions = positions.unique()
    case = {"T": seq_len, "dk": dk, "dv": dv, "HQ": hq, "HK": hk, "select_block": select_block, "n": n,
            "window": window, "samples": int(positions.numel())}

    def sel(q_, k_, v_):
        return sel_triton.selected_attention_triton(q_, k_, v_, idx, select_block=select_block, scale=scale)

    def win(q_, k_, v_):
        return win_triton.window_attention_triton(q_, k_, v_, window=window, scale=scale)

    for kind, op, (key_pos, key_ok) in (("sel", sel, selected_keys(idx, positions, select_block)),
                                        ("win", win, window_keys(positions, hk, window))):
        result, (o, lse, do) = check_op(kind, op, q, k, v, key_pos, key_ok, positions, scale, args.rep)
        result["bwd_pieces"] = backward_pieces(kind, q, k, v, o, lse, do, idx, window, select_block, scale,
                                               args.rep)
        case[kind] = result
    case["sdpa"] = sdpa_dense(q, k, v, args.rep) if device.type == "cuda" else {}
    return case


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[65536, 32768, 16384, 8192])
    parser.add_argument("--dims", default="128/128,192/128", help="comma list of Dk/Dv")
    parser.add_argument("--heads", type=int, default=64)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--select-block", type=int, default=64)
    parser.add_argument("--select-count", type=int, default=16)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--samples", type=int, default=256, help="query positions the reference checks")
    parser.add_argument("--rep", type=int, default=50, help="do_bench rep (ms) per timing")
    parser.add_argument("--budget", type=float, default=150.0, help="seconds; later cases are skipped")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run under TRITON_INTERPRET=1")
    parser.add_argument("--resources", action="store_true",
                        help="compile every config for sm_90 and print registers/spills/shared (no GPU)")
    args = parser.parse_args()
    if args.resources:
        from nsa.ops.compile_check import audit, report
        report(audit([(128, 128), (192, 128)], [16, 4, 1],
                     kernels=("selected-fwd", "selected-dq", "selected-dkdv", "window-fwd", "window-dq",
                              "window-dkdv")))
        return 0
    if args.smoke:
        args.lengths, args.dims, args.heads, args.kv_heads = [100], "24/16", 8, 2
        args.select_block, args.select_count, args.window, args.samples = 16, 3, 40, 20
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print("needs a CUDA GPU (or --smoke for a CPU check of the script)")
            return 2
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    dims = [tuple(int(x) for x in d.split("/")) for d in args.dims.split(",")]
    # Priority: the longest and the shortest length for every head-dim pair first, then the rest
    # (first use of each head-dim pair also pays the autotuner's compiles, ~18 kernels).
    lengths = sorted(args.lengths, reverse=True)
    first = [lengths[0], lengths[-1]] if len(lengths) > 1 else lengths
    plan = ([(t, dk, dv) for t in first for dk, dv in dims]
            + [(t, dk, dv) for dk, dv in dims for t in lengths if t not in first])
    start = time.time()
    cases, skipped = [], []
    for seq_len, dk, dv in plan:
        if time.time() - start > args.budget:
            skipped.append({"T": seq_len, "dk": dk, "dv": dv})
            continue
        case = run_case(seq_len, dk, dv, args, device)
        case["elapsed_s"] = time.time() - start
        cases.append(case)
        print(f"done T={seq_len} dk={dk} dv={dv} at {case['elapsed_s']:.0f}s", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)",
              "torch": torch.__version__, "triton": triton.__version__, "cases": cases, "not_run": skipped}
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "check_attention_kernels.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        print(f"details: {path}")
    failed = False
    for c in cases:
        for kind in ("sel", "win"):
            if not c[kind]["parity"]:
                failed = True
                print(f"FAIL {kind} T={c['T']} dk={c['dk']}: deterministic={c[kind]['deterministic']} "
                      f"{json.dumps(c[kind]['errors'])}")
    print(f"\n{report['device']}, torch {report['torch']}, triton {report['triton']}; ms, "
          f"{'fp32' if args.smoke else 'bf16'}, B=1, "
          f"HQ={args.heads}, HK={args.kv_heads}, l'={args.select_block}, n={args.select_count}, w={args.window}")
    head = (f"{'T':>6} {'dk/dv':>7} {'parity':>6} | {'sel fwd':>8} {'sel bwd':>8} | {'win fwd':>8} {'win bwd':>8}"
            f" | {'fa2 fwd':>8} {'fa2 bwd':>8} | {'cudnn fwd':>9} {'cudnn bwd':>9} | {'cudnn/sel fwd':>13}")
    print(head)
    for c in sorted(cases, key=lambda c: (c["dk"], c["T"])):
        fa, cu = c["sdpa"].get("flash", {}), c["sdpa"].get("cudnn", {})
        ratio = cu["fwd_ms"] / c["sel"]["fwd_ms"] if "fwd_ms" in cu else None
        parity = "ok" if c["sel"]["parity"] and c["win"]["parity"] else "FAIL"
        print(f"{c['T']:>6} {str(c['dk']) + '/' + str(c['dv']):>7} {parity:>6} | {fmt(c['sel']['fwd_ms']):>8} "
              f"{fmt(c['sel']['bwd_ms']):>8} | {fmt(c['win']['fwd_ms']):>8} {fmt(c['win']['bwd_ms']):>8} | "
              f"{fmt(fa.get('fwd_ms')):>8} {fmt(fa.get('bwd_ms')):>8} | {fmt(cu.get('fwd_ms')):>9} "
              f"{fmt(cu.get('bwd_ms')):>9} | {fmt(ratio, '.1f'):>13}")
    for s in skipped:
        print(f"not run (time budget): T={s['T']} dk={s['dk']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
