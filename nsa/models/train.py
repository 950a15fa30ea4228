"""Training and evaluation of the NSA language model and its dense twin on the retrieval tasks.

:func:`run_training` trains each requested model (same data stream, same learning-rate schedule),
evaluates retrieval accuracy at several contexts and depths, and writes into ``out_dir``:

- ``train_log.parquet``: one row per step and model (see :data:`LOG_BASE_COLUMNS`; gradient
  norms per parameter group as ``grad_norm/<group>``, NSA gate statistics every ``log_every``
  steps as ``gate_mean/<branch>``, ``gate_std/<branch>`` over all layers plus per layer
  ``gate_mean/L<i>/<branch>``..., and the overlap of neighbouring positions' selected blocks
  per layer as ``selection_distinct/L<i>/tile<P>`` (:func:`selection_statistics`); absent values
  are null);
- ``retrieval.parquet``: one row per (model, task, context, depth) with correct/total and, for
  NSA, ``needle_selected_layer<i>``: the fraction of sequences whose needle block layer ``i``
  selected at the answer position (scoring failures apart from read-out failures);
- ``loss.png``: training loss against steps for every model;
- ``retrieval_<model>.png``: accuracy heat map (context x depth), for NSA beside the needle
  selection rate of each layer;
- ``summary.json``: configs, step counts, timings, backend, goals and whether each was met;
- ``checkpoints/<model>.pt``: model/optimizer state and everything a resumed run needs (data
  stream, log rows, schedule and warm-up state), rewritten every ``checkpoint_every`` steps and
  at the end; ``run_training(..., resume=True)`` continues from it (``nsa train --resume``).

Every file is written to a temporary name and moved into place, so a killed run leaves whole files.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nsa.config import NSAConfig
from nsa.functional import BRANCHES
from nsa.layer import NSAAttention
from nsa.models.lm import LMConfig, RetrievalLM, copy_twin_init, parameter_group
from nsa.models.tasks import BatchStream, RetrievalTask, retrieval_accuracy
from nsa.rope import ROPE_SCALING_METHODS, RopeScaling

LOG_BASE_COLUMNS = ("model", "step", "loss", "lr", "context", "grad_norm", "tokens", "elapsed_s", "skipped",
                    "nonfinite_loss_steps", "nonfinite_grad_steps", "eval_accuracy")
DEFAULT_DEPTHS = tuple(d / 100 for d in range(0, 101, 10))
# A loss curve close to zero is judged by an absolute margin too: 5% of 0.002 nats is noise.
LOSS_ABS_SLACK = 0.01
GOAL_ACCURACY = 0.99
GOAL_LOSS_RATIO = 1.05


@dataclass(frozen=True)
class TrainConfig:
    """One training run (both models share it).

    Attributes:
        models: ``("nsa",)``, ``("dense",)`` or ``("nsa", "dense")`` (NSA first; dense then runs
            as many steps as NSA did, so losses compare at equal steps).
        model: the NSA model's :class:`LMConfig` (the dense twin is ``model.twin()``).
        task: the training task; evaluation uses it with one needle (and, as ``multikey``, with
            its own needle count but one query).
        context: training context (tokens per sequence).
        start_context, context_warmup: sequence-length warm-up: the context starts at
            ``start_context`` and doubles in equal stages until it reaches ``context`` after
            ``context_warmup`` of the schedule (``None``: always ``context``). Retrieval learned
            from scratch at thousands of tokens sits on a long plateau (attention starts out
            uniform over the haystack, so the needle's signal is diluted); both twins get the same
            curriculum, so equal-step comparisons stay fair.
        advance_loss: also double the context as soon as the mean loss of the last 20 steps at
            the current context is at most this (nats), so a model that has learned moves on
            early while one that has not gets until ``context_warmup`` (the latest stage
            times). ``None``: stages by step count only.
        hold_loss, hold_until: while the mean loss of the last 20 steps at the current context is
            above ``hold_loss`` (nats: the model has not begun to learn the task at that length),
            the step-count stages wait (their clock stops), until ``hold_until`` of the schedule
            is spent; a context is also kept for the 20 steps that window needs. ``None``: no
            hold. Why: on an H200 the NSA model left the retrieval plateau
            at 1024 tokens after ~600-1000 steps when the context stayed there, but never did
            when the step-count stages moved it on to 2048 and 4096 tokens while it was still on
            the plateau (docs/TRAINING.md, GPU runs of 2026-11-28 and 2026-11-29).
        sparse_warmup: during the context warm-up, the NSA layers' selection count and window
            scale with the context, ``n(C) = max(3, n * C // context)`` and
            ``w(C) = max(1, w * C // context)``, so that every stage is as sparse as the final
            context. Without it, below ``n * l'`` tokens the selection takes every block (and
            below ``w`` the window every token) whatever the compressed scores are; on an H200
            NSA left the retrieval plateau only there, and its loss jumped back up at each
            doubling past ``n * l'`` (docs/TRAINING.md, GPU runs of 2026-11-29). ``n`` and ``w``
            are not parameters, so no weight changes with them; evaluation, checkpoints and the
            periodic accuracy checks use the model's own ``n`` and ``w``. The NSA model's rows
            of the training log record the pattern of each step (``select_count``, ``window``).
        selection_anneal: ``(start, end)`` fractions of the schedule, or ``None``. Before ``start``
            the NSA layers select every block the context has, ``n(C) = max(n, ceil(C / l'))``
            (the selection branch is then causal dense attention whatever the compressed scores
            say, as below ``n * l'`` tokens, where the H200 model left the retrieval plateau);
            from ``start`` to ``end`` their ``n`` falls linearly to the model's own, so the
            selection turns sparse gradually at a fixed context instead of at each doubling
            of the warm-up; after ``end``, the model's own ``n``. The opposite of
            ``sparse_warmup`` (the two cannot be combined); logged and evaluated as it is.
        steps: learning-rate schedule length (upper bound on steps).
        minutes: wall-clock budget of each model's training; the schedule is shortened to fit it
            after timing the first steps. ``None``: run ``steps``.
        batch_size, lr, min_lr_ratio, warmup_steps, weight_decay, grad_clip, betas: AdamW with
            linear warmup then cosine decay to ``lr * min_lr_ratio``; gradient norm clipping.
        phi_lr_scale: the learned phi's parameters (``phi_k``, ``phi_v``) train at this multiple
            of the learning rate. phi starts as mean pooling (weights ``1/l``); at the full rate
            Adam's per-weight steps of about ``lr`` scramble it into a random projection within
            tens of steps (docs/TRAINING.md, "Why NSA learned slowly").
        gate_lr_scale: the gate MLP's parameters (``gate_proj``) train at this multiple of the
            learning rate (default 1: unchanged). The gate's last layer starts at zero (spec:
            gates 0.5); Adam moves each of its ``d_model`` input weights by up to about ``lr`` per
            step, so a gate logit can move by up to about ``lr * ||x||_1`` (about 0.4 per step at
            width 256, lr 2e-3) while the retrieval branches have learned nothing to gate yet.
            ``0`` freezes the gates at 0.5 (the best 64k retrieval on the H200 so far;
            docs/TRAINING.md, "GPU runs 2026-11-29, last").
        gate_freeze: fraction of the schedule (0..1) during which the gate MLP does not train at
            all (learning rate 0, so no weight decay either: every gate stays at its initial
            0.5); afterwards it trains at ``gate_lr_scale``. ``gate_lr_scale=0`` freezes it for
            the whole run. Frozen gates keep a layer's branches from being shut while they learn
            nothing yet (docs/TRAINING.md, "GPU runs 2026-11-29, last"); releasing them later
            lets the model gate down a branch that dilutes at long context.
        paired_init: the dense twin starts from the NSA model's initial weights wherever they
            share a parameter (:func:`nsa.models.lm.copy_twin_init`); ``False``: its own draw from
            ``seed`` (which differs from NSA's in every weight drawn after NSA's first extra one).
        log_every: gate statistics and a console line every that many steps.
        eval_every: quick accuracy at the training context (random depths) every that many steps.
        eval_contexts, eval_depths, eval_samples, eval_batch_size: the final retrieval grid.
        eval_rope_scaling: how RoPE is run at evaluation contexts longer than ``context``:
            ``"none"`` (as trained), ``"yarn"`` or ``"linear"`` (:class:`nsa.rope.RopeScaling`, factor
            = evaluation context / ``context``); several evaluate the grid once per method (contexts
            up to ``context`` only under ``"none"``, where the methods coincide). Rows record it in
            ``rope_scaling``.
        eval_minutes: wall-clock budget of each model's final evaluation; cells not reached are
            recorded as ``not_run`` (never silently dropped).
        checkpoint_every: rewrite the checkpoint every that many steps (and at the end).
        init_weights: start from an earlier run's trained weights instead of a fresh draw: a
            second training stage (e.g. on a changed task) with a fresh optimizer and schedule.
            Either that run's ``--out`` directory (each model starts from its
            ``weights_<model>.pt``, so the dense twin stays a twin) or one weights file or
            checkpoint (then ``models`` must name one model). The saved models' configuration
            must equal this run's (the backend may differ). ``None``: initialise from ``seed``.
        seed: model init and data seed.
        device: ``"cpu"`` or ``"cuda"``; bf16 autocast on CUDA.
    """

    models: tuple[str, ...] = ("nsa", "dense")
    model: LMConfig = field(default_factory=lambda: LMConfig(vocab_size=RetrievalTask().vocab_size))
    task: RetrievalTask = field(default_factory=lambda: RetrievalTask(num_needles=4, num_queries=4))
    context: int = 4096
    start_context: int | None = None
    context_warmup: float = 0.3
    advance_loss: float | None = None
    hold_loss: float | None = None
    hold_until: float = 0.5
    sparse_warmup: bool = False
    selection_anneal: tuple[float, float] | None = None
    steps: int = 1000
    minutes: float | None = None
    batch_size: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)
    phi_lr_scale: float = 0.1
    gate_lr_scale: float = 1.0
    gate_freeze: float = 0.0
    paired_init: bool = True
    log_every: int = 10
    eval_every: int = 100
    eval_contexts: tuple[int, ...] = (4096, 16384, 65536)
    eval_depths: tuple[float, ...] = DEFAULT_DEPTHS
    eval_samples: int = 8
    eval_batch_size: int = 4
    eval_rope_scaling: tuple[str, ...] = ("none",)
    eval_minutes: float | None = None
    checkpoint_every: int = 500
    init_weights: str | None = None
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not self.models or any(m not in ("nsa", "dense") for m in self.models):
            raise ValueError(f"TrainConfig.models must name 'nsa' and/or 'dense', got {self.models!r}")
        for name in ("context", "steps", "batch_size", "log_every", "eval_every", "eval_samples",
                     "eval_batch_size", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {value!r}")
        if self.start_context is not None and not (
                self.task.min_context() <= self.start_context <= self.context):
            raise ValueError(f"TrainConfig.start_context must be in [{self.task.min_context()}, context="
                             f"{self.context}] or None, got {self.start_context!r}")
        if not 0 <= self.context_warmup < 1:
            raise ValueError(f"TrainConfig.context_warmup must be in [0, 1), got {self.context_warmup!r}")
        if not isinstance(self.sparse_warmup, bool):
            raise ValueError(f"TrainConfig.sparse_warmup must be a bool, got {self.sparse_warmup!r}")
        if self.selection_anneal is not None:
            anneal = self.selection_anneal
            if not (isinstance(anneal, tuple) and len(anneal) == 2 and 0 <= anneal[0] <= anneal[1] <= 1):
                raise ValueError(f"TrainConfig.selection_anneal must be (start, end) with "
                                 f"0 <= start <= end <= 1 or None, got {anneal!r}")
            if self.sparse_warmup:
                raise ValueError("TrainConfig.selection_anneal and sparse_warmup cannot be combined: one "
                                 "makes the warm-up's selection dense, the other as sparse as the final "
                                 "context's")
        if not 0 < self.hold_until <= 1:
            raise ValueError(f"TrainConfig.hold_until must be in (0, 1], got {self.hold_until!r}")
        if self.hold_loss is not None and not self.hold_loss > 0:
            raise ValueError(f"TrainConfig.hold_loss must be positive or None, got {self.hold_loss!r}")
        if self.context < self.task.min_context():
            raise ValueError(f"TrainConfig.context must be >= {self.task.min_context()} for the task, "
                             f"got {self.context}")
        for name in ("minutes", "eval_minutes"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"TrainConfig.{name} must be positive or None, got {value!r}")
        if not self.eval_contexts or any(c < self.task.min_context() for c in self.eval_contexts):
            raise ValueError(f"TrainConfig.eval_contexts must be non-empty, each >= "
                             f"{self.task.min_context()}, got {self.eval_contexts!r}")
        if any(not 0 <= d <= 1 for d in self.eval_depths):
            raise ValueError(f"TrainConfig.eval_depths must be fractions in [0, 1], got {self.eval_depths!r}")
        methods = ("none", *ROPE_SCALING_METHODS)
        if not self.eval_rope_scaling or any(m not in methods for m in self.eval_rope_scaling) or len(
                set(self.eval_rope_scaling)) != len(self.eval_rope_scaling):
            raise ValueError(f"TrainConfig.eval_rope_scaling must be distinct names from {methods}, "
                             f"got {self.eval_rope_scaling!r}")
        if self.model.vocab_size < self.task.vocab_size:
            raise ValueError(f"model vocab_size {self.model.vocab_size} < the task's {self.task.vocab_size}")
        for name in ("phi_lr_scale", "gate_lr_scale"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
                raise ValueError(f"TrainConfig.{name} must be a number >= 0, got {value!r}")
        if isinstance(self.gate_freeze, bool) or not (isinstance(self.gate_freeze, (int, float))
                                                       and 0 <= self.gate_freeze <= 1):
            raise ValueError(f"TrainConfig.gate_freeze must be a fraction in [0, 1], got {self.gate_freeze!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"TrainConfig.device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.init_weights is not None and len(self.models) != 1 and not Path(self.init_weights).is_dir():
            raise ValueError(f"TrainConfig.init_weights: a weights file starts one model, got models="
                             f"{self.models!r}; give the earlier run's directory to start both twins")

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["model"] = self.model.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict` (also of its JSON form, where tuples became lists)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"TrainConfig.from_dict: unknown fields {unknown}")
        values = dict(data)
        values["model"] = LMConfig.from_dict(data["model"])
        values["task"] = RetrievalTask(**data["task"])
        for name in ("models", "betas", "eval_contexts", "eval_depths", "eval_rope_scaling"):
            if name in data:  # eval_rope_scaling: absent from runs made before it existed
                values[name] = tuple(data[name])
        if data.get("selection_anneal") is not None:
            values["selection_anneal"] = tuple(data["selection_anneal"])
        return cls(**values)


def tiny_config(**changes: Any) -> TrainConfig:
    """A model and task small enough to learn retrieval on one CPU core in about 20 s (300 steps).

    One layer suffices with the token shift (retrieval is one attention hop). The NSA pattern is
    scaled down (l=4, d=2, l'=8, n=6, w=8) so that at the 64-token context the selection is still
    sparse (6 of 8 blocks, 3 of them forced) and the window (8) cannot see most needles. Values
    (32) outnumber the other token kinds enough that a model which only learned "the answer is
    some value" stays at ``ln 32 = 3.47`` nats, about 0.8 of the initial ``ln 72``: getting below
    0.7 of the initial loss takes actual retrieval.
    """
    task = RetrievalTask(num_keys=16, num_values=32, num_filler=16, num_needles=4, num_queries=4)
    nsa = NSAConfig(num_heads=4, num_kv_heads=2, head_dim=16, compress_block=4, compress_stride=2,
                    select_block=8, select_count=6, window=8)
    model = LMConfig(vocab_size=task.vocab_size, d_model=64, num_layers=1, nsa=nsa)
    base = TrainConfig(models=("nsa",), model=model, task=task, context=64, start_context=32, steps=300,
                       batch_size=16, lr=3e-3, warmup_steps=10, log_every=25, eval_every=100,
                       eval_contexts=(64, 256), eval_depths=(0.0, 0.5, 1.0), eval_samples=16,
                       eval_batch_size=16, checkpoint_every=1000, device="cpu")
    return base.replace(**changes)


def gpu_config(**changes: Any) -> TrainConfig:
    """The H200 run of docs/TRAINING.md: the paper's sparse pattern (l=32, d=16, l'=64, n=16,
    w=512), 8 query / 2 kv heads of dim 32, 2 layers of width 256, context warm-up from 512 to
    4096 tokens (a stage ends once the loss is <= 0.3 nats, at the latest after 60% of the
    schedule is spent; the stage clock waits while the loss is above 3.5 nats, i.e. still on the
    retrieval plateau at ln 64 = 4.16, for at most half the schedule), bf16 autocast."""
    task = RetrievalTask(num_needles=4, num_queries=4)
    nsa = NSAConfig(num_heads=8, num_kv_heads=2, head_dim=32)
    # RoPE base 1e8: the task needs no fine position (the token shift carries "previous token"),
    # and the slower the rotation, the fewer of the key-matching dimensions see angles at 64k
    # that never occurred at 4k (about 2 of the 8 slow frequency pairs here, against 3-4 of 5 at
    # base 5e5).
    model = LMConfig(vocab_size=task.vocab_size, d_model=256, num_layers=2, nsa=nsa, rope_theta=1e8)
    # phi_lr_scale 0.03: phi here flattens 32 x 32 inputs (weights 1/32 at the start), about 10x
    # more sensitive to per-weight Adam noise than the CPU study's 8 x 16 blocks (where 0.03 and 0.1
    # both worked, 0.03 better; docs/TRAINING.md, "Why NSA learned slowly").
    base = TrainConfig(models=("nsa", "dense"), model=model, task=task, context=4096, start_context=512,
                       context_warmup=0.6, advance_loss=0.3, hold_loss=3.5, hold_until=0.5, steps=3000,
                       batch_size=16, lr=2e-3, warmup_steps=50, phi_lr_scale=0.03,
                       log_every=25, eval_every=250, eval_contexts=(4096, 16384, 65536), eval_samples=8,
                       eval_batch_size=4, eval_rope_scaling=("none", "linear", "yarn"), checkpoint_every=500,
                       device="cuda")
    return base.replace(**changes)


# ----- small pieces ----------------------------------------------------------------------------


def learning_rate(step: int, total: int, config: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` to ``lr * min_lr_ratio`` at ``total``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, total - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))


def context_at(step: int, total: int, config: TrainConfig) -> int:
    """The training context of ``step`` under the sequence-length warm-up (see :class:`TrainConfig`)."""
    if config.start_context is None or config.start_context >= config.context:
        return config.context
    stages = math.ceil(math.log2(config.context / config.start_context))
    stage_steps = max(1, int(config.context_warmup * total / stages))
    return min(config.context, config.start_context * 2 ** (step // stage_steps))


def nsa_pattern_at(context: int, config: TrainConfig, progress: float = 1.0) -> NSAConfig:
    """The NSA layers' config at training context ``context``, ``progress`` (0..1) into the
    schedule: ``sparse_warmup`` scales ``n`` and ``w`` with ``context / config.context``,
    ``selection_anneal`` makes ``n`` dense and anneals it (see :class:`TrainConfig`); otherwise,
    and at the end of either, the model's own."""
    nsa = config.model.nsa
    if config.selection_anneal is not None:
        start, end = config.selection_anneal
        dense = max(nsa.select_count, -(-context // nsa.select_block))
        if progress < start:
            return nsa.replace(select_count=dense)
        if progress < end:
            return nsa.replace(select_count=round(dense + (nsa.select_count - dense) * (progress - start)
                                                  / (end - start)))
        return nsa
    if not config.sparse_warmup or context >= config.context:
        return nsa
    return nsa.replace(select_count=max(3, nsa.select_count * context // config.context),
                       window=max(1, nsa.window * context // config.context))


def set_nsa_pattern(model: RetrievalLM, nsa: NSAConfig) -> None:
    """Give every NSA layer of ``model`` the sparse pattern of ``nsa`` (same shapes: only
    ``select_count`` and ``window`` may differ from the layer's own config)."""
    for block in model.blocks:
        attn = block.attn
        if isinstance(attn, NSAAttention) and attn.config != nsa:
            if attn.config.replace(select_count=nsa.select_count, window=nsa.window) != nsa:
                raise ValueError(f"set_nsa_pattern may change select_count and window only: {attn.config} -> {nsa}")
            attn.config = nsa


def fit_schedule(step: int, per_token: float, remaining_s: float, current_context: int,
                 config: TrainConfig, held: int = 0) -> int:
    """The longest schedule (``<= config.steps``, ``> step``) whose remaining steps, at
    ``per_token`` seconds per training token and the warm-up's contexts, fit ``remaining_s``;
    ``held``: steps the warm-up's clock has stood still so far (``hold_loss``), none assumed
    from here on."""
    def cost(total: int) -> float:
        tokens = sum(max(current_context, context_at(s - held, total, config)) for s in range(step, total))
        return tokens * config.batch_size * per_token

    low, high = step + 1, config.steps
    if cost(high) <= remaining_s:
        return high
    while low < high:
        middle = (low + high + 1) // 2
        if cost(middle) <= remaining_s:
            low = middle
        else:
            high = middle - 1
    return low


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norms, biases, phi's position rows excepted) do not.

    Every group carries ``lr_scale``: the learning rate of a step is ``lr * lr_scale``
    (:func:`set_learning_rate`); the learned phi's groups have ``config.phi_lr_scale``, the NSA
    gate MLP's ``config.gate_lr_scale``. ``role`` (``"phi"``, ``"gate"`` or ``""``) names the
    groups a step can freeze.
    """
    buckets: dict[tuple[bool, str], list] = {}
    for name, p in model.named_parameters():
        role = "phi" if ".phi_" in name else "gate" if ".gate_proj." in name else ""
        buckets.setdefault((p.dim() >= 2, role), []).append(p)
    scales = {"phi": config.phi_lr_scale, "gate": config.gate_lr_scale, "": 1.0}
    groups = [{"params": params, "weight_decay": config.weight_decay if decay else 0.0,
               "lr_scale": scales[role], "lr": config.lr * scales[role], "role": role}
              for (decay, role), params in sorted(buckets.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float, frozen: tuple[str, ...] = ()) -> None:
    """The step's learning rate: ``lr`` times each group's ``lr_scale`` (1 when absent), 0 for
    the groups whose ``role`` is in ``frozen``."""
    for group in optimizer.param_groups:
        group["lr"] = 0.0 if group.get("role", "") in frozen else lr * group.get("lr_scale", 1.0)


def group_grad_norms(model: torch.nn.Module) -> dict[str, float]:
    """L2 norm of the gradient of each parameter group (:func:`parameter_group`)."""
    squares: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        group = parameter_group(name)
        value = p.grad.detach().float().pow(2).sum()
        squares[group] = squares[group] + value if group in squares else value
    if not squares:
        return {}
    keys = sorted(squares)
    norms = torch.stack([squares[k] for k in keys]).sqrt().tolist()
    return dict(zip(keys, norms))


def gate_statistics(infos: list) -> dict[str, float]:
    """Gate mean/std per branch (averaged over layers) and per layer, from the layers' NSAInfo."""
    out: dict[str, float] = {}
    layers = [(i, info) for i, info in enumerate(infos) if info is not None]
    for branch in BRANCHES:
        for i, info in layers:
            mean, std = info.gate_stats[branch]
            out[f"gate_mean/L{i}/{branch}"], out[f"gate_std/L{i}/{branch}"] = mean, std
        if layers:
            out[f"gate_mean/{branch}"] = sum(info.gate_stats[branch][0] for _, info in layers) / len(layers)
            out[f"gate_std/{branch}"] = sum(info.gate_stats[branch][1] for _, info in layers) / len(layers)
    return out


# Position tiles whose selection overlap the log records: the union walks of the selection
# kernels at this model's 4 query heads per key/value head (4 and 16 positions per program).
OVERLAP_TILES = (4, 16)


def selection_statistics(infos: list) -> dict[str, float]:
    """Per layer, how much neighbouring positions' selected blocks overlap
    (:func:`nsa.ops.distinct_blocks_per_list`, tiles :data:`OVERLAP_TILES`): what the selection
    kernels' position tiles load per position, so a step-time change can be read against it."""
    from nsa.ops import distinct_blocks_per_list

    return {f"selection_distinct/L{i}/tile{tile}": distinct_blocks_per_list(info.selected_blocks, tile)
            for i, info in enumerate(infos) if info is not None for tile in OVERLAP_TILES}


def write_table(rows: list[dict[str, Any]], path: Path, first_columns: tuple[str, ...]) -> Path:
    """Rows as a Parquet table with an explicit schema (union of keys; missing values null),
    written atomically (temp file in the same directory, then ``os.replace``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(first_columns) + sorted({k for row in rows for k in row} - set(first_columns))
    types = {}
    for name in columns:
        values = [row[name] for row in rows if row.get(name) is not None]
        if values and all(isinstance(v, str) for v in values):
            types[name] = pa.string()
        elif values and all(isinstance(v, bool) for v in values):
            types[name] = pa.bool_()
        elif values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            types[name] = pa.int64()
        else:
            types[name] = pa.float64()
    schema = pa.schema([pa.field(name, types[name]) for name in columns])
    table = pa.Table.from_pylist([{name: row.get(name) for name in columns} for row in rows], schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_table(path: Path | str) -> list[dict[str, Any]]:
    """A table written by :func:`write_table`, as rows."""
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _write_json(data: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def _save_checkpoint(path: Path, model, optimizer, config: TrainConfig, step: int,
                     state: dict[str, Any] | None = None) -> None:
    """Model and optimizer at ``step``; ``state``: the loop state a resumed run continues from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "lm_config": model.config.to_dict(), "train_config": config.to_dict(), "resume": state}, tmp)
    os.replace(tmp, path)


def _save_weights(path: Path, model, config: TrainConfig, step: int) -> None:
    """The trained model alone (no optimizer or loop state): a few MB, small enough to fetch
    from a GPU machine where the checkpoint is not; :func:`load_model` reads it too."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # CPU tensors: the file then loads on a machine without the training's GPU.
    weights = {name: tensor.cpu() for name, tensor in model.state_dict().items()}
    torch.save({"model": weights, "step": step, "lm_config": model.config.to_dict(),
                "train_config": config.to_dict()}, tmp)
    os.replace(tmp, path)


def weights_path(out_dir: Path | str, name: str) -> Path:
    """``<out_dir>/weights_<name>.pt``: the finished model's weights (see :func:`_save_weights`)."""
    return Path(out_dir) / f"weights_{name}.pt"


def checkpoint_path(out_dir: Path | str, name: str) -> Path:
    """Where training writes model ``name``'s checkpoint under ``out_dir``."""
    return Path(out_dir) / "checkpoints" / f"{name}.pt"


def load_resume_state(out_dir: Path | str, name: str, config: TrainConfig) -> dict[str, Any] | None:
    """The checkpoint of model ``name`` under ``out_dir`` to resume from (``None`` when there is
    none: that model has not started). Errors if it was written by another run configuration, or
    before checkpoints carried their loop state."""
    path = checkpoint_path(out_dir, name)
    if not path.is_file():
        return None
    saved = _read_checkpoint(path)
    if saved.get("resume") is None:
        raise ValueError(f"cannot resume from {path}: it has no loop state (written before resumable "
                         f"checkpoints); start a new run")
    if saved["train_config"] != config.to_dict():
        raise ValueError(f"cannot resume from {path}: it was written by a different run configuration")
    return saved


def _read_checkpoint(path: Path | str, purpose: str = "cannot resume from") -> dict[str, Any]:
    """A checkpoint's contents on the CPU; a ``ValueError`` naming the file (after ``purpose``)
    when it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch.load fails on a damaged file in many ways
        raise ValueError(f"{purpose} {path}: unreadable checkpoint "
                         f"({type(exc).__name__}: {exc})") from None


def load_model(path: Path | str, device: str = "cpu") -> tuple[RetrievalLM, int]:
    """A model saved by training (``checkpoints/<model>.pt`` or ``weights_<model>.pt``) and the
    step it was saved at."""
    state = torch.load(path, map_location=device, weights_only=False)
    return model_from_state(state, device), int(state["step"])


def model_from_state(state: dict[str, Any], device: str = "cpu") -> RetrievalLM:
    """The model of a loaded checkpoint or weights file (its ``lm_config`` and ``model``)."""
    model = RetrievalLM(LMConfig.from_dict(state["lm_config"])).to(device)
    model.load_state_dict(state["model"])
    return model


def load_initial_weights(model: RetrievalLM, path: Path | str) -> int:
    """Load the weights saved at ``path`` into ``model`` (``TrainConfig.init_weights``); returns
    the step they were saved at. Raises ``ValueError`` when the saved model is configured
    differently (the backend aside)."""
    state = _read_checkpoint(path, "TrainConfig.init_weights: cannot start from")
    if "lm_config" not in state or "model" not in state:
        raise ValueError(f"TrainConfig.init_weights: {path} holds no model weights (lm_config and model)")
    saved = LMConfig.from_dict(state["lm_config"])
    if saved.replace(backend=model.config.backend) != model.config:
        raise ValueError(f"TrainConfig.init_weights: {path} holds a model configured as {saved}, this run's "
                         f"model is {model.config}")
    model.load_state_dict(state["model"])
    return int(state.get("step", 0))


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    return torch.bfloat16 if device.type == "cuda" else None


# ----- training --------------------------------------------------------------------------------


@dataclass
class ModelRun:
    """What training one model produced."""

    name: str
    steps: int
    schedule_steps: int
    train_seconds: float
    rows: list[dict[str, Any]]
    backend: str
    parameters: int
    eval_rows: list[dict[str, Any]] = field(default_factory=list)
    eval_seconds: float = 0.0
    backend_fallback: str = ""
    paused: bool = False  # stopped by the leg limit (``stop_after_s``), to be resumed


def train_model(name: str, config: TrainConfig, out_dir: Path, *, replay: ModelRun | None = None,
                report: Callable[[str], None] = print,
                progress: Callable[[str, int, int, dict], None] | None = None,
                resume: dict[str, Any] | None = None,
                stop_after_s: float | None = None) -> tuple[RetrievalLM, ModelRun]:
    """Train one model (``"nsa"`` or ``"dense"``).

    Args:
        name: which attention.
        config: the run's :class:`TrainConfig`.
        out_dir: where the checkpoint goes.
        replay: a run whose per-step learning rates and contexts are repeated exactly, for as many
            steps (the dense twin replays NSA: same batches, same schedule). A paused run is
            replayed as far as it has logged, and this one then pauses too. Without
            it the schedule is ``config.steps`` long, refitted to ``config.minutes`` if given.
        report: receives console lines. progress: ``(model, step, total, row)`` after each step.
        resume: a checkpoint of this model and configuration (:func:`load_resume_state`): training
            continues from its step as if it had never stopped (same batches, schedule, warm-up
            state; on the CPU bit for bit). A checkpoint of finished training trains no further.
        stop_after_s: wall-clock seconds this call may train (a "leg" of a run split across
            commands); when spent, the checkpoint is written and the run returned with
            ``paused=True``. Unlike ``config.minutes`` it does not change the schedule.
    """
    device = torch.device(config.device)
    lm_config = config.model if name == "nsa" else config.model.replace(attention="dense")
    torch.manual_seed(config.seed)
    model = RetrievalLM(lm_config)
    if name == "dense" and config.paired_init:
        torch.manual_seed(config.seed)
        copy_twin_init(RetrievalLM(config.model.replace(attention="nsa")), model)
    if config.init_weights is not None and resume is None:
        source = Path(config.init_weights)
        load_initial_weights(model, weights_path(source, name) if source.is_dir() else source)
    model = model.to(device)
    model.train()
    optimizer = make_optimizer(model, config)
    gen = torch.Generator().manual_seed(config.seed + 1)
    autocast = _autocast_dtype(device)
    total = replay.schedule_steps if replay is not None else config.steps
    max_steps = replay.steps if replay is not None else None
    budget = None if config.minutes is None else config.minutes * 60
    rows: list[dict[str, Any]] = []
    nonfinite_loss = nonfinite_grad = 0
    backend = "sdpa" if name == "dense" else ""
    start = time.perf_counter()
    fixed_schedule = replay is not None
    timing: dict[str, Any] = {"context": None}
    last_context = 0  # the context of the previous step
    held = 0  # steps the hold (hold_loss) stopped the warm-up's stage clock
    step = tokens_seen = 0
    fallback = ""
    trained_before = 0.0  # seconds of training in earlier legs
    finished = paused = False
    if resume is not None:
        loop = resume["resume"]
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        gen.set_state(loop["generator"])
        rows = list(loop["rows"])
        # A replayed run may have gone on (and refitted its schedule) since the checkpoint.
        total = loop["total"] if replay is None else replay.schedule_steps
        step, held, last_context = resume["step"], loop["held"], loop["last_context"]
        tokens_seen, nonfinite_loss, nonfinite_grad = (loop["tokens_seen"], loop["nonfinite_loss"],
                                                       loop["nonfinite_grad"])
        backend, fallback, finished = loop["backend"], loop["fallback"], loop["finished"]
        trained_before = loop["train_seconds"]
        if fallback:
            set_nsa_backend(model, "reference")
        if not finished:
            report(f"[{name}] resuming at step {step} of {total} ({trained_before:.0f} s trained before)")
    start = time.perf_counter() - trained_before
    leg_start = time.perf_counter()
    batches = BatchStream(config.task, config.batch_size, gen)

    def loop_state() -> dict[str, Any]:
        return {"generator": batches.state(), "rows": list(rows), "total": total, "held": held,
                "last_context": last_context, "tokens_seen": tokens_seen, "nonfinite_loss": nonfinite_loss,
                "nonfinite_grad": nonfinite_grad, "backend": backend, "fallback": fallback,
                "train_seconds": time.perf_counter() - start, "finished": finished}

    while not finished and step < (max_steps if max_steps is not None else total):
        lr = replay.rows[step]["lr"] if replay is not None else learning_rate(step, total, config)
        gate_frozen = step < config.gate_freeze * total
        set_learning_rate(optimizer, lr, frozen=("gate",) if gate_frozen else ())
        # Never shrink: a refitted (longer) schedule moves the warm-up stages later.
        if replay is not None:
            context = replay.rows[step]["context"]
        else:
            scheduled = context_at(step - held, total, config)
            recent = [r["loss"] for r in rows[-20:] if r["context"] == last_context]
            if (config.hold_loss is not None and last_context and scheduled > last_context
                    and step < config.hold_until * total
                    and (len(recent) < 20 or sum(recent) / 20 > config.hold_loss)):
                if not held:
                    report(f"[{name}] step {step}: holding context {last_context} while the loss is above "
                           f"{config.hold_loss:g} (until {config.hold_until:.0%} of the schedule)")
                held += 1
                scheduled = last_context
            context = max(last_context, scheduled)
            if (config.advance_loss is not None and len(recent) == 20 and context == last_context
                    and sum(recent) / 20 <= config.advance_loss):
                context = min(config.context, 2 * last_context)
            if context != last_context and last_context:
                report(f"[{name}] step {step}: context {last_context} -> {context}")
        last_context = context
        pattern = nsa_pattern_at(context, config, step / total) if name == "nsa" else None
        if pattern is not None:
            set_nsa_pattern(model, pattern)
        batch = batches.next(context).to(device)
        want_info = name == "nsa" and (step % config.log_every == 0)
        try:
            loss_value = _forward_backward(model, batch, want_info, autocast, device)
        except Exception as exc:
            # Only the first step of an auto backend is retried: a kernel that fails to compile
            # for these shapes must not cost the whole run. Said loudly and recorded.
            if step > 0 or name != "nsa" or model.config.backend != "auto" or isinstance(
                    exc, torch.cuda.OutOfMemoryError):
                raise
            fallback = f"{type(exc).__name__}: {str(exc)[:300]}"
            report(f"[{name}] backend 'auto' failed on the first step ({fallback}); "
                   "continuing with backend='reference'")
            set_nsa_backend(model, "reference")
            optimizer.zero_grad(set_to_none=True)
            loss_value = _forward_backward(model, batch, want_info, autocast, device)
        row: dict[str, Any] = {"model": name, "step": step, "lr": lr, "context": context}
        if pattern is not None:
            row.update(select_count=pattern.select_count, window=pattern.window)
        skipped = False
        if not math.isfinite(loss_value):
            nonfinite_loss += 1
            skipped = True
        else:
            norms = group_grad_norms(model)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip))
            row.update({f"grad_norm/{g}": v for g, v in norms.items()})
            row["grad_norm"] = grad_norm
            if not math.isfinite(grad_norm):
                nonfinite_grad += 1
                skipped = True
            else:
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if want_info:
            row.update(gate_statistics(model.last_infos))
            row.update(selection_statistics(model.last_infos))
            if not backend:
                backend = next(i.backend for i in model.last_infos if i is not None)
        elapsed = time.perf_counter() - start
        tokens_seen += config.batch_size * context
        row.update({"loss": loss_value, "tokens": tokens_seen,
                    "elapsed_s": elapsed, "skipped": skipped, "nonfinite_loss_steps": nonfinite_loss,
                    "nonfinite_grad_steps": nonfinite_grad})
        step += 1
        if (step % config.eval_every == 0) and step < total:
            model.eval()
            if pattern is not None:
                set_nsa_pattern(model, config.model.nsa)
            count = retrieval_accuracy(model, config.task.replace(num_needles=1, num_queries=1),
                                       config.context, None, num_samples=32,
                                       batch_size=config.eval_batch_size, seed=config.seed + 7,
                                       device=device, autocast_dtype=autocast)
            model.train()
            if pattern is not None:
                set_nsa_pattern(model, pattern)
            row["eval_accuracy"] = count.accuracy
            report(f"[{name}] step {step}: accuracy at {config.context} tokens (random depths) "
                   f"{count.correct}/{count.total}")
        rows.append(row)
        if progress is not None:
            progress(name, step, max_steps if max_steps is not None else total, row)
        if step % config.log_every == 0:
            recent = [r["loss"] for r in rows[-config.log_every:]]
            report(f"[{name}] step {step}/{total} ctx {context} loss {sum(recent) / len(recent):.4f} lr {lr:.2e} "
                   f"grad {row.get('grad_norm', float('nan')):.3f} {elapsed:.0f}s")
        if step % config.checkpoint_every == 0:
            _save_checkpoint(checkpoint_path(out_dir, name), model, optimizer, config, step, loop_state())
        # Fit the schedule into the time budget from measured step times: at every new context
        # (skipping its first steps, which pay for autotuning and allocator growth) the cost per
        # token is re-measured and the schedule length re-chosen so that the predicted remaining
        # steps fit the remaining time.
        if budget is not None:
            now = time.perf_counter()
            if context != timing["context"]:
                timing.update(context=context, since=None, steps=-2, fitted=False)
            timing["steps"] += 1
            if timing["steps"] == 0:
                timing["since"] = now
            if not fixed_schedule and not timing["fitted"] and timing["steps"] >= 10:
                per_token = (now - timing["since"]) / (timing["steps"] * config.batch_size * context)
                total = fit_schedule(step, per_token, budget - (now - start), context, config, held)
                timing["fitted"] = True
                report(f"[{name}] {per_token * config.batch_size * context * 1000:.0f} ms/step at {context} "
                       f"tokens: schedule set to {total} steps to fit {config.minutes:g} min")
            if now - start > budget:
                report(f"[{name}] time budget of {config.minutes:g} min reached at step {step}")
                break
        if stop_after_s is not None and time.perf_counter() - leg_start > stop_after_s:
            paused = step < (max_steps if max_steps is not None else total)
            if paused:
                report(f"[{name}] leg time limit reached at step {step}: paused "
                       f"(resume with the same output directory)")
            break
    batches.close()
    if replay is not None and replay.paused and not finished and step >= replay.steps:
        # Caught up with an NSA run that is itself paused: go on when it has.
        paused = True
        report(f"[{name}] replayed all {step} steps the paused {replay.name} run has logged: paused "
               f"(resume after it has gone on)")
    finished = not paused
    seconds = time.perf_counter() - start
    if name == "nsa":
        set_nsa_pattern(model, config.model.nsa)
    if resume is None or not resume["resume"]["finished"]:
        _save_checkpoint(checkpoint_path(out_dir, name), model, optimizer, config, step, loop_state())
        if finished:
            _save_weights(weights_path(out_dir, name), model, config, step)
    else:
        seconds = trained_before
    run = ModelRun(name, step, total, seconds, rows, backend or "unknown",
                   sum(p.numel() for p in model.parameters()), backend_fallback=fallback, paused=paused)
    return model, run


def _forward_backward(model: RetrievalLM, batch, want_info: bool, autocast, device: torch.device) -> float:
    """The loss of one batch; gradients accumulated when it is finite (a NaN loss is not
    back-propagated: the step is skipped and counted)."""
    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        logits = model(batch.tokens, logits_at=batch.answer_positions, collect_info=want_info)
    loss = F.cross_entropy(logits.flatten(0, 1), batch.answers.flatten())
    value = float(loss.detach())
    if math.isfinite(value):
        loss.backward()
    return value


def set_nsa_backend(model: RetrievalLM, backend: str) -> None:
    """Switch every NSA layer of ``model`` to ``backend`` (the configs are frozen: replaced)."""
    model.config = model.config.replace(backend=backend)
    for block in model.blocks:
        block.config = block.config.replace(backend=backend)


# ----- evaluation ------------------------------------------------------------------------------


def evaluate_retrieval(model: RetrievalLM, name: str, config: TrainConfig,
                       report: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Accuracy on the single-needle task at every (context, depth), then the multi-key task
    (``config.task``'s needles, one query) at the same grid, once per ``eval_rope_scaling`` method
    (contexts beyond the training context only, for methods other than ``"none"``); stops
    starting new cells when ``eval_minutes`` is spent, recording those cells as ``not_run``."""
    model.eval()
    tasks = {"single": config.task.replace(num_needles=1, num_queries=1)}
    if config.task.num_needles > 1:
        tasks["multikey"] = config.task.replace(num_queries=1)
    deadline = None if config.eval_minutes is None else time.perf_counter() + config.eval_minutes * 60
    rows = []
    # A context within the training length runs RoPE as trained, once, whatever the methods.
    methods = config.eval_rope_scaling
    grid = [("none", c) for c in config.eval_contexts if "none" in methods or c <= config.context]
    grid += [(m, c) for m in methods if m != "none" for c in config.eval_contexts if c > config.context]
    try:
        for task_name, task in tasks.items():
            for method, context in grid:
                model.set_rope_scaling(RopeScaling.for_context(method, context, config.context))
                rows += _evaluate_cells(model, name, task_name, task, context, method, config, deadline,
                                        report)
    finally:
        model.set_rope_scaling(None)
    return rows


def _evaluate_cells(model: RetrievalLM, name: str, task_name: str, task: RetrievalTask, context: int,
                    method: str, config: TrainConfig, deadline: float | None,
                    report: Callable[[str], None]) -> list[dict[str, Any]]:
    """One (task, context, RoPE method) row of the retrieval grid: a cell per depth; cells not
    started by ``deadline`` (``time.perf_counter()``) are ``not_run``."""
    is_nsa = model.config.attention == "nsa"
    device = torch.device(config.device)
    autocast = _autocast_dtype(device)
    rows = []
    for index, depth in enumerate(config.eval_depths):
        row = {"model": name, "task": task_name, "context": context, "depth": float(depth),
               "rope_scaling": method, "samples": config.eval_samples}
        if deadline is not None and time.perf_counter() > deadline:
            rows.append({**row, "status": "not_run", "correct": None, "accuracy": None, "seconds": None})
            continue
        began = time.perf_counter()
        try:
            count = retrieval_accuracy(
                model, task, context, depth, num_samples=config.eval_samples,
                batch_size=config.eval_batch_size, seed=config.seed + 1000 + context + index,
                device=device, autocast_dtype=autocast, needle_selection=is_nsa)
        except Exception as exc:  # noqa: BLE001 -- one failing cell (OOM, a kernel) must not end the run
            oom = isinstance(exc, torch.cuda.OutOfMemoryError)
            rows.append({**row, "status": "oom" if oom else "error", "correct": None, "accuracy": None,
                         "seconds": time.perf_counter() - began,
                         "message": f"{type(exc).__name__}: {str(exc)[:300]}"})
            report(f"[{name}] {task_name} at {context} tokens, depth {depth:.0%}: {rows[-1]['message']}")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        rows.append({**row, "status": "ok", "correct": count.correct, "accuracy": count.accuracy,
                     "seconds": time.perf_counter() - began,
                     **{f"{NEEDLE_SELECTED}{layer}": hits / count.total
                        for layer, hits in enumerate(count.needle_selected)}})
    done = [r for r in rows if r["status"] == "ok"]
    where = f"{context} tokens" + ("" if method == "none" else f" ({method} RoPE)")
    if done:
        report(f"[{name}] {task_name} retrieval at {where}: "
               + " ".join(f"{r['depth']:.0%}:{r['accuracy']:.2f}" for r in done))
        if is_nsa:
            report(f"[{name}] {task_name} needle block selected at {where}, per layer: "
                   + " ".join(f"{r['depth']:.0%}:" + "/".join(
                       f"{r[k]:.2f}" for k in needle_selected_columns([r])) for r in done))
    return rows


def rope_method(row: dict[str, Any]) -> str:
    """A retrieval row's RoPE method (rows written before ``rope_scaling`` existed ran RoPE as trained)."""
    return row.get("rope_scaling") or "none"


# Per-layer column prefix of the retrieval rows: ``needle_selected_layer<i>``.
NEEDLE_SELECTED = "needle_selected_layer"


def needle_selected_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The ``needle_selected_layer<i>`` columns present in ``rows``, in layer order."""
    names = {k for r in rows for k in r if k.startswith(NEEDLE_SELECTED)}
    return sorted(names, key=lambda k: int(k.removeprefix(NEEDLE_SELECTED)))


def smoothed_final_loss(rows: list[dict[str, Any]], steps: int) -> float:
    """Mean training loss over the last 10% (at least 1) of the first ``steps`` steps."""
    losses = [r["loss"] for r in rows if r["step"] < steps]
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail) if tail else float("nan")


def step_milliseconds(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Median and 90th percentile of the wall time per step between consecutive log rows, in ms.

    From the rows' ``elapsed_s``; a difference that holds a periodic evaluation is one step in
    ``eval_every`` (250 by default), so such steps move neither statistic while ``eval_every``
    exceeds 10. NaN with fewer than two rows.
    """
    per_step = sorted(1000.0 * (later["elapsed_s"] - earlier["elapsed_s"]) / (later["step"] - earlier["step"])
                      for earlier, later in itertools.pairwise(rows) if later["step"] > earlier["step"])
    if not per_step:
        return {"step_ms_median": float("nan"), "step_ms_p90": float("nan")}
    return {"step_ms_median": per_step[len(per_step) // 2],
            "step_ms_p90": per_step[min(len(per_step) - 1, int(0.9 * len(per_step)))]}


def initial_loss(rows: list[dict[str, Any]]) -> float:
    """Mean training loss of the first 5 steps (before learning has moved much)."""
    head = [r["loss"] for r in rows[:5]]
    return sum(head) / len(head) if head else float("nan")


def goals(runs: dict[str, ModelRun]) -> dict[str, Any]:
    """The issue's goals, measured: NSA single-needle retrieval >= 99% at every depth at the
    longest evaluated context, NSA loss within 5% of dense at equal steps, no NaN/inf; with the
    lowest rate, over those depths, at which each NSA layer selected the needle's block."""
    out: dict[str, Any] = {}
    if "nsa" in runs:
        nsa = runs["nsa"]
        longest = max(r["context"] for r in nsa.eval_rows) if nsa.eval_rows else None
        out["nsa_longest_context"] = longest
        single = [r for r in nsa.eval_rows if r["task"] == "single" and r["context"] == longest]
        methods = {method: _retrieval_goal([r for r in single if rope_method(r) == method])
                   for method in dict.fromkeys(rope_method(r) for r in single)}
        # The top-level numbers are RoPE as trained (or the only method evaluated); the goal counts
        # as met under any method evaluated, named in nsa_retrieval_goal_method.
        primary = methods.get("none") or next(iter(methods.values()), _retrieval_goal([]))
        out.update({f"nsa_{key}": value for key, value in primary.items()})
        met = [method for method, result in methods.items() if result["retrieval_goal_met"]]
        out["nsa_retrieval_goal_met"] = bool(met)
        out["nsa_retrieval_goal_method"] = met[0] if met else None
        if len(methods) > 1:
            out["nsa_by_rope_scaling"] = methods
    if "nsa" in runs and "dense" in runs:
        steps = min(runs["nsa"].steps, runs["dense"].steps)
        nsa_loss = smoothed_final_loss(runs["nsa"].rows, steps)
        dense_loss = smoothed_final_loss(runs["dense"].rows, steps)
        out.update({"equal_steps": steps, "nsa_final_loss": nsa_loss, "dense_final_loss": dense_loss,
                    "loss_ratio_nsa_over_dense": nsa_loss / dense_loss if dense_loss > 0 else float("inf")})
        out["loss_goal_met"] = bool(nsa_loss <= GOAL_LOSS_RATIO * dense_loss
                                    or nsa_loss - dense_loss <= LOSS_ABS_SLACK)
    nonfinite = {name: run.rows[-1]["nonfinite_loss_steps"] + run.rows[-1]["nonfinite_grad_steps"]
                 for name, run in runs.items() if run.rows}
    out["nonfinite_steps"] = nonfinite
    out["finite_goal_met"] = all(v == 0 for v in nonfinite.values())
    return out


def _retrieval_goal(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """The retrieval goal over one method's single-needle cells at the longest context; with, per
    layer, the worst depth's rate of selecting the needle's block (why the goal is missed)."""
    measured = [r["accuracy"] for r in cells if r["status"] == "ok"]
    return {
        "min_accuracy_longest": min(measured) if measured else None,
        "cells_not_measured_longest": len(cells) - len(measured),
        "retrieval_goal_met": bool(measured) and len(measured) == len(cells)
        and min(measured) >= GOAL_ACCURACY,
        "min_needle_selected_longest": {
            f"layer{k.removeprefix(NEEDLE_SELECTED)}": min((r[k] for r in cells if r.get(k) is not None),
                                                    default=None)
            for k in needle_selected_columns(cells)},
    }


# ----- plots -----------------------------------------------------------------------------------


def plot_loss(runs: dict[str, ModelRun], path: Path) -> Path:
    """Training loss against steps, raw (faint) and smoothed, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"nsa": "tab:blue", "dense": "tab:orange"}
    for name, run in runs.items():
        steps = [r["step"] for r in run.rows]
        losses = [r["loss"] for r in run.rows]
        ax.plot(steps, losses, color=colors[name], alpha=0.25, linewidth=0.8)
        smooth, ema = [], None
        for value in losses:
            ema = value if ema is None or not math.isfinite(ema) else 0.95 * ema + 0.05 * value
            smooth.append(ema)
        ax.plot(steps, smooth, color=colors[name], label=f"{name} ({run.backend}, {run.steps} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy on answer tokens (nats)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Retrieval training loss: NSA vs dense twin")
    return _save_figure(fig, path)


def _save_figure(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` as PNG atomically (a temp file beside it, then ``os.replace``) and
    close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_retrieval(run: ModelRun, path: Path) -> Path | None:
    """Single-needle heat maps, contexts (rows; one per RoPE method beyond the training context)
    x depths (columns), grey = not measured: accuracy, and for NSA beside it, per layer, the rate
    at which the needle's block was selected."""
    cells = [r for r in run.eval_rows if r["task"] == "single"]
    if not cells:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    contexts = sorted({(r["context"], rope_method(r)) for r in cells},
                      key=lambda k: (k[0], k[1] != "none", k[1]))
    depths = sorted({r["depth"] for r in cells})
    panels = [("accuracy", f"{run.name}: single-needle retrieval accuracy")]
    panels += [(k, f"layer {k.removeprefix(NEEDLE_SELECTED)}: needle block selected")
               for k in needle_selected_columns(cells)]
    width, height = max(6.0, 1.5 + 0.7 * len(depths)), max(3.0, 1.5 + 0.6 * len(contexts))
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), height), squeeze=False)
    for ax, (metric, title) in zip(axes[0], panels):
        grid = np.full((len(contexts), len(depths)), np.nan)
        for r in cells:
            if r["status"] == "ok" and r.get(metric) is not None:
                grid[contexts.index((r["context"], rope_method(r))), depths.index(r["depth"])] = r[metric]
        image = ax.imshow(np.ma.masked_invalid(grid), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, "-" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=8)
        ax.set_facecolor("lightgrey")
        ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths], rotation=45)
        ax.set_yticks(range(len(contexts)), [str(c) if m == "none" else f"{c} {m}" for c, m in contexts])
        ax.set_xlabel("needle depth")
        ax.set_ylabel("context")
        ax.set_title(title)
        fig.colorbar(image, ax=ax)
    return _save_figure(fig, path)


# ----- the whole run ---------------------------------------------------------------------------


def _present(row: dict[str, Any]) -> dict[str, Any]:
    """A retrieval row read back from Parquet without the columns other rows added (null here);
    ``accuracy`` and ``correct`` stay, null meaning not measured."""
    return {k: v for k, v in row.items() if v is not None or k in ("accuracy", "correct")}


def load_model_run(run_dir: Path | str, name: str = "nsa", *, allow_paused: bool = False) -> ModelRun:
    """Model ``name``'s run from a previous ``run_training`` output directory (its log rows,
    retrieval rows and summary entry): the NSA run a dense twin trained in a separate command
    replays, or either twin of a pair trained side by side (:mod:`nsa.models.twins`).
    ``allow_paused``: a run stopped by its leg limit is returned as far as it has logged
    (``paused=True``, no retrieval rows) instead of refused."""
    run_dir = Path(run_dir)
    paths = [run_dir / file for file in ("train_log.parquet", "retrieval.parquet", "summary.json")]
    info = None
    if paths[2].is_file():
        info = json.loads(paths[2].read_text())["models"].get(name)
    paused = info is not None and bool(info.get("paused"))
    if paused and not allow_paused:
        raise ValueError(f"{run_dir}'s {name} run is paused at step {info['steps']}: finish it first "
                         f"(nsa train --resume --out {run_dir})")
    missing = [str(p) for p in paths if not p.is_file() and not (paused and p == paths[1])]
    if missing:
        raise FileNotFoundError(f"run directory {run_dir} lacks {', '.join(missing)} (the outputs of "
                                f"a run that trained {name})")
    rows = [r for r in read_table(paths[0]) if r["model"] == name]
    if info is None or not rows:
        models = json.loads(paths[2].read_text())["models"]
        raise ValueError(f"{run_dir} holds no {name} run (summary.json models: {sorted(models)})")
    rows = [{k: v for k, v in r.items() if v is not None} for r in sorted(rows, key=lambda r: r["step"])]
    run = ModelRun(name, info["steps"], info["schedule_steps"], info["train_seconds"], rows, info["backend"],
                   info["parameters"], backend_fallback=info.get("backend_fallback", ""), paused=paused)
    if not paused:
        run.eval_rows = [_present(r) for r in read_table(paths[1]) if r["model"] == name]
        run.eval_seconds = info["eval_seconds"]
    return run


def resume_config(out_dir: Path | str) -> TrainConfig:
    """The configuration of the run whose outputs are in ``out_dir`` (from ``summary.json``, or
    from a checkpoint when the run was stopped before writing one)."""
    out_dir = Path(out_dir)
    summary = out_dir / "summary.json"
    if summary.is_file():
        try:
            return TrainConfig.from_dict(json.loads(summary.read_text())["config"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot resume from {out_dir}: summary.json has no readable config "
                             f"({exc})") from None
    for path in sorted((out_dir / "checkpoints").glob("*.pt")):
        return TrainConfig.from_dict(_read_checkpoint(path)["train_config"])
    raise FileNotFoundError(f"cannot resume from {out_dir}: it holds neither summary.json nor "
                            f"checkpoints/*.pt (the --out directory of an earlier `nsa train`)")


def run_training(config: TrainConfig, out_dir: Path | str, *, report: Callable[[str], None] = print,
                 progress: Callable[[str, int, int, dict], None] | None = None,
                 replay_dir: Path | str | None = None, resume: bool = False,
                 leg_minutes: float | None = None) -> dict[str, Any]:
    """Train and evaluate every model in ``config.models``, write the outputs (module docstring)
    under ``out_dir`` and return the summary (also in ``summary.json``).

    ``replay_dir``: the output directory of an earlier run that trained NSA; its NSA run is
    loaded (log and retrieval rows), the dense twin replays its schedule, and the outputs here
    cover both models (so one long NSA command and one dense command compare at equal steps).
    An NSA run paused by its leg limit is replayed as far as it has logged; the twin then pauses
    too and, resumed after NSA has gone on, follows it further (one leg behind, on another GPU,
    instead of waiting for NSA to finish).

    ``leg_minutes``: wall-clock limit on this call's training (a run longer than one session or
    one job's time limit goes in legs). When it is spent, the model in training is checkpointed,
    later models do not start, the summary's ``status`` is ``"paused"`` and ``goals`` is ``None``.
    ``resume``: continue the run in ``out_dir`` (same ``config``: see :func:`resume_config`): a
    model with a finished, evaluated checkpoint is taken as it is, a paused one continues, one
    without a checkpoint starts. A dense twin that was replaying an NSA run goes on replaying it.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    earlier: dict[str, Any] = {}
    if resume and (out_dir / "summary.json").is_file():
        earlier = json.loads((out_dir / "summary.json").read_text()).get("models", {})
        if replay_dir is None and "replayed_from" in earlier.get("nsa", {}):
            replay_dir = earlier["nsa"]["replayed_from"]
    if leg_minutes is not None and not leg_minutes > 0:
        raise ValueError(f"leg_minutes must be positive or None, got {leg_minutes!r}")
    if replay_dir is not None and config.models != ("dense",):
        raise ValueError(f"replay_dir is for training the dense twin alone (models=('dense',)), "
                         f"got models={config.models}")
    if config.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' but torch.cuda.is_available() is False")
        # The reference NSA path upcasts to float32; TF32 matmuls keep it from dominating the run.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    began = time.perf_counter()
    runs: dict[str, ModelRun] = {}
    log_path, eval_path = out_dir / "train_log.parquet", out_dir / "retrieval.parquet"

    def all_rows(attr: str) -> list[dict[str, Any]]:
        return [row for run in runs.values() for row in getattr(run, attr)]

    summary: dict[str, Any] = {"config": config.to_dict(), "device": _device_name(config.device),
                               "torch_version": torch.__version__, "models": {}}
    if config.init_weights is not None and (Path(config.init_weights) / "summary.json").is_file():
        # Provenance of a second stage's starting point, for joining twins trained side by side
        # (nsa.models.twins): a dense twin's first stage names the NSA run it replayed.
        first_stage = json.loads((Path(config.init_weights) / "summary.json").read_text())
        summary["init_weights_replayed_from"] = first_stage["models"].get("nsa", {}).get("replayed_from")
    if replay_dir is not None:
        # Through TrainConfig, so that a run archived before a field existed reads with its default.
        earlier = resume_config(replay_dir).to_dict()
        now = config.to_dict()
        for key in ("task", "batch_size", "seed", "context"):
            if earlier.get(key) != now[key]:
                raise ValueError(f"replay_dir {replay_dir} was trained with {key}={earlier.get(key)!r}, this run "
                                 f"has {now[key]!r}: the twins would not see the same batches")
        runs["nsa"] = load_model_run(replay_dir, allow_paused=True)
        replayed = json.loads((Path(replay_dir) / "summary.json").read_text())["models"]["nsa"]
        summary["models"]["nsa"] = {**replayed, "replayed_from": str(replay_dir)}
    paused = trained = False  # trained: some model took steps in this call (every leg makes progress)
    for name in config.models:
        saved = load_resume_state(out_dir, name, config) if resume else None
        done_before = saved is not None and saved["resume"]["finished"]
        left = None if leg_minutes is None else leg_minutes * 60 - (time.perf_counter() - began)
        if left is not None and left <= 0 and trained and not done_before:
            report(f"[{name}] leg time limit reached before it started: paused")
            paused = True
            break
        trained = trained or not done_before
        model, run = train_model(name, config, out_dir, report=report, progress=progress,
                                 replay=runs.get("nsa"), resume=saved, stop_after_s=left)
        runs[name] = run
        write_table(all_rows("rows"), log_path, LOG_BASE_COLUMNS)
        entry = {"steps": run.steps, "schedule_steps": run.schedule_steps, "train_seconds": run.train_seconds,
                 "backend": run.backend, "backend_fallback": run.backend_fallback,
                 "parameters": run.parameters, "initial_loss": initial_loss(run.rows),
                 "final_loss": smoothed_final_loss(run.rows, run.steps), **step_milliseconds(run.rows)}
        if run.paused:
            summary["models"][name] = {**entry, "paused": True}
            paused = True
            break
        if earlier.get(name, {}).get("evaluated") and eval_path.is_file():
            # Finished and evaluated in an earlier leg: its retrieval rows stand.
            run.eval_rows = [_present(r) for r in read_table(eval_path) if r["model"] == name]
            run.eval_seconds = earlier[name]["eval_seconds"]
        else:
            eval_start = time.perf_counter()
            run.eval_rows = evaluate_retrieval(model, name, config, report=report)
            run.eval_seconds = time.perf_counter() - eval_start
            write_table(all_rows("eval_rows"), eval_path, ("model", "task", "context", "depth", "status"))
            plot_retrieval(run, out_dir / f"retrieval_{name}.png")
        summary["models"][name] = {**entry, "eval_seconds": run.eval_seconds, "evaluated": True}
        del model
        if config.device == "cuda":
            torch.cuda.empty_cache()
    plot_loss(runs, out_dir / "loss.png")
    summary["status"] = "paused" if paused else "done"
    summary["goals"] = None if paused else goals(runs)
    summary["wall_seconds"] = time.perf_counter() - began
    _write_json(summary, out_dir / "summary.json")
    return summary


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"cpu: {platform.processor() or platform.machine()}"
