"""Autotuning is keyed by sequence-length class: a config chosen at one size is not reused at
another (the autotuner itself is faked: the interpreter bypasses it)."""

import pytest

from nsa.ops import triton_common
from nsa.ops.triton_common import GroupTunedKernel, SizeTunedKernel, size_class


@pytest.mark.parametrize("seq_len,want", [(1, 1024), (1000, 1024), (1024, 1024), (1025, 2048), (8192, 8192),
                                          (8193, 16384), (65536, 65536), (100_000, 131072)])
def test_size_class_is_the_next_power_of_two_from_1024(seq_len, want):
    assert size_class(seq_len) == want


class _FakeAutotune:
    """Stands in for ``triton.autotune``: records each autotuner made and each launch."""

    def __init__(self):
        self.made, self.launches = [], []

    def __call__(self, configs, key, **kwargs):
        def wrap(kernel):
            tuner = _FakeTuner(self, list(configs), key)
            tuner.kwargs = kwargs
            self.made.append(tuner)
            return tuner
        return wrap


class _FakeTuner:
    """Launching "chooses" the last config for the call's key, as Triton's cache would hold it."""

    def __init__(self, owner, configs, key):
        self.owner, self.configs, self.key, self.cache = owner, configs, key, {}

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.owner.launches.append((self, kwargs))
            self.cache[tuple(kwargs.get(k) for k in self.key)] = self.configs[-1]
        return launch


@pytest.fixture
def fake_autotune(monkeypatch):
    fake = _FakeAutotune()
    monkeypatch.setattr(triton_common.triton, "autotune", fake)
    monkeypatch.setattr(triton_common, "INTERPRET", False)
    return fake


def test_size_tuned_kernel_keeps_one_autotuner_per_size_class(fake_autotune):
    configs = [triton_common.triton.Config({"BLOCK_M": m}) for m in (64, 128)]
    tuned = SizeTunedKernel("kernel", configs, key=["G"])
    at_8k = tuned.at(8192)
    assert tuned.at(5000) is at_8k and tuned.at(65536) is not at_8k and tuned.at(40000) is tuned.at(65536)
    assert len(fake_autotune.made) == 2 and all(t.configs == configs for t in fake_autotune.made)
    pinned = configs[1]
    with tuned.only(pinned):
        assert tuned.at(8192) is not at_8k and tuned.at(8192).configs == [pinned]
    assert tuned.at(8192) is at_8k and tuned.configs == configs


def test_group_tuned_kernel_keys_by_group_and_size_class(fake_autotune):
    tuned = GroupTunedKernel("kernel", [(64, 4, 2), (32, 4, 2)], key=["G"])
    for group, seq_len in ((16, 8192), (16, 6000), (16, 65536), (4, 8192)):
        tuned(lambda cfg: (1,), "arg", G=group, seq_len=seq_len)
    launched = [tuner for tuner, _ in fake_autotune.launches]
    # 8192 and 6000 share a class; 64k and another group get autotuners of their own.
    assert launched[0] is launched[1] and len({id(t) for t in launched}) == 3
    assert all(kwargs["G"] in (4, 16) and "seq_len" not in kwargs for _, kwargs in fake_autotune.launches)
    with pytest.raises(TypeError, match="seq_len"):
        tuned(lambda cfg: (1,), "arg", G=16)


def test_launches_that_change_a_tensor_in_place_have_it_restored(fake_autotune):
    """Autotuning times each config by launching it on the call's arguments: a launch that names
    arguments in ``restore`` gets an autotuner that puts them back after each timed launch, one
    that names none an autotuner that copies nothing (its placeholders may be a caller's tensors).
    Which launches name what: tests/test_triton_nsa.py, test_in_place_kernels_survive_..."""
    tuned = GroupTunedKernel("kernel", [(64, 4, 2), (32, 4, 2)], key=["G"])
    tuned(lambda cfg: (1,), "arg", G=4, seq_len=8192, restore=("dq",))
    tuned(lambda cfg: (1,), "arg", G=4, seq_len=8192)
    tuned(lambda cfg: (1,), "arg", G=4, seq_len=8192, restore=("dq",))
    assert [t.kwargs.get("restore_value") for t in fake_autotune.made] == [["dq"], None]
    launched = [tuner for tuner, _ in fake_autotune.launches]
    assert launched[0] is launched[2] is not launched[1]
    assert all("restore" not in kwargs for _, kwargs in fake_autotune.launches)
    sized = SizeTunedKernel("kernel", [triton_common.triton.Config({"BLOCK_M": 64})], key=["G"])
    sized.launch(8192, lambda meta: (1,), ("arg",), {"G": 4}, {}, restore=("DQ",))
    sized.launch(8192, lambda meta: (1,), ("arg",), {"G": 4}, {})
    assert [t.kwargs.get("restore_value") for t in fake_autotune.made[2:]] == [["DQ"], None]


def test_max_positions_rounds_position_tiles_down_to_a_capped_power_of_two(fake_autotune):
    tuned = GroupTunedKernel("kernel", [(16, 2, 2), (64, 4, 2)], key=["G"])
    tiles = [(c.kwargs["BT"], c.kwargs["BLOCK_M"]) for c in tuned.configs(3)]
    assert tiles == [(5, 16), (21, 64)]  # uncapped: rows // G positions
    assert [(c.kwargs["BT"], c.kwargs["BLOCK_M"]) for c in tuned.configs(3, 8)] == [(4, 16), (8, 32)]
    # G = 1: both options become 16 positions, one config per (tiles, warps).
    assert [(c.kwargs["BT"], c.num_warps) for c in tuned.configs(1, 16)] == [(16, 2), (16, 4)]
    tuned(lambda cfg: (1,), "arg", G=4, seq_len=8192, max_positions=16)
    tuned(lambda cfg: (1,), "arg", G=4, seq_len=8192, max_positions=4)
    first, second = (tuner for tuner, _ in fake_autotune.launches)
    assert first is not second and [c.kwargs["BT"] for c in second.configs] == [4, 4]
    assert all("max_positions" not in kwargs for _, kwargs in fake_autotune.launches)


