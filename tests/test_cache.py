"""NSACache: emission rule, ring buffers (the window holds w tokens, not T), sequence independence,
memory accounting and errors. Prefill == decode over whole layers is the `decode` suite's job."""

import random

import pytest
import torch

from nsa import NSACache, NSAConfig
from nsa.ops.compression import compress_mean

# One cached token: HK * (Dk + Dv) elements.
CONFIG = NSAConfig(num_heads=4, num_kv_heads=2, head_dim=4, v_head_dim=6, compress_block=4, compress_stride=2,
                   select_block=8, select_count=3, window=5)


class RecordingMean:
    """Mean-pooling phi that records how many blocks each call compressed."""

    def __init__(self):
        self.calls = []

    def __call__(self, k_blocks, v_blocks):
        self.calls.append(k_blocks.shape[1])
        return k_blocks.mean(dim=2), v_blocks.mean(dim=2)


def raw_tokens(count: int, config: NSAConfig = CONFIG) -> list[torch.Tensor]:
    """Random (k_cmp, v_cmp, k_slc, v_slc, k_win, v_win), each ``[count, HK, D]`` float64."""
    hk = config.num_kv_heads
    dims = (config.head_dim, config.v_head_dim) * 3
    return [torch.randn(count, hk, dim, dtype=torch.float64) for dim in dims]


def grow(cache: NSACache, index: int, raw: list[torch.Tensor], sizes: list[int], compress) -> list[int]:
    """Append ``raw`` to sequence ``index`` in chunks of ``sizes``; returns the lengths after each."""
    lengths, start = [], 0
    for size in sizes:
        cache.append(index, *(t[start:start + size] for t in raw), compress=compress)
        start += size
        lengths.append(start)
    return lengths


def chunk_sizes(total: int, choices: list[int], seed: int) -> list[int]:
    rng, sizes = random.Random(seed), []
    while sum(sizes) < total:
        sizes.append(min(rng.choice(choices), total - sum(sizes)))
    return sizes


@pytest.mark.parametrize("block, stride", [(4, 2), (4, 4), (1, 1), (8, 2), (6, 3)])
@pytest.mark.parametrize("choices", [[1], [1, 2, 3, 7]])
def test_emission_rule_and_compressed_contents(block, stride, choices):
    config = CONFIG.replace(compress_block=block, compress_stride=stride, select_block=max(8, 2 * block))
    total = 37
    cache = NSACache.allocate(config, 2, total, dtype=torch.float64)
    raw = raw_tokens(total, config)
    phi = RecordingMean()
    sizes = chunk_sizes(total, choices, seed=block * 10 + stride)
    lengths = grow(cache, 1, raw, sizes, phi)
    # Per step: blocks emitted == lengths S in (old, new] with S >= l and (S - l) % d == 0.
    expected, old = [], 0
    for new in lengths:
        emitted = sum(1 for s in range(old + 1, new + 1) if s >= block and (s - block) % stride == 0)
        if emitted:
            expected.append(emitted)
        old = new
    assert phi.calls == expected
    count = config.num_compressed(total)
    torch.testing.assert_close(cache.k_cmp[1, :count], compress_mean(raw[0][None], block, stride)[0],
                               rtol=0, atol=1e-15)
    torch.testing.assert_close(cache.v_cmp[1, :count], compress_mean(raw[1][None], block, stride)[0],
                               rtol=0, atol=1e-15)
    assert cache.k_cmp[0].abs().max() == 0 and cache.lengths.tolist() == [0, total]


def test_selection_cache_keeps_all_and_window_ring_keeps_last_w():
    max_len = 40
    cache = NSACache.allocate(CONFIG, 1, max_len, dtype=torch.float64)
    assert cache.k_win.shape[1] == CONFIG.window and cache.k_slc.shape[1] == max_len
    raw = raw_tokens(33)
    sizes = chunk_sizes(33, [1, 2, 6, 9], seed=1)
    start = 0
    for size in sizes:
        view = cache.append(0, *(t[start:start + size] for t in raw), compress=RecordingMean())
        first = max(0, start - CONFIG.window + 1)
        # The window view covers every key the step's queries read, from position win_offset.
        assert view.win_offset == first and view.q_offset == start
        torch.testing.assert_close(view.k_win[0], raw[4][first:start + size], rtol=0, atol=0)
        torch.testing.assert_close(view.v_win[0], raw[5][first:start + size], rtol=0, atol=0)
        start += size
        torch.testing.assert_close(cache.k_slc[0, :start], raw[2][:start], rtol=0, atol=0)
        torch.testing.assert_close(cache.v_slc[0, :start], raw[3][:start], rtol=0, atol=0)
        held = list(range(max(0, start - CONFIG.window), start))
        slots = [p % CONFIG.window for p in held]
        torch.testing.assert_close(cache.k_win[0, slots], raw[4][held], rtol=0, atol=0)


