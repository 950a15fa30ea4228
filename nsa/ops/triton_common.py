"""Pieces shared by the selection- and window-attention Triton kernels.

Row layout used by every kernel here: a program owns ``BLOCK_M`` rows, row ``r`` is query head
``h*G + r % G`` of position ``r // G`` of the program's position tile, so the ``G`` heads of a
group share every key/value tile they load (GQA folded into the M dimension of ``tl.dot``).
Softmax runs in base 2 (``qk_scale = scale * log2(e)``); ``lse`` is stored in natural log.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

# Triton decides interpret-or-compile when a kernel is defined, i.e. when the kernel modules are
# imported; launchers follow that decision, not a later change of the variable.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when the kernels were defined under ``TRITON_INTERPRET=1``: they run on CPU tensors
    and autotuning is bypassed."""
    return INTERPRET
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# Whether the kernels that can load tiles by the TMA do (where the GPU and the tensors allow it):
# False makes every launch use its pointer-load configs, for A/B timing
# (scripts/gpu/profile_prefill_kernels.py --tma-loads) or to rule the TMA path out.
TMA_LOADS = True


def tile_descriptors(tensors: tuple, box: list[int], cols: list[int], sources: list[int],
                     wanted: bool = True):
    """Tensor descriptors of ``[*box, cols[i]]`` boxes of ``tensors[sources[i]]``, for tiles loaded
    by the tensor-memory accelerator (TMA): one bulk copy issued by one thread instead of every
    thread's address arithmetic, zero outside the tensor. ``None`` where the TMA cannot serve
    them: :data:`TMA_LOADS` off, a GPU before sm_90, an empty tensor, or a base or stride not
    16-byte aligned (the caller then launches its pointer-load configs), and where not
    ``wanted``: no config of the kernel reads them (``reads_descriptors`` of its tuned kernel;
    Triton encodes every descriptor on the host at each launch)."""
    first = tensors[0]
    if not (TMA_LOADS and wanted):
        return None
    if not INTERPRET and not (first.is_cuda and torch.cuda.get_device_capability(first.device)[0] >= 9):
        return None
    for x in tensors:
        if (x.numel() == 0 or x.stride(-1) != 1 or x.data_ptr() % 16
                or any(stride * x.element_size() % 16 for stride in x.stride()[:-1])):
            return None
    return tuple(TensorDescriptor(x, list(x.shape), list(x.stride()), [*box, width])
                 for x, width in zip((tensors[i] for i in sources), cols))


def kv_tile_descriptors(k: torch.Tensor, v: torch.Tensor, rows: int, k_cols: tuple[int, int], v_cols: int,
                        wanted: bool = True):
    """:func:`tile_descriptors` of ``[1, rows, 1, cols]`` key/value tiles of ``k`` (its two column
    tiles ``k_cols``; a second of 0 gets an unused 16-wide box) and ``v``, both ``[B, T, H, D]``."""
    return tile_descriptors((k, v), [1, rows, 1], [k_cols[0], max(k_cols[1], 16), v_cols], [0, 0, 1], wanted)


def set_box_rows(nargs: dict, names, rows: int) -> None:
    """The descriptors ``names`` of a launch's arguments ``nargs`` get ``rows`` as their boxes'
    second dim (placeholder tensors are left alone): one host descriptor serves every config, so an
    autotune ``pre_hook`` sizes it to the config's tile."""
    for name in names:
        desc = nargs[name]
        if isinstance(desc, TensorDescriptor):
            desc.block_shape = [desc.block_shape[0], rows, *desc.block_shape[2:]]


