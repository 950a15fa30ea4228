"""Prefill (training) benchmark: NSA forward/backward beside dense attention and a peer NSA.

Every number of one run comes from the same process on the same card, so the ratios are
meaningful. Times are medians after warm-up on random data: ``triton.testing.do_bench`` for
calls under 50 ms, three CUDA-event samples for longer ones (see :func:`_bench`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from nsa.config import NSAConfig

SEQ_LENS = (8192, 16384, 32768, 65536, 131072)
HEAD_DIMS = ((128, 128), (192, 128))
HEADS = (64, 4)  # (query heads, key/value heads): issue 3's layout, G = 16


@dataclass
class BenchRow:
    """One implementation at one shape. Times in milliseconds; ``None`` when it cannot run (see ``note``)."""

    impl: str
    seq_len: int
    head_dim: int
    v_head_dim: int
    num_heads: int = HEADS[0]
    num_kv_heads: int = HEADS[1]
    fwd_ms: float | None = None
    bwd_ms: float | None = None
    fwdbwd_ms: float | None = None
    peak_mem_gib: float | None = None
    note: str = ""
    # NSA rows: the backward's schedule and the autotuned tile config of each kernel at this length
    # ("backward schedule: name; kernel: config; ...").
    tiles: str = ""
    # Achieved TFLOP/s on the algorithmic FLOPs of what the row computes (see attention_flops);
    # None where the time or the count is missing.
    fwd_tflops: float | None = None
    bwd_tflops: float | None = None
    # Which repetition of its shape's group (``nsa bench --repeats``); ratios pair rows of one.
    repeat: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def attention_flops(pairs: float, head_dim: int, v_head_dim: int) -> tuple[float, float]:
    """(forward, backward) FLOPs of attention over ``pairs`` (query head, key) pairs, counted as
    FlashAttention counts them: forward ``QK^T`` and ``PV``; backward the five products ``QK^T``
    (recomputed), ``dO V^T``, ``P^T dO``, ``dS^T Q``, ``dS K``. Recomputation beyond that and the
    softmax are not counted, so the TFLOP/s are comparable across implementations."""
    return 2.0 * pairs * (head_dim + v_head_dim), 2.0 * pairs * (3 * head_dim + 2 * v_head_dim)


def dense_causal_pairs(seq_len: int, num_heads: int) -> float:
    """(query head, key) pairs of causal attention over one sequence: ``HQ * T (T + 1) / 2``."""
    return num_heads * seq_len * (seq_len + 1) / 2


def nsa_flops(reads: dict[str, torch.Tensor], config: NSAConfig) -> dict[str, tuple[float, float]]:
    """(forward, backward) FLOPs per NSA branch from the key reads an :class:`~nsa.NSAInfo`
    reports (``{"cmp", "slc", "win"} -> [B, T, HK]``; each read serves the group's ``G`` query
    heads), plus ``"scoring-topn"``: block scoring's second ``q.k`` pass over the compressed keys
    (forward only; Eq. 9/10 and the top-n are not counted)."""
    pairs = {name: float(r.sum()) * config.group_size for name, r in reads.items()}
    dk, dv = config.head_dim, config.v_head_dim
    return {"compression": attention_flops(pairs["cmp"], dk, dv),
            "selection": attention_flops(pairs["slc"], dk, dv),
            "window": attention_flops(pairs["win"], dk, dv),
            "scoring-topn": (2.0 * pairs["cmp"] * dk, 0.0)}


def set_tflops(row: BenchRow, fwd_flops: float, bwd_flops: float) -> BenchRow:
    """Fill ``row``'s achieved TFLOP/s from its times (where measured and the count is non-zero)."""
    if row.fwd_ms and fwd_flops:
        row.fwd_tflops = fwd_flops / (row.fwd_ms * 1e-3) / 1e12
    if row.bwd_ms and bwd_flops:
        row.bwd_tflops = bwd_flops / (row.bwd_ms * 1e-3) / 1e12
    return row


# A call this slow is timed with a few CUDA-event samples rather than do_bench: do_bench spends
# five estimation calls plus warm-up and repeats on each, and at 128k the dense baselines (about
# 0.6 s forward, 2 s backward) would then take most of the benchmark's wall time. A 50 ms call is
# long enough that launch jitter is far below the 1% we report.
LONG_CALL_MS = 50.0
LONG_CALL_SAMPLES = 3


