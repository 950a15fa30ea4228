"""Decode benchmark: one NSA decode step (Triton kernels, CUDA graph) beside torch SDPA over a
dense KV cache, in one process on one card, plus a parity check against the reference step.

Both sides time the attention of one new token per sequence over a cache that already holds it
(the cache writes are not timed on either side). Times are medians of ``triton.testing.do_bench``,
which empties the L2 cache before every call, so a step that fits in L2 is not flattered.
Bytes per step follow the spec's formula: ``B * reads(S) * HK * (Dk + Dv) * itemsize`` for NSA
(``reads(S) = num_cmp(S) + min(n*l', S) + min(w, S)``; the compressed keys are read by the
attention and again by the block scoring, counted once), ``B * S * HK * (Dk + Dv) * itemsize``
for the dense cache. NSA rows also give ``bytes_with_rescoring``: the formula plus the scoring
pass's second read of the compressed keys.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from nsa.cache import NSACache
from nsa.config import NSAConfig

if TYPE_CHECKING:
    from nsa.ops.decode.triton import DecodePlan

CONTEXTS = (8192, 16384, 32768, 65536, 131072)
BATCHES = (1, 32)
HEAD_DIMS = ((128, 128), (192, 128))
NUM_HEADS, NUM_KV_HEADS = 64, 4


@dataclass
class DecodeRow:
    """One implementation at one shape; ``us`` is the median time per step in microseconds."""

    impl: str
    context: int
    batch: int
    head_dim: int
    v_head_dim: int
    us: float | None = None
    bytes_read: int = 0
    read_tokens: int = 0
    bytes_with_rescoring: int = 0
    gbps: float | None = None
    copy_fraction: float | None = None
    speedup_vs_dense: float | None = None
    cuda_graph: bool = False
    # NSA rows: the step's scoring, select and combine kernels were programmatic dependent
    # launches (DecodePlan.pdl: sm_90 and later).
    programmatic_launch: bool = False
    eager_us: float | None = None
    best_dense: str | None = None
    # NSA rows: mean device time per step of each kernel, eager, under torch.profiler
    # ("_range_kernel 132.7, _select_kernel 35.1, ..." in us), or why it could not be measured.
    kernels_us: str = ""
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def kernel_times_us(fn: Callable[[], object], repeats: int = 20) -> dict[str, float]:
    """Mean device time per call of each CUDA kernel ``fn`` launches (eager, torch.profiler), us."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.key] = times.get(event.key, 0.0) + event.device_time_total / repeats
    return times


def format_kernel_times(times: dict[str, float]) -> str:
    """``name us, name us, ...`` of :func:`kernel_times_us`'s result, slowest first."""
    return ", ".join(f"{name} {us:.1f}" for name, us in sorted(times.items(), key=lambda kv: -kv[1]))


def bench_us(fn: Callable[[], object]) -> float:
    import triton.testing

    return 1000.0 * float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def copy_bandwidth_gbps(nbytes: int = 2 << 30) -> float:
    """Device copy bandwidth (bytes read + written per second, GB/s) of a ``nbytes`` buffer."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    seconds = bench_us(lambda: dst.copy_(src)) * 1e-6
    return 2 * nbytes / seconds / 1e9


def graphed(fn: Callable[[], object]) -> tuple[Callable[[], object], bool, str]:
    """``fn`` captured in a CUDA graph (replay), or ``fn`` itself with the reason capture failed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # compiles kernels and settles the allocator before capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager, recorded
        torch.cuda.synchronize()
        return fn, False, f"graph capture failed: {type(exc).__name__}: {str(exc)[:120]}"
    torch.cuda.synchronize()
    return graph.replay, True, ""


def paper_config(head_dim: int, v_head_dim: int) -> NSAConfig:
    return NSAConfig(num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=head_dim, v_head_dim=v_head_dim)