def test_window_memory_does_not_grow_with_context():
    small, large = (NSACache.allocate(CONFIG, 2, n) for n in (64, 4096))
    ring = 2 * CONFIG.window * small.entry_bytes()
    assert small.allocated_bytes()["win"] == large.allocated_bytes()["win"] == ring
    assert large.allocated_bytes()["slc"] == 64 * small.allocated_bytes()["slc"]
    tiny = NSACache.allocate(CONFIG, 1, 3)
    assert tiny.k_win.shape[1] == 3, "a cache shorter than the window needs no more slots than max_len"


def test_memory_accounting():
    cache = NSACache.allocate(CONFIG, 3, 100, dtype=torch.bfloat16)
    entry = CONFIG.num_kv_heads * (CONFIG.head_dim + CONFIG.v_head_dim) * 2
    assert cache.entry_bytes() == entry
    assert cache.bytes_per_token() == {"cmp": entry / CONFIG.compress_stride, "slc": entry, "win": 0.0}
    assert cache.fixed_bytes() == {"cmp": CONFIG.compress_block * entry, "slc": 0,
                                   "win": CONFIG.window * entry}
    assert cache.used_bytes(50) == {"cmp": (CONFIG.num_compressed(50) + CONFIG.compress_block) * entry,
                                    "slc": 50 * entry, "win": CONFIG.window * entry}
    assert cache.allocated_bytes() == {
        "cmp": 3 * (CONFIG.num_compressed(100) + CONFIG.compress_block) * entry,
        "slc": 3 * 100 * entry, "win": 3 * CONFIG.window * entry}


def test_sequences_are_independent_and_reset_reuses_a_slot():
    cache = NSACache.allocate(CONFIG, 3, 20, dtype=torch.float64)
    raws = [raw_tokens(n) for n in (7, 12, 3)]
    for index, raw in enumerate(raws):
        grow(cache, index, raw, [len(raw[0])], RecordingMean())
    snapshot = {name: getattr(cache, name).clone() for name in ("k_slc", "k_win", "k_cmp", "v_tail")}
    grow(cache, 1, raw_tokens(5), [2, 3], RecordingMean())
    for name, before in snapshot.items():
        after = getattr(cache, name)
        assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2]), name
    assert cache.lengths.tolist() == [7, 17, 3]
    cache.reset(1)
    assert cache.lengths.tolist() == [7, 0, 3]
    fresh = raw_tokens(6)
    grow(cache, 1, fresh, [6], RecordingMean())
    torch.testing.assert_close(cache.k_cmp[1, :2], compress_mean(fresh[0][None], 4, 2)[0], rtol=0, atol=0)
    cache.reset()
    assert cache.lengths.tolist() == [0, 0, 0]


def test_cache_errors_name_the_argument():
    with pytest.raises(ValueError, match="max_len must be a positive int"):
        NSACache.allocate(CONFIG, 1, 0)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        NSACache.allocate(CONFIG, 2.0, 5)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        NSACache.allocate(CONFIG, 1, 5, dtype=torch.int32)
    with pytest.raises(TypeError, match="config must be an nsa.NSAConfig"):
        NSACache.allocate(None, 1, 5)
    cache = NSACache.allocate(CONFIG, 2, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"sequence 0 would reach 6 tokens, more than the cache's max_len=5"):
        grow(cache, 0, raw_tokens(6), [6], RecordingMean())
    with pytest.raises(IndexError, match=r"sequence index must be in \[0, 2\), got 2"):
        grow(cache, 2, raw_tokens(1), [1], RecordingMean())
    with pytest.raises(ValueError, match="the cache holds 2 sequences, got new-token counts for 3"):
        cache.check_room([1, 1, 1])
    with pytest.raises(ValueError, match="new-token count of sequence 1 must be >= 0"):
        cache.check_room([1, -1])


