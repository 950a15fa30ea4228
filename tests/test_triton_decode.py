"""Triton decode step == reference decode step == prefill reference, on CPU (Triton interpreter).

Caches are filled with fresh random keys/values at known positions (the selection cache and the
compressed tokens position-indexed, the window a ring), then a step of ``K`` new tokens per
sequence (``num_new`` of them real, 0 allowed) runs through :func:`nsa_decode_triton`,
:func:`nsa_decode_reference` and, as the independent oracle, :func:`nsa_reference` over each whole
sequence in float64 whose last rows are the step's tokens. Kernels run in float32 (the
interpreter's bf16 dot is wrong).
"""

import contextlib
import dataclasses
import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything defines a Triton kernel

import pytest
import torch
import triton
import triton.language as tl
from test_triton_selection import assert_same_selection

from nsa import NSAAttention
from nsa.config import NSAConfig
from nsa.ops.decode import nsa_decode, nsa_decode_reference, resolve_decode
from nsa.ops.decode.triton import (
    DECODE_STAGES,
    FUSED_SCORE_STEPS,
    SHORT_CHUNK_STAGES,
    TOP_N_METHODS,
    _nth_largest_key,
    nsa_decode_triton,
    plan_decode,
    pow2,
    top_n_method,
)
from nsa.ops.reads import compressed_reads, selected_reads, window_reads
from nsa.ops.reference import nsa_reference
from nsa.ops.selection import selection_block_scores

OUTPUT_TOL = 2e-5  # float32 kernels against the float64 oracle, relative to max |o|


def small(**changes) -> NSAConfig:
    base = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "v_head_dim": 32, "compress_block": 8,
            "compress_stride": 4, "select_block": 16, "select_count": 4, "window": 12, "phi": "mean"}
    return NSAConfig(**{**base, **changes})


def make_step(config: NSAConfig, lengths: list[int], counts: list[int], steps: int, max_len: int,
              ring: int, seed: int, *, zero_cmp_keys: bool = False):
    """Random whole sequences, their caches after the step and the step's inputs (float64)."""
    g = torch.Generator().manual_seed(seed)
    c, batch = config, len(lengths)
    hq, hk, dk, dv = c.num_heads, c.num_kv_heads, c.head_dim, c.v_head_dim

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    n_cmp = c.num_compressed(max_len)
    full = {"q": randn(batch, max_len, hq, dk), "k_cmp": randn(batch, n_cmp, hk, dk),
            "v_cmp": randn(batch, n_cmp, hk, dv), "k_slc": randn(batch, max_len, hk, dk),
            "v_slc": randn(batch, max_len, hk, dv), "k_win": randn(batch, max_len, hk, dk),
            "v_win": randn(batch, max_len, hk, dv), "gates": torch.rand(batch, max_len, hq, 3, generator=g,
                                                                           dtype=torch.float64)}
    if zero_cmp_keys:
        full["k_cmp"].zero_()
    # Ring slot p % ring holds the latest position p < length with that slot; older ones are
    # overwritten with noise, so reading a stale slot shows.
    rings = {name: randn(batch, ring, hk, full[name].shape[-1]) * 100 for name in ("k_win", "v_win")}
    q = torch.zeros(batch, steps, hq, dk, dtype=torch.float64)
    gates = torch.zeros(batch, steps, hq, 3, dtype=torch.float64)
    for b, (length, count) in enumerate(zip(lengths, counts)):
        for p in range(max(0, length - ring), length):
            for name, ring_tensor in rings.items():
                ring_tensor[b, p % ring] = full[name][b, p]
        q[b, :count] = full["q"][b, length - count:length]
        gates[b, :count] = full["gates"][b, length - count:length]
    step = {**{name: full[name] for name in ("k_cmp", "v_cmp", "k_slc", "v_slc")}, **rings, "q": q,
            "gates": gates, "lengths": torch.tensor(lengths), "num_new": torch.tensor(counts)}
    return full, step


