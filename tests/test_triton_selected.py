"""Selection-attention Triton kernels vs the naive reference, on CPU through the Triton interpreter."""

import json
import os

os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined

import pytest
import torch
from compiled_subprocess import run_compiled
from tile_options import option_id, option_pairs, pinned

from nsa.ops import compress_mean, select_blocks, selection_block_scores
from nsa.ops.selected_attention import triton as triton_selected
from nsa.ops.selected_attention.naive import selected_attention
from nsa.ops.selected_attention.triton import (
    invert_selection,
    selected_attention_forward,
    selected_attention_triton,
)
from nsa.ops.window_attention import triton as triton_window
from nsa.ops.window_attention.triton import window_attention_forward, window_attention_forward_with_forced

SELECT_BLOCK = 16


def naive_selection(q, k, *, n, generator):
    """Block indices from the real selection path: mean-compressed keys, Eq. 8-10, top-n."""
    k_cmp = compress_mean(k, 8, 4)
    scores = selection_block_scores(q, k_cmp, block=8, stride=4, select_block=SELECT_BLOCK)
    return select_blocks(scores, select_block=SELECT_BLOCK, select_count=n)


def random_selection(batch, seq_len, num_kv, n, *, generator):
    """Random distinct ascending block sets (future blocks included) with random -1 padding."""
    num_blocks = -(-seq_len // SELECT_BLOCK)
    scores = torch.rand(batch, seq_len, num_kv, num_blocks, generator=generator)
    idx = scores.topk(min(n, num_blocks), dim=-1).indices
    keep = torch.rand(idx.shape, generator=generator) < 0.7
    idx = torch.where(keep, idx, num_blocks)
    idx = torch.sort(idx, dim=-1).values
    idx = torch.where(idx == num_blocks, -1, idx)
    if idx.shape[-1] < n:
        idx = torch.cat([idx, idx.new_full((*idx.shape[:-1], n - idx.shape[-1]), -1)], dim=-1)
    return idx


CASES = [  # (G, HK, Dk, Dv, T, n, selection)
    (1, 2, 32, 32, 45, 4, "naive"),
    (2, 2, 24, 16, 40, 3, "random"),
    (4, 1, 16, 16, 37, 4, "naive"),
    (8, 1, 48, 16, 40, 3, "random"),   # Dk = 32 + 16: two exact column tiles, like 192 = 128 + 64
    (16, 1, 16, 32, 33, 3, "naive"),
    (3, 2, 40, 24, 35, 3, "random"),   # G not a power of two (15 of 16 rows used); Dk = 32 + 8
]


@pytest.mark.parametrize("group,num_kv,dk,dv,seq_len,n,selection", CASES,
                         ids=[f"G{c[0]}-dk{c[2]}-dv{c[3]}-{c[6]}" for c in CASES])
def test_selected_attention_matches_naive(group, num_kv, dk, dv, seq_len, n, selection, monkeypatch):
    # Small chunks so that dk/dv of a block come from several partials (the chunked reduction).
    monkeypatch.setattr(triton_selected, "CHUNK", 32)
    gen = torch.Generator().manual_seed(1000 * group + dk)
    batch = 2
    q = torch.randn(batch, seq_len, group * num_kv, dk, generator=gen)
    k = torch.randn(batch, seq_len, num_kv, dk, generator=gen)
    v = torch.randn(batch, seq_len, num_kv, dv, generator=gen)
    if selection == "naive":
        idx = naive_selection(q, k, n=n, generator=gen)
    else:
        idx = random_selection(batch, seq_len, num_kv, n, generator=gen)
    do = torch.randn(batch, seq_len, group * num_kv, dv, generator=gen)
    dlse = torch.randn(batch, seq_len, group * num_kv, generator=gen)

    def run(fn, dtype):
        leaves = [x.detach().clone().to(dtype).requires_grad_() for x in (q, k, v)]
        o, lse = fn(*leaves, idx, select_block=SELECT_BLOCK)
        loss = (o * do.to(dtype)).sum() + torch.where(torch.isfinite(lse), lse * dlse.to(lse.dtype), 0).sum()
        loss.backward()
        return o, lse, [x.grad for x in leaves]

    o_ref, lse_ref, grads_ref = run(selected_attention, torch.float64)
    o, lse, grads = run(selected_attention_triton, torch.float32)
    assert o.dtype == torch.float32 and lse.dtype == torch.float32
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(o.double(), o_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), lse_ref, atol=2e-5, rtol=1e-4)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert torch.isfinite(g).all(), f"d{name} not finite"
        torch.testing.assert_close(g.double(), g_ref, atol=5e-5, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("key_dtype", [None, torch.int64])
def test_invert_selection_lists_every_query_once_per_block(key_dtype):
    """Against a brute-force search, with the 32-bit sort keys chosen where they fit and with
    64-bit ones (what sequences past 2^31 / groups tokens get)."""
    gen = torch.Generator().manual_seed(7)
    seq_len, num_kv, n = 70, 2, 3
    idx = random_selection(2, seq_len, num_kv, n, generator=gen)
    qpos, item_group, item_start, item_len, group_first, group_items = invert_selection(
        idx, seq_len, SELECT_BLOCK, chunk=8, key_dtype=key_dtype)
    num_blocks = -(-seq_len // SELECT_BLOCK)
    for b in range(2):
        for h in range(num_kv):
            for blk in range(num_blocks):
                g = (b * num_kv + h) * num_blocks + blk
                items = range(int(group_first[g]), int(group_first[g] + group_items[g]))
                got = [int(p) for i in items for p in qpos[item_start[i]:item_start[i] + item_len[i]]]
                want = torch.nonzero((idx[b, :, h] == blk).any(-1)).flatten().tolist()
                assert got == want
                assert all(int(item_group[i]) == g for i in items)
    assert int(item_len.sum()) == int((idx >= 0).sum())


def test_invert_selection_refuses_sort_keys_that_do_not_fit():
    idx = torch.zeros(1, 70, 1, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"key_dtype: torch.int32 cannot hold the sort keys up to "
                                         r"1099511627776 \(1048576 groups x T=1048576\)"):
        invert_selection(idx, 1 << 20, 1, key_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"key_dtype: torch.float32 cannot hold the sort keys"):
        invert_selection(idx, 70, SELECT_BLOCK, key_dtype=torch.float32)



def check_pinned_against_naive(kernels, options, *, group, dk=32, dv=16, batch=1, num_kv=1, seed=5):
    """Outputs (o, lse) and every gradient of the Triton op with ``kernels`` pinned to ``options``
    equal the float64 naive op's, on random inputs and selections (T = 70: a last block cut short)."""
    gen = torch.Generator().manual_seed(seed)
    seq_len, n = 70, 3
    q = torch.randn(batch, seq_len, group * num_kv, dk, generator=gen)
    k = torch.randn(batch, seq_len, num_kv, dk, generator=gen)
    v = torch.randn(batch, seq_len, num_kv, dv, generator=gen)
    idx = random_selection(batch, seq_len, num_kv, n, generator=gen)
    do = torch.randn(batch, seq_len, group * num_kv, dv, generator=gen)

    def run(fn, dtype):
        leaves = [x.detach().clone().to(dtype).requires_grad_() for x in (q, k, v)]
        o, lse = fn(*leaves, idx, select_block=SELECT_BLOCK)
        (o * do.to(dtype)).sum().backward()
        return [o, lse] + [x.grad for x in leaves]

    with pinned(kernels, options):
        got_all = run(selected_attention_triton, torch.float32)
    for name, got, want in zip(("o", "lse", "dq", "dk", "dv"), got_all, run(selected_attention, torch.float64)):
        assert not torch.isnan(got).any(), name  # lse is -inf where a query reads no key
        torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("group", [16, 4, 1])
@pytest.mark.parametrize("options", option_pairs(triton_selected._query_kernel, triton_selected._dkdv_kernel),
                         ids=option_id)
def test_every_production_tile_matches_naive(options, group, monkeypatch):
    """The interpreter runs each list's first option; here each option of the GPU lists runs, at
    G = 16 (one position per 16 rows, or 4-position tiles walking the union of their blocks),
    G = 4 (4- and 16-position tiles) and G = 1 (16- and 64-position tiles)."""
    monkeypatch.setattr(triton_selected, "CHUNK", 32)
    check_pinned_against_naive((triton_selected._query_kernel, triton_selected._dkdv_kernel), options, group=group)


@pytest.mark.parametrize("option", triton_selected.TMA_OPTIONS, ids=lambda o: option_id((o,)))
@pytest.mark.parametrize("group,dk,dv", [(16, 32, 16), (4, 48, 32), (1, 32, 16)])
def test_tma_loads_match_naive(option, group, dk, dv, monkeypatch):
    """The walks with key/value blocks loaded through tensor descriptors (interpreted), at
    G = 16, 4 and 1, a split head dim (48 = 32 + 16, like 192 = 128 + 64) and two sequences of
    two key/value heads (a box past one sequence's end reads zeros, not the next sequence)."""
    monkeypatch.setattr(triton_selected, "CHUNK", 32)
    k, v = torch.randn(2, 70, 2, dk), torch.randn(2, 70, 2, dv)
    assert triton_selected._block_descriptors(k, v, triton_selected._common(k, k, v, SELECT_BLOCK)) is not None
    check_pinned_against_naive((triton_selected._query_kernel,), (option,), group=group, dk=dk, dv=dv, batch=2,
                               num_kv=2, seed=group + dk)


def test_union_walk_pipelines_its_loads_on_sm90():
    """Position tiles walk the union of their lists in a loop without a branch, so that Triton
    software-pipelines the block loads (asynchronous copies in the compiled kernel); a branch
    around the loads, the former walk, compiled to none. Built for sm_90 with the bundled ptxas."""
    code = ("import json\nfrom dataclasses import asdict\nfrom nsa.ops.compile_check import audit\n"
            "for dims, group in (([(32, 32)], 4), ([(128, 128)], 16)):\n"
            "    for row in audit(dims, [group], kernels=('selected-fwd', 'selected-dq')):\n"
            "        print(json.dumps(asdict(row)))\n")
    rows = [json.loads(line) for line in run_compiled(code).splitlines()]
    walks = [row for row in rows if not row["config"].startswith("BT=1 ") and "TMA=False" in row["config"]]
    # (32, 4): 4-position tiles on 1, 2 (two and three stages) and 4 warps and 16-position ones;
    # (128, 16): 4-position tiles; forward and dq each. The TMA walks' copies count too.
    assert len(walks) == 12, rows
    assert any("TMA=True" in row["config"] for row in rows), rows
    assert all(row["async_copies"] > 0 for row in rows), rows


def test_walk_ab_script_runs_on_cpu(tmp_path, run_gpu_script):
    """The GPU A/B of the union walk (scripts/gpu/selection_walk_ab.py) in its CPU smoke mode,
    with this module as its own "before": every option agrees bit for bit and the JSON is whole."""
    out = tmp_path / "ab.json"
    done = run_gpu_script("selection_walk_ab.py", triton_selected.__file__, "--smoke", "--out", str(out))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    options = len(triton_selected._query_kernel.options) + 1
    assert len(rows) == 2 * options and all(r["bitwise_equal"] and r["finite"] for r in rows)
    assert "| smoke | local |" in done.stdout


@pytest.mark.parametrize("group,seq_len", [(1, 1), (1, 3), (4, 5), (2, 19)])
def test_sequences_shorter_than_a_position_tile(group, seq_len):
    """Union walks whose tile reaches past T (16 positions at G = 1, 4 at G = 4, 8 at G = 2)."""
    gen = torch.Generator().manual_seed(seq_len)
    q = torch.randn(1, seq_len, group, 16, generator=gen)
    k, v = (torch.randn(1, seq_len, 1, 16, generator=gen) for _ in range(2))
    idx = random_selection(1, seq_len, 1, 3, generator=gen)
    o, lse = selected_attention_triton(q, k, v, idx, select_block=SELECT_BLOCK)
    o_ref, lse_ref = selected_attention(q.double(), k.double(), v.double(), idx, select_block=SELECT_BLOCK)
    torch.testing.assert_close(o.double(), o_ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), lse_ref, atol=2e-6, rtol=1e-5)


def test_unaligned_tensors_take_the_pointer_loads():
    """A stride that is not a multiple of 16 bytes cannot be a tensor descriptor's: no descriptor,
    so the launcher uses the pointer-only options (same result)."""
    k = torch.randn(1, 20, 1, 6)  # 24-byte rows
    v = torch.randn(1, 20, 1, 8)
    meta = triton_selected._common(torch.randn(1, 20, 2, 6), k, v, SELECT_BLOCK)
    assert triton_selected._block_descriptors(k, v, meta) is None
    assert triton_selected._block_descriptors(k[..., :4].contiguous(), v, meta) is not None


def forced_lists(batch, seq_len, num_kv):
    """Each position's forced blocks alone (0, c - 1, c), distinct, ascending, -1 padded: int32."""
    c = torch.arange(seq_len) // SELECT_BLOCK
    blocks = torch.stack([torch.zeros_like(c), c - 1, c], dim=-1)
    blocks = torch.where((blocks < 0) | ((blocks == 0) & (torch.arange(3) > 0)), -1, blocks)
    blocks = torch.sort(torch.where(blocks < 0, 1 << 30, blocks), dim=-1).values
    blocks = torch.where(blocks == 1 << 30, -1, blocks).to(torch.int32)
    return blocks[None, :, None, :].expand(batch, seq_len, num_kv, 3).contiguous()


def check_forced_forward(group, num_kv, dk, dv, seq_len, n, window):
    """Selection's forward completing the window's forced-block softmax over one ``k, v``, against
    float64 naive selection attention: the window's part over the forced blocks alone, the whole
    over each position's list; the window's own output as without."""
    gen = torch.Generator().manual_seed(seq_len + window + group)
    batch, scale = 2, dk ** -0.5
    q = torch.randn(batch, seq_len, group * num_kv, dk, generator=gen)
    k = torch.randn(batch, seq_len, num_kv, dk, generator=gen)
    v = torch.randn(batch, seq_len, num_kv, dv, generator=gen)
    idx = naive_selection(q, k, n=n, generator=gen).to(torch.int32).contiguous()
    o_win, lse_win = window_attention_forward(q, k, v, window, scale)
    o_win2, lse_win2, o_forced, lse_forced = window_attention_forward_with_forced(q, k, v, window, scale,
                                                                                    SELECT_BLOCK)
    assert torch.equal(o_win, o_win2) and torch.equal(lse_win, lse_win2)
    q64, k64, v64 = q.double(), k.double(), v.double()
    forced_ref = selected_attention(q64, k64, v64, forced_lists(batch, seq_len, num_kv),
                                    select_block=SELECT_BLOCK)
    for got, want in zip((o_forced, lse_forced), forced_ref):
        torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5)
    o, lse = selected_attention_forward(q, k, v, idx, SELECT_BLOCK, scale, forced=(o_forced, lse_forced))
    assert o is o_forced and lse is lse_forced  # completed in place
    o_ref, lse_ref = selected_attention(q64, k64, v64, idx, select_block=SELECT_BLOCK)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(o.double(), o_ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), lse_ref, atol=2e-6, rtol=1e-5)


