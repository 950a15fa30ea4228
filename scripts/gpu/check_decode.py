"""GPU check of the Triton decode step (issue 5): parity with the reference step, then time per
step beside torch SDPA over a dense cache, bytes the step must read and the bandwidth achieved.

    python3 scripts/gpu/check_decode.py --out "$OUT"      # one H100/H200, < 4 minutes

Parity: fp32 at 8k (blocks must match up to ties judged by score), bf16 at 8k and 64k with one
new token per sequence, and bf16 at 8k with a 2-token step (one sequence at 0 new tokens); on
sm_90+ each case's step with programmatic dependent launches (``DecodePlan.pdl``) must equal
ordinary launches bitwise.
Layer step in a CUDA graph: ``NSAAttention.decode_step`` (projections, cache append with masked
compression emission and learned phi, the decode kernels, output projection) at 64k, batch 1
and 32, Dk=Dv=128, HQ=64, HK=4, bf16, d_model 4096: warmed up on a side stream, captured, 16
replays checked against 16 eager steps from the same cache (outputs, blocks, final cache), one
eager step run under ``torch.cuda.set_sync_debug_mode("error")``, then eager and replayed steps
timed over 100 back-to-back steps each.
Timing: contexts 8k..128k, batch 1 and 32, Dk/Dv 128/128 then 192/128 (the second set is cut
when the time budget runs out; those rows say so). Writes ``$OUT/check_decode.json`` and prints
short tables last. Exit status 1 when a parity or layer-graph check fails.

    python3 scripts/gpu/check_decode.py --out "$OUT" --layer-only   # the layer-graph section alone
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from nsa.bench import decode as bench

# Scores within this fraction of a row's best count as tied (float32 kernels vs the float32
# reference scorer; bf16 inputs give near-ties of random keys a few ulps of slack).
TIE_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
# Max |error| over max |reference output| (reference: float32 compute of the same bf16 caches).
OUTPUT_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def run_parity(log) -> tuple[list[dict], bool]:
    cases = [
        (bench.paper_config(128, 128), [8192, 8150, 4133], [1, 1, 1], torch.float32),
        (bench.paper_config(192, 128), [8192, 7001, 6000], [1, 1, 1], torch.bfloat16),
        (bench.paper_config(128, 128), [65536, 65001, 40000], [1, 1, 1], torch.bfloat16),
        (bench.paper_config(192, 128), [8192, 5555, 3000], [2, 1, 0], torch.bfloat16),
    ]
    results, ok = [], True
    for seed, (config, lengths, counts, dtype) in enumerate(cases):
        started = time.time()
        try:
            r = bench.parity(config, lengths, counts, dtype, seed, tie_rtol=TIE_RTOL[dtype])
        except Exception as exc:  # noqa: BLE001 - a crash is a failed check; the timing still runs
            log(f"parity crashed: {traceback.format_exc()}")
            r = {"dtype": str(dtype), "lengths": lengths, "num_new": counts, "error": repr(exc)[:300],
                 "finite": False, "reads_exact": False, "block_mismatch_not_tied": -1, "block_mismatch_heads": -1,
                 "token_heads": 0, "max_abs_err_rel": float("inf")}
            torch.cuda.synchronize()
        r["head_dims"] = f"{config.head_dim}/{config.v_head_dim}"
        r["passed"] = bool(r["finite"] and r["reads_exact"] and r["block_mismatch_not_tied"] == 0
                           and r["max_abs_err_rel"] <= OUTPUT_TOL[dtype]
                           and r.get("pdl_equals_ordinary") is not False)
        ok &= r["passed"]
        log(f"parity {r['dtype']} Dk/Dv={r['head_dims']} lengths={lengths} new={counts}: "
            f"err {r['max_abs_err_rel']:.2e}, block mismatches {r['block_mismatch_heads']}/{r['token_heads']} "
            f"(not ties: {r['block_mismatch_not_tied']}), reads exact {r['reads_exact']}, "
            f"programmatic launches bitwise equal to ordinary: {r.get('pdl_equals_ordinary')} -> "
            f"{'PASS' if r['passed'] else 'FAIL'} [{time.time() - started:.1f}s]")
        results.append(r)
        torch.cuda.empty_cache()
    return results, ok


def run_layer_graph(log, contexts: list[int], batches: list[int], d_model: int) -> tuple[list, bool]:
    """The layer's decode step captured in a CUDA graph at each shape (``bench.layer_step_row``)."""
    rows, ok = [], True
    for context in contexts:
        for batch in batches:
            started = time.time()
            try:
                row = bench.layer_step_row(context, batch, 128, 128, d_model=d_model)
            except Exception as exc:  # noqa: BLE001 - a crash is a failed check; the other shapes still run
                log(f"layer graph crashed at S={context} B={batch}: {traceback.format_exc()}")
                row = bench.LayerStepRow(context, batch, 128, 128, d_model, "mlp", "bfloat16",
                                         note=f"failed: {type(exc).__name__}: {str(exc)[:200]}")
                try:
                    torch.cuda.synchronize()
                except Exception:  # noqa: BLE001 - a poisoned context fails every later shape anyway
                    log(f"CUDA context unusable after the crash: {traceback.format_exc(limit=1)}")
            ok &= row.passed

            def num(value, spec):
                return "-" if value is None else format(value, spec)

            log(f"layer graph S={context} B={batch}: {'PASS' if row.passed else 'FAIL'} (bitwise {row.bitwise}, "
                f"err {num(row.max_abs_err_rel, '.1e')}, block mismatches {row.block_mismatch}, cache equal "
                f"{row.cache_equal}, sync-free {row.sync_free}); eager {num(row.eager_us, '.1f')} us, graph "
                f"{num(row.graph_us, '.1f')} us per step [{time.time() - started:.1f}s] {row.note}")
            rows.append(row)
            torch.cuda.empty_cache()
    return rows, ok


