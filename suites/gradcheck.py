"""Gradients: float64 ``torch.autograd.gradcheck`` of every sub-op and of ``nsa_attention``, and no
NaN/inf in forward or backward at the edges (T = 1, T < compress_block, sequences shorter than
every block, empty and one-token sequences in a packed batch).

Sub-op cases call the reference ops directly (``checks.backend = "reference"``); the end-to-end
and edge cases go through ``nsa_attention`` with the case's backend. Gradcheck needs float64
and tiny shapes (it differentiates numerically, input element by input element).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from nsa.ops import (
    combine_branches,
    compress_mean,
    compressed_attention,
    select_blocks,
    selected_attention,
    window_attention,
)
from suites.common import (
    PAPER,
    case_seed,
    config_from,
    device_of,
    dtype_of,
    make_inputs,
    max_abs,
    one_hot_gates,
    randn,
    run_nsa,
)
from verify.registry import Checks, suite

_TINY = {"heads": 2, "kv_heads": 1, "dk": 3, "dv": 2}


def _cases(scale: str):
    if scale == "ci":
        yield "compress_mean-l4-d2", {"op": "compress_mean", "l": 4, "d": 2, "seq_len": 11}
        yield "compress_mean-l3-d3", {"op": "compress_mean", "l": 3, "d": 3, "seq_len": 10}
        yield "compressed_attention-G2", {"op": "compressed_attention", **_TINY, "l": 4, "d": 2,
                                          "seq_len": 11}
        yield "compressed_attention-G1-l=d", {"op": "compressed_attention", "heads": 2, "kv_heads": 2,
                                              "dk": 2, "dv": 3, "l": 3, "d": 3, "seq_len": 10}
        yield "selected_attention-G2", {"op": "selected_attention", **_TINY, "lp": 3, "n": 3, "seq_len": 13}
        yield "window_attention-G2-w3", {"op": "window_attention", **_TINY, "w": 3, "seq_len": 10}
        yield "window_attention-G1-w1", {"op": "window_attention", "heads": 2, "kv_heads": 2, "dk": 2,
                                         "dv": 3, "w": 1, "seq_len": 6}
        yield "combine_branches", {"op": "combine_branches", **_TINY, "seq_len": 7}
        e2e = {**_TINY, "l": 4, "d": 2, "lp": 4, "n": 4, "w": 3, "seq_len": 17}
        yield "nsa_attention-mean", {"op": "nsa_attention", **e2e, "phi": "mean"}
        yield "nsa_attention-mlp-compressed_kv", {"op": "nsa_attention", **e2e, "phi": "mlp"}
        yield "nsa_attention-mean-varlen", {"op": "nsa_attention", **e2e, "phi": "mean", "lengths": "9,1,0,7"}
        small = {"heads": 4, "kv_heads": 2, "dk": 8, "dv": 4, "l": 8, "d": 4, "lp": 16, "n": 3, "w": 4}
        for dtype in ("float64", "float32"):
            for phi in ("mean", "mlp"):
                for label, lengths in (("T1", "1"), ("T-lt-l", "7"), ("T-lt-every-block", "3"),
                                       ("varlen-edges", "1,0,7,20,2")):
                    yield f"finite-{label}-{phi}-{dtype}", {"op": "finite", **small, "phi": phi,
                                                            "dtype": dtype, "lengths": lengths}
        # The Triton path (interpreter on a CPU) with an empty sequence in the pack: its backward
        # once indexed an empty tensor there (found by the full-scale run on an H200).
        yield "finite-varlen-edges-mean-float32-triton", {"op": "finite", **small, "dk": 16, "dv": 16, "phi": "mean",
                                                          "dtype": "float32", "lengths": "1,0,7,20,2",
                                                          "backend": "triton"}
        return
    for phi in ("mean", "mlp"):
        for label, lengths in (("T1", "1"), ("T31-lt-l", "31"), ("T63-lt-lp", "63"),
                               ("varlen-edges", "1,0,31,600,2,8192")):
            yield f"finite-{label}-{phi}-paper-bf16", {"op": "finite", **PAPER, "phi": phi,
                                                       "lengths": lengths, "dtype": "bfloat16",
                                                       "needs_gpu": True}


@suite("gradcheck", "float64 gradcheck of every sub-op and of nsa_attention; no NaN/inf in forward "
       "or backward at T = 1, T < compress_block and sequences shorter than every block", cases=_cases)
def gradcheck(params: dict[str, Any], checks: Checks) -> None:
    op = params["op"]
    if op == "finite":
        _check_finite(params, checks)
        return
    gen = torch.Generator().manual_seed(case_seed(params))
    if op == "nsa_attention":
        fn, inputs = _nsa_function(params, checks)
    else:
        checks.backend = "reference"  # a sub-op of the reference itself; no backend dispatch
        fn, inputs = _SUB_OPS[op](params, gen)
    for x in inputs:
        x.requires_grad_(True)
    # Full Jacobians for the sub-ops; random projections (fast mode) for the end-to-end op, whose
    # numerical Jacobian would cost hundreds of whole NSA calls.
    ok = torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=op == "nsa_attention",
                                  raise_exception=False)
    checks.true("gradcheck", bool(ok), f"{op}: analytic and numerical gradients differ")
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    grads = torch.autograd.grad(sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
                                    for o in outputs), inputs, allow_unused=True)
    checks.true("finite_forward", all(bool(torch.isfinite(o).all()) for o in outputs))
    checks.true("finite_grads", all(g is None or bool(torch.isfinite(g).all()) for g in grads))
    if op == "compressed_attention":
        l = params["l"]
        # Queries with no visible compressed block (t + 1 < l) get exactly 0.
        checks.equal("max_abs_output_before_first_block", max_abs(outputs[0][:, :l - 1]), 0.0)


def _draw(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return randn(shape, gen=gen, dtype=torch.float64, device=torch.device("cpu"))


def _qkv(params: dict[str, Any], gen: torch.Generator) -> list[torch.Tensor]:
    t, hq, hk, dk, dv = params["seq_len"], params["heads"], params["kv_heads"], params["dk"], params["dv"]
    return [_draw(gen, 1, t, hq, dk), _draw(gen, 1, t, hk, dk), _draw(gen, 1, t, hk, dv)]


def _compress_mean(params, gen):
    l, d = params["l"], params["d"]
    return (lambda x: compress_mean(x, l, d)), [_draw(gen, 2, params["seq_len"], 2, 3)]


def _compressed_attention(params, gen):
    l, d, t = params["l"], params["d"], params["seq_len"]
    q, _, _ = _qkv(params, gen)
    n = (t - l) // d + 1
    k_cmp = _draw(gen, 1, n, params["kv_heads"], params["dk"])
    v_cmp = _draw(gen, 1, n, params["kv_heads"], params["dv"])
    # lse is -inf for queries with no visible block, so only the output is differentiated.
    return (lambda q, k, v: compressed_attention(q, k, v, block=l, stride=d)[0]), [q, k_cmp, v_cmp]


def _selected_attention(params, gen):
    lp, n, t = params["lp"], params["n"], params["seq_len"]
    q, k, v = _qkv(params, gen)
    scores = torch.rand(1, t, params["kv_heads"], -(-t // lp), generator=gen, dtype=torch.float64)
    blocks = select_blocks(scores, select_block=lp, select_count=n)  # early rows are -1 padded
    return (lambda q, k, v: selected_attention(q, k, v, blocks, select_block=lp)), [q, k, v]


def _window_attention(params, gen):
    w = params["w"]
    return (lambda q, k, v: window_attention(q, k, v, window=w)), _qkv(params, gen)


def _combine_branches(params, gen):
    t, hq, dv = params["seq_len"], params["heads"], params["dv"]
    parts = [_draw(gen, 1, t, hq, dv) for _ in range(3)]
    gates = torch.rand(1, t, hq, 3, generator=gen, dtype=torch.float64)
    return combine_branches, [*parts, gates]


_SUB_OPS: dict[str, Callable] = {
    "compress_mean": _compress_mean, "compressed_attention": _compressed_attention,
    "selected_attention": _selected_attention, "window_attention": _window_attention,
    "combine_branches": _combine_branches,
}


def _packing(params: dict[str, Any]) -> tuple[torch.Tensor | None, int]:
    """``(cu_seqlens or None, total tokens)`` from ``lengths`` ("9,1,0,7") or ``seq_len``."""
    if "lengths" not in params:
        return None, params["seq_len"]
    lengths = [int(x) for x in str(params["lengths"]).split(",")]
    if len(lengths) == 1:
        return None, lengths[0]
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32), sum(lengths)


def _nsa_function(params: dict[str, Any], checks: Checks):
    """``nsa_attention`` as a function of its differentiable inputs (compressed tokens too for mlp)."""
    config = config_from(params)
    cu_seqlens, total = _packing(params)
    data = make_inputs(config, batch=1, seq_len=total, dtype=torch.float64, device=torch.device("cpu"),
                       seed=case_seed(params), compressed=config.phi == "mlp", cu_seqlens=cu_seqlens)
    names = ["q", "k", "v", "gates"] + (["k_cmp", "v_cmp"] if config.phi == "mlp" else [])

    def fn(*tensors: torch.Tensor) -> torch.Tensor:
        out, _ = run_nsa(dict(zip(names, tensors)), config, params, checks, cu_seqlens=cu_seqlens)
        return out
    return fn, [data[n] for n in names]


def _check_finite(params: dict[str, Any], checks: Checks) -> None:
    """Forward and backward stay finite at the edges; the compressed branch is exactly 0 there."""
    config = config_from(params)
    device, dtype = device_of(params), dtype_of(params)
    cu_seqlens, total = _packing(params)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device)
    data = make_inputs(config, batch=1, seq_len=total, dtype=dtype, device=device, seed=case_seed(params),
                       compressed=config.phi == "mlp", cu_seqlens=cu_seqlens)
    rows = {"all": data["gates"], "cmp": one_hot_gates(data["gates"], "cmp")}
    for label, gates in rows.items():
        inputs = {name: x.detach().clone().requires_grad_(True) for name, x in data.items()}
        inputs["gates"] = gates.detach().clone().requires_grad_(True)
        out, _ = run_nsa(inputs, config, params, checks, cu_seqlens=cu_seqlens)
        out.float().square().sum().backward()
        checks.true(f"{label}_forward_finite", bool(torch.isfinite(out).all()))
        bad = [n for n, x in inputs.items() if x.grad is not None and not bool(torch.isfinite(x.grad).all())]
        checks.true(f"{label}_grads_finite", not bad, f"non-finite grads of {bad}")
        if label == "cmp":
            # Positions with t + 1 < l in their own sequence see no compressed token: output exactly 0.
            starts = [0] if cu_seqlens is None else cu_seqlens[:-1].tolist()
            ends = [total] if cu_seqlens is None else cu_seqlens[1:].tolist()
            early = [p for s, e in zip(starts, ends) for p in range(s, min(e, s + config.compress_block - 1))]
            checks.equal("cmp_output_before_first_block", max_abs(out[:, early]) if early else 0.0, 0.0)
