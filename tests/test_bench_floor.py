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


def test_floor_script_says_it_needs_a_gpu(run_gpu_script):
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU-only message; on a GPU the script runs")
    result = run_gpu_script("forward_floor.py", "--seq-lens", "8192")
    assert result.returncode != 0
    assert "needs a CUDA GPU" in result.stderr
