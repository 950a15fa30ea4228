"""The forward floor's gather kernel reads exactly the listed blocks (``nsa.bench.floor``)."""

import pytest
import torch

from nsa.bench.floor import gather_selected_blocks, non_forced_blocks


def expected_sums(k, v, lists, select_block):
    """float64 ``[B, HK, T]``: every element of k and v in each position's listed blocks."""
    batch, seq_len, num_kv, _ = k.shape
    out = torch.zeros(batch, num_kv, seq_len, dtype=torch.float64)
    for b in range(batch):
        for t in range(seq_len):
            for h in range(num_kv):
                for j in lists[b, t, h].tolist():
                    if j >= 0:
                        keys = slice(j * select_block, (j + 1) * select_block)
                        out[b, h, t] += k[b, keys, h].double().sum() + v[b, keys, h].double().sum()
    return out


def test_non_forced_blocks_drops_block_zero_and_the_local_ones():
    select_block = 4
    # Position 9 is in block 2: forced 0, 1, 2; position 13 in block 3: forced 0, 2, 3.
    blocks = torch.full((1, 16, 1, 5), -1, dtype=torch.int64)
    blocks[0, 9, 0, :4] = torch.tensor([0, 1, 2, -1])
    blocks[0, 13, 0] = torch.tensor([0, 1, 2, 3, -1])
    blocks[0, 15, 0] = torch.tensor([3, 0, 1, 2, -1])  # out of order: kept ones come out ascending
    lists = non_forced_blocks(blocks, select_block)
    assert lists.dtype == torch.int32 and lists.shape == (1, 16, 1, 1)
    assert lists[0, 9, 0].tolist() == [-1]
    assert lists[0, 13, 0].tolist() == [1]
    assert lists[0, 15, 0].tolist() == [1]
    assert (lists[0, :9] == -1).all()


