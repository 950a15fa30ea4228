"""compile: every Triton kernel config compiled for Hopper (sm_90) on this machine, no GPU needed.

What the interpreter-run suites cannot see: how the kernels compile. Each case builds every
config of the production autotune lists with Triton's bundled ptxas, as a launch with contiguous
inputs specialises it (:mod:`nsa.ops.compile_check` for prefill, :mod:`nsa.ops.decode.compile_check`
for decode), in a subprocess without ``TRITON_INTERPRET``, and records per kernel the configs'
registers, spill bytes and asynchronous copies. Bounds:

* every config with a software pipeline (``num_stages >= 2``) has asynchronous copies, i.e. its
  loop's loads are in flight while it computes (the selection walk had none until 2026-12-05);
* each prefill autotune list has a config spilling at most 64 bytes per thread (a few registers;
  the spills worth catching are hundreds of bytes), so autotuning always has a clean choice;
  no decode kernel spills at all (one config each, the plan's).
"""

from __future__ import annotations

import json

from verify.registry import Checks, suite

SPILL_ALLOWANCE_BYTES = 64
PREFILL = ("import json\nfrom dataclasses import asdict\nfrom nsa.ops.compile_check import audit\n"
           "for row in audit({dims}, {groups}):\n    print(json.dumps(asdict(row)))\n")
DECODE = ("import json\nfrom nsa.ops.decode.compile_check import compile_all\n"
          "for row in compile_all('bf16', {dims}, 90):\n    print(json.dumps(row))\n")
# The decode kernels that loop over keys (the score-tile and combine kernels do not loop).
DECODE_LOOPS = ("range_", "scoring_", "select_")


def _cases(scale: str):
    if scale == "ci":
        yield "prefill-d32-G4", {"kind": "prefill", "head_dims": "32/32", "groups": "4"}
        yield "prefill-d128-G16", {"kind": "prefill", "head_dims": "128/128", "groups": "16"}
        yield "decode-d128", {"kind": "decode", "head_dims": "128/128"}
        return
    # Opt-in (run when the suite is named): minutes of CPU-bound compiling on a cold Triton cache
    # (37, 108, 151, 12 s measured), which would run beside the performance suite's timings.
    full = {"opt_in": True}
    yield "prefill-d32-G4", {"kind": "prefill", "head_dims": "32/32", "groups": "4", "expected_s": 40, **full}
    yield "prefill-d128", {"kind": "prefill", "head_dims": "128/128", "groups": "16,4", "expected_s": 110,
                           **full}
    yield "prefill-d192x128", {"kind": "prefill", "head_dims": "192/128", "groups": "16,4", "expected_s": 150,
                               **full}
    yield "decode-d128-d192x128", {"kind": "decode", "head_dims": "128/128,192/128", "expected_s": 15, **full}


def _compiled_rows(code: str) -> list[dict]:
    from nsa.ops.offline_compile import run_compiling

    return [json.loads(line) for line in run_compiling(code).splitlines() if line.startswith("{")]


def _dims(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in pair.split("/")) for pair in text.split(",")]


def _check_prefill(params: dict, checks: Checks) -> None:
    groups = [int(g) for g in params["groups"].split(",")]
    rows = _compiled_rows(PREFILL.format(dims=_dims(params["head_dims"]), groups=groups))
    checks.record("configs_compiled", len(rows))
    lists: dict[tuple, list[dict]] = {}
    for row in rows:
        lists.setdefault((row["kernel"], row["dk"], row["group"]), []).append(row)
    for (kernel, dk, group), configs in lists.items():
        name = f"{kernel}_d{dk}_G{group}"
        checks.record(f"{name}_configs", len(configs))
        checks.record(f"{name}_registers_max", max(c["registers"] for c in configs))
        checks.record(f"{name}_spill_bytes_max", max(c["spill_bytes"] for c in configs))
        best_spill = min(c["spill_bytes"] for c in configs)
        checks.at_most(f"{name}_spill_bytes_best", best_spill, SPILL_ALLOWANCE_BYTES)
        pipelined = [c for c in configs if c["num_stages"] >= 2]
        if pipelined:
            checks.at_least(f"{name}_async_copies_min", min(c["async_copies"] for c in pipelined), 1)


def _check_decode(params: dict, checks: Checks) -> None:
    rows = _compiled_rows(DECODE.format(dims=_dims(params["head_dims"])))
    checks.record("configs_compiled", len(rows))
    for row in rows:
        name = row["name"]
        checks.record(f"{name}_registers", row["registers"])
        checks.at_most(f"{name}_spill_bytes", row["spill_bytes"], 0)
        if name.startswith(DECODE_LOOPS):
            checks.at_least(f"{name}_async_copies", row["async_copies"], 1)


def _check(params: dict, checks: Checks) -> None:
    import triton

    checks.backend = f"compiled for sm_90 (triton {triton.__version__}, no GPU)"
    (_check_prefill if params["kind"] == "prefill" else _check_decode)(params, checks)


compile_suite = suite("compile", "every kernel config compiled for sm_90: pipelined loads, spills, registers",
                      cases=_cases, timeout_s=1200)(_check)