def set_kv_tile_rows(nargs: dict, names=("K_DESC_A", "K_DESC_B", "V_DESC"), rows: str = "BLOCK_N") -> None:
    """Autotune ``pre_hook``: the key/value descriptors ``names`` get the config's key tile
    (the constexpr ``rows``) as their boxes' rows (:func:`set_box_rows`)."""
    set_box_rows(nargs, names, nargs[rows])


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """Kernels address the head dim with unit stride; other strides are free."""
    return x if x.stride(-1) == 1 else x.contiguous()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get IEEE dots (tf32 would lose ~3 digits); 16-bit inputs ignore this."""
    return "ieee" if dtype == torch.float32 else "tf32"


def row_tile_configs(group: int, options: list[tuple],
                     max_positions: int | None = None) -> list[triton.Config]:
    """Configs for kernels whose rows are ``BT positions x G heads``.

    ``options`` holds ``(target_rows, num_warps, num_stages[, other constexprs])``;
    ``BT = max(1, rows // G)`` and ``BLOCK_M`` is ``BT * G`` rounded up to a power of two (and to
    16, the smallest dot M). With ``max_positions`` (a power of two) ``BT`` is rounded down to a
    power of two and capped there: for kernels that hold a vector per position of the tile.
    """
    seen, configs = set(), []
    for rows, warps, stages, *other in options:
        positions = max(1, rows // group)
        if max_positions is not None:
            positions = min(max_positions, 1 << (positions.bit_length() - 1))
        block_m = max(16, triton.next_power_of_2(positions * group))
        kwargs = {"BT": positions, "BLOCK_M": block_m, **(other[0] if other else {})}
        signature = (tuple(sorted(kwargs.items())), warps, stages)
        if signature in seen:
            continue
        seen.add(signature)
        configs.append(triton.Config(kwargs, num_warps=warps, num_stages=stages))
    return configs


def size_class(seq_len: int) -> int:
    """The sequence-length class autotuning is keyed by: the power of two >= ``seq_len`` (at
    least 1024).

    Why: Triton's autotuner keeps, for its key, the config it chose at the first call; keyed
    without the length, a process that ran 8k first (``nsa bench``, a Ray worker that ran a
    smaller case, training's context warm-up) ran 64k on 8k's choice, and the tile sweep's
    winners differ between the two (docs/PERFORMANCE.md). Classes rather than every length keep
    varlen batches and changing lengths to a few tunings; configs compile once and are shared
    across classes.
    """
    return max(1024, triton.next_power_of_2(max(1, int(seq_len))))


def describe_config(config: triton.Config) -> str:
    """``BLOCK_M=256 BLOCK_N=64 w8 s2``: a config's constexprs, warps and stages (and ``r128``
    when it caps registers per thread at 128)."""
    cap = [f"r{config.maxnreg}"] if config.maxnreg else []
    return " ".join([*(f"{k}={v}" for k, v in config.kwargs.items()), f"w{config.num_warps}",
                     f"s{config.num_stages}", *cap])


def _chosen(tuners) -> list[str]:
    """The configs ``tuners`` (Triton autotuners) settled on, one per key they were called with."""
    return [describe_config(config) for tuner in tuners for config in getattr(tuner, "cache", {}).values()]


@contextlib.contextmanager
def _pinned(tuned, attr: str, choices: list):
    """``tuned.<attr>`` is ``choices`` and its autotuners are fresh within the block; both are
    restored afterwards."""
    saved = getattr(tuned, attr), tuned._tuned
    setattr(tuned, attr, choices)
    tuned._tuned = {}
    try:
        yield tuned
    finally:
        setattr(tuned, attr, saved[0])
        tuned._tuned = saved[1]


def _autotuned(kernel, configs: list[triton.Config], key: list[str], autotune_kwargs: dict,
               restore: tuple[str, ...]):
    """``triton.autotune`` of ``kernel``; ``restore`` names the arguments the launch changes in
    place, which autotuning puts back after each timed launch (none: nothing is copied)."""
    restored = {"restore_value": list(restore)} if restore else {}
    return triton.autotune(configs, key=key, **autotune_kwargs, **restored)(kernel)


class SizeTunedKernel:
    """``triton.autotune(configs, key=key, **autotune_kwargs)(kernel)``, one autotuner per
    :func:`size_class` of the sequence length: ``at(seq_len)`` is the one to launch. What a
    launch changes in place is named per launch (``restore``), as for :class:`GroupTunedKernel`."""

    def __init__(self, kernel, configs: list[triton.Config], key: list[str], **autotune_kwargs):
        self.kernel, self.configs, self.key, self.autotune_kwargs = kernel, configs, key, autotune_kwargs
        # (size class, TMA configs allowed, restored arguments)
        self._tuned: dict[tuple[int, bool, tuple[str, ...]], object] = {}

    def at(self, seq_len: int, tma: bool = True, restore: tuple[str, ...] = ()):
        """The autotuner of ``seq_len``'s size class; without ``tma`` (no tensor descriptors could
        be made) over the configs that load by pointers only; ``restore``: the arguments (by name)
        the launch changes in place."""
        key = (size_class(seq_len), tma, tuple(restore))
        if key not in self._tuned:
            configs = self.configs if tma else [c for c in self.configs if not c.kwargs.get("TMA")]
            self._tuned[key] = _autotuned(self.kernel, configs, self.key, self.autotune_kwargs,
                                          tuple(restore))
        return self._tuned[key]

    def chosen(self, seq_len: int) -> list[str]:
        """The configs autotuning chose in ``seq_len``'s size class (empty before any launch
        there, and under the interpreter)."""
        return _chosen([t for (size, *_), t in self._tuned.items() if size == size_class(seq_len)])

    def only(self, config: triton.Config):
        """Within the ``with`` block, ``config`` is the whole list (autotuning has nothing to
        choose); the list and the tuned kernels are restored afterwards."""
        return _pinned(self, "configs", [config])

    def reads_descriptors(self, interpret_config: dict) -> bool:
        """Whether a launch may run a config that loads through tensor descriptors (``TMA``): one
        of the list's or, under the interpreter, ``interpret_config``. Launchers build descriptors
        only then, since Triton encodes each one on the host at every launch."""
        if INTERPRET:
            return bool(interpret_config.get("TMA"))
        return any(c.kwargs.get("TMA") for c in self.configs)

    def launch(self, seq_len: int, grid, args, fixed: dict, interpret_config: dict,
               tma: bool = False, restore: tuple[str, ...] = ()) -> None:
        """Launch the autotuner of ``seq_len``'s size class or, under the interpreter (which
        bypasses autotuning), the kernel with ``interpret_config``'s tiles.

        ``grid`` is a callable of the meta-parameters; ``fixed`` holds the non-tuned constexprs;
        ``tma``: ``args`` hold tensor descriptors, so configs with ``TMA`` may run; ``restore``:
        the arguments (by name) this launch changes in place.
        """
        if INTERPRET:
            meta = {**fixed, **interpret_config}
            if "TMA" in meta:
                meta["TMA"] = meta["TMA"] and tma
            self.kernel[grid(meta)](*args, **meta)
        else:
            self.at(seq_len, tma, restore)[grid](*args, **fixed)


class GroupTunedKernel:
    """A ``@triton.jit`` kernel autotuned per group size ``G`` (the configs depend on it) and
    :func:`size_class` of the sequence length (``seq_len``, given at each call).

    Options may turn on a ``TMA`` constexpr (tiles loaded through tensor descriptors); a launch
    without descriptors (``tma=False``) tunes over the others only. ``pre_hook`` (a Triton config
    pre-hook) sizes such descriptors to each config's tiles. Under the interpreter autotuning is
    bypassed: the first allowed config's block sizes are passed (after its ``pre_hook``).

    Autotuning times each config by launching it on the call's arguments: a launch that changes
    a tensor in place (adds to it, or completes what it holds) names it in ``restore``, and those
    are put back after each timed launch. Per launch, not per kernel: a placeholder argument (an
    input standing in for a pointer the launch does not use) is then never copied over.
    """

    def __init__(self, kernel, options: list[tuple], key: list[str], extra: dict | None = None,
                 pre_hook=None, **autotune_kwargs):
        self.kernel, self.options, self.key, self.extra = kernel, options, key, extra or {}
        self.pre_hook, self.autotune_kwargs = pre_hook, autotune_kwargs
        # (G, size class, max_positions, TMA configs allowed, restored arguments)
        self._tuned: dict[tuple[int, int, int | None, bool, tuple[str, ...]], object] = {}

    def configs(self, group: int, max_positions: int | None = None, tma: bool = True) -> list[triton.Config]:
        configs = row_tile_configs(group, self.options, max_positions)
        for c in configs:
            c.kwargs.update({k: v for k, v in self.extra.items() if k not in c.kwargs})
            c.pre_hook = self.pre_hook
        return configs if tma else [c for c in configs if not c.kwargs.get("TMA")]

    def reads_descriptors(self) -> bool:
        """Whether a launch may run an option that loads through tensor descriptors (``TMA``; under
        the interpreter, the first option, the one it runs). Launchers build descriptors only then,
        since Triton encodes each one on the host at every launch. Read from the options as given
        (an option's constexprs over ``extra``), without building configs on the launch path."""
        options = self.options[:1] if INTERPRET else self.options
        return any({**self.extra, **(option[3] if len(option) > 3 else {})}.get("TMA") for option in options)

    def chosen(self, seq_len: int) -> list[str]:
        """The configs autotuning chose in ``seq_len``'s size class, every group size (empty
        before any launch there, and under the interpreter)."""
        return _chosen([t for (_, size, *_), t in self._tuned.items() if size == size_class(seq_len)])

    def only(self, option: tuple):
        """Within the ``with`` block, ``option`` is the whole list (autotuning has nothing to
        choose, the interpreter runs it); the list and the tuned kernels are restored afterwards."""
        return _pinned(self, "options", [option])

    def __call__(self, grid, *args, G: int, seq_len: int, max_positions: int | None = None, tma: bool = False,
                 restore: tuple[str, ...] = (), **kwargs):
        """Launch on ``grid``; ``max_positions`` caps ``BT`` (see :func:`row_tile_configs`); ``tma``:
        ``args`` hold tensor descriptors, so options with ``TMA`` may run; ``restore``: the
        arguments (by name) this launch changes in place."""
        if INTERPRET:
            config = self.configs(G, max_positions, tma)[0]
            if config.pre_hook is not None:
                config.pre_hook({**dict(zip(self.kernel.arg_names, args)), **kwargs, **config.kwargs, "G": G})
            self.kernel[grid(config.kwargs)](*args, G=G, **kwargs, **config.kwargs)
            return
        tune_key = (G, size_class(seq_len), max_positions, tma, tuple(restore))
        if tune_key not in self._tuned:
            self._tuned[tune_key] = _autotuned(self.kernel, self.configs(G, max_positions, tma), self.key,
                                               self.autotune_kwargs, tuple(restore))
        self._tuned[tune_key][grid](*args, G=G, **kwargs)


@triton.jit
def _delta_kernel(o_ptr, do_ptr, dlse_ptr, delta_ptr, n_rows, DV: tl.constexpr, DV_PAD: tl.constexpr,
                  HAS_DLSE: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, DV_PAD)
    ok = rows < n_rows
    mask = ok[:, None] & (cols[None, :] < DV)
    offs = rows[:, None] * DV + cols[None, :]
    o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, axis=1)
    if HAS_DLSE:
        # d lse / d s = p, so an lse gradient folds into the softmax backward as -dlse.
        delta -= tl.load(dlse_ptr + rows, mask=ok, other=0.0).to(tl.float32)
    tl.store(delta_ptr + rows, delta, mask=ok)