def filled_cache(config: NSAConfig, batch: int, context: int, dtype: torch.dtype,
                 device: str = "cuda") -> NSACache:
    """An :class:`NSACache` of ``batch`` sequences of ``context`` tokens, every slot random."""
    cache = NSACache.allocate(config, batch, context, dtype=dtype, device=device)
    for t in (cache.k_cmp, cache.v_cmp, cache.k_tail, cache.v_tail, cache.k_slc, cache.v_slc, cache.k_win,
              cache.v_win):
        t.normal_()
    cache.lengths.fill_(context)
    return cache


def nsa_step(config: NSAConfig, cache: NSACache, q: torch.Tensor, gates: torch.Tensor,
             num_new: torch.Tensor) -> tuple[Callable[[], object], DecodePlan]:
    """The Triton decode step over ``cache`` as a capturable closure (no host synchronisation),
    and the split plan it runs."""
    from nsa.ops.decode.triton import nsa_decode_triton, plan_decode

    plan = plan_decode(config, q.shape[0] * q.shape[1] * config.num_kv_heads, cache.max_len)

    def step():
        return nsa_decode_triton(q, cache.k_cmp, cache.v_cmp, cache.k_slc, cache.v_slc, cache.k_win,
                                 cache.v_win, gates, cache.lengths, config, num_new=num_new, plan=plan,
                                 check_values=False)

    return step, plan


def read_bytes(config: NSAConfig, batch: int, context: int, itemsize: int) -> tuple[int, int]:
    """(tokens, bytes) one NSA step must read per the spec's formula, all sequences together."""
    tokens = config.decode_reads(context)
    entry = config.num_kv_heads * (config.head_dim + config.v_head_dim) * itemsize
    return tokens, batch * tokens * entry


def dense_rows(batch: int, context: int, head_dim: int, v_head_dim: int,
               dtype: torch.dtype = torch.bfloat16) -> list[DecodeRow]:
    """torch SDPA of one new token over a dense GQA cache, each backend that runs (graphed).

    The ``G`` query heads of a kv head are laid out as ``G`` queries of one head (no mask: the
    new token sees the whole cache), so every backend reads each key/value once, as GQA does.
    """
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = NUM_HEADS // NUM_KV_HEADS
    q = torch.randn(batch, NUM_KV_HEADS, group, head_dim, dtype=dtype, device="cuda")
    k = torch.randn(batch, NUM_KV_HEADS, context, head_dim, dtype=dtype, device="cuda")
    v = torch.randn(batch, NUM_KV_HEADS, context, v_head_dim, dtype=dtype, device="cuda")
    nbytes = batch * context * NUM_KV_HEADS * (head_dim + v_head_dim) * dtype.itemsize
    rows = []
    for name, backend in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION),
                          ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION), ("sdpa-math", SDPBackend.MATH)):
        row = DecodeRow(name, context, batch, head_dim, v_head_dim, bytes_read=nbytes, read_tokens=context)

        def attend(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)

        try:
            attend()
            torch.cuda.synchronize()
            fn, row.cuda_graph, row.note = graphed(attend)
            row.us = bench_us(fn)
            row.gbps = nbytes / (row.us * 1e-6) / 1e9
        except Exception as exc:  # noqa: BLE001 - a backend that cannot run is recorded, not fatal
            torch.cuda.synchronize()
            row.note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        rows.append(row)
    return rows


def nsa_row(batch: int, context: int, head_dim: int, v_head_dim: int,
            dtype: torch.dtype = torch.bfloat16) -> DecodeRow:
    """One NSA decode step (one new token per sequence) over full caches of ``context`` tokens."""
    config = paper_config(head_dim, v_head_dim)
    cache = filled_cache(config, batch, context, dtype)
    q = torch.randn(batch, 1, NUM_HEADS, head_dim, dtype=dtype, device="cuda")
    gates = torch.rand(batch, 1, NUM_HEADS, 3, dtype=dtype, device="cuda")
    num_new = torch.ones(batch, dtype=torch.int64, device="cuda")
    tokens, nbytes = read_bytes(config, batch, context, dtype.itemsize)
    # The block scoring reads the compressed keys a second time (L2 may serve part of it).
    rescoring = batch * config.num_compressed(context) * config.num_kv_heads * head_dim * dtype.itemsize
    row = DecodeRow("nsa-triton", context, batch, head_dim, v_head_dim, bytes_read=nbytes, read_tokens=tokens,
                    bytes_with_rescoring=nbytes + rescoring)
    step, plan = nsa_step(config, cache, q, gates, num_new)
    row.programmatic_launch = plan.pdl
    fn, row.cuda_graph, row.note = graphed(step)
    row.us = bench_us(fn)
    row.gbps = nbytes / (row.us * 1e-6) / 1e9
    row.eager_us = bench_us(step)
    try:
        row.kernels_us = format_kernel_times(kernel_times_us(step))
    except Exception as exc:  # noqa: BLE001 - the breakdown is a detail: its failure is recorded, the row stays
        row.kernels_us = f"profiler failed: {type(exc).__name__}: {str(exc)[:120]}"
    del cache
    return row


