"""Tile-config sweep of the prefill kernels at real sizes, one config at a time (GPU only).

    python scripts/gpu/tune_kernels.py [--seq-lens 8192,65536] [--head-dims 128/128]

Production autotune lists are kept short (every config is one more compile on first use); this
script times a wider list per kernel so that the short lists hold the winners. For each kernel
pass it pins one config (the autotuner then has nothing to choose), times the pass with
``triton.testing.do_bench`` (median, after warm-up) on random data, B=1, HQ/HK from ``--heads``
(default 64/4), bf16, the paper's block sizes, and prints per kernel the configs sorted by time,
marking the ones in the production list (``*``). Compressed attention's dK/dV pass is timed with
the query chunks that config would get (``dkdv_chunk_len`` with that key tile), then the
autotuned pass with its chunks sized for 4-32 waves of programs (``DKDV_WAVES``). The candidates
include each kernel's tile loads through tensor descriptors (``TMA``) and the scoring's merges
of several steps (``MERGE_STEPS``); selection's and the window's query passes run as the Triton
backend launches them where both read one ``k, v`` (selection's forced blocks in the window's
forward and dq); every timed option's output (the forward's and dq's, dk of
dK/dV) is compared with the autotuned choice's, and the top-n lists with its. Details go to
``$OUT/tune_kernels_<families>_<lengths>_<heads>.json``. ``--smoke`` runs the plumbing on CPU
under ``TRITON_INTERPRET=1`` at T=200 (no meaningful times).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nsa.ops.compressed_attention import triton as cmp_triton  # noqa: E402
from nsa.ops.selected_attention import triton as sel_triton  # noqa: E402
from nsa.ops.selection import triton as select_triton  # noqa: E402
from nsa.ops.triton_common import softmax_delta  # noqa: E402
from nsa.ops.window_attention import triton as win_triton  # noqa: E402

BLOCK, STRIDE, SELECT_BLOCK, COUNT, WINDOW = 32, 16, 64, 16, 512

def _tiles(configs) -> list[tuple]:
    """``(BLOCK_M, BLOCK_N, warps, stages[, maxnreg][, {"TMA": True}])`` of ``triton.Config`` objects."""
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages,
             *([c.maxnreg] if c.maxnreg else []), *([{"TMA": True}] if c.kwargs.get("TMA") else []))
            for c in configs]


# The production lists, read from the kernels' modules (before any pinning below changes them).
# Tuples are (BLOCK_M, BLOCK_N, warps, stages) for the compressed-attention and scoring kernels,
# (rows, warps, stages[, constexprs]) for the GroupTunedKernel ones (selection and window).
PRODUCTION = {
    "cmp-fwd": _tiles(cmp_triton._FWD_CONFIGS), "cmp-dkdv": _tiles(cmp_triton._DKDV_CONFIGS),
    "cmp-dq": _tiles(cmp_triton._DQ_CONFIGS), "select": _tiles(select_triton._select_tuned.configs),
    "sel-fwd": list(sel_triton._query_kernel.options), "sel-dq": list(sel_triton._query_kernel.options),
    "sel-dkdv": list(sel_triton._dkdv_kernel.options), "win-fwd": list(win_triton._query_kernel.options),
    "win-dq": list(win_triton._query_kernel.options), "win-dkdv": list(win_triton._dkdv_kernel.options),
    "cmp-dkdv-waves": [f"waves={cmp_triton.DKDV_WAVES}"],
}
# Programs with work per SM that compressed attention's dK/dV chunks aim at (DKDV_WAVES): fewer
# waves mean longer chunks and fewer float32 partials, more an evener grid.
DKDV_WAVE_CANDIDATES = (4, 8, 16, 32)
# The candidates the kernels' modules keep beside their autotune lists (timed, not adopted:
# compressed attention's TMA dK/dV tiles, the scoring's other TMA and merge configs);
# ``--module-candidates-only`` sweeps these beside the production lists and nothing else.
MODULE_CANDIDATES = {
    "cmp-fwd": [], "cmp-dq": [], "win-query": [],
    "cmp-dkdv": cmp_triton.DKDV_TMA_TILES,
    "select": [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages,
                *([c.maxnreg] if c.maxnreg else []),
                {k: c.kwargs[k] for k in ("TMA", "MERGE_STEPS") if k in c.kwargs})
               for c in select_triton.SELECT_CANDIDATES],
}
# Candidates timed beside them (the lists of the 2026-11-29 sweep, whose winners now lead the
# production lists).
CANDIDATES = {
    "cmp-fwd": [(128, 64, 8, 2), (128, 128, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3)],
    "cmp-dkdv": [(128, 32, 8, 2), (64, 128, 8, 2), (32, 64, 4, 2), (64, 128, 8, 4), (128, 128, 8, 2),
                 *MODULE_CANDIDATES["cmp-dkdv"]],
    "cmp-dq": [(128, 32, 8, 2), (128, 128, 8, 3), (256, 64, 8, 2)],
    # A fifth entry caps registers per thread (Config.maxnreg): 143 registers x 256 threads
    # leave one program per SM, and the kernel's steps are a serial chain (dot, exp, dot, merge,
    # barrier) that only a second program can overlap. BLOCK_M sets the positions per tile
    # (BLOCK_M // G), above MAX_POSITIONS too.
    "select": [(64, 64, 4, 1, 96), (64, 64, 4, 1, 128), (64, 64, 4, 2, 96), (64, 64, 4, 3, 128),
               (64, 128, 4, 2, 128), (64, 128, 4, 2, 168), (128, 128, 8, 2, 128), (64, 32, 4, 2, 128),
               (32, 64, 4, 2, 128), (256, 64, 8, 2, 128), *MODULE_CANDIDATES["select"]],
    "sel-query": [(16, 2, 3), (16, 1, 2), (16, 1, 3), *sel_triton.TMA_OPTIONS],
    "sel-dkdv": [(32, 4, 2), (128, 4, 2), (32, 8, 2, {"KEYS_AS_M": True}), (64, 4, 3, {"KEYS_AS_M": True}),
                 (16, 4, 2, {"KEYS_AS_M": True}), (64, 8, 1, {"KEYS_AS_M": True})],
    "win-query": [(64, 4, 3, {"BN": 32}), (32, 4, 2), (64, 2, 2), (64, 4, 2, {"BN": 128}),
                  (128, 8, 2, {"BN": 128}), (128, 8, 3, {"BN": 128}), (256, 8, 2)],
    # Key tiles of 128: the M of the dK/dV dots (Hopper's warp-group MMA wants M >= 64; the
    # compressed-attention dK/dV pass gained 1.8x from the same change).
    # Keys as the M of the dots (KEYS_AS_M): two of them lead the production list since the
    # fourteenth session's sweep (docs/PERFORMANCE.md); these are the others.
    "win-dkdv": [(16, 4, 2), (32, 4, 3), (64, 4, 2, {"KEYS_AS_M": True}), (32, 4, 2, {"KEYS_AS_M": True}),
                 (16, 4, 2, {"KEYS_AS_M": True}), (64, 8, 2, {"KEYS_AS_M": True, "BN": 128}),
                 (32, 8, 2, {"KEYS_AS_M": True, "BN": 128}), (128, 8, 2, {"BN": 128})],
}


def sweep_list(production: str, candidates: str) -> list[tuple]:
    """The production configs, then the candidates not already among them."""
    first = PRODUCTION[production]
    return first + [c for c in CANDIDATES[candidates] if c not in first]


CMP_FWD = sweep_list("cmp-fwd", "cmp-fwd")
CMP_DKDV = sweep_list("cmp-dkdv", "cmp-dkdv")
CMP_DQ = sweep_list("cmp-dq", "cmp-dq")
SELECT = sweep_list("select", "select")
SEL_QUERY = sweep_list("sel-fwd", "sel-query")
SEL_DKDV = sweep_list("sel-dkdv", "sel-dkdv")
WIN_QUERY = sweep_list("win-fwd", "win-query")
WIN_DKDV = sweep_list("win-dkdv", "win-dkdv")


DEVICE = "cpu" if "--smoke" in sys.argv else "cuda"


def bench_ms(fn) -> float:
    fn()
    if DEVICE == "cpu":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def cmp_config(*tile, pre_hook=cmp_triton.set_kv_tile_rows):
    """The autotune config of a ``(BLOCK_M, BLOCK_N, warps, stages[, constexprs])`` tile of a
    compressed-attention kernel (``pre_hook``: its descriptors' sizing, as in its production list)."""
    return cmp_triton.group_configs([tile], pre_hook=pre_hook)[0]


def dkdv_config(*tile):
    return cmp_config(*tile, pre_hook=cmp_triton.set_query_tile_rows)


def timed(results, kernel, label, fn):
    try:
        ms = bench_ms(fn)
    except Exception as exc:  # a config that does not compile or fit is reported, not fatal
        ms = None
        print(f"  {kernel} {label}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
    results.append({"kernel": kernel, "config": label, "ms": ms})
    print(f"  {kernel:9} {label:28} {'-' if ms is None else f'{ms:8.3f}'} ms", flush=True)
    return ms


def timed_and_compared(results, kernel, label, fn, want, check=None):
    """:func:`timed`, then the largest difference of ``fn``'s result (its first tensor; ``check``'s
    when given: ``fn`` on fresh inputs where it overwrites its own) to ``want``, the autotuned
    choice's: every option computes the same function, so this is bf16 rounding of another
    summation order at most."""
    if timed(results, kernel, label, fn) is not None:
        got = (check or fn)()
        got = got[0] if isinstance(got, tuple) else got
        results[-1]["max_abs_diff"] = (got.float() - want.float()).abs().max().item()
        print(f"  {'':9} {'':28} max abs difference to the autotuned choice {results[-1]['max_abs_diff']:.2e}",
              flush=True)


def sweep(seq_len, dk, dv, results, only, hq=64, hk=4):
    torch.manual_seed(0)
    dev, dt = DEVICE, (torch.float32 if DEVICE == "cpu" else torch.bfloat16)
    group = hq // hk
    n_cmp = (seq_len - BLOCK) // STRIDE + 1
    q = torch.randn(1, seq_len, hq, dk, device=dev, dtype=dt)
    k = torch.randn(1, seq_len, hk, dk, device=dev, dtype=dt)
    v = torch.randn(1, seq_len, hk, dv, device=dev, dtype=dt)
    kc = torch.randn(1, n_cmp, hk, dk, device=dev, dtype=dt)
    vc = torch.randn(1, n_cmp, hk, dv, device=dev, dtype=dt)
    do = torch.randn(1, seq_len, hq, dv, device=dev, dtype=dt)
    scale = dk ** -0.5
    # One token (the summary groups rows by the label's first two).
    tag = f"T={seq_len} {dk}/{dv}" + ("" if (hq, hk) == (64, 4) else f":{hq}/{hk}")

    # Compressed attention.
    o, lse = cmp_triton.compressed_attention_forward(q, kc, vc, BLOCK, STRIDE, scale)
    cmp_delta = softmax_delta(o, do, None)
    for cfg in CMP_FWD if "cmp" in only or "cmp-query" in only else []:
        with cmp_triton._cmp_fwd_tuned.only(cmp_config(*cfg)):
            timed_and_compared(results, "cmp-fwd", f"{tag} {cfg}",
                               lambda: cmp_triton.compressed_attention_forward(q, kc, vc, BLOCK, STRIDE, scale), o)
    def cmp_dkdv():
        return cmp_triton.compressed_attention_backward_dkdv(q, kc, vc, lse, do, cmp_delta, BLOCK, STRIDE, scale)
    cmp_dk = cmp_dkdv()
    for cfg in CMP_DKDV if "cmp" in only or "cmp-dkdv" in only else []:
        chunks = functools.partial(cmp_triton.dkdv_chunk_len, key_tile=cfg[1])
        with (mock.patch.object(cmp_triton, "dkdv_chunk_len", chunks),
              cmp_triton._cmp_bwd_dkdv_tuned.only(dkdv_config(*cfg))):
            # The dK/dV pass alone (its dk compared).
            timed_and_compared(results, "cmp-dkdv", f"{tag} {cfg}", cmp_dkdv, cmp_dk[0])
    for waves in DKDV_WAVE_CANDIDATES if "cmp" in only or "cmp-dkdv" in only else []:
        # The autotuned dK/dV pass with chunks sized for this many waves (its dk compared).
        with mock.patch.object(cmp_triton, "DKDV_WAVES", waves):
            timed_and_compared(results, "cmp-dkdv-waves", f"{tag} waves={waves}", cmp_dkdv, cmp_dk[0])
    with cmp_triton._cmp_bwd_dkdv_tuned.only(dkdv_config(*CMP_DKDV[0])):
        cmp_dq = cmp_triton.compressed_attention_backward_dq(q, kc, vc, lse, do, cmp_delta, BLOCK, STRIDE, scale)
        for cfg in CMP_DQ if "cmp" in only or "cmp-query" in only else []:
            with cmp_triton._cmp_bwd_dq_tuned.only(cmp_config(*cfg)):
                # The dq pass alone (the dK/dV pass is the same in every row).
                timed_and_compared(results, "cmp-dq", f"{tag} {cfg}",
                                   lambda: cmp_triton.compressed_attention_backward_dq(
                                       q, kc, vc, lse, do, cmp_delta, BLOCK, STRIDE, scale), cmp_dq)

    # Block scoring + top-n.
    def select():
        return select_triton.select_blocks_triton(q, kc, lse, block=BLOCK, stride=STRIDE,
                                                  select_block=SELECT_BLOCK, select_count=COUNT)

    chosen = select()  # the production lists' autotuned choice: every pinned config must agree
    for m, n, w, s, *rest in SELECT if "select" in only else []:
        # One config: the autotuner skips its prune hook, so derive the tiles here. ``rest``: a
        # register cap (int) and/or constexprs (dict: TMA).
        cap = next((x for x in rest if isinstance(x, int)), None)
        extra = next((x for x in rest if isinstance(x, dict)), {})
        positions = max(select_triton.MAX_POSITIONS, m // group)
        tiles = select_triton.selection_tiles(m, n, group_pow2=triton.next_power_of_2(group),
                                              max_positions=positions, block=BLOCK, stride=STRIDE,
                                              select_block=SELECT_BLOCK, count_pow2=COUNT)
        label = f"{tag} {(m, n, w, s, *rest)}"
        with select_triton._select_tuned.only(triton.Config({**tiles, "TMA": False, "MERGE_STEPS": 1, **extra},
                                                            num_warps=w,
                                                            num_stages=s, maxnreg=cap,
                                                            pre_hook=select_triton.set_key_tile_rows)):
            if timed(results, "select", label, select) is not None:
                # Rows whose chosen blocks differ (Eq. 9 sums in another order may flip a tie).
                results[-1]["rows_differing"] = int((select() != chosen).any(-1).sum())
                print(f"  {'':9} {label:28} rows differing from the autotuned choice: "
                      f"{results[-1]['rows_differing']}", flush=True)
    idx = chosen.to(torch.int32).contiguous()

    # Selection and window as the Triton backend runs them where both read one k, v (nsa_attention's
    # default): selection's forced blocks in the window's forward and dq passes, selection's walks
    # over the blocks it chose (nsa.ops.triton_nsa.shared_kv_forward, shared_kv_backward).
    wo, wlse, forced_o, forced_lse = win_triton._query_pass(q, k, v, WINDOW, scale, forced_block=SELECT_BLOCK)
    # Selection's forward completes the forced blocks' softmax in place: timed on one copy (its
    # walk does not depend on the values it starts from), compared from a fresh one.
    timed_partial = (forced_o.clone(), forced_lse.clone())

    def sel_forward(partial=timed_partial):
        return sel_triton._query_pass(q, k, v, idx, scale, SELECT_BLOCK, forced=partial)

    def sel_forward_fresh():
        return sel_forward((forced_o.clone(), forced_lse.clone()))

    def sel_dq_pass():
        return sel_triton._query_pass(q, k, v, idx, scale, SELECT_BLOCK, lse=slse, do=do, delta=delta,
                                      skip_forced=True)

    so, slse = sel_forward_fresh()
    delta = softmax_delta(so, do, None)
    sel_dq = sel_dq_pass()
    for option in SEL_QUERY if "sel" in only or "sel-query" in only else []:
        with sel_triton._query_kernel.only(option):
            timed_and_compared(results, "sel-fwd", f"{tag} {option}", sel_forward, so,
                               check=sel_forward_fresh)
            timed_and_compared(results, "sel-dq", f"{tag} {option}", sel_dq_pass, sel_dq)
    for option in SEL_DKDV if "sel" in only else []:
        with sel_triton._dkdv_kernel.only(option):
            timed(results, "sel-dkdv", f"{tag} {option}",
                  lambda: sel_triton._dkdv_pass(q, k, v, idx, do, slse, delta, scale, SELECT_BLOCK))

    # Sliding window (with selection's forced blocks, as above).
    wdelta = softmax_delta(wo, do, None)
    forced = win_triton.SelectionForcedBlocks(slse, delta, SELECT_BLOCK)

    def win_forward():
        return win_triton._query_pass(q, k, v, WINDOW, scale, forced_block=SELECT_BLOCK)

    def win_dq_pass():
        return win_triton._query_pass(q, k, v, WINDOW, scale, lse=wlse, do=do, delta=wdelta, forced=forced)

    win_dq = win_dq_pass()
    for option in WIN_QUERY if "win" in only or "win-query" in only else []:
        with win_triton._query_kernel.only(option):
            timed_and_compared(results, "win-fwd", f"{tag} {option}", win_forward, wo)
            timed_and_compared(results, "win-dq", f"{tag} {option}", win_dq_pass, win_dq)
    for option in WIN_DKDV if "win" in only else []:
        with win_triton._dkdv_kernel.only(option):
            timed(results, "win-dkdv", f"{tag} {option}",
                  lambda: win_triton._dkdv_pass(q, k, v, do, wlse, wdelta, WINDOW, scale))


# Decode-plan variants, each a change from the default plan (the first, empty one): programmatic
# dependent launches, programs per branch in multiples of the SM count, key tile, warps of the
# range/select kernels, pipeline depth of their key loops, warps of the combine kernel and its
# programs per query head (Dv slices, its warps sized by plan_decode; the default plan takes 8
# at batch 1), the window splits on a side stream, the select kernel's top-n method (one of the
# two is the default plan's), the fused scoring's tiles per program, the select kernel's programs
# per token group.
DECODE_VARIANTS = [{}, {"pdl": True}, {"programs": 8}, {"programs": 2}, {"block_n": 128}, {"num_warps": 8},
                   {"num_stages": 2}, {"num_stages": 4}, {"combine_warps": 1}, {"combine_warps": 2},
                   {"combine_columns": 1}, {"combine_columns": 2}, {"combine_columns": 4},
                   {"num_stages": 4, "combine_warps": 1},
                   {"programs": 8, "num_stages": 4, "combine_warps": 1},
                   {"programs": 2, "window_overlap": "compressed"},
                   {"programs": 2, "window_overlap": "scoring"},
                   {"top_n": "bitonic"}, {"top_n": "max-removal"},
                   {"score_steps": 1}, {"score_steps": 4}, {"score_steps": 8}, {"select_splits": 1},
                   {"select_splits": 2}]


PLAN_DECODE_ARGS = ("block_n", "combine_columns", "top_n", "score_steps", "select_splits")


def sweep_decode(context, dk, dv, results):
    """The decode step (CUDA graph) at batch 1 and 32 under the plan variants of DECODE_VARIANTS,
    with a per-kernel breakdown of the default plan."""
    import dataclasses

    from nsa.bench import decode as decode_bench
    from nsa.ops.decode.triton import nsa_decode_triton, plan_decode

    config = decode_bench.paper_config(dk, dv)
    dt = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else 1
    # (On the CPU, the default plan and one with more programs: the interpreter has no PDL.)
    variants = DECODE_VARIANTS[:1] + DECODE_VARIANTS[2:3] if DEVICE == "cpu" else DECODE_VARIANTS
    for batch in (1, 32):
        cache = decode_bench.filled_cache(config, batch, context, dt, device=DEVICE)
        q = torch.randn(batch, 1, config.num_heads, dk, dtype=dt, device=DEVICE)
        gates = torch.rand(batch, 1, config.num_heads, 3, dtype=dt, device=DEVICE)
        num_new = torch.ones(batch, dtype=torch.int64, device=DEVICE)
        rows = batch * config.num_kv_heads
        for variant in variants:
            changes = dict(variant)
            programs = changes.pop("programs", 4) * sms
            # plan_decode's own arguments go to it (the plan follows them), the rest replace fields.
            plan_args = {name: changes.pop(name) for name in PLAN_DECODE_ARGS if name in changes}
            plan = plan_decode(config, rows, cache.max_len, target_programs=programs, **plan_args)
            plan = dataclasses.replace(plan, **changes)

            def step(plan=plan):
                return nsa_decode_triton(q, cache.k_cmp, cache.v_cmp, cache.k_slc, cache.v_slc, cache.k_win,
                                         cache.v_win, gates, cache.lengths, config, num_new=num_new,
                                         plan=plan, check_values=False)
            label = (f"T={context} B={batch} {dk}/{dv} (bn {plan.block_n}, warps {plan.num_warps}, "
                     f"stages {plan.num_stages}, combine {plan.combine_warps}, programs {programs}, "
                     f"window {plan.window_overlap}, pdl {plan.pdl}, columns {plan.combine_columns}, "
                     f"top-n {plan.top_n}, score steps {plan.score_steps}, select splits {plan.slc_splits})")
            if DEVICE == "cpu":
                timed(results, "decode", label, step)
                continue
            try:
                fn, _, _ = decode_bench.graphed(step)
            except Exception as exc:  # noqa: BLE001 - a variant that does not compile is reported
                print(f"  decode {label}: failed: {type(exc).__name__}: {str(exc)[:100]}")
                continue
            timed(results, "decode", label, fn)
            if not variant:
                try:
                    results[-1]["kernels_us"] = kernel_breakdown(step, label)
                except Exception as exc:  # noqa: BLE001 - a profiler problem must not end the sweep
                    print(f"  kernels of {label}: profiler failed: {type(exc).__name__}: {exc}")


def kernel_breakdown(fn, label: str) -> dict[str, float]:
    """Mean device time per launch of each kernel ``fn`` runs (eager, under torch.profiler), us."""
    from nsa.bench import decode as decode_bench

    times = decode_bench.kernel_times_us(fn)
    print(f"  kernels of {label} (eager, mean us per step): {decode_bench.format_kernel_times(times)}", flush=True)
    return times


def summary(results):
    print("\nbest config per kernel and shape (* = in the production list)")
    print(f"{'kernel':14} {'shape':18} {'best':34} {'ms':>8} {'prod best':>10} {'gain':>6}")
    keys = sorted({(r["kernel"], " ".join(r["config"].split(" ")[:3 if r["kernel"] == "decode" else 2]))
                   for r in results})
    for kernel, shape in keys:
        rows = [r for r in results if r["kernel"] == kernel and r["config"].startswith(shape + " ") and r["ms"]]
        if not rows:
            continue
        best = min(rows, key=lambda r: r["ms"])
        prod_key = kernel
        if prod_key == "decode":
            prod = rows[:1]  # the first variant is the default plan
        else:
            prod = [r for r in rows if any(r["config"].endswith(str(c)) for c in PRODUCTION[prod_key])]
        prod_ms = min(r["ms"] for r in prod) if prod else float("nan")
        mark = "*" if best in prod else " "
        cfg = best["config"][len(shape) + 1:]
        print(f"{kernel:14} {shape:18} {mark}{cfg:33} {best['ms']:8.3f} {prod_ms:10.3f} {prod_ms / best['ms']:6.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", default="65536,8192")
    parser.add_argument("--head-dims", default="128/128")
    parser.add_argument("--heads", default="64/4", help="comma list of query heads / key-value heads")
    parser.add_argument("--only", default="cmp,select,sel,win",
                        help="kernel families: cmp (compressed attention), cmp-query (its forward and dq "
                             "only), cmp-dkdv (its dK/dV pass only), select (scoring + top-n), sel (selection "
                             "attention), sel-query (its forward and dq only), win (window), win-query (its "
                             "forward and dq only), decode (the decode step, batch 1 and 32, context = each "
                             "--seq-lens value)")
    parser.add_argument("--module-candidates-only", action="store_true",
                        help="sweep the production lists and the candidates the kernels' modules keep "
                             "(MODULE_CANDIDATES) only, not the earlier sweeps' other configs")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (TRITON_INTERPRET=1): checks the script")
    args = parser.parse_args()
    if args.module_candidates_only:
        for name, configs in (("cmp-fwd", CMP_FWD), ("cmp-dkdv", CMP_DKDV), ("cmp-dq", CMP_DQ),
                              ("select", SELECT), ("win-fwd", WIN_QUERY)):
            kept = PRODUCTION[name] + MODULE_CANDIDATES["win-query" if name == "win-fwd" else name]
            configs[:] = [c for c in configs if c in kept]
    if args.smoke:
        args.seq_lens = "200"
        for configs in (CMP_FWD, CMP_DKDV, CMP_DQ, SEL_QUERY, SEL_DKDV, WIN_QUERY, WIN_DKDV, SELECT):
            del configs[2:]
    print(torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (interpreter)", "torch", torch.__version__,
          "triton", triton.__version__)
    results = []
    for dims in args.head_dims.split(","):
        dk, dv = (int(x) for x in dims.split("/"))
        for seq_len in (int(x) for x in args.seq_lens.split(",")):
            print(f"T={seq_len} Dk/Dv={dk}/{dv}", flush=True)
            if "decode" in args.only.split(","):
                sweep_decode(seq_len, dk, dv, results)
            if set(args.only.split(",")) - {"decode"}:
                for heads in args.heads.split(","):
                    hq, hk = (int(x) for x in heads.split("/"))
                    sweep(seq_len, dk, dv, results, args.only.split(","), hq, hk)
    if os.environ.get("OUT"):
        # Named by the run's families and lengths, so that several runs in one command all come back.
        name = (f"tune_kernels_{args.only.replace(',', '-')}_{args.seq_lens.replace(',', '-')}"
                f"_{args.heads.replace('/', 'x').replace(',', '-')}.json")
        Path(os.environ["OUT"], name).write_text(json.dumps(results, indent=1))
    summary(results)


if __name__ == "__main__":
    main()
