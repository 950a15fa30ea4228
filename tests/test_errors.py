"""Bad input to nsa_attention raises an error that names the argument and what was wrong."""

import pytest
import torch

from nsa import NSAConfig, nsa_attention

CFG = NSAConfig(
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    v_head_dim=6,
    compress_block=4,
    compress_stride=2,
    select_block=8,
    select_count=3,
    window=8,
    phi="mean",
)
B, T = 2, 10


def _inputs(device="cpu", dtype=torch.float32, batch=B, seq_len=T):
    return {
        "q": torch.randn(batch, seq_len, 4, 8, device=device, dtype=dtype),
        "k": torch.randn(batch, seq_len, 2, 8, device=device, dtype=dtype),
        "v": torch.randn(batch, seq_len, 2, 6, device=device, dtype=dtype),
        "gates": torch.rand(batch, seq_len, 4, 3, device=device, dtype=dtype),
    }


def _call(config=CFG, **changes):
    args = _inputs()
    kwargs = {k: changes.pop(k) for k in list(changes) if k not in args}
    args.update(changes)
    return nsa_attention(args["q"], args["k"], args["v"], args["gates"], config, **kwargs)


def test_good_input_runs():
    out = _call()
    assert out.shape == (B, T, 4, 6) and torch.isfinite(out).all()


SHAPE_CASES = [
    (
        "q 3-D",
        {"q": torch.randn(T, 4, 8)},
        ValueError,
        r"q must be 4-D \[B, T, HQ, Dk\], got shape \(10, 4, 8\)",
    ),
    ("q heads", {"q": torch.randn(B, T, 3, 8)}, ValueError, r"q must be \[B, T, num_heads=4, head_dim=8\]"),
    (
        "q head dim",
        {"q": torch.randn(B, T, 4, 7)},
        ValueError,
        r"q must be \[B, T, num_heads=4, head_dim=8\], got \[2, 10, 4, 7\]",
    ),
    ("k 5-D", {"k": torch.randn(1, B, T, 2, 8)}, ValueError, r"k/v keys must be 4-D"),
    (
        "k heads",
        {"k": torch.randn(B, T, 4, 8)},
        ValueError,
        r"k/v keys must have shape \[B, T, HK, D\] = \[2, 10, 2, 8\]",
    ),
    (
        "k length",
        {"k": torch.randn(B, T + 1, 2, 8)},
        ValueError,
        r"k/v keys must have shape .* got \[2, 11, 2, 8\]",
    ),
    (
        "v dim",
        {"v": torch.randn(B, T, 2, 8)},
        ValueError,
        r"k/v values must have shape \[B, T, HK, D\] = \[2, 10, 2, 6\]",
    ),
    ("v batch", {"v": torch.randn(B + 1, T, 2, 6)}, ValueError, r"k/v values must have shape"),
    (
        "gates last dim",
        {"gates": torch.rand(B, T, 4, 2)},
        ValueError,
        r"gates must be \[B, T, HQ, 3\] = \[2, 10, 4, 3\], got \[2, 10, 4, 2\]",
    ),
    ("gates per kv head", {"gates": torch.rand(B, T, 2, 3)}, ValueError, r"gates must be \[B, T, HQ, 3\]"),
    ("gates 3-D", {"gates": torch.rand(B, T, 12)}, ValueError, r"gates must be 4-D \[B, T, HQ, 3\]"),
]


@pytest.mark.parametrize("what,changes,exc,message", SHAPE_CASES, ids=[c[0] for c in SHAPE_CASES])
def test_shapes(what, changes, exc, message):
    with pytest.raises(exc, match=message):
        _call(**changes)


DTYPE_CASES = [
    (
        "q int",
        {"q": torch.ones(B, T, 4, 8, dtype=torch.int64)},
        r"q must be float16, bfloat16, float32 or float64, got torch.int64",
    ),
    (
        "k float64 vs q float32",
        {"k": torch.randn(B, T, 2, 8, dtype=torch.float64)},
        r"k/v keys must have q's dtype torch.float32, got torch.float64",
    ),
    (
        "v bf16 vs q float32",
        {"v": torch.randn(B, T, 2, 6, dtype=torch.bfloat16)},
        r"k/v values must have q's dtype",
    ),
    (
        "gates bool",
        {"gates": torch.ones(B, T, 4, 3, dtype=torch.bool)},
        r"gates must be float16, bfloat16, float32 or float64",
    ),
    ("k not a tensor", {"k": [[1.0]]}, r"k/v keys must be a torch.Tensor"),
]


