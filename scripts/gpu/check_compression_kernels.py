"""GPU check of the compression-side Triton kernels at real sizes: parity, then timing.

Run on one CUDA GPU (made for an H200), no arguments needed:

    python scripts/gpu/check_compression_kernels.py

For T in 8k..64k, B=1, HQ=64, HK=4, (Dk, Dv) in {(128, 128), (192, 128)}, bf16, the paper's block
sizes (l=32, d=16, l'=64, n=16):

* compressed attention forward (o, lse) and backward (dq, dk, dv) against a float32 PyTorch
  reference computed in query chunks (TF32 off); relative RMS error must be <= 1e-2 and no more
  than twice that of the same PyTorch code run in bf16 (FlashAttention's criterion);
* selected blocks against ``select_blocks(selection_block_scores(...))`` in float32; rows that
  differ must differ only by ties within rounding (judged by score);
* timing of each kernel with ``triton.testing.do_bench`` (forward, backward, selection) and of
  dense causal cuDNN SDPA forward for scale, with achieved TFLOP/s.

Prints a short table last; details go to ``$OUT/check_compression_kernels.json`` when ``OUT`` is
set. Exit status 1 if any parity check fails. Stays under ~3 minutes: cases run in priority order
and any case left when the time budget is spent is reported as not run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nsa.config import num_compressed
from nsa.ops.compressed_attention.triton import compressed_attention_triton
from nsa.ops.selection.naive import select_blocks, selection_block_scores
from nsa.ops.selection.triton import select_blocks_triton
from nsa.ops.triton_nsa import autotuned_tiles

BLOCK, STRIDE, SELECT_BLOCK, SELECT_COUNT = 32, 16, 64, 16
HQ, HK = 64, 4
REL_RMS_MAX = 1e-2
TIE_RTOL = 2e-5
QUERY_CHUNK = 1024


def visible(positions: torch.Tensor) -> torch.Tensor:
    return torch.where(positions + 1 >= BLOCK, (positions + 1 - BLOCK) // STRIDE + 1, torch.zeros_like(positions))


def reference(q, k, v, do, scale, dtype):
    """Compressed attention forward and backward in ``dtype`` (softmax statistics in float32).

    Shapes without batch: q ``[T, HQ, Dk]``, k ``[N, HK, Dk]``, v ``[N, HK, Dv]``, do ``[T, HQ, Dv]``.
    Returns float32 ``o, lse, dq, dk, dv``. Query chunks keep the score tensors to ~1 GiB.
    """
    seq_len, num_heads, dk = q.shape
    num_kv, group = k.shape[1], num_heads // k.shape[1]
    kh = k.to(dtype).permute(1, 0, 2)  # [HK, N, Dk]
    vh = v.to(dtype).permute(1, 0, 2)
    o = torch.zeros(seq_len, num_heads, v.shape[-1], device=q.device)
    lse = torch.full((seq_len, num_heads), float("-inf"), device=q.device)
    dq = torch.zeros(seq_len, num_heads, dk, device=q.device)
    dk_acc = torch.zeros(k.shape[1], k.shape[0], dk, device=q.device)
    dv_acc = torch.zeros(v.shape[1], v.shape[0], v.shape[-1], device=q.device)

    def heads_first(x, c):  # [c, HQ, D] -> [HK, G*c, D], rows (g, t)
        return x.to(dtype).reshape(c, num_kv, group, -1).permute(1, 2, 0, 3).reshape(num_kv, group * c, -1)

    def heads_back(x, c):  # inverse of heads_first
        return x.reshape(num_kv, group, c, -1).permute(2, 0, 1, 3).reshape(c, num_heads, -1)

    for start in range(0, seq_len, QUERY_CHUNK):
        end = min(seq_len, start + QUERY_CHUNK)
        c = end - start
        vis = visible(torch.arange(start, end, device=q.device))
        n_end = int(vis.max())
        if n_end == 0:
            continue
        qc, doc = heads_first(q[start:end], c), heads_first(do[start:end], c)
        allowed = (torch.arange(n_end, device=q.device)[None, :] < vis[:, None]).repeat(group, 1)
        s = (qc @ kh[:, :n_end].transpose(1, 2)).float() * scale
        s = s.masked_fill(~allowed, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - torch.where(torch.isfinite(row_lse), row_lse, torch.zeros_like(row_lse))[..., None])
        oc = (p.to(dtype) @ vh[:, :n_end]).float()
        dp = (doc @ vh[:, :n_end].transpose(1, 2)).float()
        delta = (doc.float() * oc).sum(-1, keepdim=True)
        ds = p * (dp - delta)
        dq[start:end] = heads_back((ds.to(dtype) @ kh[:, :n_end]).float() * scale, c)
        dk_acc[:, :n_end] += (ds.to(dtype).transpose(1, 2) @ qc).float() * scale
        dv_acc[:, :n_end] += (p.to(dtype).transpose(1, 2) @ doc).float()
        o[start:end] = heads_back(oc, c)
        lse[start:end] = heads_back(row_lse[..., None], c)[..., 0]
    return o, lse, dq, dk_acc.permute(1, 0, 2), dv_acc.permute(1, 0, 2)


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.float(), ref.float()
    finite = torch.isfinite(ref)
    if not torch.equal(finite, torch.isfinite(x)):
        return float("inf")
    diff = (x - ref)[finite]
    return (diff.norm() / ref[finite].norm().clamp_min(1e-30)).item()


def check_selection(got: torch.Tensor, want: torch.Tensor, scores: torch.Tensor) -> dict:
    """Rows of ``got`` differing from ``want`` must be ties within rounding, judged by score."""
    positions = torch.arange(got.shape[1], device=got.device)[None, :, None, None]
    current = positions // SELECT_BLOCK
    differ = (got != want).any(-1)
    result = {"rows": differ.numel(), "rows_differing": int(differ.sum()), "worst_tie_gap": 0.0, "bad_rows": 0}
    if not differ.any():
        return result

    def candidate_scores(blocks):
        forced = (blocks == 0) | (blocks == current) | (blocks == current - 1) | (blocks < 0)
        picked = scores.gather(-1, blocks.clamp_min(0))
        return torch.where(forced, float("-inf"), picked).sort(-1, descending=True).values, forced

    got_scores, got_forced = candidate_scores(got)
    want_scores, want_forced = candidate_scores(want)
    gap = (got_scores - want_scores).abs().nan_to_num(0.0)
    scale = torch.maximum(got_scores.abs(), want_scores.abs()).nan_to_num(0.0, posinf=0.0, neginf=0.0)
    tolerance = TIE_RTOL * scale + 1e-7 * scores.amax(-1, keepdim=True)
    same_shape = (got_scores.isinf() == want_scores.isinf()).all(-1) & (
        (got >= 0).sum(-1) == (want >= 0).sum(-1)) & (got_forced.sum(-1) == want_forced.sum(-1))
    ok = same_shape & (gap <= tolerance).all(-1)
    result["bad_rows"] = int((differ & ~ok).sum())
    relative = gap / scale.clamp_min(1e-30)
    result["worst_tie_gap"] = float(relative[differ].max()) if differ.any() else 0.0
    return result


def pairs(seq_len: int) -> int:
    """Visible (query, compressed key) pairs per query head."""
    return int(visible(torch.arange(seq_len)).sum())


def run_case(seq_len: int, dk: int, dv: int, rep: int) -> dict:
    device = "cuda"
    gen = torch.Generator(device=device).manual_seed(seq_len + dk)
    num_cmp = num_compressed(seq_len, BLOCK, STRIDE)
    q = torch.randn(1, seq_len, HQ, dk, device=device, generator=gen).bfloat16()
    k = torch.randn(1, num_cmp, HK, dk, device=device, generator=gen).bfloat16()
    v = torch.randn(1, num_cmp, HK, dv, device=device, generator=gen).bfloat16()
    do = torch.randn(1, seq_len, HQ, dv, device=device, generator=gen).bfloat16()
    scale = dk ** -0.5
    row = {"T": seq_len, "dk": dk, "dv": dv}

    # Parity: Triton (bf16) and PyTorch-in-bf16 against PyTorch in float32.
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    # One untimed pass first: autotuning allocates benchmark buffers that would inflate the peak.
    compressed_attention_triton(*leaves, block=BLOCK, stride=STRIDE)[0].backward(do)
    for x in leaves:
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base_memory = torch.cuda.memory_allocated()
    o, lse = compressed_attention_triton(*leaves, block=BLOCK, stride=STRIDE)
    o.backward(do)
    row["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base_memory) / 2**30
    got = (o.detach(), lse, *(x.grad for x in leaves))
    ref32 = reference(q[0], k[0], v[0], do[0], scale, torch.float32)
    ref16 = reference(q[0], k[0], v[0], do[0], scale, torch.bfloat16)
    names = ("o", "lse", "dq", "dk", "dv")
    passed = True
    row["errors"] = {}
    for name, x, r32, r16 in zip(names, got, ref32, ref16):
        triton_err, torch_bf16_err = rel_rms(x[0], r32), rel_rms(r16, r32)
        limit = REL_RMS_MAX if name == "lse" else min(REL_RMS_MAX, max(2 * torch_bf16_err, 1e-3))
        ok = triton_err <= limit
        passed &= ok
        row["errors"][name] = {"triton": triton_err, "torch_bf16": torch_bf16_err, "limit": limit, "ok": ok}
    del ref16, got

    blocks = select_blocks_triton(q, k, lse, block=BLOCK, stride=STRIDE, select_block=SELECT_BLOCK,
                                  select_count=SELECT_COUNT)
    scores = selection_block_scores(q.float(), k.float(), block=BLOCK, stride=STRIDE, select_block=SELECT_BLOCK)
    want = select_blocks(scores, select_block=SELECT_BLOCK, select_count=SELECT_COUNT)
    row["selection"] = check_selection(blocks, want, scores)
    passed &= row["selection"]["bad_rows"] == 0
    del scores, want, ref32
    row["passed"] = bool(passed)

    # Timing.
    flops_pair = 2 * pairs(seq_len) * HQ
    fwd = triton.testing.do_bench(lambda: compressed_attention_triton(q, k, v, block=BLOCK, stride=STRIDE),
                                  rep=rep)
    o, lse = compressed_attention_triton(*leaves, block=BLOCK, stride=STRIDE)
    bwd = triton.testing.do_bench(lambda: torch.autograd.grad(o, leaves, do, retain_graph=True), rep=rep)
    sel = triton.testing.do_bench(lambda: select_blocks_triton(q, k, lse, block=BLOCK, stride=STRIDE,
                                                               select_block=SELECT_BLOCK,
                                                               select_count=SELECT_COUNT), rep=rep)
    row["ms"] = {"fwd": fwd, "bwd": bwd, "select": sel}
    row["tflops"] = {"fwd": flops_pair * (dk + dv) / fwd / 1e9,
                     "bwd": flops_pair * (4 * dk + 3 * dv) / bwd / 1e9,  # dk/dv pass 2Dk+2Dv, dq pass 2Dk+Dv
                     "select": flops_pair * dk / sel / 1e9}
    row["ms"]["sdpa_cudnn_fwd"] = sdpa_cudnn_forward_ms(q, k, v, rep)
    row["autotuned"] = autotuned_tiles(seq_len)
    return row


def sdpa_cudnn_forward_ms(q, k, v, rep) -> float | None:
    """Dense causal cuDNN SDPA forward on the same q and (uncompressed-size) K/V, for scale."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    seq_len = q.shape[1]
    qh = q.transpose(1, 2)
    kh = torch.randn(1, HK, seq_len, k.shape[-1], device=q.device, dtype=q.dtype).repeat_interleave(HQ // HK, 1)
    vh = torch.randn(1, HK, seq_len, v.shape[-1], device=q.device, dtype=q.dtype).repeat_interleave(HQ // HK, 1)
    try:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return triton.testing.do_bench(
                lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True), rep=rep)
    except RuntimeError as exc:  # cuDNN backend missing or shape unsupported: say so in the table
        print(f"cuDNN SDPA unavailable at T={seq_len}: {exc}", file=sys.stderr)
        return None


def fmt(x, spec=".2f"):
    return "n/a" if x is None else format(x, spec)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=140.0, help="stop starting new cases after this")
    parser.add_argument("--rep", type=int, default=60, help="do_bench rep (ms) per timing")
    parser.add_argument("--lengths", default="8192,65536,16384,32768", help="comma-separated T, run in order")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    started = time.time()
    lengths = [int(x) for x in args.lengths.split(",")]
    cases = [(t, dk, 128) for t in lengths for dk in (128, 192)]
    rows, not_run = [], []
    for seq_len, dk, dv in cases:
        if time.time() - started > args.budget_s:
            not_run.append({"T": seq_len, "dk": dk, "dv": dv})
            continue
        case_start = time.time()
        row = run_case(seq_len, dk, dv, args.rep)
        row["case_s"] = time.time() - case_start
        rows.append(row)
        torch.cuda.empty_cache()
        print(f"done T={seq_len} dk={dk}: passed={row['passed']} in {row['case_s']:.1f}s", flush=True)

    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "config": {"HQ": HQ, "HK": HK, "l": BLOCK, "d": STRIDE, "l'": SELECT_BLOCK, "n": SELECT_COUNT,
                         "dtype": "bfloat16"},
              "rows": rows, "not_run": not_run, "elapsed_s": time.time() - started}
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "check_compression_kernels.json"
        path.write_text(json.dumps(report, indent=2))
        print(f"details: {path}")

    print(f"\n{report['device']}  torch {torch.__version__}  triton {triton.__version__}  "
          f"HQ={HQ} HK={HK} l={BLOCK} d={STRIDE} l'={SELECT_BLOCK} n={SELECT_COUNT} bf16")
    header = (f"{'T':>6} {'dk/dv':>7} | {'fwd ms':>7} {'TF/s':>5} | {'bwd ms':>7} {'TF/s':>5} | {'sel ms':>7} "
              f"{'TF/s':>5} | {'cudnn':>7} | {'err o/dq/dk/dv (x1e-3)':>24} | {'sel diff/bad':>12} | ok")
    print(header)
    print("-" * len(header))
    for r in sorted(rows, key=lambda r: (r["dk"], r["T"])):
        errs = "/".join(f"{r['errors'][n]['triton'] * 1e3:.1f}" for n in ("o", "dq", "dk", "dv"))
        sel = r["selection"]
        print(f"{r['T']:>6} {r['dk']:>3}/{r['dv']:<3} | {r['ms']['fwd']:>7.2f} {r['tflops']['fwd']:>5.0f} | "
              f"{r['ms']['bwd']:>7.2f} {r['tflops']['bwd']:>5.0f} | {r['ms']['select']:>7.2f} "
              f"{r['tflops']['select']:>5.0f} | {fmt(r['ms']['sdpa_cudnn_fwd']):>7} | {errs:>24} | "
              f"{sel['rows_differing']:>6}/{sel['bad_rows']:<5} | {'PASS' if r['passed'] else 'FAIL'}")
    for r in not_run:
        print(f"{r['T']:>6} {r['dk']:>3}/{r['dv']:<3} | not run: time budget ({args.budget_s:.0f}s) spent")
    failed = [r for r in rows if not r["passed"]]
    for r in failed:
        print(f"FAIL T={r['T']} dk={r['dk']}: {json.dumps(r['errors'])} selection={r['selection']}")
    print(f"{len(rows) - len(failed)}/{len(rows)} cases pass, {len(not_run)} not run, "
          f"{time.time() - started:.0f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