def test_chosen_configs_are_reported_per_size_class(fake_autotune):
    configs = [triton_common.triton.Config({"BLOCK_M": m, "BLOCK_N": 64}, num_warps=w, num_stages=2)
               for m, w in ((64, 4), (256, 8))]
    tuned = SizeTunedKernel("kernel", configs, key=["G"])
    assert tuned.chosen(8192) == []
    tuned.at(8192)[lambda meta: (1,)]("arg", G=16)
    assert tuned.chosen(8192) == ["BLOCK_M=256 BLOCK_N=64 w8 s2"] and tuned.chosen(65536) == []
    group_tuned = GroupTunedKernel("kernel", [(64, 4, 2)], key=["G"], extra={"BN": 64})
    group_tuned(lambda cfg: (1,), "arg", G=16, seq_len=65536)
    assert group_tuned.chosen(65536) == ["BT=4 BLOCK_M=64 BN=64 w4 s2"] and group_tuned.chosen(8192) == []


def test_autotuned_tiles_names_every_prefill_kernel():
    from nsa.ops.triton_nsa import autotuned_tiles

    # Under the interpreter nothing is autotuned: every kernel is listed, none with a choice.
    assert autotuned_tiles(4096) == {name: [] for name in (
        "compressed-fwd", "compressed-dkdv", "compressed-dq", "selection-scoring", "selected-query",
        "selected-dkdv", "window-query", "window-dkdv")}


def test_descriptors_are_wanted_only_where_a_config_loads_through_them(fake_autotune, monkeypatch):
    """Triton encodes each tensor descriptor on the host at every launch, so launchers build them
    only where a config of the list (under the interpreter: the one it runs) has ``TMA`` on."""
    config = triton_common.triton.Config
    pointers = [config({"BLOCK_M": 64, "TMA": False}), config({"BLOCK_M": 128})]
    assert not SizeTunedKernel("kernel", pointers, key=["G"]).reads_descriptors({"TMA": True})
    both = SizeTunedKernel("kernel", [*pointers, config({"BLOCK_M": 64, "TMA": True})], key=["G"])
    assert both.reads_descriptors({"TMA": False})
    group_tuned = GroupTunedKernel("kernel", [(64, 4, 2), (64, 4, 2, {"TMA": True})], key=["G"],
                                   extra={"TMA": False})
    assert group_tuned.reads_descriptors()
    with group_tuned.only((64, 4, 2)):
        assert not group_tuned.reads_descriptors()
    monkeypatch.setattr(triton_common, "INTERPRET", True)  # the interpreter runs one config: its own
    assert not both.reads_descriptors({"TMA": False}) and both.reads_descriptors({"TMA": True})
    assert not group_tuned.reads_descriptors()
    with group_tuned.only((64, 4, 2, {"TMA": True})):
        assert group_tuned.reads_descriptors()


@pytest.mark.parametrize("op", ["compressed", "scoring", "window", "selected"])
@pytest.mark.parametrize("tma", [False, True], ids=["pointer-config", "tma-config"])
def test_launchers_build_descriptors_only_for_a_config_that_reads_them(op, tma, monkeypatch):
    """Each launcher passes its kernel's :meth:`SizeTunedKernel.reads_descriptors` to the
    descriptor builder, which makes none where no config reads them; the interpreter's config
    decides here, and the op's result is checked on both paths by the kernel tests."""
    import torch

    from nsa.ops.compressed_attention import triton as cmp_triton
    from nsa.ops.selected_attention import triton as selected
    from nsa.ops.selection import triton as selection
    from nsa.ops.window_attention import triton as window

    built = []

    def spy(module, name):
        real = getattr(module, name)

        def counted(*args, **kwargs):
            descriptors = real(*args, **kwargs)
            if descriptors is not None:
                built.append(name)
            return descriptors
        monkeypatch.setattr(module, name, counted)
        return name

    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 64, h, 32, generator=gen) for h in (4, 2, 2))
    k_cmp, v_cmp = torch.randn(1, 15, 2, 32, generator=gen), torch.randn(1, 15, 2, 32, generator=gen)
    if op == "compressed":
        builder = spy(cmp_triton, "kv_tile_descriptors")
        monkeypatch.setitem(cmp_triton.INTERPRET_TILES, "TMA", tma)
        cmp_triton.compressed_attention_forward(q, k_cmp, v_cmp, 8, 4, 0.2)
    elif op == "scoring":
        builder = spy(selection, "tile_descriptors")
        monkeypatch.setitem(selection.INTERPRET_TILES, "TMA", tma)
        _, lse = cmp_triton.compressed_attention_forward(q, k_cmp, v_cmp, 8, 4, 0.2)
        selection.select_blocks_triton(q, k_cmp, lse, block=8, stride=4, select_block=16, select_count=2)
    else:
        module = window if op == "window" else selected
        builder = spy(module, "kv_tile_descriptors")
        option = (64, 4, 2, {"TMA": True}) if tma else module._query_kernel.options[0]
        with module._query_kernel.only(option):
            if op == "window":
                window._query_pass(q, k, v, 16, 0.2)
            else:
                idx = torch.zeros(1, 64, 2, 2, dtype=torch.int32)
                selected._query_pass(q, k, v, idx, 0.2, 16)
    assert built == ([builder] if tma else []), built
