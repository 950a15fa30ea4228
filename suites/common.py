"""Shared building blocks of the oracle suites: configs and random inputs from case params,
attention with an explicit boolean mask, an independent Eq. 8-10 scorer and a brute-force top-n.

Everything here is written independently of ``nsa.ops`` (no import of the reference's masks,
softmax or Eq. 9 matrix), so that the suites compare the library with a second implementation
rather than with itself.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import torch

from nsa import NSAConfig, NSAInfo, nsa_attention
from verify.registry import Checks, SkipCase

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}

# Max abs error of an NSA/attention output (values ~ N(0, 1)) against an oracle computed in a
# wider dtype from the same rounded inputs. bf16/fp16 are dominated by rounding the output
# itself (2^-8, 2^-11 relative) plus low-precision P@V products in fused kernels.
OUTPUT_TOLERANCE = {"float64": 1e-10, "float32": 2e-5, "bfloat16": 3e-2, "float16": 4e-3}

BRANCHES = ("cmp", "slc", "win")

# NSAConfig field <- short case-param name (params stay short, readable case ids).
_CONFIG_PARAMS = {"heads": "num_heads", "kv_heads": "num_kv_heads", "dk": "head_dim",
                  "dv": "v_head_dim", "l": "compress_block", "d": "compress_stride",
                  "lp": "select_block", "n": "select_count", "w": "window", "phi": "phi"}

# The paper's layer (NSA_SPEC.md "Shapes and defaults"), as case params.
PAPER = {"heads": 64, "kv_heads": 4, "dk": 192, "dv": 128, "l": 32, "d": 16, "lp": 64, "n": 16,
         "w": 512}


def case_seed(params: dict[str, Any]) -> int:
    """A reproducible seed derived from a case's params (the injected backend excluded)."""
    stable = {k: v for k, v in params.items() if k != "backend"}
    return zlib.crc32(json.dumps(stable, sort_keys=True).encode()) & 0x7FFFFFFF


def config_from(params: dict[str, Any], **overrides: Any) -> NSAConfig:
    """The :class:`NSAConfig` named by a case's short params (see ``_CONFIG_PARAMS``)."""
    values = {field: params[short] for short, field in _CONFIG_PARAMS.items() if short in params}
    values.update(overrides)
    return NSAConfig(**values)


