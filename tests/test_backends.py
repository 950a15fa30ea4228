"""Backend choice is explicit and recorded: what runs, and why the other one did not."""

import pytest
import torch

from nsa import NSAConfig, nsa_attention
from nsa.backends import resolve_backend

SMALL = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "compress_block": 8, "compress_stride": 4,
         "select_count": 4, "window": 24, "phi": "mean"}


def _inputs(config, dtype=torch.float32, seq_len=40):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, seq_len, config.num_heads, config.head_dim, generator=gen).to(dtype)
    k = torch.randn(1, seq_len, config.num_kv_heads, config.head_dim, generator=gen).to(dtype)
    v = torch.randn(1, seq_len, config.num_kv_heads, config.v_head_dim, generator=gen).to(dtype)
    return q, k, v, torch.rand(1, seq_len, config.num_heads, 3, generator=gen).to(dtype)


def test_cpu_auto_runs_reference_and_says_why():
    config = NSAConfig(select_block=16, **SMALL)
    _, info = nsa_attention(*_inputs(config), config, return_info=True)
    assert info.backend == "reference" and "cpu" in info.backend_reason.lower()


@pytest.mark.parametrize("select_block", [8, 24, 48])
def test_triton_refuses_select_blocks_its_kernels_cannot_tile(select_block):
    config = NSAConfig(select_block=select_block, **SMALL)
    q = _inputs(config)[0]
    with pytest.raises(RuntimeError, match=f"select_block={select_block}.*power of two"):
        resolve_backend("triton", q, config)
    name, reason = resolve_backend("auto", q, config)
    assert name == "reference" and f"select_block={select_block}" in reason


def test_triton_refuses_float64_with_reason():
    config = NSAConfig(select_block=16, **SMALL)
    q = _inputs(config, torch.float64)[0]
    with pytest.raises(RuntimeError, match="float64"):
        resolve_backend("triton", q, config)


def test_explicit_triton_runs_in_the_interpreter_and_matches_reference():
    config = NSAConfig(select_block=16, **SMALL)
    args = _inputs(config)
    out, info = nsa_attention(*args, config, backend="triton", return_info=True)
    ref, ref_info = nsa_attention(*args, config, backend="reference", return_info=True)
    assert info.backend == "triton"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(info.selected_blocks, ref_info.selected_blocks)
    for branch in ("cmp", "slc", "win"):
        assert torch.equal(info.reads[branch], ref_info.reads[branch])


def test_unknown_backend_is_named():
    config = NSAConfig(select_block=16, **SMALL)
    with pytest.raises(ValueError, match="backend must be one of"):
        nsa_attention(*_inputs(config), config, backend="cuda")


@pytest.mark.parametrize("field", ["head_dim", "v_head_dim"])
def test_triton_refuses_head_dims_beyond_its_tiles(field):
    config = NSAConfig(select_block=16, **{**SMALL, field: 320})
    q = torch.zeros(1, 4, config.num_heads, config.head_dim)
    with pytest.raises(RuntimeError, match=f"{field}=320.*<= 256"):
        resolve_backend("triton", q, config)
    assert resolve_backend("auto", q, config)[0] == "reference"


def _graph_nodes(tensor: torch.Tensor) -> set[str]:
    seen, names, stack = set(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(parent for parent, _ in node.next_functions)
    return names


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_whole_sequences_run_without_copies_and_reads_only_when_asked(backend, monkeypatch):
    """Unpacked inputs reach the backend as given (no slice, no concatenation, which copied the
    output; the reference chunks internally, so the graph is checked on Triton), and the
    per-branch reads are counted only for the info."""
    import nsa.ops.reference
    import nsa.ops.triton_nsa

    config = NSAConfig(select_block=16, **SMALL)
    q, k, v, gates = (t.requires_grad_() for t in _inputs(config))
    counted = []

    def counting(real):
        def branch_reads(*args, **kwargs):
            counted.append(1)
            return real(*args, **kwargs)
        return branch_reads

    for module in (nsa.ops.reference, nsa.ops.triton_nsa):
        monkeypatch.setattr(module, "branch_reads", counting(module.branch_reads))
    out = nsa_attention(q, k, v, gates, config, backend=backend)
    assert not counted
    if backend == "triton":
        assert not _graph_nodes(out) & {"SliceBackward0", "CatBackward0"}, _graph_nodes(out)
    _, info = nsa_attention(q, k, v, gates, config, backend=backend, return_info=True)
    assert counted and set(info.reads) == {"cmp", "slc", "win"}