@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("num_kv", [1, 2])
def test_gather_selected_blocks_sums_exactly_the_listed_blocks(tma, num_kv):
    gen = torch.Generator().manual_seed(7 + num_kv)
    batch, seq_len, select_block, dk, dv = 2, 96, 16, 32, 16
    k = torch.randn(batch, seq_len, num_kv, dk, generator=gen)
    v = torch.randn(batch, seq_len, num_kv, dv, generator=gen)
    # Up to three distinct earlier blocks per position, -1 elsewhere (padding not at the end too).
    lists = torch.full((batch, seq_len, num_kv, 3), -1, dtype=torch.int32)
    for b in range(batch):
        for t in range(seq_len):
            for h in range(num_kv):
                count = int(torch.randint(0, 4, (1,), generator=gen))
                chosen = torch.randperm(t // select_block + 1, generator=gen)[:count]
                lists[b, t, h, torch.randperm(3, generator=gen)[:len(chosen)]] = chosen.int()
    got = gather_selected_blocks(k, v, lists, select_block=select_block, tma=tma, num_stages=2)
    torch.testing.assert_close(got.double(), expected_sums(k, v, lists, select_block), rtol=1e-5, atol=1e-4)


def test_gather_selected_blocks_names_what_it_cannot_take():
    k = torch.randn(1, 64, 1, 24)
    lists = torch.zeros(1, 64, 1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="Dk=24 must be a power of two"):
        gather_selected_blocks(k, k, lists, select_block=16)
    with pytest.raises(ValueError, match="int32 blocks"):
        gather_selected_blocks(k[..., :16], k[..., :16], lists.long(), select_block=16)


@pytest.mark.parametrize("script", ["prefill_floor.py", "decode_floor.py"])
def test_floor_scripts_say_they_need_a_gpu(run_gpu_script, script):
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU-only message; on a GPU the script runs")
    result = run_gpu_script(script)
    assert result.returncode != 0
    assert "needs a CUDA GPU" in result.stderr


def tile_sums(k, v, tiles, rows):
    """float64 sum of every element of k and v in ``tiles`` (batch, first row, head)."""
    total = 0.0
    for b, row0, h in tiles.tolist():
        keys = slice(row0, row0 + rows)
        total += k[b, keys, h].double().sum().item() + v[b, keys, h].double().sum().item()
    return total


@pytest.fixture
def tiled_cache():
    from nsa.bench.floor import TILE_ROWS

    gen = torch.Generator().manual_seed(11)
    k = torch.randn(2, 6 * TILE_ROWS, 2, 16, generator=gen)
    v = torch.randn(2, 6 * TILE_ROWS, 2, 32, generator=gen)
    tiles = torch.tensor([(b, r * TILE_ROWS, h) for b in range(2) for r in (0, 5, 2) for h in range(2)],
                         dtype=torch.int32)
    return k, v, tiles, tile_sums(k, v, tiles, TILE_ROWS)


@pytest.mark.parametrize("programs", [1, 3, 16])
def test_read_tiles_reads_each_tile_once(tiled_cache, programs):
    from nsa.bench.floor import read_tiles

    k, v, tiles, want = tiled_cache
    got = read_tiles(k, v, tiles, programs=programs).double().sum().item()
    assert got == pytest.approx(want, rel=1e-5, abs=1e-3)
    # The two phases as two launches cover the same tiles.
    first = read_tiles(k, v, tiles, programs=programs, stop=5)
    rest = read_tiles(k, v, tiles, programs=programs, start=5)
    assert (first.double().sum() + rest.double().sum()).item() == pytest.approx(want, rel=1e-5, abs=1e-3)
    assert first.double().sum().item() == pytest.approx(tile_sums(k, v, tiles[:5], 64), rel=1e-5, abs=1e-3)


def test_read_tiles_barrier_reads_both_phases_and_counts_arrivals(tiled_cache):
    from nsa.bench.floor import read_tiles

    k, v, tiles, want = tiled_cache
    arrivals = torch.zeros(1, dtype=torch.int32)
    # One program: the interpreter runs programs one after another, so only a grid of one can
    # pass a barrier here; the GPU script times the full grid.
    for launch in range(1, 3):
        got = read_tiles(k, v, tiles, programs=1, split=5, arrivals=arrivals).double().sum().item()
        assert got == pytest.approx(want, rel=1e-5, abs=1e-3)
        assert arrivals.item() == launch
    with pytest.raises(ValueError, match="split and arrivals come together"):
        read_tiles(k, v, tiles, programs=1, split=5)


def test_decode_step_tiles_follow_the_spec_reads():
    from nsa.bench.floor import TILE_ROWS, decode_step_tiles
    from nsa.config import NSAConfig

    config = NSAConfig(num_heads=8, num_kv_heads=2, head_dim=16, v_head_dim=16)
    context, batch = 2048, 3
    gen = torch.Generator().manual_seed(0)
    tiles, first_phase, rows_total = decode_step_tiles(config, batch, context, gen)
    cmp_tiles = -(-config.num_compressed(context) // TILE_ROWS)
    assert first_phase == batch * config.num_kv_heads * cmp_tiles
    per_sequence_rest = config.select_count + config.window // TILE_ROWS
    assert tiles.shape == (first_phase + batch * config.num_kv_heads * per_sequence_rest, 3)
    assert rows_total == cmp_tiles * TILE_ROWS + context + config.window
    # Tile bytes match the spec's formula up to the compressed keys' rounding to whole tiles.
    assert (tiles.shape[0] * TILE_ROWS - batch * config.num_kv_heads * config.decode_reads(context)
            == batch * config.num_kv_heads * (cmp_tiles * TILE_ROWS - config.num_compressed(context)))
    current = (context - 1) // config.select_block
    rest = tiles[first_phase:]
    for b in range(batch):
        for h in range(config.num_kv_heads):
            mine = rest[(rest[:, 0] == b) & (rest[:, 2] == h), 1]
            blocks = (mine[mine < cmp_tiles * TILE_ROWS + context] - cmp_tiles * TILE_ROWS) // TILE_ROWS
            assert len(set(blocks.tolist())) == config.select_count
            assert {0, current - 1, current} <= set(blocks.tolist())
            assert blocks.max() <= current
    assert (tiles[:, 1] + TILE_ROWS <= rows_total).all() and (tiles[:, 1] >= 0).all()


@pytest.mark.parametrize("positions", [1, 4])
@pytest.mark.parametrize("group", [4, 3])
def test_gather_reader_rows_reads_each_readers_rows(positions, group):
    from nsa.bench.floor import gather_reader_rows

    gen = torch.Generator().manual_seed(positions * 10 + group)
    batch, seq_len, num_kv, select_block = 2, 80, 2, 16
    q = torch.randn(batch, seq_len, num_kv * group, 16, generator=gen)
    do = torch.randn(batch, seq_len, num_kv * group, 32, generator=gen)
    blocks = torch.full((batch, seq_len, num_kv, 3), -1, dtype=torch.int64)
    want = 0.0
    for b in range(batch):
        for t in range(seq_len):
            for h in range(num_kv):
                count = int(torch.randint(0, 4, (1,), generator=gen))
                chosen = torch.randperm(t // select_block + 1, generator=gen)[:count]
                blocks[b, t, h, :len(chosen)] = chosen
                heads = slice(h * group, (h + 1) * group)
                want += len(chosen) * (q[b, t, heads].double().sum() + do[b, t, heads].double().sum()).item()
    got = gather_reader_rows(q, do, blocks, select_block=select_block, num_kv_heads=num_kv,
                             positions=positions, num_stages=2)
    assert got.double().sum().item() == pytest.approx(want, rel=1e-5, abs=1e-3)


def test_best_time_checks_every_shape_against_the_reference_and_records_failures():
    from nsa.bench.floor import _best_time

    rows = []

    def row(name, ms, what):
        rows.append((name, ms, what))

    def run(shape_id):
        if shape_id == 2:
            raise RuntimeError("no such launch")
        return (torch.ones(3), torch.ones(2)) if shape_id == 1 else torch.full((5,), 1.0)

    timings = {0: 2.0, 1: 1.5}
    calls = []

    def timer(fn):
        calls.append(fn)
        return timings[len(calls) - 1]

    best_ms, best_shape = _best_time("reads", [(0,), (1,), (2,)], run, row, timer, reference=5.0)
    assert (best_ms, best_shape) == (1.5, (1,))
    assert [r[0] for r in rows] == ["reads 0", "reads 1", "reads 2"]
    assert "cannot run: RuntimeError: no such launch" in rows[2][2]
    with pytest.raises(AssertionError, match="summed other elements"):
        _best_time("reads", [(0,)], run, row, timer, reference=50.0)
