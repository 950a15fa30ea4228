"""NSAConfig: the paper's defaults, every validation rule, replace(), and the derived counts."""

import dataclasses
import re

import pytest

from nsa import NSAConfig


def test_defaults_are_the_papers():
    c = NSAConfig()
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.v_head_dim) == (64, 4, 192, 192)
    assert (c.compress_block, c.compress_stride, c.select_block, c.select_count, c.window) == (
        32,
        16,
        64,
        16,
        512,
    )
    assert (c.phi, c.gate) == ("mlp", "sigmoid")
    assert c.group_size == 16
    assert NSAConfig(head_dim=192, v_head_dim=128).v_head_dim == 128


def test_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        NSAConfig().window = 3


POSITIVE_INT_FIELDS = (
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "v_head_dim",
    "compress_block",
    "compress_stride",
    "select_block",
    "select_count",
    "window",
)


@pytest.mark.parametrize("field", POSITIVE_INT_FIELDS)
@pytest.mark.parametrize("value", [0, -3])
def test_sizes_must_be_positive(field, value):
    with pytest.raises(ValueError, match=rf"NSAConfig\.{field} must be positive, got {value}"):
        NSAConfig(**{field: value})


@pytest.mark.parametrize("field", POSITIVE_INT_FIELDS)
@pytest.mark.parametrize("value", [2.0, "8", True])
def test_sizes_must_be_ints(field, value):
    with pytest.raises(ValueError, match=rf"NSAConfig\.{field} must be an int, got {re.escape(repr(value))}"):
        NSAConfig(**{field: value})


# (changes, field named first, the rule, the offending values as the message prints them)
RULES = [
    (
        {"num_heads": 6, "num_kv_heads": 4},
        "num_heads",
        "divisible by num_kv_heads",
        "num_heads=6, num_kv_heads=4",
    ),
    (
        {"compress_block": 24, "compress_stride": 16},
        "compress_stride",
        "divide compress_block",
        "compress_stride=16, compress_block=24",
    ),
    (
        {"compress_block": 32, "compress_stride": 16, "select_block": 72},
        "compress_stride",
        "divide select_block",
        "compress_stride=16, select_block=72",
    ),
    (
        {"compress_block": 128, "select_block": 64},
        "compress_block",
        "<= select_block",
        "compress_block=128, select_block=64",
    ),
    ({"select_count": 2}, "select_count", ">= 3", "got 2"),
    ({"phi": "max"}, "phi", "one of ('mlp', 'mean')", "got 'max'"),
    ({"gate": "relu"}, "gate", "one of ('sigmoid', 'softmax')", "got 'relu'"),
]


@pytest.mark.parametrize("changes,field,rule,shown", RULES, ids=[r[1] + ":" + r[2] for r in RULES])
def test_each_rule_names_field_rule_and_value(changes, field, rule, shown):
    with pytest.raises(ValueError) as err:
        NSAConfig(**changes)
    message = str(err.value)
    assert f"NSAConfig.{field}" in message
    assert rule in message
    assert shown in message


def test_valid_edge_configs():
    # l = d = 1 (the compression equivalence), l = l', n = 3 (forced blocks only), G = 1.
    NSAConfig(
        num_heads=2,
        num_kv_heads=2,
        head_dim=8,
        compress_block=1,
        compress_stride=1,
        select_block=1,
        select_count=3,
        window=1,
        phi="mean",
        gate="softmax",
    )
    NSAConfig(compress_block=64, compress_stride=64, select_block=64)


def test_replace_copies_and_revalidates():
    c = NSAConfig(num_heads=8, num_kv_heads=2, head_dim=32)
    d = c.replace(window=64, phi="mean")
    assert (d.window, d.phi, d.num_heads, d.head_dim) == (64, "mean", 8, 32)
    assert (c.window, c.phi) == (512, "mlp")  # the original is untouched
    with pytest.raises(ValueError, match=r"NSAConfig\.select_count must be >= 3"):
        c.replace(select_count=1)
    with pytest.raises(TypeError):
        c.replace(no_such_field=1)


@pytest.mark.parametrize(
    "l,d,lengths", [(32, 16, range(200)), (4, 2, range(30)), (5, 5, range(30)), (1, 1, range(10))]
)
def test_num_compressed_counts_complete_blocks(l, d, lengths):
    c = NSAConfig(
        compress_block=l,
        compress_stride=d,
        select_block=max(l, 64 // d * d),
        num_heads=4,
        num_kv_heads=4,
        head_dim=8,
    )
    for s in lengths:
        complete = sum(1 for i in range(s + 1) if i * d + l <= s)  # blocks [i*d, i*d + l) inside [0, S)
        assert c.num_compressed(s) == complete, s


def test_decode_reads_formula_and_table4():
    c = NSAConfig()
    for s in (1, 31, 32, 100, 1000):
        assert c.decode_reads(s) == c.num_compressed(s) + min(16 * 64, s) + min(512, s)
    # The paper's Table 4 (64k context, defaults): about 2048, 2560, 3584, 5632 tokens.
    got = [c.decode_reads(s) for s in (8192, 16384, 32768, 65536)]
    assert got == [511 + 1024 + 512, 1023 + 1024 + 512, 2047 + 1024 + 512, 4095 + 1024 + 512]
    for value, paper in zip(got, (2048, 2560, 3584, 5632)):
        assert abs(value - paper) <= 2


def test_num_select_blocks():
    c = NSAConfig()
    assert [c.num_select_blocks(s) for s in (0, 1, 64, 65, 128)] == [0, 1, 1, 2, 2]