def softmax_delta(o: torch.Tensor, do: torch.Tensor, dlse: torch.Tensor | None) -> torch.Tensor:
    """``delta = rowsum(o * do) - dlse``, float32 ``[B, T, HQ]`` (the FlashAttention-2 term).

    Args:
        o, do: ``[B, T, HQ, Dv]``, any float dtype.
        dlse: ``[B, T, HQ]`` gradient of the returned ``lse``, or ``None``.
    """
    o, do = o.contiguous(), do.contiguous()
    n_rows, dv = o.numel() // o.shape[-1], o.shape[-1]
    delta = torch.empty(o.shape[:-1], dtype=torch.float32, device=o.device)
    dlse_c = dlse.contiguous() if dlse is not None else delta
    block_r = 16
    _delta_kernel[(triton.cdiv(n_rows, block_r),)](o, do, dlse_c, delta, n_rows, DV=dv,
                                                   DV_PAD=triton.next_power_of_2(dv),
                                                   HAS_DLSE=dlse is not None, BLOCK_R=block_r)
    return delta


@triton.jit
def softmax_step(s, allowed, m_i, l_i, acc, v, PREC: tl.constexpr, MASKED: tl.constexpr):
    """One online-softmax update with scores ``s`` (base-2 units, [M, N]) and values ``v`` [N, DV].

    ``allowed`` is applied only when ``MASKED`` (interior tiles skip the select). Rows that have
    seen no allowed key keep ``m = -inf`` and contribute exactly 0 (no NaN).
    """
    if MASKED:
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def softmax_finish(m_i, l_i, acc):
    """``(o, lse)`` from the running max (base 2), sum and accumulator; empty rows: 0, -inf."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    return o, lse


@triton.jit
def softmax_grad(s, allowed, lse2, delta, do, v, PREC: tl.constexpr, MASKED: tl.constexpr, second=None,
                 SECOND: tl.constexpr = False):
    """Recompute ``p`` from ``lse`` and return ``(p, ds)`` for one [M, N] tile.

    ``s`` is in base-2 units, ``lse2 = lse * log2(e)``; ``ds`` is the gradient of the natural
    scores (multiply by ``scale`` for the gradient of ``q . k``). Unmasked tiles rely on
    ``lse = +inf`` for rows that must not contribute.

    With ``SECOND``, ``second = (mask, lse2_b, delta_b)`` is another softmax over the same
    scores and values (another branch reading the keys in ``mask`` with the same ``q, k, v, dO``,
    its own lse and delta): its ``ds`` is added (``p`` stays the first's), so that one ``dp``
    product and one dq product serve both (the window's dq pass:
    :func:`nsa.ops.triton_nsa.branch_backward`).
    """
    p = tl.exp2(s - lse2[:, None])
    if MASKED:
        p = tl.where(allowed, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    if SECOND:
        mask_b, lse2_b, delta_b = second
        p_b = tl.where(mask_b, tl.exp2(s - lse2_b[:, None]), 0.0)
        ds += p_b * (dp - delta_b[:, None])
    return p, ds


@triton.jit
def softmax_grad_keys(s_t, allowed_t, lse2, delta, do, v, dv_acc, PREC: tl.constexpr, MASKED: tl.constexpr):
    """:func:`softmax_grad` with keys as rows, for dK/dV programs that own a key tile:
    ``s_t = k @ q^T`` ([N, M], base 2) gives ``ds_t`` [N, M] and ``dv_acc + p_t @ do``.

    Keys as the M of the dots (``dv += p_t @ do``, ``dk += ds_t @ q``) feed ``p_t`` and ``ds_t``
    to the tensor cores straight from the accumulator layout, where ``tl.trans(p) @ do`` needs
    a transpose through shared memory; and a key tile of 64 or more is the M Hopper's warp-group
    MMA wants. (The dV update comes before ``dp_t``: compiled for sm_90 the other order spills
    more in compressed attention's dK/dV.)
    """
    p_t = tl.exp2(s_t - lse2[None, :])
    if MASKED:
        p_t = tl.where(allowed_t, p_t, 0.0)
    dv_acc += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
    return p_t * (dp_t - delta[None, :]), dv_acc


@triton.jit
def dkdv_tile(qa, qb, do_t, lse2, delta_t, ka, kb, vb, allowed, allowed_t, qk_scale, dk_acc, dk_acc_b, dv_acc,
              DK_B: tl.constexpr, PREC: tl.constexpr, MASKED: tl.constexpr, KEYS_AS_M: tl.constexpr):
    """One query tile's share of a key tile's dK and dV (``[N, D]`` float32 accumulators).

    Queries as rows (``allowed [M, N]``): the dots take ``tl.trans(p)`` and ``tl.trans(ds)``.
    ``KEYS_AS_M`` (``allowed_t [N, M]``): :func:`softmax_grad_keys`, no transposes. Only the
    mask of the chosen form is used (the other is compiled away).
    """
    if KEYS_AS_M:
        s_t = split_scores(ka, kb, qa, qb, DK_B, PREC) * qk_scale
        ds_t, dv_acc = softmax_grad_keys(s_t, allowed_t, lse2, delta_t, do_t, vb, dv_acc, PREC, MASKED)
    else:
        s = split_scores(qa, qb, ka, kb, DK_B, PREC) * qk_scale
        p, ds = softmax_grad(s, allowed, lse2, delta_t, do_t, vb, PREC, MASKED)
        dv_acc += tl.dot(tl.trans(p.to(do_t.dtype)), do_t, input_precision=PREC)
        ds_t = tl.trans(ds)
    dk_acc, dk_acc_b = split_acc_dot(dk_acc, dk_acc_b, ds_t, qa, qb, DK_B, PREC)
    return dk_acc, dk_acc_b, dv_acc


@triton.jit
def row_layout(t0, T, G: tl.constexpr, BT: tl.constexpr, BLOCK_M: tl.constexpr):
    """Row r: head r % G of position t0 + r // G; rows past BT*G or past T are off."""
    r = tl.arange(0, BLOCK_M)
    row_pos = t0 + r // G
    row_ok = (r < BT * G) & (row_pos < T)
    return r, row_pos, row_ok


@triton.jit
def load_rows(base, row_pos, head, stride_t, stride_h, row_ok, D: tl.constexpr, D_PAD: tl.constexpr):
    """Rows ([M], at (row_pos, head)) of a [T, H, D] view; 64-bit offsets (T up to 128k+)."""
    cols = tl.arange(0, D_PAD)
    ptrs = base + row_pos.to(tl.int64)[:, None] * stride_t + head.to(tl.int64)[:, None] * stride_h + cols[None, :]
    return tl.load(ptrs, mask=row_ok[:, None] & (cols[None, :] < D), other=0.0)


@triton.jit
def store_rows(base, x, row_pos, head, stride_t, stride_h, row_ok, D: tl.constexpr, D_PAD: tl.constexpr):
    cols = tl.arange(0, D_PAD)
    ptrs = base + row_pos.to(tl.int64)[:, None] * stride_t + head.to(tl.int64)[:, None] * stride_h + cols[None, :]
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < D))


