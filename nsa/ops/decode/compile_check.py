"""Compile the decode kernels for an NVIDIA target without a GPU (Triton's bundled ptxas).

The CPU interpreter runs kernels as NumPy and misses compiled-mode errors (loop-carried type
changes, unsupported ops, register spills). This builds every decode kernel with the constants
and warps a real step uses and reports each one's registers, spill stack and asynchronous copies
(a loop whose loads Triton software-pipelines has some; none means every load waits)::

    python -m nsa.ops.decode.compile_check --dtype bf16 --head-dims 128/128,192/128 --arch 90

The kernels are compiled with the specialisation a real launch gets (16-byte aligned tensors,
strides divisible by 16): without it the key/value loads are not pipelined and the report shows
spills the launched kernel does not have (this tool reported 120-144 bytes at Dk=128 until
2026-11-29; with the hints nothing spills). They are built with programmatic dependent launch
(``PDL``, what ``DecodePlan.pdl`` runs on sm_90+; ``--no-pdl`` without); ``GRID_WAITS`` counts
the ``griddepcontrol.wait`` instructions. Exit status 1 on a compile error, or on a spill at a
head dim listed in ``--no-spill`` (default: every head dim).

Must run with ``TRITON_INTERPRET`` unset (the kernels must be defined as compiled kernels).
"""

from __future__ import annotations

import argparse
import os
import sys