def print_layer_table(rows) -> None:
    if not rows:
        return
    r0 = rows[0]
    print(f"\nlayer decode step (NSAAttention.decode_step, d_model={r0.d_model}, Dk/Dv={r0.head_dim}/{r0.v_head_dim}, "
          f"HQ=64, HK=4, phi={r0.phi}, {r0.dtype}): us per step over back-to-back steps")
    print(f"{'S':>7} {'B':>3} | {'eager us':>9} {'graph us':>9} {'x':>6} | graph == eager ({r0.steps} steps)")
    for r in rows:
        if r.graph_us is None:
            print(f"{r.context:>7} {r.batch:>3} | {r.note}")
            continue
        verdict = ("bitwise" if r.bitwise else f"err {r.max_abs_err_rel:.1e}") if r.passed else f"FAIL {r.note}"
        print(f"{r.context:>7} {r.batch:>3} | {r.eager_us:9.1f} {r.graph_us:9.1f} {r.speedup:6.2f} | {verdict}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for check_decode.json")
    parser.add_argument("--budget-s", type=float, default=160.0,
                        help="no new timing shape starts after this many seconds from launch")
    parser.add_argument("--contexts", default=",".join(map(str, bench.CONTEXTS)))
    parser.add_argument("--batches", default=",".join(map(str, bench.BATCHES)))
    parser.add_argument("--layer-contexts", default="65536", help="contexts of the layer-graph section")
    parser.add_argument("--layer-batches", default="1,32", help="batches of the layer-graph section")
    parser.add_argument("--layer-d-model", type=int, default=bench.LAYER_D_MODEL,
                        help="d_model of the layer whose step is captured")
    parser.add_argument("--layer-only", action="store_true",
                        help="run the layer-graph section only (no kernel parity, no timing sweep)")
    args = parser.parse_args()
    launched = time.time()
    if not torch.cuda.is_available():
        print("check_decode needs a CUDA device", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.time() - launched:6.1f}s] {msg}", flush=True)

    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import triton
    report["triton"] = triton.__version__
    log(f"{report['device']}, torch {report['torch']}, triton {report['triton']}")
    parity, parity_ok = ([], True) if args.layer_only else run_parity(log)
    report["parity"], report["parity_passed"] = parity, parity_ok
    (out / "check_decode.json").write_text(json.dumps(report, indent=1))

    layer_rows, layer_ok = run_layer_graph(log, [int(x) for x in args.layer_contexts.split(",")],
                                           [int(x) for x in args.layer_batches.split(",")], args.layer_d_model)
    report["layer_graph"], report["layer_graph_passed"] = [r.as_dict() for r in layer_rows], layer_ok
    (out / "check_decode.json").write_text(json.dumps(report, indent=1))
    if args.layer_only:
        print_layer_table(layer_rows)
        print(f"total {time.time() - launched:.0f}s; JSON: {out / 'check_decode.json'}")
        return 0 if layer_ok else 1

    rows, copy = bench.measure([int(x) for x in args.contexts.split(",")], [int(x) for x in args.batches.split(",")],
                               bench.HEAD_DIMS, deadline=launched + args.budget_s, log=log)
    report["copy_gbps"] = copy
    report["rows"] = [r.as_dict() for r in rows]
    (out / "check_decode.json").write_text(json.dumps(report, indent=1))

    print(f"\nparity: {'PASS' if parity_ok else 'FAIL'}; copy bandwidth {copy:.0f} GB/s; "
          f"times in us per step (median, L2 flushed), NSA graphed; x = best dense / NSA")
    print(f"{'Dk/Dv':>7} {'S':>7} {'B':>3} | {'nsa us':>8} {'GB/s':>6} {'%copy':>6} | {'best dense':>14} "
          f"{'us':>8} {'GB/s':>6} | {'x':>6} | nsa MB read")
    for r in rows:
        if r.impl != "nsa-triton":
            continue
        if r.us is None:
            print(f"{r.head_dim}/{r.v_head_dim:>3} {r.context:>7} {r.batch:>3} | {r.note}")
            continue
        dense = [d for d in rows if d.impl.startswith("sdpa") and d.us is not None and
                 (d.context, d.batch, d.head_dim, d.v_head_dim) == (r.context, r.batch, r.head_dim, r.v_head_dim)]
        best = min(dense, key=lambda d: d.us) if dense else None
        print(f"{r.head_dim}/{r.v_head_dim:>3} {r.context:>7} {r.batch:>3} | {r.us:8.1f} {r.gbps:6.0f} "
              f"{100 * r.copy_fraction:5.1f}% | {best.impl if best else '-':>14} {best.us if best else 0:8.1f} "
              f"{best.gbps if best else 0:6.0f} | {r.speedup_vs_dense or 0:6.2f} | {r.bytes_read / 1e6:.1f}")
    print_layer_table(layer_rows)
    print(f"total {time.time() - launched:.0f}s; JSON: {out / 'check_decode.json'}")
    return 0 if parity_ok and layer_ok else 1


if __name__ == "__main__":
    sys.exit(main())