@triton.jit
def load_block(base, kpos, T, stride_t, D: tl.constexpr, D_PAD: tl.constexpr):
    """Key/value rows at positions kpos of one head, [N, D_PAD], zero past T and past D."""
    cols = tl.arange(0, D_PAD)
    ptrs = base + kpos.to(tl.int64)[:, None] * stride_t + cols[None, :]
    return tl.load(ptrs, mask=(kpos[:, None] < T) & (cols[None, :] < D), other=0.0)


def split_dim(d: int) -> tuple[int, int]:
    """A head dim as two power-of-two column tiles ``(DA, DB)``: ``DA`` the largest power of two
    <= d (at least 16, the smallest dot K), ``DB`` the rest rounded up (0 when none).

    192 -> (128, 64): no padding to 256, so Dk = 192 costs 192 columns of dot, not 256.
    """
    da = max(16, 1 << (d.bit_length() - 1))
    rest = d - da
    return da, (0 if rest <= 0 else max(16, triton.next_power_of_2(rest)))


@triton.jit
def load_rows_split(base, row_pos, head, stride_t, stride_h, row_ok, D: tl.constexpr, DA: tl.constexpr,
                    DB: tl.constexpr):
    """:func:`load_rows` as the column tiles ``[0, DA)`` and ``[DA, DA + DB)`` (zero past D).

    With ``DB == 0`` the second tile is the first again, never used.
    """
    rows = base + row_pos.to(tl.int64)[:, None] * stride_t + head.to(tl.int64)[:, None] * stride_h
    ca = tl.arange(0, DA)
    a = tl.load(rows + ca[None, :], mask=row_ok[:, None] & (ca[None, :] < D), other=0.0)
    if DB > 0:
        cb = DA + tl.arange(0, DB)
        b = tl.load(rows + cb[None, :], mask=row_ok[:, None] & (cb[None, :] < D), other=0.0)
    else:
        b = a
    return a, b


