"""Compile every prefill Triton kernel config for an NVIDIA target without a GPU, and report what
the compiler made of it: registers, spill bytes, shared memory and asynchronous copies.

    python -m nsa.ops.compile_check [--head-dims 128/128,192/128] [--groups 16,4] [--dtype bf16]
        [--arch 90] [--json] [--candidates]

The interpreter, which runs the kernels in CI, cannot see how a kernel compiles; these numbers
are the evidence a CPU machine can give of a fast path's health on the GPU: a loop whose loads
Triton software-pipelines compiles to asynchronous copies (none: every load waits out its
latency, as the selection walk's did until 2026-12-05), and spills cost memory traffic. Every
config of each kernel's autotune list is built as a launch with contiguous inputs specialises it
(:func:`nsa.ops.offline_compile.compile_as_launched`), at the paper's block sizes (l=32, d=16,
l'=64, n=16, w=512). The decode kernels have their own check, :mod:`nsa.ops.decode.compile_check`.

Must run with ``TRITON_INTERPRET`` unset (the kernels must be defined as compiled kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass

# "-forced": the forward and dq passes as they run where selection and window read one key/value
# tensor (selection's without its forced blocks, the window's with them; nsa.ops.triton_nsa).
KERNELS = ("compressed-fwd", "compressed-dkdv", "compressed-dq", "selection-scoring", "selected-fwd",
           "selected-fwd-forced", "selected-dq", "selected-dq-forced", "selected-dkdv", "window-fwd",
           "window-fwd-forced", "window-dq", "window-dq-forced", "window-dkdv")
# Pointer arguments by name, across the kernels' naming conventions; every other argument is an
# int32 unless it is a float scale or a constexpr.
DATA_POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "q", "k", "v", "o", "do", "dq", "dk", "dv", "o_b"}
FP32_POINTERS = {"LSE", "DELTA", "DK_PART", "DV_PART", "lse", "delta", "dk_part", "dv_part", "lse_b",
                 "delta_b"}
INT32_POINTERS = {"idx", "qpos", "item_group", "item_start", "item_len", "group_items"}
INT64_POINTERS = {"OUT"}
FLOATS = {"qk_scale", "scale"}
# Strides of the head axis of [B, T, H, D] tensors need no alignment hint (H may be any size);
# the other strides are multiples of 16 elements at the supported head dims.
UNALIGNED = {"slh", "stride_lh", "scale", "qk_scale"}


@dataclass(frozen=True)
class CompiledConfig:
    """What one autotune config of one kernel compiled to."""

    kernel: str
    dk: int
    dv: int
    group: int
    config: str
    num_warps: int
    num_stages: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    async_copies: int


def _aligned(arg: str) -> bool:
    """Strides (``s...``/``stride_...``) get the divisible-by-16 hint, but for :data:`UNALIGNED`."""
    return arg.startswith("s") and arg not in UNALIGNED


def _signature(fn, constexprs: dict, dtype: str) -> dict[str, str]:
    from nsa.ops.offline_compile import launch_signature

    pointers = {**{n: f"*{dtype}" for n in DATA_POINTERS}, **{n: "*fp32" for n in FP32_POINTERS},
                **{n: "*i32" for n in INT32_POINTERS}, **{n: "*i64" for n in INT64_POINTERS}}
    # Key/value tensor descriptors of [1, rows, 1, cols] boxes with TMA, else unused (the
    # launchers pass the tensors in their place): selection's query kernel, compressed attention's
    # forward and dq.
    if "TMA" in constexprs:
        c = constexprs
        if "k_desc_a" in fn.arg_names:  # selection's and the window's query walks: key/value tiles
            rows = f"1,{c['BN'] if 'BN' in c else c['BS']},1"  # the window's tiles, selection's blocks
            boxes = {"k_desc_a": (rows, c["DK_A"]), "k_desc_b": (rows, max(c["DK_B"], 16)),
                     "v_desc": (rows, c["DV_PAD"])}
        elif "Q_DESC_A" in fn.arg_names:  # compressed attention's dK/dV: query tiles
            rows = f"1,{c['BLOCK_M'] // c['GP']},{c['GP']}"
            boxes = {"Q_DESC_A": (rows, c["DKA"]), "Q_DESC_B": (rows, max(c["DKB"], 16)),
                     "DO_DESC": (rows, c["DVP"])}
        else:  # compressed attention's forward and dq (keys and values), the scoring (keys)
            rows = f"1,{c['BLOCK_N']},1"
            boxes = {"K_DESC_A": (rows, c["DKA"]), "K_DESC_B": (rows, max(c["DKB"], 16))}
            if "V_DESC" in fn.arg_names:
                boxes["V_DESC"] = (rows, c["DVP"])
        pointers.update({name: (f"tensordesc<{dtype}[{rows},{cols}]>" if c["TMA"] else f"*{dtype}")
                         for name, (rows, cols) in boxes.items()})
    return launch_signature(fn, constexprs, pointers, FLOATS)


def _builds(dk: int, dv: int, group: int, dtype: str, candidates: bool = False):
    """``(kernel name, jit function, constexprs, triton.Config)`` for every production config,
    and with ``candidates`` for every one ``scripts/gpu/tune_kernels.py`` sweeps beside them (TMA
    loads, the scoring's merges of several steps)."""
    from nsa.ops.compressed_attention import triton as cmp
    from nsa.ops.selected_attention import triton as sel
    from nsa.ops.selection import triton as scoring
    from nsa.ops.triton_common import GroupTunedKernel, split_dim
    from nsa.ops.window_attention import triton as win

    precision = "ieee" if dtype == "fp32" else "tf32"
    gp = cmp.pow2(group)
    dka, dkb = split_dim(dk)
    blocks = {"BLOCK": 32, "STRIDE": 16}
    cmp_consts = {"G": group, "GP": gp, **blocks, "DK": dk, "DV": dv, "DKA": dka, "DKB": dkb,
                  "DVP": cmp.pow2(dv), "PRECISION": precision}
    def swept(production: list, candidates_of_list: list) -> list:
        return production + ([c for c in candidates_of_list if c not in production] if candidates else [])

    # The compressed dq pass as the Triton backend launches it: the first dq, written (DQ_ADD off).
    dkdv_tma = cmp.group_configs(cmp.DKDV_TMA_TILES, pre_hook=cmp.set_query_tile_rows)
    for name, kernel, configs, extra in (
            ("compressed-fwd", cmp._cmp_fwd_kernel,
             swept(cmp._FWD_CONFIGS, cmp.group_configs(cmp.FWD_TMA_TILES)), {}),
            ("compressed-dkdv", cmp._cmp_bwd_dkdv_kernel, swept(cmp._DKDV_CONFIGS, dkdv_tma), {}),
            ("compressed-dq", cmp._cmp_bwd_dq_kernel,
             swept(cmp._DQ_CONFIGS, cmp.group_configs(cmp.DQ_TMA_TILES)), {"DQ_ADD": False})):
        for config in cmp.prune_group_rows(configs, cmp_consts):
            yield name, kernel, {**cmp_consts, **extra, **config.kwargs}, config
    select_consts = {"G": group, "GP": gp, **blocks, "SELECT_BLOCK": 64, "COUNT": 16, "NP": 16, "DK": dk,
                     "DKA": dka, "DKB": dkb, "PRECISION": precision, "MAX_POSITIONS": scoring.MAX_POSITIONS}
    select_configs = swept(scoring._SELECT_CONFIGS, scoring.SELECT_CANDIDATES)
    for config in scoring._prune_selection(select_configs, select_consts):
        yield "selection-scoring", scoring._select_kernel, {**select_consts, **config.kwargs}, config
    rows_consts = {"HK": 4, "G": group, "DK": dk, "DV": dv, "DK_A": dka, "DK_B": dkb,
                   "DV_PAD": cmp.pow2(dv), "PREC": precision}
    n_pad = 16
    union = sel.UNION_ENTRIES // n_pad  # the query kernel's position cap, as _query_pass sets it
    # The dq passes as the Triton backend launches them: adding to compressed attention's dq.
    forward, dq_pass = {"BACKWARD": False, "DQ_ADD": False}, {"BACKWARD": True, "DQ_ADD": True}
    sel_q, win_q = {"BS": 64, "N_PAD": n_pad, "SKIP_FORCED": False}, {"SECOND": False, "BS": 16}
    for name, tuned, extra, max_positions in (
            ("selected-fwd", sel._query_kernel, {**sel_q, **forward}, union),
            ("selected-fwd-forced", sel._query_kernel, {**sel_q, **forward, "SKIP_FORCED": True}, union),
            ("selected-dq", sel._query_kernel, {**sel_q, **dq_pass}, union),
            ("selected-dq-forced", sel._query_kernel, {**sel_q, **dq_pass, "SKIP_FORCED": True}, union),
            ("selected-dkdv", sel._dkdv_kernel, {"BS": 64}, None),
            ("window-fwd", win._query_kernel, {**win_q, **forward}, None),
            ("window-fwd-forced", win._query_kernel, {**forward, "SECOND": True, "BS": 64}, None),
            ("window-dq", win._query_kernel, {**win_q, **dq_pass}, None),
            ("window-dq-forced", win._query_kernel, {**dq_pass, "SECOND": True, "BS": 64}, None),
            ("window-dkdv", win._dkdv_kernel, {"ADD": False}, None)):
        options = swept(tuned.options, {sel._query_kernel: sel.TMA_OPTIONS,
                                        win._query_kernel: win.TMA_OPTIONS}.get(tuned, []))
        listed = GroupTunedKernel(tuned.kernel, options, tuned.key, tuned.extra)
        for config in listed.configs(group, max_positions):
            yield name, tuned.kernel, {**rows_consts, **extra, **config.kwargs}, config


def audit(head_dims: list[tuple[int, int]], groups: list[int], *, dtype: str = "bf16", arch: int = 90,
          kernels: tuple[str, ...] = KERNELS, candidates: bool = False) -> list[CompiledConfig]:
    """Every config of ``kernels`` compiled for ``sm_<arch>`` at each head dim pair and group size
    (with ``candidates`` also those the tile sweep times beside the autotune lists)."""
    from nsa.ops.offline_compile import async_copies, compile_as_launched, resource_usage
    from nsa.ops.triton_common import describe_config

    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown:
        raise ValueError(f"kernels: unknown {unknown}; known: {', '.join(KERNELS)}")
    rows = []
    for dk, dv in head_dims:
        for group in groups:
            for name, fn, constexprs, config in _builds(dk, dv, group, dtype, candidates):
                if name not in kernels:
                    continue
                compiled = compile_as_launched(
                    fn, _signature(fn, constexprs, dtype), constexprs, arch=arch, num_warps=config.num_warps,
                    num_stages=config.num_stages, aligned=_aligned, maxnreg=config.maxnreg)
                registers, spill = resource_usage(compiled) or (-1, -1)
                rows.append(CompiledConfig(name, dk, dv, group, describe_config(config), config.num_warps,
                                           config.num_stages, registers, spill, compiled.metadata.shared,
                                           async_copies(compiled)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dims", default="128/128,192/128", help="comma list of Dk/Dv")
    parser.add_argument("--groups", default="16,4", help="comma list of query heads per kv head")
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"comma list of {', '.join(KERNELS)}")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    parser.add_argument("--candidates", action="store_true",
                        help="also the configs scripts/gpu/tune_kernels.py sweeps beside the autotune lists")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the kernels must be compiled kernels", file=sys.stderr)
        return 2
    dims = [tuple(int(x) for x in pair.split("/")) for pair in args.head_dims.split(",")]
    groups = [int(g) for g in args.groups.split(",")]
    try:
        rows = audit(dims, groups, dtype=args.dtype, arch=args.arch, kernels=tuple(args.kernels.split(",")),
                     candidates=args.candidates)
    except ValueError as exc:
        parser.error(str(exc))
    report(rows, as_json=args.json)
    return 0


def report(rows: list[CompiledConfig], *, as_json: bool = False) -> None:
    """Print ``rows``: an aligned line each, or one JSON object per line."""
    for row in rows:
        if as_json:
            print(json.dumps(asdict(row)), flush=True)
        else:
            print(f"{row.kernel:18} {row.dk}/{row.dv} G={row.group:<2} {row.config:40} "
                  f"regs={row.registers:<3} spill={row.spill_bytes:<4} shared={row.shared_bytes:<6} "
                  f"async_copies={row.async_copies}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