@pytest.mark.parametrize("block, stride", [(4, 2), (4, 4), (1, 1), (8, 2), (6, 3)])
def test_append_one_equals_per_sequence_append(block, stride):
    """The batched, device-side append (one token for every sequence, emission by mask) leaves
    the same cache as appending each sequence alone, across emissions and window-ring wraps."""
    config = CONFIG.replace(compress_block=block, compress_stride=stride, select_block=max(8, 2 * block))
    max_len, starts, steps = 30, [0, 3, 11, 17], 13
    caches = [NSACache.allocate(config, len(starts), max_len, dtype=torch.float64) for _ in range(2)]
    raws = [raw_tokens(start + steps, config) for start in starts]
    for cache in caches:
        for index, (start, raw) in enumerate(zip(starts, raws)):
            grow(cache, index, [t[:start] for t in raw], [start] if start else [], RecordingMean())
    batched, single = caches
    shapes = []

    def phi(k_blocks, v_blocks):
        shapes.append(tuple(k_blocks.shape[:3]))
        return k_blocks.mean(dim=2), v_blocks.mean(dim=2)

    for step in range(steps):
        positions = batched.append_one(*(torch.stack([raw[i][start + step] for raw, start in zip(raws, starts)])
                                         for i in range(6)), compress=phi)
        assert positions.tolist() == [start + step for start in starts]
        for index, (start, raw) in enumerate(zip(starts, raws)):
            grow(single, index, [t[start + step:start + step + 1] for t in raw], [1], RecordingMean())
        for name in ("k_cmp", "v_cmp", "k_tail", "v_tail", "k_slc", "v_slc", "k_win", "v_win", "lengths"):
            assert torch.equal(getattr(batched, name), getattr(single, name)), (step, name)
    # phi sees one candidate block per sequence on every step, emitted or not.
    assert shapes == [(len(starts), 1, block)] * steps
    assert not batched.overflowed.any()
    for index, (start, raw) in enumerate(zip(starts, raws)):
        count = config.num_compressed(start + steps)
        torch.testing.assert_close(batched.k_cmp[index, :count], compress_mean(raw[0][None], block, stride)[0],
                                   rtol=0, atol=1e-15)


def test_append_one_drops_a_full_sequence_and_flags_it():
    cache = NSACache.allocate(CONFIG, 3, 6, dtype=torch.float64)
    grow(cache, 1, raw_tokens(6), [6], RecordingMean())
    grow(cache, 2, raw_tokens(5), [5], RecordingMean())
    before = {name: getattr(cache, name).clone() for name in ("k_cmp", "k_tail", "k_slc", "v_slc", "k_win")}
    new = raw_tokens(3)  # [3, HK, D]: one token for each sequence
    positions = cache.append_one(*new, compress=RecordingMean())
    assert positions.tolist() == [0, 6, 5] and cache.lengths.tolist() == [1, 6, 6]
    assert cache.overflowed.tolist() == [False, True, False]
    for name, old in before.items():
        assert torch.equal(getattr(cache, name)[1], old[1]), f"the full sequence's {name} must not change"
    assert torch.equal(cache.k_slc[0, 0], new[2][0]) and torch.equal(cache.k_slc[2, 5], new[2][2])
    cache.reset(1)
    assert cache.overflowed.tolist() == [False, False, False]


def test_append_one_errors_name_the_argument():
    cache = NSACache.allocate(CONFIG, 2, 8, dtype=torch.float64)
    new = raw_tokens(2)
    with pytest.raises(ValueError, match=r"v_slc must be a tensor \[B=2, HK=2, 6\]"):
        cache.append_one(*new[:3], new[3][:1], *new[4:], compress=RecordingMean())
    with pytest.raises(ValueError, match=r"k_cmp must be a tensor \[B=2, HK=2, 4\] \(one new token per sequence\)"):
        cache.append_one(new[0][:, None], *new[1:], compress=RecordingMean())
    assert cache.lengths.tolist() == [0, 0]