def rank_against_dense(group: list[DecodeRow], copy_gbps: float) -> DecodeRow | None:
    """Fill in each row's ``copy_fraction``, ``speedup_vs_dense`` and ``best_dense`` for one shape
    (``group``: the NSA row, then the dense rows) and return the fastest dense row (``None`` when
    no dense backend ran)."""
    timed = [r for r in group[1:] if r.us is not None]
    best = min(timed, key=lambda r: r.us) if timed else None
    for r in group:
        if r.gbps is not None:
            r.copy_fraction = r.gbps / copy_gbps
        if best is not None and r.us is not None:
            r.speedup_vs_dense = best.us / r.us
        r.best_dense = best.impl if best else None
    return best


def measure(contexts=CONTEXTS, batches=BATCHES, head_dims=HEAD_DIMS, *, deadline: float | None = None,
            log: Callable[[str], None] = print) -> tuple[list[DecodeRow], float]:
    """Rows for every (head dims, context, batch) and the card's copy bandwidth in GB/s.

    Shapes not started before ``deadline`` (``time.time()`` seconds) get a row saying so.
    """
    copy = copy_bandwidth_gbps()
    log(f"device copy bandwidth: {copy:.0f} GB/s")
    rows: list[DecodeRow] = []
    for dk, dv in head_dims:
        for context in contexts:
            for batch in batches:
                if deadline is not None and time.time() > deadline:
                    rows.append(DecodeRow("nsa-triton", context, batch, dk, dv, note="skipped: time budget"))
                    continue
                started = time.time()
                try:
                    group = [nsa_row(batch, context, dk, dv)]
                except Exception as exc:  # noqa: BLE001 - recorded in the row, the dense rows still run
                    torch.cuda.synchronize()
                    log(f"nsa step failed at S={context} B={batch} Dk/Dv={dk}/{dv}: {traceback.format_exc()}")
                    group = [DecodeRow("nsa-triton", context, batch, dk, dv,
                                       note=f"failed: {type(exc).__name__}: {str(exc)[:150]}")]
                torch.cuda.empty_cache()
                group += dense_rows(batch, context, dk, dv)
                torch.cuda.empty_cache()
                best = rank_against_dense(group, copy)
                nsa = group[0]
                log(f"Dk/Dv={dk}/{dv} S={context} B={batch}: nsa {nsa.us or math.nan:.1f} us "
                    f"({nsa.gbps or math.nan:.0f} GB/s, graph={nsa.cuda_graph}), best dense "
                    f"{best.impl if best else '-'} {best.us if best else math.nan:.1f} us, "
                    f"x{nsa.speedup_vs_dense or math.nan:.2f} [{time.time() - started:.1f}s] {nsa.note}")
                rows += group
    return rows, copy


# ----- the layer's step in a CUDA graph ----------------------------------------------------------

LAYER_D_MODEL = 4096
CACHE_BUFFERS = ("k_cmp", "v_cmp", "k_tail", "v_tail", "k_slc", "v_slc", "k_win", "v_win", "lengths", "overflowed")