def as_args(step: dict, dtype: torch.dtype):
    tensors = [step[k].to(dtype) for k in ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates")]
    return (*tensors, step["lengths"])


def oracle(config: NSAConfig, full: dict, lengths: list[int], counts: list[int], steps: int):
    """Prefill reference over each whole sequence (float64): the step's rows, blocks, reads, scores."""
    c, batch = config, len(lengths)
    o = torch.zeros(batch, steps, c.num_heads, c.v_head_dim, dtype=torch.float64)
    blocks = torch.full((batch, steps, c.num_kv_heads, c.select_count), -1, dtype=torch.int64)
    scores = torch.zeros(batch, steps, c.num_kv_heads, c.num_select_blocks(max(lengths)), dtype=torch.float64)
    for b, (length, count) in enumerate(zip(lengths, counts)):
        if not count:
            continue
        seq = slice(b, b + 1)
        n_cmp = c.num_compressed(length)
        out, sel, _ = nsa_reference(full["q"][seq, :length], full["k_cmp"][seq, :n_cmp], full["v_cmp"][seq, :n_cmp],
                                    full["k_slc"][seq, :length], full["v_slc"][seq, :length],
                                    full["k_win"][seq, :length], full["v_win"][seq, :length],
                                    full["gates"][seq, :length], c)
        o[b, :count] = out[0, length - count:]
        blocks[b, :count] = sel[0, length - count:]
        s = selection_block_scores(full["q"][seq, length - count:length], full["k_cmp"][seq, :n_cmp],
                                   block=c.compress_block, stride=c.compress_stride, select_block=c.select_block,
                                   num_blocks=scores.shape[-1], q_offset=length - count)
        scores[b, :count] = s[0]
    return o, blocks, scores


def expected_candidates(config: NSAConfig, lengths: list[int], counts: list[int], steps: int) -> int:
    """Candidate blocks ``1 .. c-2`` summed over real tokens and kv heads."""
    total = 0
    for length, count in zip(lengths, counts):
        for t in range(length - count, length):
            total += max(0, t // config.select_block - 2) * config.num_kv_heads
    return total


def expected_reads(config: NSAConfig, blocks: torch.Tensor, lengths: list[int], counts: list[int]):
    """Reads by nsa.ops.reads from the ranges, 0 for padding rows (``[B, K, HK]`` per branch)."""
    c = config
    out = {b: torch.zeros(blocks.shape[:3], dtype=torch.int64) for b in ("cmp", "slc", "win")}
    for b, (length, count) in enumerate(zip(lengths, counts)):
        pos = torch.arange(length - count, length)
        out["cmp"][b, :count] = compressed_reads(pos, block=c.compress_block, stride=c.compress_stride)[:, None]
        out["slc"][b, :count] = selected_reads(blocks[b, :count], pos, select_block=c.select_block)
        out["win"][b, :count] = window_reads(pos, window=c.window)[:, None]
    return out


def check_step(config, lengths, counts, steps, max_len, ring, seed, *, plan_kwargs=None, zero_cmp_keys=False):
    full, step = make_step(config, lengths, counts, steps, max_len, ring, seed, zero_cmp_keys=zero_cmp_keys)
    want_o, want_blocks, scores = oracle(config, full, lengths, counts, steps)
    plan = plan_decode(config, len(lengths) * steps * config.num_kv_heads, max_len, **(plan_kwargs or {}))
    o, blocks, reads, got_scores = nsa_decode_triton(*as_args(step, torch.float32), config, num_new=step["num_new"],
                                                     plan=plan, return_scores=True)
    ref_o, ref_blocks, ref_reads = nsa_decode_reference(*as_args(step, torch.float64), config,
                                                        num_new=step["num_new"])
    assert torch.isfinite(o).all()
    # Every candidate block's Eq. 10 score (what the top-n ranked) against the float64 scorer.
    candidate = ~torch.isnan(got_scores[..., :scores.shape[-1]])
    assert int(candidate.sum()) == expected_candidates(config, lengths, counts, steps)
    err = (got_scores[..., :scores.shape[-1]].double() - scores)[candidate].abs().max() if candidate.any() else 0.0
    assert err <= 1e-5 * max(1.0, scores.abs().max().item()), float(err)
    assert torch.equal(ref_blocks, want_blocks), "reference decode must pick the prefill's blocks exactly"
    assert torch.allclose(ref_o, want_o, rtol=0, atol=1e-12), "reference decode must equal the prefill"
    assert_same_selection(blocks.flatten(0, 1)[None], want_blocks.flatten(0, 1)[None],
                          scores.flatten(0, 1)[None], select_block=config.select_block)
    agree = (blocks == want_blocks).all(-1).all(-1)
    err = (o.double() - want_o)[agree].abs().max().item() if agree.any() else 0.0
    assert err <= OUTPUT_TOL * max(1.0, want_o.abs().max().item()), err
    # Reads are counted by the kernels; they must equal the ranges of the blocks they chose.
    want_reads = expected_reads(config, blocks, lengths, counts)
    for branch in ("cmp", "slc", "win"):
        assert torch.equal(reads[branch], want_reads[branch]), branch
        assert torch.equal(reads[branch][agree], ref_reads[branch][agree]), branch
    return blocks, want_blocks


@pytest.mark.parametrize("config,lengths,counts,steps,max_len,ring,seed", [
    # G=2 (padded to 16 rows), Dk != Dv; one token each, lengths across emission/block boundaries;
    # 91: c = 5, a real top-n among candidates 1..3.
    (small(), [1, 8, 37, 91], [1, 1, 1, 1], 1, 96, 12, 0),
    # Three-token steps (chunked prefill / speculative), 0 and 2 new tokens among them, ring w + K - 1.
    (small(), [40, 77, 66], [3, 0, 2], 3, 80, 14, 1),
    # G=1, d = l (no overlap), w larger than every sequence, more blocks than n.
    (small(num_heads=2, num_kv_heads=2, head_dim=32, v_head_dim=16, compress_block=8, compress_stride=8,
           select_count=3, window=64), [50, 120], [1, 1], 1, 128, 64, 2),
    # G=16 (the paper's group), l/d = 4, l'/d = 8, n = 6.
    (small(num_heads=16, num_kv_heads=1, head_dim=16, v_head_dim=16, compress_block=16, compress_stride=4,
           select_block=32, select_count=6, window=20), [130, 161], [2, 1], 2, 170, 21, 3),
])
def test_triton_decode_matches_reference_and_prefill(config, lengths, counts, steps, max_len, ring, seed):
    check_step(config, lengths, counts, steps, max_len, ring, seed)


def test_unfused_scoring_when_blocks_do_not_tile():
    """l'/d = 3 does not divide a power-of-two tile, so the scoring re-reads the compressed keys
    in Eq. 9 windows (the unfused kernel); the default plans above take the fused path."""
    config = small(compress_block=4, compress_stride=2, select_block=6, select_count=5, window=9)
    assert not plan_decode(config, 4, 100).fused and plan_decode(small(), 4, 96).fused
    check_step(config, [100, 61], [2, 1], 2, 100, 10, 8)


def test_split_plans_agree():
    """Many small splits per branch, one split per branch, and the GPU's 64-key tiles give the
    prefill's result."""
    config = small()
    for plan_kwargs in ({"target_programs": 1, "block_n": 16}, {"target_programs": 1024, "block_n": 16},
                        {"target_programs": 8, "block_n": 64}, {"target_programs": 1024, "select_splits": 1},
                        {"target_programs": 1, "select_splits": 3}):
        check_step(config, [90, 57], [1, 1], 1, 96, 12, 4, plan_kwargs=plan_kwargs)
    many = plan_decode(config, 4, 96, target_programs=1024, block_n=16)
    assert many.cmp_splits > 1 and many.slc_splits > 1 and many.score_splits > 1


@pytest.mark.parametrize("score_steps", [1, 3])
def test_fused_scoring_steps_per_program_agree(score_steps):
    """The fused scoring with one tile per program and with three (a partial last program) gives
    the prefill's blocks and output."""
    config = small()
    plan = plan_decode(config, 4, 300, score_steps=score_steps)
    assert plan.fused and plan.score_steps == score_steps
    assert plan.score_splits == -(-plan.n_tiles // score_steps) and plan.score_splits > 1
    check_step(config, [290, 157], [1, 1], 1, 300, 12, 6, plan_kwargs={"score_steps": score_steps})


def test_fused_scoring_gets_its_own_program_count():
    """The fused scoring takes at most FUSED_SCORE_STEPS tiles per program whatever the other
    branches' split (batch 32 at 64k: 64 / FUSED_SCORE_STEPS programs per token group, where the
    shared split gave 22 tiles to each of 3); batch 1 keeps one tile per program; explicit
    scoring steps and select programs are taken as given; bad counts are refused."""
    paper = NSAConfig(num_heads=64, num_kv_heads=4, head_dim=128, v_head_dim=128)
    gpu = {"target_programs": 264, "block_n": 64}  # an H100's plan
    batch32 = plan_decode(paper, 128, 65536, **gpu)
    assert batch32.fused and batch32.slc_splits == 3
    assert (batch32.score_steps, batch32.score_splits) == (FUSED_SCORE_STEPS, 64 // FUSED_SCORE_STEPS)
    batch1 = plan_decode(paper, 4, 65536, **gpu)
    assert (batch1.score_steps, batch1.score_splits) == (1, 64)
    assert plan_decode(paper, 128, 65536, **gpu, score_steps=8).score_splits == 8
    unfused = small(compress_block=4, compress_stride=2, select_block=6, select_count=5, window=9)
    assert plan_decode(unfused, 128, 6000, target_programs=128).score_steps > FUSED_SCORE_STEPS
    with pytest.raises(ValueError, match=r"score_steps: Eq. 9 steps per scoring program must be >= 1, got 0"):
        plan_decode(paper, 4, 65536, score_steps=0)
    assert plan_decode(paper, 128, 65536, **gpu, select_splits=1).slc_splits == 1
    assert (plan_decode(paper, 128, 65536, **gpu, select_splits=3).slc_chunk, batch32.slc_chunk) == (6, 6)
    with pytest.raises(ValueError, match=r"select_splits: programs per token group of the select kernel"):
        plan_decode(paper, 4, 65536, select_splits=0)


@pytest.mark.parametrize("columns", [2, 4])
def test_combine_column_slices_agree(columns):
    """The combine kernel with several programs per query head, each merging a slice of Dv, gives
    the prefill's result (outputs, blocks, reads), with several splits in every branch."""
    config = small(v_head_dim=64, window=40)
    plan_kwargs = {"target_programs": 1024, "block_n": 16, "combine_columns": columns}
    plan = plan_decode(config, 4, 96, **plan_kwargs)
    assert plan.cmp_splits > 1 and plan.win_splits > 1 and plan.combine_columns == columns
    check_step(config, [90, 57], [1, 1], 1, 96, 40, 4, plan_kwargs=plan_kwargs)


def test_combine_column_slices_are_checked():
    from nsa.bench.decode import filled_cache

    config = small()  # Dv 32: at most two slices of 16 columns
    with pytest.raises(ValueError, match="combine_columns must be a power of two >= 1, got 3"):
        plan_decode(config, 4, 96, combine_columns=3)
    cache = filled_cache(config, 1, 96, torch.float32, device="cpu")
    q = torch.randn(1, 1, config.num_heads, config.head_dim)
    gates = torch.rand(1, 1, config.num_heads, 3)
    plan = plan_decode(config, config.num_kv_heads, 96, combine_columns=4)
    with pytest.raises(ValueError, match=r"combine_columns: 4 slices of Dv 32 .* powers of two up to 2"):
        nsa_decode_triton(q, cache.k_cmp, cache.v_cmp, cache.k_slc, cache.v_slc, cache.k_win, cache.v_win,
                          gates, cache.lengths, config, plan=plan)


@pytest.mark.parametrize("window_overlap", ["compressed", "scoring"])
def test_window_splits_launched_apart_agree(window_overlap):
    """The window splits as a launch of their own (``SPLIT_BASE``; on a side stream on CUDA, in
    order here) give the prefill's result, with several splits in every branch."""
    config = small(window=40)
    plan_kwargs = {"target_programs": 1024, "block_n": 16, "window_overlap": window_overlap}
    plan = plan_decode(config, 4, 96, **plan_kwargs)
    assert plan.cmp_splits > 1 and plan.win_splits > 1
    check_step(config, [90, 57], [1, 1], 1, 96, 40, 4, plan_kwargs=plan_kwargs)
    with pytest.raises(ValueError, match="window_overlap"):
        plan_decode(small(), 4, 96, window_overlap="window")


def test_programmatic_launch_is_refused_where_it_cannot_run(monkeypatch):
    """``pdl`` (programmatic dependent launch) is opt-in; it needs compiled kernels on sm_90+ and
    every launch in one stream: a plan that asks for it otherwise is refused, not silently run
    without it."""
    import nsa.ops.decode.triton as decode_triton

    config = small()
    assert not plan_decode(config, 4, 96).pdl
    with pytest.raises(ValueError, match="pdl needs window_overlap='none'"):
        plan_decode(config, 4, 96, window_overlap="scoring", pdl=True)
    from nsa.bench.decode import filled_cache

    cache = filled_cache(config, 1, 96, torch.float32, device="cpu")
    q = torch.randn(1, 1, config.num_heads, config.head_dim)
    gates = torch.rand(1, 1, config.num_heads, 3)
    plan = dataclasses.replace(plan_decode(config, config.num_kv_heads, 96), pdl=True)
    refusal = r"plan.pdl: .* compute capability >= 9.0, got q on cpu \(interpreter\)"
    with pytest.raises(ValueError, match=refusal):
        nsa_decode_triton(q, cache.k_cmp, cache.v_cmp, cache.k_slc, cache.v_slc, cache.k_win, cache.v_win,
                          gates, cache.lengths, config, plan=plan)
    monkeypatch.setattr(decode_triton, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, want in (((9, 0), True), ((10, 0), True), ((8, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert decode_triton.supports_pdl() is want


@pytest.mark.parametrize("head_dim,warps", [(64, 4), (128, 4), (192, 8), (256, 8)])
def test_decode_warps_follow_the_padded_head_dim(head_dim, warps):
    """4 warps up to Dk=128 (faster on an H200); 8 above (as fast as 4 there, measured)."""
    config = NSAConfig(num_heads=64, num_kv_heads=4, head_dim=head_dim, v_head_dim=128)
    assert plan_decode(config, 4, 65536, target_programs=528).num_warps == warps


@pytest.mark.parametrize("head_dim,per_sm,cmp_splits", [(128, 2, 3), (192, 4, 5)])
def test_default_split_plan_aims_at_programs_per_sm(monkeypatch, head_dim, per_sm, cmp_splits):
    """On a GPU the plan aims at ``programs_per_sm(Dk)`` programs per branch per SM: 2 at Dk <= 128,
    4 above. Batch 32 at 64k on 132 SMs (128 token groups): ceil(264 / 128) = 3 splits of the
    4096 compressed tokens at Dk=128, ceil(528 / 128) = 5 at Dk=192; batch 1 hits MAX_SPLITS."""
    import nsa.ops.decode.triton as decode_triton

    monkeypatch.setattr(decode_triton, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: type("Props", (), {"multi_processor_count": 132})())
    assert decode_triton.programs_per_sm(head_dim) == per_sm
    config = NSAConfig(num_heads=64, num_kv_heads=4, head_dim=head_dim, v_head_dim=128)
    assert plan_decode(config, 32 * 4, 65536).cmp_splits == cmp_splits
    assert plan_decode(config, 4, 65536).cmp_splits == decode_triton.MAX_SPLITS


def test_decode_pipeline_depth_follows_the_chunk_and_head_dim():
    """Two stages when each program reads at most two key tiles (batch 1 at 64k: one) or the head
    dims are at most 128, three for longer chunks at Dk 192 (batch 32 at 64k: 13 tiles per
    program); the combine kernel's warps grow with the
    splits it merges (64 at batch 1: 4 warps, 5 at batch 32: 1 warp) over the Dv slice it
    merges: batch 1's 64 query heads get 8 slices of 16 columns each (~528 programs), one warp."""
    config = NSAConfig(num_heads=64, num_kv_heads=4, head_dim=128, v_head_dim=128)
    batch1 = plan_decode(config, 4, 65536, target_programs=528, block_n=64)
    batch32 = plan_decode(config, 128, 65536, target_programs=528, block_n=64)
    whole_heads = plan_decode(config, 4, 65536, target_programs=528, block_n=64, combine_columns=1)
    assert (batch1.cmp_chunk, batch1.num_stages, batch1.combine_columns, batch1.combine_warps) == (
        64, SHORT_CHUNK_STAGES, 8, 1)
    assert (whole_heads.combine_columns, whole_heads.combine_warps) == (1, 4)
    assert (batch32.cmp_chunk, batch32.num_stages, batch32.combine_columns, batch32.combine_warps) == (
        13 * 64, SHORT_CHUNK_STAGES, 1, 1)
    wide = NSAConfig(num_heads=64, num_kv_heads=4, head_dim=192, v_head_dim=128)
    assert plan_decode(wide, 128, 65536, target_programs=528, block_n=64).num_stages == DECODE_STAGES
    assert plan_decode(wide, 4, 65536, target_programs=528, block_n=64).num_stages == SHORT_CHUNK_STAGES
    # Slices never narrower than 16 columns: Dv 32 gets at most 2.
    narrow = NSAConfig(num_heads=64, num_kv_heads=4, head_dim=128, v_head_dim=32)
    assert plan_decode(narrow, 4, 65536, target_programs=528).combine_columns == 2


@triton.jit
def threshold_kernel(KEYS, OUT, COUNT: tl.constexpr, COUNTP: tl.constexpr, NBP: tl.constexpr,
                     BITONIC: tl.constexpr):
    tl.store(OUT, _nth_largest_key(tl.load(KEYS + tl.arange(0, NBP)), COUNT, COUNTP, NBP, BITONIC))


@pytest.mark.parametrize("num_keys,count,valid", [(16, 16, 16), (16, 5, 3), (64, 4, 40), (128, 16, 100),
                                                   (1024, 16, 1021), (1024, 3, 2), (32, 16, 32), (8, 16, 6)])
@pytest.mark.parametrize("top_n", TOP_N_METHODS)
def test_nth_largest_key_is_the_nth_ranking_key(num_keys, count, valid, top_n):
    """The select kernel's top-n threshold (both methods) against torch.topk, on random distinct
    ranking keys (with the +inf-forced and the -1 ones) in random slots: with more blocks than
    slots (the bitonic halving rounds run), as many, fewer valid than the count, and fewer blocks
    than the slots."""
    g = torch.Generator().manual_seed(num_keys * 31 + count * 7 + valid)
    for _ in range(3):
        keys = torch.full((num_keys,), -1, dtype=torch.int64)
        scores = torch.randperm(1 << 20, generator=g)[:valid].to(torch.int64)
        scores[:2] = 0x7F800000  # forced blocks: equal high bits, told apart by the index bits
        slots = torch.randperm(num_keys, generator=g)[:valid]
        keys[slots] = (scores << 32) | (0x7FFFFFFF - torch.arange(valid))
        out = torch.empty(1, dtype=torch.int64)
        threshold_kernel[(1,)](keys, out, COUNT=count, COUNTP=max(16, pow2(count)), NBP=num_keys,
                               BITONIC=top_n == "bitonic")
        want = torch.topk(keys, count).values[-1].item() if count <= num_keys else -1
        assert out.item() == max(want, -1), (out.item(), want)
        chosen = (keys >= out.item()) & (keys >= 0)
        assert chosen.sum().item() == min(count, valid)


@pytest.mark.parametrize("top_n", TOP_N_METHODS)
@pytest.mark.parametrize("steps,lengths,counts", [(1, [600, 333], [1, 1]), (2, [410, 587], [2, 1])])
def test_top_n_among_many_blocks(steps, lengths, counts, top_n):
    """Over 16 selection blocks (75 at 600 tokens: the bitonic top-n's halving rounds run) the
    step equals the prefill's selection and output with either top-n method."""
    config = small(select_block=8, compress_block=8, compress_stride=4, select_count=5, window=12)
    check_step(config, lengths, counts, steps, 600, 13, 9, plan_kwargs={"top_n": top_n})


def test_top_n_method_follows_the_keys_per_thread():
    """The bitonic top-k while each thread holds <= 4 block keys (the measured wins), the removals
    beyond; an unknown method is refused with the accepted ones."""
    assert top_n_method(256, 4) == "bitonic" and top_n_method(512, 4) == "bitonic"  # 16k, 32k at Dk 128
    assert top_n_method(1024, 4) == "max-removal" and top_n_method(2048, 4) == "max-removal"
    assert top_n_method(1024, 8) == "bitonic" and top_n_method(2048, 8) == "max-removal"  # Dk 192
    assert top_n_method(3, 4) == "bitonic"  # padded to 16 keys
    paper = NSAConfig(num_heads=64, num_kv_heads=4, head_dim=128, v_head_dim=128)
    assert plan_decode(paper, 4, 16384).top_n == "bitonic"
    assert plan_decode(paper, 4, 65536).top_n == "max-removal"
    assert plan_decode(paper, 4, 65536, top_n="bitonic").top_n == "bitonic"
    with pytest.raises(ValueError, match=r"top_n must be one of \('bitonic', 'max-removal'\), got 'heap'"):
        plan_decode(paper, 4, 65536, top_n="heap")


def test_exact_ties_go_to_the_lower_block():
    """Zero compressed keys make p_cmp uniform (num_cmp = 16 or 32, so 1/num_cmp is exact): every
    candidate block that is fully visible scores the same, and the lowest indices must win."""
    config = small(select_count=5)
    blocks, want = check_step(config, [72, 136], [1, 1], 1, 140, 12, 5, zero_cmp_keys=True)
    assert torch.equal(blocks, want)
    assert blocks[0, 0, 0].tolist() == [0, 1, 2, 3, 4] and blocks[1, 0, 0].tolist() == [0, 1, 2, 7, 8]


def test_bad_inputs_name_the_argument():
    config = small()
    _, step = make_step(config, [20], [2], 2, 32, 12, 6)
    args = as_args(step, torch.float32)
    with pytest.raises(ValueError, match="k_win ring has 12 slots; a step of K=2 tokens needs"):
        nsa_decode_triton(*args, config)
    _, step = make_step(config, [20], [1], 1, 32, 12, 6)
    args = list(as_args(step, torch.float32))
    with pytest.raises(ValueError, match=r"num_new\[0\] must be in \[0, K=1\], got 2"):
        nsa_decode_triton(*args, config, num_new=torch.tensor([2]))
    with pytest.raises(ValueError, match=r"lengths\[0\] must be in \[num_new=1, max_len=32\], got 33"):
        nsa_decode_triton(*args[:-1], torch.tensor([33]), config)
    with pytest.raises(TypeError, match="k_slc must have q's dtype"):
        nsa_decode_triton(*args[:3], args[3].double(), *args[4:], config)
    with pytest.raises(ValueError, match="plan was made for 1 selection blocks, the caches hold max_len=32"):
        nsa_decode_triton(*args, config, plan=plan_decode(config, 2, 16))
    with pytest.raises(ValueError, match="backend must be one of"):
        nsa_decode(*args, config, backend="cuda")
    with pytest.raises(RuntimeError, match="no incremental-decode kernels for torch.float64"):
        resolve_decode("triton", args[0].double())
    assert resolve_decode("auto", args[0]) == ("reference", "auto: decode runs the reference path")


@pytest.mark.parametrize("step_tokens", [64, 2])
def test_layer_cache_steps_on_triton_equal_reference(monkeypatch, step_tokens):
    """NSAAttention's cache path with backend='triton' (a 1-token step, then a 3-token step with a
    0-count sequence, after a prefill into the cache) equals backend='reference' and records it;
    with at most 2 tokens per launch the 3-token step runs as 2 + 1 (chunked)."""
    import nsa.layer

    monkeypatch.setattr(nsa.layer, "TRITON_STEP_TOKENS", step_tokens)
    torch.manual_seed(7)
    config = small(phi="mlp")
    layer = NSAAttention(24, config).float()
    with torch.no_grad():
        layer.gate_proj.weight.normal_()
    caches = {name: layer.new_cache(2, 96) for name in ("triton", "reference")}
    prompt, prompt_offsets = torch.randn(1, 125, 24), torch.tensor([0, 40, 125])
    for cache in caches.values():  # the prefill (one long step) on the reference keeps the test short
        layer(prompt, cu_seqlens=prompt_offsets, cache=cache, backend="reference")
    xs = [torch.randn(2, 1, 24), torch.randn(1, 3, 24)]
    offsets = [None, torch.tensor([0, 0, 3])]
    for x, off in zip(xs, offsets):
        results = {name: layer(x, cu_seqlens=off, cache=cache, backend=name, return_info=True)
                   for name, cache in caches.items()}
        (out_t, info_t), (out_r, info_r) = results["triton"], results["reference"]
        assert info_t.backend == "triton" and info_r.backend == "reference"
        assert info_t.step == ("batched" if x.shape[1] == 1 else "per-sequence") and info_r.step == "per-sequence"
        assert torch.equal(info_t.selected_blocks, info_r.selected_blocks)
        assert torch.allclose(out_t, out_r, rtol=0, atol=1e-5 * max(1.0, out_r.abs().max().item()))
        for branch in ("cmp", "slc", "win"):
            assert torch.equal(info_t.reads[branch], info_r.reads[branch]), branch
        assert torch.equal(info_t.lengths, info_r.lengths) and torch.equal(info_t.positions, info_r.positions)
    assert caches["triton"].lengths.tolist() == [41, 89]


def test_long_prompt_into_an_empty_cache_runs_the_prefill_kernels(monkeypatch):
    """A prompt longer than TRITON_STEP_TOKENS into an empty cache takes the Triton prefill
    kernels (step "per-sequence+prefill"); a sequence whose cache is not empty keeps the chunked
    decode path in the same step. Outputs, blocks, reads and the filled caches equal the
    reference path's, and the next 1-token step agrees too."""
    import nsa.layer

    monkeypatch.setattr(nsa.layer, "TRITON_STEP_TOKENS", 8)
    torch.manual_seed(11)
    config = small(phi="mlp")
    layer = NSAAttention(24, config).float()
    with torch.no_grad():
        layer.gate_proj.weight.normal_()
    caches = {name: layer.new_cache(2, 96) for name in ("triton", "reference")}
    seed, seed_offsets = torch.randn(1, 5, 24), torch.tensor([0, 0, 5])  # sequence 1 not empty
    prompt, prompt_offsets = torch.randn(1, 70, 24), torch.tensor([0, 45, 70])
    for cache in caches.values():
        layer(seed, cu_seqlens=seed_offsets, cache=cache, backend="reference")
    for x, off in ((prompt, prompt_offsets), (torch.randn(2, 1, 24), None)):
        (out_t, info_t), (out_r, info_r) = (layer(x, cu_seqlens=off, cache=cache, backend=name, return_info=True)
                                            for name, cache in caches.items())
        assert info_t.step == ("per-sequence+prefill" if off is not None else "batched")
        assert torch.equal(info_t.selected_blocks, info_r.selected_blocks)
        assert torch.allclose(out_t, out_r, rtol=0, atol=1e-5 * max(1.0, out_r.abs().max().item()))
        for branch in ("cmp", "slc", "win"):
            assert torch.equal(info_t.reads[branch], info_r.reads[branch]), branch
    for name in CACHE_BUFFERS:
        a, b = getattr(caches["triton"], name), getattr(caches["reference"], name)
        assert torch.allclose(a.double(), b.double(), rtol=0, atol=1e-5), name


CACHE_BUFFERS = ("k_cmp", "v_cmp", "k_tail", "v_tail", "k_slc", "v_slc", "k_win", "v_win", "lengths")


def primed_layer(config: NSAConfig, prompt_lengths: list[int], max_len: int, seed: int):
    """A float32 layer (random gates) and two caches holding the same prompts of different lengths."""
    torch.manual_seed(seed)
    layer = NSAAttention(24, config).float()
    with torch.no_grad():
        layer.gate_proj.weight.normal_()
    caches = [layer.new_cache(len(prompt_lengths), max_len) for _ in range(2)]
    prompt = torch.randn(1, sum(prompt_lengths), 24)
    offsets = torch.tensor([0, *prompt_lengths]).cumsum(0)
    for cache in caches:
        layer(prompt, cu_seqlens=offsets, cache=cache, backend="reference")
    return layer, caches


@pytest.mark.parametrize("phi", ["mlp", "mean"])
@pytest.mark.parametrize("heads", [(2, 2), (8, 2)], ids=["G1", "G4"])
def test_batched_step_equals_per_sequence_step(monkeypatch, phi, heads):
    """decode_step (every sequence at once, emission by mask, no host reads) == the per-sequence
    loop (host lengths, host-decided emission) on the same Triton kernels: outputs, blocks, reads,
    positions and every cache buffer, step by step. Lengths 0, 5, 28 grown by 8 tokens: the first
    token of an empty cache, the first emission (S = l = 8) and later ones (every d = 4), selection-
    block boundaries (l' = 8), the window ring's wrap (w = 12: position 12 goes to slot 0; the third
    sequence overwrites a slot every step) and the last ends exactly at max_len, emitting into the
    last compressed slot."""
    import nsa.layer

    config = small(num_heads=heads[0], num_kv_heads=heads[1], select_block=8, phi=phi)
    layer, (batched, single) = primed_layer(config, [0, 5, 28], 36, seed=11)
    batch = batched.batch_size
    for step in range(8):
        x = torch.randn(batch, 1, 24)
        if step % 2:  # forward routes one-token Triton steps to the batched step, packed or not
            out_b, info_b = layer(x.reshape(1, batch, 24), cu_seqlens=torch.arange(batch + 1), cache=batched,
                                  backend="triton", return_info=True)
            out_b = out_b.reshape(batch, 1, 24)
            info_b.selected_blocks = info_b.selected_blocks.reshape(batch, 1, *info_b.selected_blocks.shape[2:])
            info_b.positions = info_b.positions.reshape(batch, 1)
            info_b.reads = {b: r.reshape(batch, 1, -1) for b, r in info_b.reads.items()}
        else:
            out_b, info_b = layer.decode_step(x, batched, return_info=True)
        monkeypatch.setattr(nsa.layer, "BATCHED_STEP", False)
        out_s, info_s = layer(x, cache=single, backend="triton", return_info=True)
        monkeypatch.setattr(nsa.layer, "BATCHED_STEP", True)
        assert (info_b.step, info_s.step) == ("batched", "per-sequence")
        assert torch.equal(info_b.selected_blocks, info_s.selected_blocks), step
        for branch in ("cmp", "slc", "win"):
            assert torch.equal(info_b.reads[branch], info_s.reads[branch]), (step, branch)
        assert torch.equal(info_b.positions, info_s.positions) and torch.equal(info_b.lengths, info_s.lengths)
        # The same kernels on the same caches; phi batched over B blocks may round differently.
        torch.testing.assert_close(out_b, out_s, rtol=1e-5, atol=1e-6)
        for name in CACHE_BUFFERS:
            torch.testing.assert_close(getattr(batched, name), getattr(single, name), rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=name, step=step: f"step {step}, {name}: {m}")
        if phi == "mean":
            for name in CACHE_BUFFERS:
                assert torch.equal(getattr(batched, name), getattr(single, name)), (step, name)
    assert batched.lengths.tolist() == [8, 13, 36] and not batched.overflowed.any()


HOST_READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "nonzero", "is_nonzero",
              "numpy", "cpu")


@contextlib.contextmanager
def no_host_reads():
    """Any tensor method that reads values on the host (a CUDA sync, and an error inside CUDA-graph
    capture) raises within this block. CPU tensors never sync, so this is how a CPU test sees the
    host reads that a GPU step would synchronise on."""

    def refuse(name):
        def method(*args, **kwargs):
            raise AssertionError(f"host read in a step that must not synchronise: Tensor.{name}")
        return method

    with pytest.MonkeyPatch.context() as patch:
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, refuse(name))
        patch.setattr(torch, "nonzero", refuse("nonzero"))
        yield


def test_batched_step_reads_nothing_on_the_host(monkeypatch):
    """decode_step with learned phi across an emission, a ring wrap and a selection-block boundary,
    with every host read refused. The guard is live: the per-sequence loop trips it."""
    import nsa.layer

    config = small(select_block=8)
    layer, (cache, other) = primed_layer(config, [6, 15], 40, seed=12)
    x = torch.randn(2, 1, 24)
    with no_host_reads():
        for _ in range(3):  # lengths 7..9 and 16..18: emission at 8 and 16, block 2 starts at 16
            out, info = layer.decode_step(x, cache, return_info=True)
    assert cache.lengths.tolist() == [9, 18] and torch.isfinite(out).all()
    assert info.gate_stats == {}, "decode_step's info holds tensors only"
    monkeypatch.setattr(nsa.layer, "BATCHED_STEP", False)
    with pytest.raises(AssertionError, match=r"host read .* Tensor\.tolist"), no_host_reads():
        layer(x, cache=other, backend="triton")


def test_decode_step_errors_and_overflow():
    config = small()
    layer, (cache, _) = primed_layer(config, [3, 6], 6, seed=13)
    with pytest.raises(ValueError, match=r"decode_step takes one new token per sequence, x must be \[B, 1, d_model\]"):
        layer.decode_step(torch.randn(2, 2, 24), cache)
    with pytest.raises(ValueError, match="cache batch mismatch: the cache holds 2 sequences, x has batch 3"):
        layer.decode_step(torch.randn(3, 1, 24), cache)
    with pytest.raises(RuntimeError, match="no incremental-decode kernels for torch.float64"):
        layer.double().decode_step(torch.randn(2, 1, 24, dtype=torch.float64),
                                   layer.new_cache(2, 6, dtype=torch.float64))
    layer.float()
    with pytest.raises(ValueError, match=r"sequence 1 would reach 7 tokens, more than the cache's max_len=6"):
        layer.decode_step(torch.randn(2, 1, 24), cache, check=True)
    assert cache.lengths.tolist() == [3, 6] and not cache.overflowed.any(), "check=True refuses before writing"
    slc = cache.k_slc[1].clone()
    out = layer.decode_step(torch.randn(2, 1, 24), cache)  # unchecked: the full sequence is dropped, flagged
    assert cache.lengths.tolist() == [4, 6] and cache.overflowed.tolist() == [False, True]
    assert torch.equal(cache.k_slc[1], slc) and torch.isfinite(out).all()


def test_kernels_compile_for_sm90_without_spills():
    """The interpreter misses compiled-mode errors (it let a loop-carried type change through once);
    build every decode kernel for sm_90 with Triton's bundled ptxas, bf16 at the paper's blocks."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-W", "ignore", "-m", "nsa.ops.decode.compile_check", "--dtype", "bf16",
                           "--head-dims", "128/128,192/128", "--arch", "90"], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 16 and all("REG:" in line for line in lines), done.stdout
    # Compiled as launched (aligned pointers and strides), no decode kernel spills at either head dim.
    assert all("STACK:0" in line for line in lines), done.stdout
    # The kernels that loop over keys keep their loads in flight (software-pipelined).
    looping = [line for line in lines
               if line.startswith(("_range_kernel", "_score_kernel", "_select_kernel"))]
    assert len(looping) == 10 and all("ASYNC_COPIES:0" not in line for line in looping), done.stdout
    # Built with programmatic dependent launch, as sm_90 runs them: each kernel waits once.
    assert all(line.endswith("GRID_WAITS:1") for line in lines), done.stdout


def test_layer_graph_check_dry_run_on_cpu():
    """scripts/gpu/check_decode.py's layer-graph section without CUDA: nothing is captured (the
    "replay" is the eager step into the same static outputs), everything else runs: cache set-up,
    restore between runs, the step-by-step comparison, timing and the JSON row."""
    import json

    from nsa.bench.decode import layer_step_row

    config = small(select_block=8)
    row = layer_step_row(40, 2, d_model=24, config=config, steps=4, timed_steps=1, repeats=1,
                         dtype=torch.float32, device="cpu")
    assert row.passed and row.bitwise and row.cache_equal and row.block_mismatch == 0, row
    assert not row.cuda_graph and row.sync_free is None and row.eager_us > 0 and row.graph_us > 0
    assert json.loads(json.dumps(row.as_dict()))["steps"] == 4


def test_decode_bench_kernel_breakdown_reads_slowest_first():
    from nsa.bench.decode import format_kernel_times

    times = {"_combine_kernel": 21.14, "_range_kernel": 132.66, "_score_tiles_kernel": 12.4}
    assert format_kernel_times(times) == "_range_kernel 132.7, _combine_kernel 21.1, _score_tiles_kernel 12.4"
    assert format_kernel_times({}) == ""


def test_gpu_parity_check_runs_under_the_interpreter():
    """``nsa.bench.decode.parity`` (what scripts/gpu/check_decode.py runs at 8k-64k) on CPU: the
    Triton step agrees with the reference step, reads exact; programmatic launches cannot run
    here, so their bitwise comparison is reported as not run (None), never as passed."""
    from nsa.bench.decode import parity

    config = small(window=16)
    r = parity(config, [70, 50], [1, 1], torch.float32, 0, tie_rtol=1e-4, device="cpu")
    assert r["finite"] and r["reads_exact"] and r["block_mismatch_not_tied"] == 0, r
    assert r["max_abs_err_rel"] < 1e-5 and r["token_heads"] == 2 * config.num_kv_heads, r
    assert r["pdl_equals_ordinary"] is None, r