@triton.jit
def store_rows_split(base, xa, xb, row_pos, head, stride_t, stride_h, row_ok, D: tl.constexpr,
                     DA: tl.constexpr, DB: tl.constexpr):
    """Inverse of :func:`load_rows_split`, casting to the destination dtype."""
    rows = base + row_pos.to(tl.int64)[:, None] * stride_t + head.to(tl.int64)[:, None] * stride_h
    ca = tl.arange(0, DA)
    tl.store(rows + ca[None, :], xa.to(base.dtype.element_ty), mask=row_ok[:, None] & (ca[None, :] < D))
    if DB > 0:
        cb = DA + tl.arange(0, DB)
        tl.store(rows + cb[None, :], xb.to(base.dtype.element_ty), mask=row_ok[:, None] & (cb[None, :] < D))


@triton.jit
def store_or_add_rows_split(base, xa, xb, row_pos, head, stride_t, stride_h, row_ok, D: tl.constexpr,
                            DA: tl.constexpr, DB: tl.constexpr, ADD: tl.constexpr):
    """:func:`store_rows_split`, or with ``ADD`` of ``x`` plus what those rows already hold (added
    in float32, rounded once): one branch's dq added to another's without a pass over memory."""
    if ADD:
        ya, yb = load_rows_split(base, row_pos, head, stride_t, stride_h, row_ok, D, DA, DB)
        xa += ya.to(tl.float32)
        if DB > 0:
            xb += yb.to(tl.float32)
    store_rows_split(base, xa, xb, row_pos, head, stride_t, stride_h, row_ok, D, DA, DB)