def device_of(params: dict[str, Any]) -> torch.device:
    """``cuda`` for full-scale (``needs_gpu``) cases, else ``params["device"]`` (default cpu)."""
    name = "cuda" if params.get("needs_gpu") else params.get("device", "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SkipCase(f"needs CUDA ({name}); torch.cuda.is_available() is False here")
    return torch.device(name)


def dtype_of(params: dict[str, Any]) -> torch.dtype:
    return DTYPES[params.get("dtype", "float64")]


def oracle_dtype(device: torch.device) -> torch.dtype:
    """float64 on CPU; float32 on CUDA (the spec's "fp32 reference" for full-scale cases)."""
    return torch.float64 if device.type == "cpu" else torch.float32


def generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def randn(shape: Iterable[int], *, gen: torch.Generator, dtype: torch.dtype,
          device: torch.device) -> torch.Tensor:
    """Standard normal ``shape`` drawn in float32 (float64 for float64) from ``gen``, then cast."""
    draw = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.randn(*shape, generator=gen, dtype=draw, device=device).to(dtype)


def make_inputs(config: NSAConfig, *, batch: int, seq_len: int, dtype: torch.dtype,
                device: torch.device, seed: int, compressed: bool = False,
                selection_kv: bool = False, window_kv: bool = False,
                cu_seqlens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Random NSA inputs, keyed by role.

    Returns ``q [B, T, HQ, Dk]``, ``k [B, T, HK, Dk]``, ``v [B, T, HK, Dv]``, ``gates [B, T, HQ, 3]``
    (uniform in (0, 1)), all ``dtype`` on ``device``; with ``compressed`` also ``k_cmp, v_cmp
    [B, N, HK, Dk|Dv]`` standing in for a learned phi's output (``N = num_cmp(T)``, or the packed
    total for ``cu_seqlens``); with ``selection_kv`` / ``window_kv`` also ``k_slc, v_slc`` /
    ``k_win, v_win`` (``[B, T, HK, Dk|Dv]``), the branches' own projections.
    """
    gen = generator(seed, device)
    hq, hk, dk, dv = config.num_heads, config.num_kv_heads, config.head_dim, config.v_head_dim

    def draw(*shape: int) -> torch.Tensor:
        return randn(shape, gen=gen, dtype=dtype, device=device)

    out = {"q": draw(batch, seq_len, hq, dk), "k": draw(batch, seq_len, hk, dk),
           "v": draw(batch, seq_len, hk, dv),
           "gates": torch.rand(batch, seq_len, hq, 3, generator=gen, device=device).to(dtype)}
    if compressed:
        if cu_seqlens is None:
            count = config.num_compressed(seq_len)
        else:
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
            count = sum(config.num_compressed(n) for n in lengths)
        out["k_cmp"], out["v_cmp"] = draw(batch, count, hk, dk), draw(batch, count, hk, dv)
    if selection_kv:
        out["k_slc"], out["v_slc"] = draw(batch, seq_len, hk, dk), draw(batch, seq_len, hk, dv)
    if window_kv:
        out["k_win"], out["v_win"] = draw(batch, seq_len, hk, dk), draw(batch, seq_len, hk, dv)
    return out


def one_hot_gates(like: torch.Tensor, branch: str) -> torch.Tensor:
    """Gates ``[B, T, HQ, 3]`` (shape/dtype of ``like``) that keep only ``branch``."""
    gates = torch.zeros_like(like)
    gates[..., BRANCHES.index(branch)] = 1
    return gates


def run_nsa(inputs: dict[str, torch.Tensor], config: NSAConfig, params: dict[str, Any],
            checks: Checks | None = None, **kwargs: Any) -> tuple[torch.Tensor, NSAInfo]:
    """``nsa_attention`` on ``inputs`` (keys as :func:`make_inputs`) with the case's backend.

    Records the backend that actually ran in ``checks.backend``.
    """
    extra = {}
    for name, (kk, vk) in (("compressed_kv", ("k_cmp", "v_cmp")), ("selection_kv", ("k_slc", "v_slc")),
                           ("window_kv", ("k_win", "v_win"))):
        if kk in inputs:
            extra[name] = (inputs[kk], inputs[vk])
    out, info = nsa_attention(inputs["q"], inputs["k"], inputs["v"], inputs["gates"], config,
                              backend=params.get("backend", "auto"), return_info=True, **extra, **kwargs)
    if checks is not None:
        checks.backend = info.backend
    return out, info


def max_abs(x: torch.Tensor) -> float:
    """``max |x|`` as a float; NaN anywhere gives NaN (so a bound check fails), empty gives 0."""
    if x.numel() == 0:
        return 0.0
    x = x.detach()
    if torch.isnan(x).any():
        return math.nan
    return float(x.abs().max())


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` computed in float64 (NaN-propagating)."""
    return max_abs(a.detach().to(torch.float64) - b.detach().to(b.device, torch.float64))


def causal_rows(seq_len: int, device: torch.device | str = "cpu",
                cu_seqlens: torch.Tensor | None = None) -> Callable[[int, int], torch.Tensor]:
    """Rows ``[start, end)`` of the explicit bool ``[T, T]`` causal mask: query ``i`` may read key
    ``j`` iff ``j <= i`` (and, for packed sequences, both lie in the same sequence)."""
    pos = torch.arange(seq_len, device=device)
    seq_id = None
    if cu_seqlens is not None:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device)
        seq_id = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)

    def rows(start: int, end: int) -> torch.Tensor:
        allowed = pos[None, :] <= pos[start:end, None]
        if seq_id is not None:
            allowed &= seq_id[None, :] == seq_id[start:end, None]
        return allowed
    return rows


