"""Eq. 9: compressed-block probabilities mapped to selection blocks by token overlap.

``nsa.ops.eq9_weights`` is compared with the overlap of the two token ranges counted one token
at a time; ``nsa.ops.selection_block_scores`` with p_cmp computed with explicit Python loops
(Eq. 8, visible tokens only) and summed by that overlap; and the blocks ``nsa_attention``
selects (through the case's backend) must be a top-n of those oracle scores.
"""

from __future__ import annotations

from typing import Any

import torch

from nsa.ops import eq9_weights, selection_block_scores
from suites.common import (
    PAPER,
    case_seed,
    config_from,
    device_of,
    dtype_of,
    make_inputs,
    max_err,
    oracle_block_scores,
    oracle_head_scores_loops,
    run_nsa,
    sample_positions,
    topn_violations,
)
from verify.registry import Checks, suite

# (l, d, l') of the ci cases: the paper's, l = d, l = l', l larger than d by 4, tiny ones.
GEOMETRIES = ((32, 16, 64), (16, 8, 64), (32, 32, 64), (64, 16, 64), (8, 4, 32), (4, 2, 8), (8, 8, 8))


def _cases(scale: str):
    if scale == "ci":
        for l, d, lp in GEOMETRIES:
            # Long enough for several selection blocks and a partial last one.
            seq_len = 3 * lp + l + d + 3
            yield f"l{l}-d{d}-lp{lp}", {"heads": 2, "kv_heads": 1, "dk": 8, "dv": 4, "l": l, "d": d, "lp": lp,
                                        "n": 4, "w": 16, "phi": "mean", "seq_len": seq_len}
        return
    for seq_len in (8192, 32768):
        yield f"paper-T{seq_len}-bf16", {**PAPER, "phi": "mean", "seq_len": seq_len, "dtype": "bfloat16",
                                         "check_rows": 512, "needs_gpu": True}


def _token_overlap_weights(num_cmp: int, num_blocks: int, l: int, d: int, lp: int) -> torch.Tensor:
    """``|[i*d, i*d+l) ∩ [j*l', (j+1)*l')| / d``, counting token by token."""
    weights = torch.zeros(num_cmp, num_blocks, dtype=torch.float64)
    for i in range(num_cmp):
        for token in range(i * d, i * d + l):
            if token // lp < num_blocks:
                weights[i, token // lp] += 1
    return weights / d


def _check_paper_pattern(weights: torch.Tensor, checks: Checks) -> None:
    """The spec's example: with l, d, l' = 32, 16, 64 block j gets 1,2,2,2,1 on blocks 4j-1 .. 4j+3."""
    bad = []
    for j in range(1, weights.shape[1]):
        rows = range(4 * j - 1, min(4 * j + 4, weights.shape[0]))
        col = weights[:, j]
        want = [1, 2, 2, 2, 1][:len(rows)]
        if col[list(rows)].tolist() != want or col.sum().item() != sum(want):
            bad.append(f"block {j}: {col.tolist()}")
    checks.true("paper_pattern_1_2_2_2_1", not bad, "; ".join(bad[:3]))


@suite("eq9", "Eq. 9 weights equal token overlap / d for several (l, d, l'); block scores equal p_cmp "
       "summed by overlap (explicit loops); the backend's selection is a top-n of those scores", cases=_cases)
def eq9(params: dict[str, Any], checks: Checks) -> None:
    config = config_from(params)
    device, dtype = device_of(params), dtype_of(params)
    l, d, lp = config.compress_block, config.compress_stride, config.select_block
    seq_len = params["seq_len"]
    num_cmp, num_blocks = config.num_compressed(seq_len), config.num_select_blocks(seq_len)

    weights = eq9_weights(num_cmp, num_blocks, block=l, stride=d, select_block=lp, dtype=torch.float64)
    counted = _token_overlap_weights(num_cmp, num_blocks, l, d, lp)
    checks.at_most("eq9_weights_max_err", max_err(weights, counted), 0.0)
    # Every token of an interior block lies in l/d compressed blocks: the column sums to (l'/d)(l/d).
    checks.equal("eq9_interior_column_total", float(weights[:, 1].sum()), (lp // d) * (l // d))
    if (l, d, lp) == (32, 16, 64):
        _check_paper_pattern(weights, checks)

    inputs = make_inputs(config, batch=2, seq_len=seq_len, dtype=dtype, device=device, seed=case_seed(params))
    q, k = inputs["q"], inputs["k"]
    k_cmp = k.unfold(1, l, d)[:, :num_cmp].to(torch.float64).mean(-1).to(dtype)  # mean phi, by hand
    got = selection_block_scores(q, k_cmp, block=l, stride=d, select_block=lp)
    if device.type == "cpu" and seq_len <= 1024:
        oracle = _loop_scores(q, k_cmp, config, num_blocks)
        tol = 1e-12
    else:
        oracle = oracle_block_scores(q, k_cmp, config, num_blocks=num_blocks, dtype=torch.float64)
        tol = 2e-4 * config.group_size  # float32 scoring: ~1e-5 per head, summed over G heads
    checks.at_most("block_scores_max_err", max_err(got, oracle), tol)
    # p_slc sums p_cmp (which sums to 1) with weights totalling l/d per compressed token, per head.
    visible = (torch.arange(seq_len, device=device) + 1 >= l)
    totals = oracle.sum(-1)[:, visible]
    expected_total = torch.full_like(totals, config.group_size * l / d)
    checks.at_most("block_score_mass_err", max_err(totals, expected_total),
                   1e-9 if oracle.dtype == torch.float64 else 1e-3)

    _, info = run_nsa(inputs, config, params, checks)
    problems, rows = [], sample_positions(seq_len, params.get("check_rows"), case_seed(params))
    for b in range(q.shape[0]):
        problems += topn_violations(info.selected_blocks[b], oracle[b], rows, lp, config.select_count, tol)
    checks.true("backend_selection_is_topn_of_oracle_scores", not problems, "; ".join(problems[:3]))


def _loop_scores(q: torch.Tensor, k_cmp: torch.Tensor, config, num_blocks: int) -> torch.Tensor:
    """:func:`oracle_head_scores_loops` for every batch row and head, summed over each group."""
    batch, seq_len, hq, dk = q.shape
    hk, group = config.num_kv_heads, config.group_size
    out = torch.zeros(batch, seq_len, hk, num_blocks, dtype=torch.float64)
    positions = list(range(seq_len))
    for b in range(batch):
        for head in range(hq):
            rows = oracle_head_scores_loops(q[b, :, head].double().tolist(),
                                            k_cmp[b, :, head // group].double().tolist(),
                                            positions, config.compress_block, config.compress_stride,
                                            config.select_block, num_blocks, dk ** -0.5)
            out[b, :, head // group] += torch.tensor(rows, dtype=torch.float64)
    return out