@triton.jit
def split_acc(M: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr):
    """fp32 zero accumulators for the two column tiles (a 16-wide unused one when DB == 0)."""
    acc_a = tl.zeros([M, DA], dtype=tl.float32)
    if DB > 0:
        acc_b = tl.zeros([M, DB], dtype=tl.float32)
    else:
        acc_b = tl.zeros([M, 16], dtype=tl.float32)
    return acc_a, acc_b


@triton.jit
def split_scores(qa, qb, ka, kb, DB: tl.constexpr, PREC: tl.constexpr):
    """``q @ k^T`` over both column tiles: [M, D] x [N, D] -> [M, N] float32."""
    s = tl.dot(qa, tl.trans(ka), input_precision=PREC)
    if DB > 0:
        s += tl.dot(qb, tl.trans(kb), input_precision=PREC)
    return s


@triton.jit
def split_acc_dot(acc_a, acc_b, x, ya, yb, DB: tl.constexpr, PREC: tl.constexpr):
    """``acc += x @ y`` for both column tiles of ``y`` ([M, N] x [N, D])."""
    x = x.to(ya.dtype)
    acc_a += tl.dot(x, ya, input_precision=PREC)
    if DB > 0:
        acc_b += tl.dot(x, yb, input_precision=PREC)
    return acc_a, acc_b


