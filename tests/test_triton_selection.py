"""Triton block selection against ``select_blocks(selection_block_scores(...))``, on CPU.

Kernels run in Triton's interpreter (float32). Where the two paths pick different blocks, the
picks must be equally good: ties within rounding are judged by score, not by index.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything defines a Triton kernel

import pytest
import torch

from nsa.config import num_compressed
from nsa.ops.compressed_attention.naive import compressed_attention
from nsa.ops.compressed_attention.triton import compressed_attention_triton
from nsa.ops.selection import triton as selection_triton
from nsa.ops.selection.naive import select_blocks, selection_block_scores
from nsa.ops.selection.triton import select_blocks_triton

# Scores agreeing to this fraction of the row's best score count as tied (float32 kernels
# against a float64 reference).
TIE_RTOL = 1e-5


def assert_same_selection(got: torch.Tensor, want: torch.Tensor, scores: torch.Tensor, *, select_block: int,
                          rtol: float = TIE_RTOL) -> None:
    """``got`` is a correct top-n selection wherever it differs from ``want``.

    Both ``[B, T, HK, n]`` int64; ``scores [B, T, HK, NB]`` from the float64 reference. Rows that
    differ must hold the same forced blocks and as many blocks, and their non-forced blocks'
    scores, sorted, must agree within ``rtol`` of the row's largest score. Every row of ``got``
    must be ascending, duplicate-free and ``-1``-padded at the end.
    """
    assert got.shape == want.shape and got.dtype == torch.int64, (got.shape, got.dtype)
    valid = got >= 0
    assert (valid[..., :-1] | ~valid[..., 1:]).all(), "-1 padding must come last"
    assert ((got[..., 1:] > got[..., :-1]) | ~valid[..., 1:]).all(), "blocks must be ascending, no duplicates"
    differ = (got != want).any(-1).nonzero().tolist()
    for b, t, h in differ:
        current = t // select_block
        forced = {0, current, current - 1} - {-1}
        picked = {int(x) for x in got[b, t, h] if x >= 0}
        expected = {int(x) for x in want[b, t, h] if x >= 0}
        where = f"(b={b}, t={t}, h={h}): got {sorted(picked)}, want {sorted(expected)}"
        assert len(picked) == len(expected), f"different block counts at {where}"
        assert forced & expected <= picked, f"forced block missing at {where}"
        assert all(1 <= j <= current - 2 for j in picked - forced), f"non-candidate block picked at {where}"
        row = scores[b, t, h].double()
        got_scores = row[sorted(picked - forced)].sort(descending=True).values
        want_scores = row[sorted(expected - forced)].sort(descending=True).values
        tolerance = rtol * row.abs().max().item()
        assert torch.allclose(got_scores, want_scores, rtol=0, atol=tolerance), (
            f"not a tie within {tolerance:.3g} at {where}: scores {got_scores.tolist()} vs {want_scores.tolist()}")


def test_selection_check_rejects_a_worse_pick():
    # Row t = 6 with l' = 1: forced 0, 5, 6, and the best candidates are 1 and 3.
    scores = torch.tensor([5.0, 9.0, 1.0, 7.0, 3.0, 0.5, 0.2]).expand(1, 7, 1, 7)
    want = torch.tensor([0, 1, 3, 5, 6]).expand(1, 7, 1, 5)

    def with_row6(blocks):
        out = want.clone()
        out[0, 6, 0] = torch.tensor(blocks)
        return out

    assert_same_selection(want.clone(), want, scores, select_block=1)
    with pytest.raises(AssertionError, match="not a tie"):
        assert_same_selection(with_row6([0, 1, 2, 5, 6]), want, scores, select_block=1)
    with pytest.raises(AssertionError, match="forced"):
        assert_same_selection(with_row6([0, 1, 3, 4, 6]), want, scores, select_block=1)
    with pytest.raises(AssertionError, match="ascending"):
        assert_same_selection(with_row6([0, 3, 1, 5, 6]), want, scores, select_block=1)


# (batch, T, HK, G, Dk, l, d, l', n): G in {1, 2, 4, 8, 16} and a non-power of two, several
# (l, d, l'), T off the tile sizes, n below and above the number of candidates. Blocks enter the
# running top-n both by bitonic merges (early steps gain many) and by insertions (later ones few).
CASES = [
    (2, 203, 2, 1, 16, 8, 4, 16, 5),
    (1, 300, 1, 2, 32, 16, 8, 32, 4),
    (2, 150, 1, 4, 16, 8, 4, 16, 6),
    (1, 170, 2, 8, 24, 4, 2, 8, 7),
    (1, 97, 1, 16, 48, 8, 8, 8, 16),
    (1, 120, 1, 3, 16, 16, 4, 16, 3),
    # Many steps of the block walk (3 and 7 blocks a step under the interpreter), n not a power of two.
    (1, 300, 1, 2, 16, 4, 2, 16, 6),
    (1, 200, 1, 4, 32, 4, 2, 8, 12),
    # Top-n wider than the rank-counting sort (n > 64): the final order comes from tl.sort. Kept
    # to few block-walk steps (l = d = l' = 1: 32 blocks a step under the interpreter), each a
    # 256-wide bitonic merge: T=1200 with l'=8 took over 30 minutes of interpreter time.
    (1, 72, 1, 2, 16, 1, 1, 1, 66),
]


@pytest.mark.parametrize("batch,seq_len,num_kv,group,dk,block,stride,select_block,count", CASES,
                         ids=[f"B{c[0]}-T{c[1]}-HK{c[2]}-G{c[3]}-l{c[5]}-d{c[6]}-ls{c[7]}-n{c[8]}" for c in CASES])
def test_selected_blocks_match_reference(batch, seq_len, num_kv, group, dk, block, stride, select_block, count):
    check_random_selection(torch.Generator().manual_seed(seq_len + 100 * group), batch, seq_len, num_kv, group,
                           dk, block, stride, select_block, count)


def check_random_selection(gen, batch, seq_len, num_kv, group, dk, block, stride, select_block, count):
    """Triton's blocks for random q and compressed keys equal the float64 reference's (ties aside)."""
    q = torch.randn(batch, seq_len, num_kv * group, dk, generator=gen)
    k_cmp = torch.randn(batch, num_compressed(seq_len, block, stride), num_kv, dk, generator=gen)
    v_cmp = torch.randn(batch, k_cmp.shape[1], num_kv, 16, generator=gen)
    _, lse = compressed_attention_triton(q, k_cmp, v_cmp, block=block, stride=stride)
    got = select_blocks_triton(q, k_cmp, lse, block=block, stride=stride, select_block=select_block,
                               select_count=count)
    scores = selection_block_scores(q.double(), k_cmp.double(), block=block, stride=stride,
                                    select_block=select_block)
    want = select_blocks(scores, select_block=select_block, select_count=count)
    assert_same_selection(got, want, scores, select_block=select_block)
    # Random scores rarely tie: nearly every row must match index for index.
    assert (got == want).all(-1).float().mean() > 0.99


def test_lse_from_naive_reference_gives_same_blocks():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 130, 4, 16, generator=gen)
    k_cmp = torch.randn(2, num_compressed(130, 8, 4), 2, 16, generator=gen)
    _, lse = compressed_attention(q, k_cmp, k_cmp, block=8, stride=4)
    got = select_blocks_triton(q, k_cmp, lse, block=8, stride=4, select_block=16, select_count=4)
    scores = selection_block_scores(q.double(), k_cmp.double(), block=8, stride=4, select_block=16)
    assert_same_selection(got, select_blocks(scores, select_block=16, select_count=4), scores, select_block=16)


@pytest.mark.parametrize("block,stride,select_block", [(8, 4, 16), (4, 4, 8), (8, 2, 8)])
def test_exact_ties_choose_the_lower_index(block, stride, select_block):
    # q = 0 and lse = 0 make every visible p_cmp exactly 1, so every candidate block (its whole
    # Eq. 9 window is visible) scores the same integer: the lowest candidates must win.
    seq_len, count = 150, 5
    q = torch.zeros(1, seq_len, 4, 16)
    k_cmp = torch.randn(1, num_compressed(seq_len, block, stride), 2, 16)
    lse = torch.zeros(1, seq_len, 4)
    got = select_blocks_triton(q, k_cmp, lse, block=block, stride=stride, select_block=select_block,
                               select_count=count)
    for t in range(seq_len):
        current = t // select_block
        forced = sorted({0, current, max(current - 1, 0)})
        lowest = [j for j in range(1, current - 1)][:count - len(forced)]
        expected = sorted(forced + lowest)
        expected += [-1] * (count - len(expected))
        assert got[0, t].tolist() == [expected, expected], f"t={t}: got {got[0, t].tolist()}, want {expected}"


def test_eq9_weights_beyond_float16_integers_are_rejected():
    q = torch.zeros(1, 4, 1, 16)
    with pytest.raises(ValueError, match="stride=1 must be <= 2048"):
        select_blocks_triton(q, torch.zeros(1, 1, 1, 16), torch.zeros(1, 4, 1), block=4096, stride=1,
                             select_block=4096, select_count=2)


@pytest.mark.parametrize("tma,merge_steps", [(False, 1), (True, 1), (False, 2), (True, 4)],
                         ids=["pointers", "tma", "merge2", "tma-merge4"])
@pytest.mark.parametrize("tiles", sorted({(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"])
                                          for c in selection_triton._SELECT_CONFIGS}), ids=lambda t: f"M{t[0]}-N{t[1]}")
def test_production_tiles_select_like_the_reference(tiles, tma, merge_steps, monkeypatch):
    """The interpreter normally runs small tiles; here the GPU autotune list's tiles, with the
    paper's ratios l'/d = 4 and l/d = 2 (15 blocks a 64-key step) and G = 4, the compressed keys
    loaded by pointers or through tensor descriptors (the first step's box starts before key 0),
    merging each step's blocks into the top-n or 2 or 4 steps' at once (steps past a tile's last
    block included)."""
    monkeypatch.setattr(selection_triton, "INTERPRET_TILES",
                        {"BLOCK_M": tiles[0], "BLOCK_N": tiles[1], "TMA": tma, "MERGE_STEPS": merge_steps})
    check_random_selection(torch.Generator().manual_seed(sum(tiles)), batch=1, seq_len=400, num_kv=1, group=4,
                           dk=16, block=8, stride=4, select_block=16, count=6)


def test_distinct_blocks_per_list_against_a_loop_and_by_hand():
    """The overlap statistic of neighbouring positions' lists: hand cases, then a Python loop
    over tiles as the oracle on random lists with -1 padding."""
    import math

    from nsa.ops import distinct_blocks_per_list

    same = torch.tensor([0, 3, 5]).expand(1, 8, 2, 3)
    assert distinct_blocks_per_list(same, 4) == 1.0
    disjoint = torch.arange(24).reshape(1, 8, 1, 3)
    assert distinct_blocks_per_list(disjoint, 4) == 4.0
    padded = torch.tensor([[0, 1, -1], [0, 2, -1]]).reshape(1, 2, 1, 3)  # 3 distinct, 2 per list
    assert distinct_blocks_per_list(padded, 2) == 1.5
    assert math.isnan(distinct_blocks_per_list(disjoint, 4, start=6))  # no whole tile left
    with pytest.raises(ValueError, match=r"selected must be \[B, T, HK, n\]"):
        distinct_blocks_per_list(disjoint[0], 4)
    gen = torch.Generator().manual_seed(3)
    lists = torch.randint(0, 12, (2, 37, 3, 5), generator=gen)
    lists = torch.where(torch.rand(lists.shape, generator=gen) < 0.2, -1, lists)
    for tile, start in ((4, 0), (16, 5), (1, 0)):
        ratios = []
        for b in range(2):
            for h in range(3):
                for t0 in range(start, start + (37 - start) // tile * tile, tile):
                    blocks = lists[b, t0:t0 + tile, h].flatten()
                    valid = blocks[blocks >= 0]
                    ratios.append(valid.unique().numel() / max(1.0, valid.numel() / tile))
        assert distinct_blocks_per_list(lists, tile, start) == pytest.approx(sum(ratios) / len(ratios))


def test_register_caps_survive_pruning_and_compile_under_the_cap():
    """The autotune list's register caps (``maxnreg``, for programs per SM) reach the launched
    configs through the prune hook, and compiled for sm_90 the capped configs stay within them
    (the audit compiles with each config's cap)."""
    import json

    from compiled_subprocess import run_compiled

    consts = {"GP": 4, "MAX_POSITIONS": selection_triton.MAX_POSITIONS, "BLOCK": 32, "STRIDE": 16,
              "SELECT_BLOCK": 64, "NP": 16}
    kept = selection_triton._prune_selection(selection_triton._SELECT_CONFIGS, consts)
    caps = sorted(c.maxnreg or 0 for c in selection_triton._SELECT_CONFIGS)
    assert sorted(c.maxnreg or 0 for c in kept) == caps and max(caps) > 0, kept
    code = ("import json\nfrom dataclasses import asdict\nfrom nsa.ops.compile_check import audit\n"
            "for row in audit([(128, 128)], [16, 4], kernels=('selection-scoring',)):\n"
            "    print(json.dumps(asdict(row)))\n")
    rows = [json.loads(line) for line in run_compiled(code).splitlines()]
    capped = [row for row in rows if " r" in row["config"]]  # the list's capped configs, both groups
    assert len(capped) == 2 * sum(1 for cap in caps if cap), rows
    for row in capped:
        cap = int(row["config"].rsplit(" r", 1)[1])
        assert 0 < row["registers"] <= cap, row
