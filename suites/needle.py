"""Needle in a haystack without a trained model.

Keys, values and queries are random. One selection block at a chosen depth holds the needle:
its keys are ``alpha * u + noise`` where ``u`` is the direction the final query of every head in
the group leans towards (each head's final query is ``u`` plus its own random part, so heads
differ), and its values all carry one needle value vector. Scores stay real softmax scores over
random competitors, never one-hot. The check: the real scoring path (mean-phi compression ->
``selection_block_scores`` -> ``select_blocks``, as the backend runs it) selects the needle block
for the last query, and the output at the last position retrieves the needle value
(cosine >= 0.99) at depths 0-100% in 10% steps.

Gates: with no trained gate MLP there is nothing that learned to trust one branch, so the bound
uses gates (0, 1, 0) that route the output through the selection branch, the one this test is
about (the window cannot see a deep needle; the compression branch blurs it over l tokens).
The cosine under the layer's initial gates (all 0.5: the gate MLP's last layer starts at zero)
is recorded without a bound.
"""

from __future__ import annotations

from typing import Any

import torch

from nsa.backends import resolve_backend, run_backend
from nsa.ops import compress_mean, selection_block_scores
from suites.common import PAPER, case_seed, config_from, device_of, dtype_of, generator, randn, run_nsa
from verify.registry import Checks, suite

DEPTHS = tuple(range(0, 101, 10))
# Needle keys = ALPHA * u + N(0, I) with |u| = 1; a final query of norm sqrt(Dk) at cosine ~0.9
# to u then scores a needle key about ALPHA * 0.9 against the N(0, 1) scores of random keys: the
# needle block ranks first, yet (at 4k, and far more at 128k) competitors keep real score mass.
ALPHA = 6.0
COSINE_BOUND = 0.99


def _cases(scale: str):
    if scale == "ci":
        for depth in DEPTHS:
            yield f"T4096-depth{depth}", {"heads": 4, "kv_heads": 2, "dk": 64, "dv": 32, "l": 32, "d": 16,
                                          "lp": 64, "n": 16, "w": 512, "phi": "mean", "seq_len": 4096,
                                          "depth": depth, "dtype": "float32", "last_queries": 4}
        return
    for seq_len in (65536, 131072):
        for depth in DEPTHS:
            yield f"paper-T{seq_len}-depth{depth}-bf16", {**PAPER, "phi": "mean", "seq_len": seq_len,
                                                          "depth": depth, "dtype": "bfloat16",
                                                          "last_queries": 4, "needs_gpu": True}


def _haystack(params: dict[str, Any], config, device: torch.device, dtype: torch.dtype):
    """Random q, k, v ``[1, T, H, D]`` with the needle planted; returns them, the needle block and
    the needle value vectors ``[HK, Dv]``."""
    seq_len, lp = params["seq_len"], config.select_block
    hk, group, dk, dv = config.num_kv_heads, config.group_size, config.head_dim, config.v_head_dim
    gen = generator(case_seed(params), device)

    def draw(*shape: int) -> torch.Tensor:
        return randn(shape, gen=gen, dtype=torch.float32, device=device)

    q, k, v = draw(1, seq_len, config.num_heads, dk), draw(1, seq_len, hk, dk), draw(1, seq_len, hk, dv)
    num_blocks = config.num_select_blocks(seq_len)
    needle = round(params["depth"] / 100 * (num_blocks - 1))
    span = slice(needle * lp, min(seq_len, (needle + 1) * lp))
    u = torch.nn.functional.normalize(draw(hk, dk), dim=-1)
    needle_value = draw(hk, dv)
    k[0, span] += ALPHA * u
    v[0, span] = needle_value
    # Final query of head h*G + g: sqrt(Dk) * unit(u_h + 0.5 * own random unit vector).
    own = torch.nn.functional.normalize(draw(hk, group, dk), dim=-1)
    last = torch.nn.functional.normalize(u[:, None, :] + 0.5 * own, dim=-1) * dk ** 0.5
    q[0, -1] = last.reshape(config.num_heads, dk)
    return q.to(dtype), k.to(dtype), v.to(dtype), needle, needle_value