@triton.jit
def attend_keys(kpos, allowed, qa, qb, k_base, v_base, T, skt, svt, qk_scale, m_i, l_i, acc, acc_b, lse2,
                delta, do, DK: tl.constexpr, DV: tl.constexpr, DK_A: tl.constexpr, DK_B: tl.constexpr,
                DV_PAD: tl.constexpr, PREC: tl.constexpr, BACKWARD: tl.constexpr, MASKED: tl.constexpr,
                second=None, SECOND: tl.constexpr = False):
    """One key tile (positions ``kpos`` of one key/value head, ``allowed [M, N]``) for a query
    program: the online-softmax update ``(m_i, l_i, acc)`` forward, or dq's ``(acc, acc_b)``
    backward (with ``SECOND``, a second softmax's share added: :func:`softmax_grad`). Returns all
    four (the unused ones unchanged); the selection and window kernels' query walks share it."""
    ka, kb = load_rows_split(k_base, kpos, kpos * 0, skt, 0, kpos < T, DK, DK_A, DK_B)
    vb = load_block(v_base, kpos, T, svt, DV, DV_PAD)
    return attend_tile(ka, kb, vb, allowed, qa, qb, qk_scale, m_i, l_i, acc, acc_b, lse2, delta, do, DK_B,
                       PREC, BACKWARD, MASKED, second, SECOND)