# G = 16: one position per program; G = 4, 3, 1: the union walk. Windows narrower than both local
# blocks (20, 24) too: the forced-block walk does not depend on the window's.
@pytest.mark.parametrize("group,num_kv,dk,dv,seq_len,n,window",
                         [(16, 1, 32, 16, 70, 4, 32), (4, 1, 16, 16, 72, 4, 40), (3, 2, 40, 24, 50, 3, 20),
                          (1, 2, 32, 32, 45, 5, 24), (16, 2, 48, 16, 33, 3, 64)])
def test_forward_completes_the_windows_forced_blocks(group, num_kv, dk, dv, seq_len, n, window):
    check_forced_forward(group, num_kv, dk, dv, seq_len, n, window)


@pytest.mark.parametrize("option", triton_window._query_kernel.options, ids=lambda o: option_id((o,)))
def test_forced_forward_on_every_window_tile(option):
    """32-, 64- and 128-key tiles (the forced walk starts at a tile boundary below the first
    row's local blocks), pointer and TMA loads."""
    with pinned((triton_window._query_kernel,), (option,)):
        check_forced_forward(16, 1, 32, 16, 100, 4, 48)
        check_forced_forward(4, 1, 16, 16, 66, 3, 32)


def test_forced_forward_refuses_misshapen_partials():
    q, k, v = torch.randn(1, 20, 2, 16), torch.randn(1, 20, 1, 16), torch.randn(1, 20, 1, 8)
    idx = torch.zeros(1, 20, 1, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"forced: \(o, lse\) contiguous, o \(1, 20, 2, 8\)"):
        selected_attention_forward(q, k, v, idx, SELECT_BLOCK, 0.25,
                                   forced=(torch.zeros(1, 20, 2, 16), torch.zeros(1, 20, 2)))
    with pytest.raises(ValueError, match="select_block: a power of two, got 24"):
        window_attention_forward_with_forced(q, k, v, 8, 0.25, 24)