@pytest.mark.parametrize("what,changes,message", DTYPE_CASES, ids=[c[0] for c in DTYPE_CASES])
def test_dtypes(what, changes, message):
    with pytest.raises(TypeError, match=message):
        _call(**changes)


@pytest.mark.parametrize("name", ["k", "v", "gates"])
def test_mismatched_devices(name):
    # The "meta" device stands in for a second device: same checks, no accelerator needed.
    args = _inputs(device="meta")
    args[name] = _inputs()[name]
    label = {"k": "k/v keys", "v": "k/v values", "gates": "gates"}[name]
    with pytest.raises(ValueError, match=rf"{label} must be on q's device meta, got cpu"):
        nsa_attention(args["q"], args["k"], args["v"], args["gates"], CFG)


def test_config_must_be_nsaconfig():
    args = _inputs()
    with pytest.raises(TypeError, match=r"config must be an nsa.NSAConfig, got dict"):
        nsa_attention(args["q"], args["k"], args["v"], args["gates"], {"num_heads": 4})


def _packed(cu):
    args = _inputs(batch=1)
    return nsa_attention(args["q"], args["k"], args["v"], args["gates"], CFG, cu_seqlens=cu)


CU_CASES = [
    ("float", torch.tensor([0.0, 4.0, 10.0]), r"cu_seqlens must be a 1-D int32/int64 tensor \[N \+ 1\]"),
    ("2-D", torch.tensor([[0, 4, 10]]), r"cu_seqlens must be a 1-D int32/int64 tensor"),
    (
        "not from 0",
        torch.tensor([1, 4, 10]),
        r"cu_seqlens must start at 0, be non-decreasing and end at total=10, got \[1, 4, 10\]",
    ),
    (
        "decreasing",
        torch.tensor([0, 6, 4, 10]),
        r"cu_seqlens must start at 0, be non-decreasing .* got \[0, 6, 4, 10\]",
    ),
    ("short of total", torch.tensor([0, 4, 9]), r"end at total=10, got \[0, 4, 9\]"),
    ("single offset", torch.tensor([0]), r"cu_seqlens must start at 0, be non-decreasing"),
]


@pytest.mark.parametrize("what,cu,message", CU_CASES, ids=[c[0] for c in CU_CASES])
def test_cu_seqlens(what, cu, message):
    with pytest.raises(ValueError, match=message):
        _packed(cu)


def test_cu_seqlens_needs_batch_one():
    with pytest.raises(
        ValueError, match=r"with cu_seqlens, q must be packed as \[1, total, HQ, Dk\], got batch 2"
    ):
        _call(cu_seqlens=torch.tensor([0, 4, 10]))


def test_cu_seqlens_device():
    args = _inputs(device="meta", batch=1)
    with pytest.raises(ValueError, match=r"cu_seqlens must be on q's device meta, got cpu"):
        nsa_attention(args["q"], args["k"], args["v"], args["gates"], CFG, cu_seqlens=torch.tensor([0, 10]))


def test_mlp_phi_needs_compressed_kv():
    with pytest.raises(ValueError, match=r"config.phi='mlp' needs compressed_kv=\(k_cmp, v_cmp\)"):
        _call(config=CFG.replace(phi="mlp"))


def test_compressed_kv_shape():
    n = CFG.num_compressed(T)  # 4
    good_v = torch.randn(B, n, 2, 6)
    with pytest.raises(
        ValueError, match=rf"compressed_kv keys must have shape \[B, T, HK, D\] = \[2, {n}, 2, 8\]"
    ):
        _call(config=CFG.replace(phi="mlp"), compressed_kv=(torch.randn(B, n + 1, 2, 8), good_v))
    with pytest.raises(TypeError, match=r"compressed_kv values must have q's dtype"):
        _call(config=CFG.replace(phi="mlp"), compressed_kv=(torch.randn(B, n, 2, 8), good_v.double()))


@pytest.mark.parametrize("name", ["selection_kv", "window_kv"])
def test_branch_kv_shape(name):
    bad = (torch.randn(B, T, 2, 8), torch.randn(B, T, 2, 5))
    with pytest.raises(ValueError, match=rf"{name} values must have shape \[B, T, HK, D\] = \[2, 10, 2, 6\]"):
        _call(**{name: bad})


def test_unknown_backend():
    with pytest.raises(
        ValueError, match=r"backend must be one of \('auto', 'reference', 'triton'\), got 'cuda'"
    ):
        _call(backend="cuda")


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run: .*(CUDA|unavailable|not part)"):
        _call(backend="triton")
