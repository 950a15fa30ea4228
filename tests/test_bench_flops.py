"""The FLOP counts behind `nsa bench`'s TFLOP/s columns, against independent counts."""

import pytest
import torch

from nsa import NSAConfig
from nsa.bench.prefill import BenchRow, attention_flops, dense_causal_pairs, nsa_flops, set_tflops
from nsa.functional import nsa_attention


def test_attention_flops_follow_flashattention_counting():
    """Causal forward is 4 * HQ * T(T+1)/2 * D FLOPs at Dk = Dv = D, backward 2.5x that."""
    pairs = dense_causal_pairs(1024, 8)
    assert pairs == 8 * 1024 * 1025 / 2
    fwd, bwd = attention_flops(pairs, 128, 128)
    assert fwd == 4 * pairs * 128 and bwd == pytest.approx(2.5 * fwd)
    fwd, bwd = attention_flops(pairs, 192, 128)
    assert fwd == 2 * pairs * (192 + 128) and bwd == 2 * pairs * (3 * 192 + 2 * 128)


@pytest.mark.parametrize("seq_len", [64, 45])
def test_nsa_flops_from_the_layer_reads(seq_len):
    """With n * l' >= T and w >= T, selection and window attend causally to everything: their
    pairs are dense causal attention's. The compressed pairs are counted here by brute force."""
    config = NSAConfig(num_heads=4, num_kv_heads=2, head_dim=16, compress_block=8, compress_stride=4,
                       select_block=16, select_count=4, window=64, phi="mean")
    gen = torch.Generator().manual_seed(seq_len)
    q = torch.randn(1, seq_len, 4, 16, generator=gen)
    k, v = torch.randn(1, seq_len, 2, 16, generator=gen), torch.randn(1, seq_len, 2, 16, generator=gen)
    gates = torch.rand(1, seq_len, 4, 3, generator=gen)
    _, info = nsa_attention(q, k, v, gates, config, backend="reference", return_info=True)
    flops = nsa_flops(info.reads, config)
    dense = attention_flops(dense_causal_pairs(seq_len, 4), 16, 16)
    assert flops["selection"] == dense and flops["window"] == dense
    visible = sum(1 for t in range(seq_len) for i in range(seq_len) if i * 4 + 8 - 1 <= t)
    assert flops["compression"] == attention_flops(4 * visible, 16, 16)
    assert flops["scoring-topn"] == (2.0 * 4 * visible * 16, 0.0)


def test_set_tflops_uses_the_row_times():
    row = set_tflops(BenchRow("x", 8, 128, 128, fwd_ms=2.0, bwd_ms=None), 4e12, 8e12)
    assert row.fwd_tflops == pytest.approx(2000.0) and row.bwd_tflops is None
