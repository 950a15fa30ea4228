"""Eq. 10 and the top-n rules.

* Block scores of a key/value head equal the sum over its G query heads of each head's own
  Eq. 9 scores, computed independently (explicit softmax and token overlap per head).
* Every query head of a group reads the same blocks although their queries differ: the
  selection branch's output of each query head equals attention over the group's blocks (explicit
  mask), and the heads' own per-head top-n would have differed somewhere (so the check bites).
* Top-n rules on crafted scores, against a brute-force top-n in plain Python: forced blocks 0, c,
  c-1, exact ties to the lower index, -1 padding when candidates run out, ascending order.
"""

from __future__ import annotations

from typing import Any

import torch

from nsa.ops import select_blocks, selection_block_scores
from suites.common import (
    PAPER,
    brute_force_topn,
    case_seed,
    config_from,
    dense_attention,
    device_of,
    dtype_of,
    make_inputs,
    max_err,
    one_hot_gates,
    oracle_block_scores,
    oracle_dtype,
    run_nsa,
    sample_positions,
    topn_violations,
)
from verify.registry import Checks, suite


def _cases(scale: str):
    if scale == "ci":
        for heads, kv_heads, dk, dv in ((4, 2, 8, 8), (4, 1, 12, 6), (16, 2, 8, 4)):
            yield f"G{heads // kv_heads}-HK{kv_heads}-dk{dk}-dv{dv}", {
                "heads": heads, "kv_heads": kv_heads, "dk": dk, "dv": dv, "l": 4, "d": 2, "lp": 8, "n": 4,
                "w": 8, "phi": "mean", "seq_len": 96}
        yield "G2-l=lp", {"heads": 4, "kv_heads": 2, "dk": 8, "dv": 4, "l": 8, "d": 4, "lp": 8, "n": 5,
                          "w": 4, "phi": "mean", "seq_len": 120}
        yield "topn-rules", {"kind": "topn", "lp": 8, "n": 5, "seq_len": 100, "kv_heads": 3}
        yield "topn-rules-n3", {"kind": "topn", "lp": 4, "n": 3, "seq_len": 40, "kv_heads": 2}
        return
    for seq_len in (8192, 32768):
        yield f"paper-T{seq_len}-bf16", {**PAPER, "phi": "mean", "seq_len": seq_len, "dtype": "bfloat16",
                                         "check_rows": 512, "needs_gpu": True}


@suite("eq10", "group scores are the sum of per-head Eq. 9 scores; every head of a group reads the "
       "same blocks; top-n rules (forced, ties, padding, order) against a brute-force top-n", cases=_cases)
def eq10(params: dict[str, Any], checks: Checks) -> None:
    if params.get("kind") == "topn":
        _check_topn_rules(params, checks)
    else:
        _check_group_sharing(params, checks)