def compile_all(dtype: str, head_dims: list[tuple[int, int]], arch: int, *, group: int = 16,
                num_warps: int | None = None, pdl: bool = True) -> list[dict]:
    """One row per decode kernel at the paper's block sizes, with the warps the decode plan uses
    for each head dim (``decode_warps``) unless given: ``label`` (kernel, dtype, dims, warps),
    ``name`` (a short identifier), ``registers``, ``spill_bytes``, ``async_copies``, ``grid_waits``
    (``griddepcontrol.wait`` in the PTX: the programmatic-launch wait, one per kernel with ``pdl``)."""
    import nsa.ops.decode.triton as kernels
    from nsa.ops.offline_compile import async_copies, compile_as_launched, launch_signature, resource_usage

    precision = "ieee" if dtype == "fp32" else "tf32"
    gp = max(16, kernels.pow2(group))
    fp32_buffers = {"O_CMP", "L_CMP", "O_WIN", "L_WIN", "O_SLC", "L_SLC", "P_TILE", "M_TILE", "LSE_PART"}
    int32_buffers = {"C_CMP", "C_WIN", "C_SLC"}
    int64_buffers = {"LENGTHS", "NUM_NEW", "KEYS", "BLOCKS", "READS"}
    data_buffers = {"Q", "KC", "VC", "KW", "VW", "KS", "VS", "GATES", "OUT"}
    floats = {"qk_scale"}
    results = []

    pointers = {**{n: "*fp32" for n in fp32_buffers}, **{n: "*i32" for n in int32_buffers},
                **{n: "*i64" for n in int64_buffers}, **{n: f"*{dtype}" for n in data_buffers}}

    def build(fn, consts: dict, label: str, warps: int, short: str,
              stages: int = kernels.DECODE_STAGES) -> None:
        consts = {**consts, "PDL": pdl}
        signature = launch_signature(fn, consts, pointers, floats)
        # Every cache stride is a multiple of 16 at the paper's head dims.
        compiled = compile_as_launched(fn, signature, consts, arch=arch, num_warps=warps, num_stages=stages,
                                       aligned=lambda name: name.startswith("stride"))
        registers, spill = resource_usage(compiled) or (-1, -1)
        results.append({"label": label, "name": short, "registers": registers, "spill_bytes": spill,
                        "async_copies": async_copies(compiled),
                        "grid_waits": compiled.asm["ptx"].count("griddepcontrol.wait")})

    for dk, dv in head_dims:
        warps = num_warps or kernels.decode_warps(dk)
        # The depth the plan gives long chunks (batch 32) at this head dim.
        stages = kernels.decode_stages(16 * 64, 64, dk)
        dims = {"G": group, "GP": gp, "DK": dk, "DKP": kernels.pow2(dk), "DV": dv, "DVP": kernels.pow2(dv)}
        blocks = {"BLOCK": 32, "STRIDE": 16}
        for fused in (True, False):
            build(kernels._range_kernel, {**dims, **blocks, "WINDOW": 512, "PRECISION": precision, "BLOCK_N": 64,
                                          "FUSED": fused, "SELECT_BLOCK": 64, "NBT": 32},
                  f"_range_kernel {dtype} {dk}/{dv} fused={fused} warps={warps}", warps,
                  f"range_{dk}x{dv}_{'fused' if fused else 'unfused'}", stages)
        build(kernels._score_tiles_kernel, {"CMP_SPLITS_P": 64, "G": group, "GP": gp, **blocks, "SELECT_BLOCK": 64,
                                            "BLOCK_N": 64, "NBT": 32},
              f"_score_tiles_kernel {dtype} warps=4", 4, f"score_tiles_{dk}x{dv}")
        build(kernels._score_kernel, {"CMP_SPLITS_P": 64, "G": group, "GP": gp, "DK": dk, "DKP": kernels.pow2(dk),
                                      **blocks, "SELECT_BLOCK": 64, "PRECISION": precision, "BLOCK_N": 64,
                                      "NB_STEP": 15, "NBT": 16},
              f"_score_kernel {dtype} {dk} warps={warps}", warps, f"scoring_{dk}x{dv}")
        for top_n in kernels.TOP_N_METHODS:  # 128k context: 2048 blocks
            build(kernels._select_kernel, {**dims, "SELECT_BLOCK": 64, "COUNT": 16, "COUNTP": 16, "NBP": 2048,
                                           "BITONIC": top_n == "bitonic", "PRECISION": precision,
                                           "BLOCK_N": 64},
                  f"_select_kernel {dtype} {dk}/{dv} top_n={top_n} warps={warps}", warps,
                  f"select_{dk}x{dv}_{top_n.replace('-', '_')}", stages)
        for columns in (1, 8):  # whole heads, and the slices the batch-1 plan takes at Dv 128
            dvc = kernels.pow2(dv) // columns
            combine_warps = kernels.combine_warps(kernels.MAX_SPLITS, dvc)  # the most splits a plan makes
            build(kernels._combine_kernel, {"S_CMP_P": 64, "S_SLC_P": 16, "S_WIN_P": 16, "G": group, "GP": gp,
                                            "DV": dv, "DVP": kernels.pow2(dv), "DVC": dvc},
                  f"_combine_kernel {dtype} {dv} columns={columns} warps={combine_warps}", combine_warps,
                  f"combine_{dk}x{dv}_{columns}col")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--head-dims", default="128/128,192/128")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--no-pdl", action="store_true",
                        help="compile without programmatic dependent launch (as before sm_90)")
    parser.add_argument("--no-spill", default=None,
                        help="comma-separated Dk values that must not spill (default: all of --head-dims)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the kernels must be compiled kernels", file=sys.stderr)
        return 2
    dims = [tuple(int(x) for x in pair.split("/")) for pair in args.head_dims.split(",")]
    if args.no_spill is None:
        strict = {dk for dk, _ in dims}
    else:
        strict = {int(x) for x in args.no_spill.split(",") if x}
    spilled = 0
    for (dk, dv) in dims:
        for row in compile_all(args.dtype, [(dk, dv)], args.arch, pdl=not args.no_pdl):
            print(f"{row['label']}: REG:{row['registers']} STACK:{row['spill_bytes']} "
                  f"ASYNC_COPIES:{row['async_copies']} GRID_WAITS:{row['grid_waits']}")
            spilled += dk in strict and row["spill_bytes"] != 0
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