def _bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` after a warm-up call (see :data:`LONG_CALL_MS`)."""
    import statistics

    import triton.testing

    def timed() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    fn()  # warm-up: autotuning, allocator growth, cuDNN plan building
    first = timed()
    if first < LONG_CALL_MS:
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    return float(statistics.median([first] + [timed() for _ in range(LONG_CALL_SAMPLES - 1)]))


def _time_fwd_bwd(forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> tuple[float, float, float, float]:
    """(fwd, bwd, fwd+bwd) medians in ms and the peak memory of one fwd+bwd in GiB."""
    fwd = _bench(forward)
    out = forward()
    grad = torch.randn_like(out)

    def backward():
        for x in inputs:
            x.grad = None
        out.backward(grad, retain_graph=True)

    bwd = _bench(backward)

    def both():
        for x in inputs:
            x.grad = None
        forward().backward(grad)

    fwdbwd = _bench(both)
    out = None  # free the timed graph before measuring peak memory
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    both()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return fwd, bwd, fwdbwd, peak


def bench_config(head_dim: int, v_head_dim: int, num_heads: int = HEADS[0], num_kv_heads: int = HEADS[1],
                 ) -> NSAConfig:
    """The benchmarked NSA: paper block sizes, mean phi (so that only attention is timed)."""
    return NSAConfig(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, v_head_dim=v_head_dim,
                     phi="mean")


def dense_rows(seq_len: int, head_dim: int, v_head_dim: int, num_heads: int = HEADS[0],
               num_kv_heads: int = HEADS[1], dtype: torch.dtype = torch.bfloat16) -> list[BenchRow]:
    """torch SDPA dense causal with the FlashAttention-2 backend and with the cuDNN backend.

    K/V are expanded to all query heads outside the timed region (both backends then run MHA).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = "cuda"
    q = torch.randn(1, num_heads, seq_len, head_dim, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(1, num_kv_heads, seq_len, head_dim, device=dev, dtype=dtype)
    v = torch.randn(1, num_kv_heads, seq_len, v_head_dim, device=dev, dtype=dtype)
    group = num_heads // num_kv_heads
    k = k.repeat_interleave(group, 1).requires_grad_()
    v = v.repeat_interleave(group, 1).requires_grad_()
    rows = []
    for name, backend in (("sdpa-flash2", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
        row = BenchRow(name, seq_len, head_dim, v_head_dim, num_heads, num_kv_heads)
        try:
            with sdpa_kernel([backend]):
                row.fwd_ms, row.bwd_ms, row.fwdbwd_ms, row.peak_mem_gib = _time_fwd_bwd(
                    lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v])
        except RuntimeError as exc:  # e.g. FlashAttention-2 rejects Dk != Dv
            row.note = f"cannot run: {str(exc).splitlines()[0][:160]}"
        flops = attention_flops(dense_causal_pairs(seq_len, num_heads), head_dim, v_head_dim)
        rows.append(set_tflops(row, *flops))
    return rows


def nsa_inputs(config: NSAConfig, seq_len: int, dtype: torch.dtype = torch.bfloat16, device: str = "cuda",
               seed: int = 0) -> dict[str, torch.Tensor]:
    """Random q, k, v, gates of one sequence for ``config`` (leaf tensors that require grad)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen).requires_grad_()

    return {
        "q": rand(1, seq_len, config.num_heads, config.head_dim),
        "k": rand(1, seq_len, config.num_kv_heads, config.head_dim),
        "v": rand(1, seq_len, config.num_kv_heads, config.v_head_dim),
        "gates": torch.rand(1, seq_len, config.num_heads, 3, device=device, dtype=dtype,
                            generator=gen).requires_grad_(),
    }


def nsa_row(seq_len: int, head_dim: int, v_head_dim: int, backend: str = "triton",
            dtype: torch.dtype = torch.bfloat16, num_heads: int = HEADS[0],
            num_kv_heads: int = HEADS[1]) -> BenchRow:
    """Our NSA (:func:`bench_config`)."""
    from nsa.functional import nsa_attention

    config = bench_config(head_dim, v_head_dim, num_heads, num_kv_heads)
    x = nsa_inputs(config, seq_len, dtype)
    row = BenchRow(f"nsa-{backend}", seq_len, head_dim, v_head_dim, num_heads, num_kv_heads)
    row.fwd_ms, row.bwd_ms, row.fwdbwd_ms, row.peak_mem_gib = _time_fwd_bwd(
        lambda: nsa_attention(x["q"], x["k"], x["v"], x["gates"], config, backend=backend), list(x.values()))
    with torch.no_grad():
        _, info = nsa_attention(x["q"], x["k"], x["v"], x["gates"], config, backend=backend, return_info=True)
    branches = nsa_flops(info.reads, config).values()
    set_tflops(row, sum(f for f, _ in branches), sum(b for _, b in branches))
    if backend == "triton":
        from nsa.ops import triton_nsa

        # Which passes shared the GPU in the backward and what the branches shared, then each
        # kernel's tile config.
        row.tiles = "; ".join([f"backward schedule: {triton_nsa.BACKWARD_SCHEDULE}",
                               f"forward sharing: {info.forward_path}",
                               f"backward sharing: {info.backward_path}"] + [
            f"{name}: {' | '.join(chosen)}" for name, chosen in triton_nsa.autotuned_tiles(seq_len).items()])
    return row


def fla_row(seq_len: int, head_dim: int, v_head_dim: int, dtype: torch.dtype = torch.bfloat16,
            num_heads: int = HEADS[0], num_kv_heads: int = HEADS[1]) -> BenchRow:
    """fla-core's ``parallel_nsa`` in its own configuration: mean pooling, l = d = l' = 64, no window."""
    row = BenchRow("fla-parallel_nsa", seq_len, head_dim, v_head_dim, num_heads, num_kv_heads)
    try:
        from fla.ops.nsa import parallel_nsa
    except ImportError as exc:
        row.note = f"fla-core not installed ({exc}); pip install 'nsa[bench]'"
        return row
    x = nsa_inputs(bench_config(head_dim, v_head_dim, num_heads, num_kv_heads), seq_len, dtype)
    g_cmp = x["gates"][..., 0].detach().contiguous().requires_grad_()
    g_slc = x["gates"][..., 1].detach().contiguous().requires_grad_()
    try:
        row.fwd_ms, row.bwd_ms, row.fwdbwd_ms, row.peak_mem_gib = _time_fwd_bwd(
            lambda: parallel_nsa(x["q"], x["k"], x["v"], g_cmp, g_slc, None, block_counts=16,
                                 block_size=64, window_size=0),
            [x["q"], x["k"], x["v"], g_cmp, g_slc])
    except Exception as exc:  # the peer's own limits (e.g. head dims) are reported, not fatal
        row.note = f"cannot run: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return row


def ratio(baseline: BenchRow, row: BenchRow, field: str) -> float | None:
    """``baseline / row`` for a time field: how many times faster ``row`` is."""
    a, b = getattr(baseline, field), getattr(row, field)
    return None if a is None or b is None or b == 0 else a / b


def nsa_branch_rows(seq_len: int, head_dim: int, v_head_dim: int, dtype: torch.dtype = torch.bfloat16,
                    num_heads: int = HEADS[0], num_kv_heads: int = HEADS[1]) -> list[BenchRow]:
    """Per-branch breakdown of the Triton NSA: each kernel timed alone (forward and backward)."""
    from nsa.ops.combine.triton import combine_branches_triton
    from nsa.ops.compressed_attention.triton import compressed_attention_triton
    from nsa.ops.compression import compress_mean
    from nsa.ops.reads import branch_reads
    from nsa.ops.selected_attention.triton import selected_attention_triton
    from nsa.ops.selection.triton import select_blocks_triton
    from nsa.ops.window_attention.triton import window_attention_triton

    c = bench_config(head_dim, v_head_dim, num_heads, num_kv_heads)
    x = nsa_inputs(c, seq_len, dtype)
    layout = (num_heads, num_kv_heads)
    q, k, v = x["q"], x["k"], x["v"]
    k_cmp = compress_mean(k.detach(), c.compress_block, c.compress_stride).requires_grad_()
    v_cmp = compress_mean(v.detach(), c.compress_block, c.compress_stride).requires_grad_()
    _, lse = compressed_attention_triton(q, k_cmp, v_cmp, block=c.compress_block, stride=c.compress_stride)
    blocks = select_blocks_triton(q.detach(), k_cmp.detach(), lse.detach(), block=c.compress_block,
                                  stride=c.compress_stride, select_block=c.select_block,
                                  select_count=c.select_count)
    branches = {
        "compression": (lambda: compressed_attention_triton(q, k_cmp, v_cmp, block=c.compress_block,
                                                            stride=c.compress_stride)[0], [q, k_cmp, v_cmp]),
        "selection": (lambda: selected_attention_triton(q, k, v, blocks, select_block=c.select_block)[0],
                      [q, k, v]),
        "window": (lambda: window_attention_triton(q, k, v, window=c.window)[0], [q, k, v]),
    }
    flops = nsa_flops(branch_reads(blocks, 0, c), c)
    rows = []
    for name, (forward, inputs) in branches.items():
        row = BenchRow(f"nsa-branch-{name}", seq_len, head_dim, v_head_dim, *layout)
        row.fwd_ms, row.bwd_ms, row.fwdbwd_ms, row.peak_mem_gib = _time_fwd_bwd(forward, inputs)
        rows.append(set_tflops(row, *flops[name]))
    scoring = BenchRow("nsa-branch-scoring-topn", seq_len, head_dim, v_head_dim, *layout,
                       note="forward only (no gradient)")
    scoring.fwd_ms = _bench(lambda: select_blocks_triton(
        q.detach(), k_cmp.detach(), lse.detach(), block=c.compress_block, stride=c.compress_stride,
        select_block=c.select_block, select_count=c.select_count))
    rows.append(set_tflops(scoring, *flops["scoring-topn"]))
    o = torch.randn(1, seq_len, c.num_heads, v_head_dim, device="cuda", dtype=dtype)
    gates = x["gates"].detach()
    combine = BenchRow("nsa-branch-gate-combine", seq_len, head_dim, v_head_dim, *layout, note="forward only")
    combine.fwd_ms = _bench(lambda: combine_branches_triton(o, o, o, gates))
    rows.append(combine)
    return rows