@suite("needle", "a needle block planted at depth 0-100% is selected by the real scoring path for "
       "the last query and retrieved by the output (cosine >= 0.99)", cases=_cases)
def needle(params: dict[str, Any], checks: Checks) -> None:
    config = config_from(params)
    device, dtype = device_of(params), dtype_of(params)
    seq_len, last = params["seq_len"], params["last_queries"]
    q, k, v, needle_block, needle_value = _haystack(params, config, device, dtype)
    # Batch row 0: selection-only gates (the bound); row 1: the initial layer gates (recorded).
    gates = torch.zeros(2, seq_len, config.num_heads, 3, device=device, dtype=dtype)
    gates[0, ..., 1] = 1
    gates[1] = 0.5
    q2, k2, v2 = (x.expand(2, *x.shape[1:]).contiguous() for x in (q, k, v))
    name, _ = resolve_backend(params.get("backend", "auto"), q, config)
    if name == "reference":
        # The reference backend takes q_offset, so only the last queries are computed: the same
        # scoring and attention code as nsa_attention, without T - last queries nobody checks.
        k_cmp = compress_mean(k2, config.compress_block, config.compress_stride)
        v_cmp = compress_mean(v2, config.compress_block, config.compress_stride)
        out, blocks, _ = run_backend(name, q2[:, -last:], k_cmp, v_cmp, k2, v2, k2, v2, gates[:, -last:],
                                     config, q_offset=seq_len - last)
        checks.backend = name
    else:
        out, info = run_nsa({"q": q2, "k": k2, "v": v2, "gates": gates}, config, params, checks)
        blocks = info.selected_blocks
    chosen = blocks[0, -1]  # [HK, n] for the last query
    checks.record("needle_block", needle_block)
    c = (seq_len - 1) // config.select_block
    checks.record("needle_block_forced", float(needle_block in (0, c, c - 1)))
    missing = [h for h in range(config.num_kv_heads) if needle_block not in chosen[h].tolist()]
    checks.true("needle_block_selected", not missing, f"kv heads {missing} chose {chosen.tolist()}")

    # How much of the last query's block score the needle block holds (real scores: well below
    # the group size G, the total, when competitors get mass too).
    k_cmp0 = compress_mean(k, config.compress_block, config.compress_stride)
    scores = selection_block_scores(q[:, -1:], k_cmp0, block=config.compress_block,
                                    stride=config.compress_stride, select_block=config.select_block,
                                    q_offset=seq_len - 1)[0, 0]
    share = scores[:, needle_block] / scores.sum(-1)
    checks.record("needle_score_share_min", float(share.min()))
    checks.record("needle_score_share_max", float(share.max()))

    target = needle_value.repeat_interleave(config.group_size, dim=0).float()  # [HQ, Dv]
    cos = torch.nn.functional.cosine_similarity(out[:, -1].float(), target[None], dim=-1)  # [2, HQ]
    checks.at_least("min_cosine_last_output_vs_needle_value", float(cos[0].min()), COSINE_BOUND)
    checks.record("min_cosine_with_initial_gates", float(cos[1].min()))


def _plot_inputs(params: dict[str, Any]) -> dict[str, Any]:
    """The planted haystack of kv head 0 for ``nsa report plot``: ``q [1, T, G, Dk]``,
    ``k [1, T, 1, Dk]`` (CPU, float32) and the config of that one group."""
    config = config_from(params)
    q, k, _, _, _ = _haystack(params, config, torch.device("cpu"), torch.float32)
    group = config.group_size
    return {"q": q[:, :, :group], "k": k[:, :, :1],
            "config": config.replace(num_heads=group, num_kv_heads=1)}


# Set after decoration so this module also imports with a registry that predates the hook.
needle.plot_inputs = _plot_inputs