@dataclass
class LayerStepRow:
    """``NSAAttention.decode_step`` (projections, cache append, phi, the four decode kernels,
    output projection) eager and replayed from a CUDA graph at one shape.

    ``passed``: ``steps`` graph replays gave the eager steps' outputs (max |diff| over max |eager|
    within ``tol``), blocks and final cache; ``bitwise``: they were identical. ``eager_us`` and
    ``graph_us``: time per step over ``timed_steps`` back-to-back steps (CUDA events around the
    whole run, median of ``repeats``), so the eager time includes the host's launch overhead
    whenever the host is the slower side. ``sync_free``: an eager step ran under
    ``torch.cuda.set_sync_debug_mode("error")``.
    """

    context: int
    batch: int
    head_dim: int
    v_head_dim: int
    d_model: int
    phi: str
    dtype: str
    steps: int = 0
    passed: bool = False
    bitwise: bool = False
    max_abs_err_rel: float | None = None
    block_mismatch: int | None = None
    cache_equal: bool = False
    sync_free: bool | None = None
    cuda_graph: bool = False
    eager_us: float | None = None
    graph_us: float | None = None
    speedup: float | None = None
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _snapshot(cache: NSACache) -> dict[str, torch.Tensor]:
    return {name: getattr(cache, name).clone() for name in CACHE_BUFFERS}


def _restore(cache: NSACache, state: dict[str, torch.Tensor]) -> None:
    # copy_ into the same storage: the captured graph holds these tensors' addresses.
    for name, saved in state.items():
        getattr(cache, name).copy_(saved)