def causal_mask(seq_len: int, device: torch.device | str = "cpu",
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """The whole explicit bool ``[T, T]`` mask of :func:`causal_rows`."""
    return causal_rows(seq_len, device, cu_seqlens)(0, seq_len)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | Callable[[int, int], torch.Tensor], *,
                    scale: float | None = None, dtype: torch.dtype = torch.float64,
                    rows_per_chunk: int | None = None) -> torch.Tensor:
    """Plain softmax attention with an explicit boolean mask, computed in ``dtype``.

    Args:
        q: ``[B, Tq, HQ, Dk]``; k: ``[B, Tk, HK, Dk]``; v: ``[B, Tk, HK, Dv]``; query head
            ``h*G + g`` reads kv head ``h``.
        mask: bool ``[Tq, Tk]`` or ``[B, Tq, Tk]`` (``True`` = may read), or a callable
            ``rows(start, end)`` giving those rows of it (for long sequences).
        scale: default ``1/sqrt(Dk)``.
        rows_per_chunk: query rows per step; default keeps a step's scores near 2^26 elements.

    Returns:
        ``[B, Tq, HQ, Dv]`` in ``dtype``; a query whose mask row is empty gets 0.
    """
    batch, q_len, hq, dk = q.shape
    group = hq // k.shape[2]
    scale = dk ** -0.5 if scale is None else scale
    kf = k.to(dtype).repeat_interleave(group, dim=2)
    vf = v.to(dtype).repeat_interleave(group, dim=2)
    rows = rows_per_chunk or max(1, (1 << 26) // max(1, batch * hq * k.shape[1]))
    out = []
    for start in range(0, q_len, rows):
        end = min(q_len, start + rows)
        m = mask(start, end) if callable(mask) else mask[..., start:end, :]
        m = m if m.dim() == 3 else m[None]
        scores = torch.einsum("bqhd,bkhd->bhqk", q[:, start:end].to(dtype), kf) * scale
        scores = scores.masked_fill(~m[:, None], float("-inf"))
        has_any = m.any(dim=-1)[:, None, :, None]
        probs = torch.softmax(torch.where(has_any, scores, torch.zeros_like(scores)), dim=-1)
        probs = torch.where(has_any, probs, torch.zeros_like(probs))
        out.append(torch.einsum("bhqk,bkhd->bqhd", probs, vf))
    return torch.cat(out, dim=1)


def overlap_tokens(i: int, j: int, l: int, d: int, lp: int) -> int:
    """Tokens compressed block ``i`` ([i*d, i*d+l)) shares with selection block ``j`` ([j*l', (j+1)*l'))."""
    return max(0, min(i * d + l, (j + 1) * lp) - max(i * d, j * lp))


def overlap_matrix(num_cmp: int, num_blocks: int, l: int, d: int, lp: int,
                   *, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[num_cmp, num_blocks]`` of :func:`overlap_tokens` / d, by interval intersection (vectorised)."""
    i = torch.arange(num_cmp, device=device, dtype=torch.int64)[:, None]
    j = torch.arange(num_blocks, device=device, dtype=torch.int64)[None, :]
    inter = (torch.minimum(i * d + l, (j + 1) * lp) - torch.maximum(i * d, j * lp)).clamp(min=0)
    return inter.to(dtype) / d


def oracle_head_scores_loops(q_head: list[list[float]], k_cmp_head: list[list[float]], positions: list[int],
                             l: int, d: int, lp: int, num_blocks: int, scale: float) -> list[list[float]]:
    """Per-query-head Eq. 8 + Eq. 9 in plain Python floats (explicit loops; no torch, no matrix).

    ``q_head[r]`` is the query at ``positions[r]``; ``k_cmp_head[i]`` compressed key ``i``.
    Returns ``scores[r][j]`` = sum over visible compressed blocks ``i`` of
    ``p_cmp[i] * overlap_tokens(i, j) / d``.
    """
    result = []
    for qrow, t in zip(q_head, positions):
        visible = 0 if t + 1 < l else (t + 1 - l) // d + 1
        logits = [scale * sum(a * b for a, b in zip(qrow, k_cmp_head[i])) for i in range(visible)]
        top = max(logits) if logits else 0.0
        weights = [math.exp(x - top) for x in logits]
        total = sum(weights)
        row = [0.0] * num_blocks
        for i, w in enumerate(weights):
            for j in range(num_blocks):
                row[j] += w / total * overlap_tokens(i, j, l, d, lp) / d
        result.append(row)
    return result


def oracle_block_scores(q: torch.Tensor, k_cmp: torch.Tensor, config: NSAConfig, *, num_blocks: int,
                        q_offset: int = 0, dtype: torch.dtype = torch.float64,
                        per_head: bool = False) -> torch.Tensor:
    """Eq. 8-10 vectorised, written apart from the library: explicit visibility mask, softmax,
    token-overlap matrix, then the sum over each group's heads.

    Args:
        q: ``[B, Tq, HQ, Dk]`` (row ``r`` at position ``q_offset + r``); k_cmp: ``[B, N, HK, Dk]``.
        per_head: return the per-query-head Eq. 9 scores ``[B, Tq, HQ, NB]`` instead of the group sums.

    Returns:
        ``[B, Tq, HK, NB]`` (or ``[B, Tq, HQ, NB]``) in ``dtype``.
    """
    batch, q_len, hq, dk = q.shape
    hk = k_cmp.shape[2]
    l, d = config.compress_block, config.compress_stride
    weights = overlap_matrix(k_cmp.shape[1], num_blocks, l, d, config.select_block, dtype=dtype,
                             device=q.device)
    kf = k_cmp.to(dtype).repeat_interleave(hq // hk, dim=2)
    out = []
    rows = max(1, (1 << 25) // max(1, batch * hq * max(k_cmp.shape[1], num_blocks)))
    for start in range(0, q_len, rows):
        end = min(q_len, start + rows)
        t = torch.arange(q_offset + start, q_offset + end, device=q.device)
        i = torch.arange(k_cmp.shape[1], device=q.device)
        visible = (i[None, :] * d + l - 1) <= t[:, None]
        logits = torch.einsum("bqhd,bkhd->bqhk", q[:, start:end].to(dtype), kf) * dk ** -0.5
        logits = logits.masked_fill(~visible[None, :, None, :], float("-inf"))
        any_visible = visible.any(-1)[None, :, None, None]
        p = torch.softmax(torch.where(any_visible, logits, torch.zeros_like(logits)), dim=-1)
        p = torch.where(any_visible, p, torch.zeros_like(p))
        scores = p @ weights
        if not per_head:
            scores = scores.reshape(batch, end - start, hk, hq // hk, num_blocks).sum(3)
        out.append(scores)
    return torch.cat(out, dim=1)


def brute_force_topn(scores: list[float], t: int, lp: int, n: int) -> list[int]:
    """The spec's top-n for the query at ``t``, in plain Python.

    Forced blocks 0, ``c``, ``c - 1`` (``c = t // l'``); the other slots go to the best
    candidates among ``1 .. c-2`` by (score descending, index ascending); ascending result,
    ``-1`` padded to ``n``.
    """
    c = t // lp
    forced = {0, c} | ({c - 1} if c - 1 >= 0 else set())
    candidates = sorted((j for j in range(1, c - 1) if j not in forced), key=lambda j: (-scores[j], j))
    chosen = sorted(forced | set(candidates[:n - len(forced)]))
    return chosen + [-1] * (n - len(chosen))


def sample_positions(seq_len: int, count: int | None, seed: int) -> list[int]:
    """All positions when ``count`` is None or covers them, else ``count`` random ones plus the last
    (for Python-level checks that would take minutes over every row of a long sequence)."""
    if count is None or count >= seq_len:
        return list(range(seq_len))
    picks = torch.randperm(seq_len, generator=torch.Generator().manual_seed(seed))[:count].tolist()
    return sorted(set(picks) | {seq_len - 1})


def topn_violations(blocks: torch.Tensor, scores: torch.Tensor, positions: list[int], lp: int, n: int,
                    tol: float) -> list[str]:
    """Where ``blocks`` is not a valid top-n of ``scores`` (within ``tol`` for near-ties).

    Args:
        blocks: int ``[T, HK, n]`` selected blocks; scores: ``[T, HK, NB]`` oracle scores; row ``t``
            is the query at position ``t``.
        positions: the rows to check.

    Checks the forced blocks, ascending order, -1 padding, the number of blocks, and that no
    unchosen candidate beats a chosen one by more than ``tol``.
    """
    problems = []
    index = torch.tensor(positions, dtype=torch.long)
    blocks_l, scores_l = blocks[index.to(blocks.device)].tolist(), scores[index.to(scores.device)].tolist()
    for r, t in enumerate(positions):
        for h in range(len(blocks_l[r])):
            got, s = blocks_l[r][h], scores_l[r][h]
            want = brute_force_topn(s, t, lp, n)
            if got == want:
                continue
            c = t // lp
            forced = {0, c} | ({c - 1} if c >= 1 else set())
            real = [b for b in got if b >= 0]
            chosen_free = [b for b in real if b not in forced]
            unchosen = [j for j in range(1, c - 1) if j not in forced and j not in real]
            ok = (real == sorted(set(real)) and got[len(real):] == [-1] * (n - len(real))
                  and forced <= set(real) and len(real) == len([b for b in want if b >= 0])
                  and all(1 <= b <= c - 2 for b in chosen_free)
                  and (not unchosen or not chosen_free
                       or max(s[j] for j in unchosen) <= min(s[b] for b in chosen_free) + tol))
            if not ok:
                problems.append(f"t={t} head={h}: got {got}, want {want}")
    return problems
