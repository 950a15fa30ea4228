"""Causality by perturbation: inputs after position t never reach outputs (or the selection) at <= t.

For each t, every input is replaced by fresh random values after t (compressed tokens: those
whose block ends after t, ``i*d + l - 1 > t``) and the outputs at ``0..t`` and the selected
blocks at ``0..t`` must be bit-identical, for each branch alone (one-hot gates) and for all
three together. The converse is checked too, so the test can fail: replacing an input at or
before t changes the output at t of every branch that reads it, and changes some selection.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from suites.common import (
    BRANCHES,
    PAPER,
    case_seed,
    config_from,
    device_of,
    dtype_of,
    generator,
    make_inputs,
    max_abs,
    one_hot_gates,
    run_nsa,
)
from verify.registry import Checks, suite

# Gate settings run side by side as batch rows: each branch alone, then all three (random gates).
GATE_ROWS = (*BRANCHES, "all")


def _cases(scale: str):
    if scale == "ci":
        yield "G1-mean-dk8", {"heads": 2, "kv_heads": 2, "dk": 8, "dv": 8, "l": 4, "d": 2, "lp": 8,
                              "n": 4, "w": 8, "phi": "mean", "seq_len": 48, "per_input": True}
        yield "G2-mlp-dk16-dv8", {"heads": 4, "kv_heads": 2, "dk": 16, "dv": 8, "l": 8, "d": 4, "lp": 16,
                                  "n": 4, "w": 12, "phi": "mlp", "seq_len": 72, "per_input": True}
        yield "G4-mean-l=d-dk8-dv12", {"heads": 4, "kv_heads": 1, "dk": 8, "dv": 12, "l": 4, "d": 4,
                                       "lp": 8, "n": 5, "w": 6, "phi": "mean", "seq_len": 64,
                                       "per_input": True}
        yield "G4-mlp-l=lp-dk12-dv4", {"heads": 8, "kv_heads": 2, "dk": 12, "dv": 4, "l": 4, "d": 2,
                                       "lp": 4, "n": 4, "w": 5, "phi": "mlp", "seq_len": 40,
                                       "per_input": True}
        return
    for seq_len in (8192, 16384):
        for phi in ("mean", "mlp"):
            yield f"paper-{phi}-T{seq_len}-bf16", {**PAPER, "phi": phi, "seq_len": seq_len,
                                                   "dtype": "bfloat16", "per_input": False,
                                                   "needs_gpu": True}


def _positions(params: dict[str, Any], seq_len: int, seed: int) -> list[int]:
    """Boundary positions (before any compressed block, where the first ends, the end of the second
    selection block, the next-to-last) plus a random one; never ``T - 1`` (nothing follows it)."""
    l, lp = params["l"], params["lp"]
    gen = torch.Generator().manual_seed(seed)
    picks = {0, l - 1, 2 * lp - 1, seq_len - 2}
    picks |= set(torch.randint(1, seq_len - 1, (1,), generator=gen).tolist())
    return sorted(t for t in picks if 0 <= t <= seq_len - 2)


def _time_mask(name: str, length: int, t: int, after: bool, config, device) -> torch.Tensor:
    """Which rows of input ``name`` count as "after t" (``after``) or "at or before t"."""
    rows = torch.arange(length, device=device)
    if name in ("k_cmp", "v_cmp"):
        ends = rows * config.compress_stride + config.compress_block - 1  # last token of block i
        late = ends > t
    else:
        late = rows > t
    return late if after else ~late


def _readers(name: str, phi: str) -> tuple[str, ...]:
    """Gate rows whose output at t must change when ``name`` changes at or before t."""
    if name in ("q", "gates"):
        return GATE_ROWS
    if name in ("k_cmp", "v_cmp"):
        return ("cmp", "all")
    if name in ("k_slc", "v_slc"):
        return ("slc", "all")
    if phi == "mlp":  # k, v feed only the window (compression and selection have their own)
        return ("win", "all")
    return GATE_ROWS


def _perturbed(inputs: dict[str, torch.Tensor], names: tuple[str, ...], t: int, after: bool, config,
               seed: int) -> dict[str, torch.Tensor]:
    gen = generator(seed, inputs["q"].device)
    out = dict(inputs)
    for name in names:
        x = inputs[name]
        mask = _time_mask(name, x.shape[1], t, after, config, x.device)[None, :, None, None]
        fresh = (torch.rand(x.shape, generator=gen, device=x.device) if name == "gates"
                 else torch.randn(x.shape, generator=gen, device=x.device)).to(x.dtype)
        out[name] = torch.where(mask, fresh, x)
    return out


@suite("causality", "inputs (q, k, v, gates, compressed tokens) after t change no output or selection "
       "at <= t, per branch and combined; inputs at <= t do change them", cases=_cases)
def causality(params: dict[str, Any], checks: Checks) -> None:
    config = config_from(params)
    device, dtype = device_of(params), dtype_of(params)
    seq_len, seed = params["seq_len"], case_seed(params)
    mlp = config.phi == "mlp"
    base = make_inputs(config, batch=1, seq_len=seq_len, dtype=dtype, device=device, seed=seed,
                       compressed=mlp, selection_kv=mlp)
    # One batch row per gate setting, so one call checks every branch alone and all together.
    rows = len(GATE_ROWS)
    inputs = {name: x.expand(rows, *x.shape[1:]).contiguous() for name, x in base.items()}
    inputs["gates"] = torch.cat([one_hot_gates(base["gates"], b) for b in BRANCHES] + [base["gates"]])
    names = ("q", "k", "v", "gates") + (("k_cmp", "v_cmp", "k_slc", "v_slc") if mlp else ())
    groups = [(n,) for n in names] + [names] if params["per_input"] else [names]
    out0, info0 = run_nsa(inputs, config, params, checks)
    blocks0 = info0.selected_blocks

    leak = {row: 0.0 for row in GATE_ROWS}
    leaks, deaf, selection_leaks = [], [], []
    min_change, selection_changes, sensitivity_checks = float("inf"), 0, 0
    # Enough compressed tokens and keys that q matters to every branch at t (2+ visible tokens).
    sensitive_from = config.compress_block + config.compress_stride - 1
    for t in _positions(params, seq_len, seed):
        variants = [(group, True) for group in groups]
        if t >= sensitive_from:
            variants += [(group, False) for group in groups]
        moved = [_perturbed(inputs, group, t, after, config, seed + 7919 * (t + 1) + after)
                 for group, after in variants]
        base_out, base_blocks, results = _run_variants(inputs, moved, config, params, out0, blocks0)
        for (group, after), (o, blocks) in zip(variants, results):
            label = "+".join(group)
            same_selection = torch.equal(blocks[:, :t + 1], base_blocks[:, :t + 1])
            if after:
                for r, row in enumerate(GATE_ROWS):
                    change = max_abs(o[r, :t + 1].double() - base_out[r, :t + 1].double())
                    nan = math.isnan(change) or math.isnan(leak[row])
                    leak[row] = math.nan if nan else max(leak[row], change)
                    if change != 0.0:
                        leaks.append(f"{label} after t={t} -> {row} output (max change {change:.3g})")
                if not same_selection:
                    selection_leaks.append(f"{label} after t={t}")
                continue
            selection_changes += int(not same_selection)
            readers = set().union(*(_readers(n, config.phi) for n in group))
            for r, row in enumerate(GATE_ROWS):
                if row not in readers:
                    continue
                change = max_abs(o[r, t].double() - base_out[r, t].double())
                sensitivity_checks += 1
                min_change = min(min_change, change)
                if not change > 0.0:
                    deaf.append(f"{label} at <= t={t} left {row} output at t unchanged")

    for row in GATE_ROWS:
        checks.at_most(f"{row}_max_change_at_or_before_t", leak[row], 0.0)
    checks.true("no_leak", not leaks, "; ".join(leaks[:4]))
    checks.true("selection_causal", not selection_leaks,
                "selected blocks at <= t changed: " + "; ".join(selection_leaks[:4]))
    checks.true("earlier_inputs_reach_output", not deaf, "; ".join(deaf[:4]))
    checks.at_least("sensitivity_checks", sensitivity_checks, 1)
    checks.at_least("min_output_change_from_earlier_inputs", min_change, 1e-12)
    checks.at_least("selection_changes_from_earlier_inputs", selection_changes, 1)


def _run_variants(inputs: dict[str, torch.Tensor], moved: list[dict[str, torch.Tensor]], config,
                  params: dict[str, Any], out0: torch.Tensor, blocks0: torch.Tensor):
    """Outputs and selected blocks of the unperturbed inputs and of each variant, each computed
    under the same schedule so that any difference is a dependence, not rounding.

    ci: one call with the unperturbed rows first and every variant stacked after them along the
    batch (cheap on a CPU); full: one call per variant with the baseline's batch size (identical
    chunking and kernel grid as ``out0``).
    """
    rows = inputs["q"].shape[0]
    if not params["per_input"]:
        results = [run_nsa(m, config, params) for m in moved]
        return out0, blocks0, [(o, info.selected_blocks) for o, info in results]
    stacked = {name: torch.cat([inputs[name]] + [m[name] for m in moved]) for name in inputs}
    out, info = run_nsa(stacked, config, params)
    pieces = [(out[i * rows:(i + 1) * rows], info.selected_blocks[i * rows:(i + 1) * rows])
              for i in range(len(moved) + 1)]
    return pieces[0][0], pieces[0][1], pieces[1:]