def layer_step_row(context: int, batch: int, head_dim: int = 128, v_head_dim: int = 128, *,
                   d_model: int = LAYER_D_MODEL, config: NSAConfig | None = None, steps: int = 16,
                   timed_steps: int = 100, repeats: int = 3, dtype: torch.dtype = torch.bfloat16,
                   device: str = "cuda", tol: float = 1e-2, seed: int = 0) -> LayerStepRow:
    """Capture the layer's one-token decode step in a CUDA graph, check ``steps`` replays against
    eager steps from the same cache state, and time both (see :class:`LayerStepRow`).

    The caches hold random keys/values; sequence ``b`` starts at ``context - 1 - (7 * b) % 48``
    tokens, so the ``steps`` steps cross compression emissions and selection-block boundaries at
    different steps for different sequences. On a CPU ``device`` (Triton interpreter) nothing is
    captured: the "replay" is the eager step writing into the same static outputs, a dry run of
    everything else (the tests run it that way).
    """
    from nsa.layer import NSAAttention

    config = config or paper_config(head_dim, v_head_dim)
    cuda = torch.device(device).type == "cuda"
    row = LayerStepRow(context, batch, config.head_dim, config.v_head_dim or config.head_dim, d_model, config.phi,
                       str(dtype).replace("torch.", ""), steps=steps)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: a d_model=4096 layer is slow to init on a CPU
        layer = NSAAttention(d_model, config).to(dtype=dtype).eval()
    with torch.no_grad():  # random gates: every branch contributes to the output
        layer.gate_proj.weight.normal_(std=d_model ** -0.5)
    warmup = 3
    start = torch.tensor([max(0, context - 1 - (7 * b) % 48) for b in range(batch)], device=device)
    # Room for the warm-up, the checked steps and one timed run (lengths are reset between runs).
    cache = layer.new_cache(batch, context + warmup + max(steps, timed_steps + 1))
    for name in CACHE_BUFFERS[:-2]:
        getattr(cache, name).normal_()
    cache.lengths.copy_(start)
    initial = _snapshot(cache)
    xs = torch.randn(steps, batch, 1, d_model, dtype=dtype, device=device)
    static_x = xs[0].clone()

    def step():
        return layer.decode_step(static_x, cache, return_info=True)

    if cuda:
        # Warm-up on a side stream (compiles the kernels, settles the allocator), as the CUDA
        # graphs section of the PyTorch docs asks, then capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        try:
            torch.cuda.set_sync_debug_mode("error")
            step()
            row.sync_free = True
        except RuntimeError as exc:
            row.sync_free = False
            row.note = f"an eager step synchronised: {str(exc).splitlines()[0][:150]}; "
        finally:
            torch.cuda.set_sync_debug_mode("default")
        _restore(cache, initial)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out, static_info = step()
        torch.cuda.synchronize()
        replay, row.cuda_graph = graph.replay, True
    else:
        static_out, static_info = step()

        def replay():
            out, info = step()
            static_out.copy_(out)
            static_info.selected_blocks.copy_(info.selected_blocks)

    def run(fn) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, torch.Tensor]]:
        _restore(cache, initial)
        outs, blocks = [], []
        for k in range(steps):
            static_x.copy_(xs[k])
            result = fn()
            out, info = result if result is not None else (static_out, static_info)
            outs.append(out.clone())
            blocks.append(info.selected_blocks.clone())
        return outs, blocks, _snapshot(cache)

    eager_outs, eager_blocks, eager_state = run(step)
    graph_outs, graph_blocks, graph_state = run(replay)
    eager_o, graph_o = torch.stack(eager_outs).float(), torch.stack(graph_outs).float()
    row.max_abs_err_rel = float((graph_o - eager_o).abs().max() / eager_o.abs().max().clamp_min(1e-6))
    row.block_mismatch = int((torch.stack(graph_blocks) != torch.stack(eager_blocks)).any(-1).sum())
    row.cache_equal = all(torch.equal(graph_state[name], eager_state[name]) for name in CACHE_BUFFERS)
    cache_close = all(torch.allclose(graph_state[name].float(), eager_state[name].float(), rtol=tol, atol=tol)
                      for name in CACHE_BUFFERS)
    lengths_ok = torch.equal(graph_state["lengths"], start + steps) and not graph_state["overflowed"].any()
    row.bitwise = bool(torch.equal(graph_o, eager_o) and row.block_mismatch == 0 and row.cache_equal)
    row.passed = bool(lengths_ok and cache_close and row.block_mismatch == 0 and row.max_abs_err_rel <= tol
                      and torch.isfinite(graph_o).all() and row.sync_free is not False)
    if not lengths_ok:
        row.note += f"lengths after {steps} steps: {graph_state['lengths'].tolist()}, want start + {steps}; "
    del eager_state, graph_state, eager_outs, graph_outs

    def per_step_us(fn) -> float:
        times = []
        for _ in range(repeats):
            cache.lengths.copy_(start)
            if cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                begin.record()
                for _ in range(timed_steps):
                    fn()
                end.record()
                end.synchronize()
                times.append(1000.0 * begin.elapsed_time(end) / timed_steps)
            else:
                began = time.perf_counter()
                for _ in range(timed_steps):
                    fn()
                times.append(1e6 * (time.perf_counter() - began) / timed_steps)
        return sorted(times)[len(times) // 2]

    eager_us, graph_us = per_step_us(step), per_step_us(replay)
    row.eager_us, row.graph_us, row.speedup = eager_us, graph_us, eager_us / graph_us
    _restore(cache, initial)
    return row


# ----- parity ----------------------------------------------------------------------------------


def parity(config: NSAConfig, lengths: list[int], counts: list[int], dtype: torch.dtype, seed: int,
           *, tie_rtol: float, device: str = "cuda") -> dict:
    """Triton decode step against the reference step on the same caches (CUDA, or CPU under
    ``TRITON_INTERPRET=1``).

    Blocks that differ must be ties within ``tie_rtol`` of the row's best score (scores from the
    reference's float32 scorer); outputs are compared on rows whose blocks agree; reads must equal
    the ranges of the kernel's own blocks and the reference's reads where blocks agree. Where
    programmatic dependent launches can run (:func:`~nsa.ops.decode.triton.supports_pdl`), the
    same step with them (``DecodePlan.pdl``) must give bitwise the same outputs, blocks and reads
    (``pdl_equals_ordinary``; ``None`` where they cannot run).
    """
    import dataclasses

    from nsa.ops.decode import nsa_decode_reference
    from nsa.ops.decode.triton import nsa_decode_triton, plan_decode, supports_pdl
    from nsa.ops.reads import selected_reads
    from nsa.ops.selection import selection_block_scores

    torch.manual_seed(seed)
    c, batch, steps = config, len(lengths), max(counts)
    max_len = max(lengths)
    cache = filled_cache(c, batch, max_len, dtype, device)
    cache.lengths.copy_(torch.tensor(lengths))
    if steps > 1:  # a K-token step reads w + K - 1 window keys
        slots = min(c.window + steps - 1, max_len)
        cache.k_win = torch.randn(batch, slots, c.num_kv_heads, c.head_dim, dtype=dtype, device=device)
        cache.v_win = torch.randn(batch, slots, c.num_kv_heads, c.v_head_dim, dtype=dtype, device=device)
    q = torch.randn(batch, steps, c.num_heads, c.head_dim, dtype=dtype, device=device)
    gates = torch.rand(batch, steps, c.num_heads, 3, dtype=dtype, device=device)
    num_new = torch.tensor(counts, device=device)
    args = (q, cache.k_cmp, cache.v_cmp, cache.k_slc, cache.v_slc, cache.k_win, cache.v_win, gates,
            cache.lengths, c)
    plan = plan_decode(c, batch * steps * c.num_kv_heads, max_len)
    o, blocks, reads = nsa_decode_triton(*args, num_new=num_new, plan=plan)
    pdl_equal = None
    if supports_pdl(q.device):  # launch timing only: the results must not change by a bit
        o_pdl, blocks_pdl, reads_pdl = nsa_decode_triton(*args, num_new=num_new,
                                                         plan=dataclasses.replace(plan, pdl=True))
        pdl_equal = (torch.equal(o, o_pdl) and torch.equal(blocks, blocks_pdl)
                     and all(torch.equal(reads[name], reads_pdl[name]) for name in reads))
    ref_o, ref_blocks, ref_reads = nsa_decode_reference(*args, num_new=num_new)
    agree = (blocks == ref_blocks).all(-1)  # [B, K, HK]
    not_tied = 0
    for b, i, h in (~agree).nonzero().tolist():
        length, count = lengths[b], counts[b]
        pos = length - count + i
        scores = selection_block_scores(q[b:b + 1, i:i + 1], cache.k_cmp[b:b + 1, :c.num_compressed(length)],
                                        block=c.compress_block, stride=c.compress_stride,
                                        select_block=c.select_block, num_blocks=c.num_select_blocks(length),
                                        q_offset=pos)[0, 0, h].double()
        current = pos // c.select_block
        forced = {0, current, current - 1}
        got = sorted(scores[[j for j in blocks[b, i, h].tolist() if j >= 0 and j not in forced]].tolist())
        want = sorted(scores[[j for j in ref_blocks[b, i, h].tolist() if j >= 0 and j not in forced]].tolist())
        tol = tie_rtol * scores.max().item()
        if len(got) != len(want) or any(abs(x - y) > tol for x, y in zip(got, want)):
            not_tied += 1
    rows_agree = agree.all(-1)  # every head of a token must agree to compare its output row
    o_err = ((o.float() - ref_o.float())[rows_agree].abs().max().item() if rows_agree.any() else 0.0)
    o_scale = max(1e-6, ref_o.float().abs().max().item())
    valid = torch.arange(steps, device=device)[None, :] < num_new[:, None]
    positions = cache.lengths[:, None] - num_new[:, None] + torch.arange(steps, device=device)[None, :]
    counted_ok = True
    for b in range(batch):
        own = selected_reads(blocks[b], positions[b], select_block=c.select_block)
        counted_ok &= bool(torch.equal(torch.where(valid[b, :, None], own, 0), reads["slc"][b]))
    for branch in ("cmp", "slc", "win"):
        counted_ok &= bool(torch.equal(reads[branch][agree], ref_reads[branch][agree]))
    return {"dtype": str(dtype).replace("torch.", ""), "lengths": lengths, "num_new": counts,
            "token_heads": int(valid.sum().item()) * c.num_kv_heads,
            "block_mismatch_heads": int((~agree & valid[:, :, None]).sum().item()),
            "block_mismatch_not_tied": not_tied, "max_abs_err_rel": o_err / o_scale,
            "reads_exact": counted_ok, "finite": bool(torch.isfinite(o).all().item()),
            "pdl_equals_ordinary": pdl_equal}