@triton.jit
def load_box(desc, b, row0, h, ROWS: tl.constexpr, COLS: tl.constexpr, col0=0):
    """``[ROWS, COLS]``: the box of tensor descriptor ``desc`` (over a ``[B, T, H, D]`` tensor) at
    ``(b, row0, h, col0)``, flattened; zero where it leaves the tensor."""
    return tl.reshape(desc.load([b, row0, h, col0]), [ROWS, COLS])


@triton.jit
def load_box_split(desc_a, desc_b, b, row0, h, ROWS: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr):
    """:func:`load_box` of the column tiles ``[0, DA)`` and ``[DA, DA + DB)`` (the TMA form of
    :func:`load_rows_split`; with ``DB == 0`` the second is the first again, never used)."""
    xa = load_box(desc_a, b, row0, h, ROWS, DA)
    if DB > 0:
        xb = load_box(desc_b, b, row0, h, ROWS, DB, DA)
    else:
        xb = xa
    return xa, xb


@triton.jit
def attend_keys_at(row0, kpos, allowed, qa, qb, k_base, v_base, descs, T, skt, svt, qk_scale, m_i, l_i, acc,
                   acc_b, lse2, delta, do, DK: tl.constexpr, DV: tl.constexpr, DK_A: tl.constexpr,
                   DK_B: tl.constexpr, DV_PAD: tl.constexpr, ROWS: tl.constexpr, PREC: tl.constexpr,
                   BACKWARD: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr, second=None,
                   SECOND: tl.constexpr = False):
    """:func:`attend_keys` over the ``ROWS`` keys from ``row0`` (positions ``kpos``), loaded by
    pointers or, with ``TMA``, through ``descs = (k_desc_a, k_desc_b, v_desc, b, h)``
    (:func:`kv_tile_descriptors`): one bulk copy per tile issued by one thread instead of every
    thread's address arithmetic and 16-byte copies. Rows past ``T`` are zero either way."""
    if TMA:
        k_desc_a, k_desc_b, v_desc, b, h = descs
        ka, kb = load_box_split(k_desc_a, k_desc_b, b, row0, h, ROWS, DK_A, DK_B)
        vb = load_box(v_desc, b, row0, h, ROWS, DV_PAD)
        return attend_tile(ka, kb, vb, allowed, qa, qb, qk_scale, m_i, l_i, acc, acc_b, lse2, delta, do, DK_B,
                           PREC, BACKWARD, MASKED, second, SECOND)
    else:
        return attend_keys(kpos, allowed, qa, qb, k_base, v_base, T, skt, svt, qk_scale, m_i, l_i, acc, acc_b,
                           lse2, delta, do, DK, DV, DK_A, DK_B, DV_PAD, PREC, BACKWARD, MASKED, second,
                           SECOND)


@triton.jit
def attend_tile(ka, kb, vb, allowed, qa, qb, qk_scale, m_i, l_i, acc, acc_b, lse2, delta, do,
                DK_B: tl.constexpr, PREC: tl.constexpr, BACKWARD: tl.constexpr, MASKED: tl.constexpr,
                second=None, SECOND: tl.constexpr = False):
    """:func:`attend_keys` on a key tile already loaded (``ka, kb`` its column tiles, ``vb``)."""
    sc = split_scores(qa, qb, ka, kb, DK_B, PREC) * qk_scale
    if BACKWARD:
        p, ds = softmax_grad(sc, allowed, lse2, delta, do, vb, PREC, MASKED, second, SECOND)
        acc, acc_b = split_acc_dot(acc, acc_b, ds, ka, kb, DK_B, PREC)
    else:
        m_i, l_i, acc = softmax_step(sc, allowed, m_i, l_i, acc, vb, PREC, MASKED)
    return m_i, l_i, acc, acc_b