def _check_group_sharing(params: dict[str, Any], checks: Checks) -> None:
    config = config_from(params)
    device, dtype = device_of(params), dtype_of(params)
    seq_len, group, hk = params["seq_len"], config.group_size, config.num_kv_heads
    l, d, lp = config.compress_block, config.compress_stride, config.select_block
    num_blocks = config.num_select_blocks(seq_len)
    inputs = make_inputs(config, batch=1, seq_len=seq_len, dtype=dtype, device=device, seed=case_seed(params))
    inputs["gates"] = one_hot_gates(inputs["gates"], "slc")
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    k_cmp = k.unfold(1, l, d)[:, :config.num_compressed(seq_len)].to(torch.float64).mean(-1).to(dtype)
    exact = dtype == torch.float64
    tol = 1e-12 if exact else 1e-4 * group

    # Eq. 10: the library's group scores against the sum of independently computed per-head scores.
    per_head = oracle_block_scores(q, k_cmp, config, num_blocks=num_blocks, per_head=True,
                                   dtype=oracle_dtype(device))
    group_oracle = per_head.reshape(1, seq_len, hk, group, num_blocks).sum(3)
    got = selection_block_scores(q, k_cmp, block=l, stride=d, select_block=lp)
    checks.at_most("group_scores_vs_sum_of_head_scores", max_err(got, group_oracle), tol)

    out, info = run_nsa(inputs, config, params, checks)
    blocks = info.selected_blocks[0]
    rows = sample_positions(seq_len, params.get("check_rows"), case_seed(params))
    problems = topn_violations(blocks, group_oracle[0], rows, lp, config.select_count, tol)
    checks.true("backend_selection_is_topn_of_group_scores", not problems, "; ".join(problems[:3]))

    # The heads of a group disagree on their own favourite blocks somewhere...
    index = torch.tensor(rows, device=device)
    head_scores, group_blocks = per_head[0, index].tolist(), blocks[index].tolist()
    disagreements = sum(
        brute_force_topn(head_scores[r][h * group + g], t, lp, config.select_count) != group_blocks[r][h]
        for r, t in enumerate(rows) for h in range(hk) for g in range(group))
    checks.at_least("per_head_topn_disagreements", disagreements, 1)
    # ...yet each of them reads exactly the group's blocks: compare the selection branch with
    # attention under the explicit mask "key in one of my group's blocks and <= t".
    positions = torch.arange(seq_len, device=device)

    def group_mask(h: int):
        def rows_of(start: int, end: int) -> torch.Tensor:
            in_selected = (blocks[start:end, h, :, None] == (positions // lp)[None, None, :]).any(1)
            return in_selected & (positions[None, :] <= positions[start:end, None])
        return rows_of

    ref = torch.cat([dense_attention(q[:, :, h * group:(h + 1) * group], k[:, :, h:h + 1], v[:, :, h:h + 1],
                                     group_mask(h), dtype=oracle_dtype(device)) for h in range(hk)], dim=2)
    out_tol = 1e-10 if exact else {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]
    checks.at_most("selection_output_vs_group_mask_attention", max_err(out, ref), out_tol)


def _check_topn_rules(params: dict[str, Any], checks: Checks) -> None:
    """Crafted integer scores in 0..2 (so exact ties abound) fed to ``select_blocks``."""
    lp, n, seq_len, hk = params["lp"], params["n"], params["seq_len"], params["kv_heads"]
    checks.backend = "reference"  # select_blocks on crafted scores: no attention backend runs here
    gen = torch.Generator().manual_seed(case_seed(params))
    num_blocks = -(-seq_len // lp)
    scores = torch.randint(0, 3, (2, seq_len, hk, num_blocks), generator=gen).to(torch.float32)
    scores[1] = 1.0  # one batch row where every candidate ties
    got = select_blocks(scores, select_block=lp, select_count=n)
    bad = [f"b={b} t={t} h={h}: got {got[b, t, h].tolist()}, want {want}"
           for b in range(2) for t in range(seq_len) for h in range(hk)
           if got[b, t, h].tolist() != (want := brute_force_topn(scores[b, t, h].tolist(), t, lp, n))]
    checks.true("select_blocks_equals_brute_force", not bad, "; ".join(bad[:3]))
    # The properties the brute force encodes, asserted on their own so a failure names the rule.
    current = torch.arange(seq_len)[:, None] // lp
    real = got >= 0
    has = lambda j: ((got == j[None, :, None, :]) & real).any(-1)
    forced_ok = has(torch.zeros_like(current)).all() and has(current).all() and \
        has(current - 1)[:, current[:, 0] >= 1].all()
    checks.true("forced_blocks_present", bool(forced_ok))
    sorted_ok = all(_well_formed(row) for row in got.reshape(-1, n).tolist())
    checks.true("ascending_then_minus_one_padding", sorted_ok)
    # Ties: row b=1 ties every candidate, so the free slots must be the lowest candidate indices.
    tie_bad = []
    for t in range(seq_len):
        c = t // lp
        forced = {0, c, c - 1} - {-1}
        free = [j for j in range(1, c - 1) if j not in forced][:n - len(forced)]
        want = sorted(forced | set(free))
        for h in range(hk):
            if [x for x in got[1, t, h].tolist() if x >= 0] != want:
                tie_bad.append(f"t={t}")
    checks.true("ties_go_to_lower_index", not tie_bad, ", ".join(tie_bad[:5]))
    padded = int((got == -1).any(-1).sum())
    checks.at_least("rows_with_padding", padded, 1)
    full = int((got != -1).all(-1).sum())
    checks.at_least("rows_with_every_slot_chosen", full, 1)


def _well_formed(row: list[int]) -> bool:
    """Distinct ascending block indices first, then only ``-1`` padding."""
    real = [x for x in row if x >= 0]
    return row[:len(real)] == real and real == sorted(set(real)) and all(x == -1 for x in row[len(real):])
