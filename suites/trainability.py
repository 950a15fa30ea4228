"""Trainability: an NSA language model learns long-context retrieval from scratch.

- ``ci`` (CPU, ~20 s): the one-layer model of :func:`nsa.models.train.tiny_config` trains 300
  steps on the 64-token retrieval task. Bound: final loss (mean of the last 10% of steps) <= 0.7 x
  the initial loss (mean of the first 5). The task is built so that a model which only learned
  the answer's token range stays at ``ln(num_values) / ln(vocab) ~ 0.8`` of the initial loss:
  passing takes real retrieval through the sparse attention. No step may have a NaN/inf loss or
  gradient. Retrieval accuracy after training is recorded.
- ``full`` (one GPU, ~40 min, opt-in): the run of docs/TRAINING.md
  (:func:`nsa.models.train.gpu_config` at 8k context, gates frozen for half the schedule, then a
  second stage from those weights with needles next to the queries in a tenth of the sequences,
  for what the first stage left of 20 minutes), NSA and the dense twin, with the issue's goals as
  bounds: NSA's two stages train <= 20 minutes together; on the final models, NSA single-needle
  retrieval >= 99% at every depth at 64k (under the best of the RoPE methods evaluated: as
  trained, position interpolation, YaRN; each one's numbers recorded), NSA loss within 5% of
  dense at equal steps (or within 0.01 nats), no NaN/inf in either stage. A second full case
  checks the Triton backward against the reference on the model's real layer shapes.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from nsa.models.train import GOAL_ACCURACY, GOAL_LOSS_RATIO, gpu_config, run_training, tiny_config
from verify.registry import Checks, SkipCase, suite

CI_LOSS_RATIO = 0.7
# Issue 6: "in at most 20 minutes of training" (NSA's, both stages together).
GOAL_TRAINING_MINUTES = 20.0
# A time budget ends training at the first step past it (~55 ms at 8k on an H200): the second
# stage's budget keeps this much in hand so that the two stages' sum stays within the goal.
BUDGET_MARGIN_S = 1.0
# Triton vs reference on the layer's gradients, fp32 inputs: the kernels run fp32 dots in IEEE
# precision (nsa.ops.triton_common.dot_precision); measured worst 1.9e-5 relative on an H200
# (2026-11-29). 1e-2 of the largest gradient entry leaves room for other accumulation orders
# while still catching a wrong term (which is O(1) off).
GRAD_RELATIVE_TOLERANCE = 1e-2


def _cases(scale: str):
    if scale == "ci":
        # Pinned to the reference: the case trains on the CPU, where Triton would mean the
        # interpreter (seconds per step).
        yield "tiny-cpu-300steps", {"steps": 300, "seed": 0, "backend": "reference"}
        return
    # Opt-in: a training run of about 40 minutes does not belong in every acceptance run (the
    # whole of `nsa verify --scale full` takes 6 on one H200); naming the suite runs it. The recipe
    # that met both goals on an H200 (docs/TRAINING.md, "GPU run 2026-12-05, twelfth session"):
    # 8k context, gates frozen for half the schedule, 16 minutes of NSA training; then a second
    # stage from those weights (both twins) in which a tenth of the sequences put the first asked
    # needle right before the queries, for what the first stage left of the 20 minutes
    # (~4, 3,300-4,400 steps); evaluation with RoPE as trained, interpolated and YaRN.
    yield "h200-nsa-vs-dense-8k", {"needs_gpu": True, "context": 8192, "steps": 15000, "minutes": 16.0,
                                   "gate_freeze": 0.5, "eval_minutes": 2.0, "seed": 0,
                                   "total_minutes": GOAL_TRAINING_MINUTES,
                                   "second_stage": {"steps": 6000, "lr": 3e-4, "adjacent_rate": 0.1, "seed": 1},
                                   "opt_in": True, "expected_s": 2400}
    yield "triton-grad-model-shapes", {"needs_gpu": True, "seq_len": 4096, "batch": 2, "seed": 0,
                                       "expected_s": 120}


def _require_cuda() -> None:
    if not torch.cuda.is_available():
        raise SkipCase("needs CUDA; torch.cuda.is_available() is False here")


def _check_ci(params: dict[str, Any], checks: Checks) -> None:
    config = tiny_config(steps=params["steps"], seed=params["seed"], eval_contexts=(64,),
                         eval_depths=(0.0, 0.5, 1.0))
    config = config.replace(model=config.model.replace(backend=params.get("backend", "reference")))
    with tempfile.TemporaryDirectory() as tmp:
        summary = run_training(config, Path(tmp), report=lambda line: None)
    info = summary["models"]["nsa"]
    checks.backend = info["backend"]
    checks.record("initial_loss", info["initial_loss"])
    checks.record("final_loss", info["final_loss"])
    checks.record("value_prior_loss", math.log(config.task.num_values))
    checks.at_most("final_over_initial_loss", info["final_loss"] / info["initial_loss"], CI_LOSS_RATIO)
    checks.equal("nonfinite_steps", summary["goals"]["nonfinite_steps"]["nsa"], 0)
    checks.record("train_seconds", info["train_seconds"])
    checks.record("nsa_min_accuracy_64", summary["goals"]["nsa_min_accuracy_longest"])


def _check_full(params: dict[str, Any], checks: Checks) -> None:
    _require_cuda()
    config = gpu_config(context=params["context"], steps=params["steps"], minutes=params["minutes"],
                        gate_freeze=params["gate_freeze"], eval_minutes=params["eval_minutes"],
                        seed=params["seed"])
    config = config.replace(model=config.model.replace(backend=params.get("backend", "auto")))
    out = Path(params.get("out_dir") or tempfile.mkdtemp(prefix="nsa-trainability-"))
    summary = _train_stage("stage1", config, out, checks)
    nsa_seconds = summary["models"]["nsa"]["train_seconds"]
    if params.get("second_stage"):
        second = params["second_stage"]
        left_s = params["total_minutes"] * 60 - nsa_seconds - BUDGET_MARGIN_S
        if left_s <= 0:
            raise ValueError(f"the first stage trained {nsa_seconds:.0f} s, leaving nothing of total_minutes="
                             f"{params['total_minutes']:g} for the second: shorten 'minutes'")
        config = config.replace(
            start_context=None, steps=second["steps"], minutes=left_s / 60, lr=second["lr"],
            gate_freeze=0.0, seed=second["seed"], init_weights=str(out / "stage1"),
            task=config.task.replace(adjacent_rate=second["adjacent_rate"]))
        summary = _train_stage("stage2", config, out, checks)
        nsa_seconds += summary["models"]["nsa"]["train_seconds"]
    checks.at_most("nsa_train_minutes_total", nsa_seconds / 60, params.get("total_minutes", params["minutes"]))
    # The goals on the last stage: the finished models, and the dense twin at NSA's steps.
    goals = summary["goals"]
    checks.backend = summary["models"]["nsa"]["backend"]
    _check_retrieval_goal(goals, checks)
    ratio = goals["loss_ratio_nsa_over_dense"]
    checks.record("loss_ratio_nsa_over_dense", ratio)
    checks.true("loss_within_5pct_of_dense", goals["loss_goal_met"],
                f"NSA {goals['nsa_final_loss']:.4f} vs dense {goals['dense_final_loss']:.4f} nats "
                f"(ratio {ratio:.3f} > {GOAL_LOSS_RATIO})")


def _train_stage(stage: str, config, out: Path, checks: Checks) -> dict[str, Any]:
    """Train one stage into ``out/stage``; record each model's steps, loss and time, check finiteness."""
    summary = run_training(config, out / stage, report=print)
    for name, info in summary["models"].items():
        checks.record(f"{stage}_{name}_steps", info["steps"])
        checks.record(f"{stage}_{name}_final_loss", info["final_loss"])
        checks.record(f"{stage}_{name}_train_seconds", info["train_seconds"])
    checks.equal(f"{stage}_nonfinite_steps", sum(summary["goals"]["nonfinite_steps"].values()), 0)
    return summary


def _check_retrieval_goal(goals: dict[str, Any], checks: Checks) -> None:
    """NSA single-needle retrieval at the longest context (64k) >= GOAL_ACCURACY at every depth.
    One entry per RoPE method evaluated there (as trained, position interpolation, YaRN): every
    method's numbers are recorded, the goal is checked on the best of them."""
    by_method = goals.get("nsa_by_rope_scaling") or {"none": {
        key: goals[f"nsa_{key}"] for key in ("min_accuracy_longest", "cells_not_measured_longest",
                                             "min_needle_selected_longest")}}
    for method, result in by_method.items():
        checks.record(f"nsa_min_accuracy_64k_{method}", _number(result["min_accuracy_longest"]))
        checks.record(f"nsa_cells_not_measured_64k_{method}", result["cells_not_measured_longest"])
        for layer, rate in result["min_needle_selected_longest"].items():
            checks.record(f"nsa_min_needle_selected_64k_{method}_{layer}", _number(rate))
    best = max(by_method, key=lambda m: (by_method[m]["cells_not_measured_longest"] == 0,
                                         _number(by_method[m]["min_accuracy_longest"], -1.0)))
    checks.record(f"nsa_best_rope_scaling_is_{best}", 1.0)
    checks.at_least("nsa_min_accuracy_64k", _number(by_method[best]["min_accuracy_longest"]), GOAL_ACCURACY)
    checks.equal("nsa_cells_not_measured_64k_is_zero", by_method[best]["cells_not_measured_longest"], 0)


def _number(value: float | None, missing: float = float("nan")) -> float:
    return missing if value is None else float(value)


def _check_triton_grads(params: dict[str, Any], checks: Checks) -> None:
    """One NSA layer of the GPU model's shapes, fp32: output and every parameter gradient of the
    Triton backend against the reference (same weights, same input)."""
    _require_cuda()
    from nsa.layer import NSAAttention

    config = gpu_config()
    torch.manual_seed(params["seed"])
    layer = NSAAttention(config.model.d_model, config.model.nsa, rope_theta=config.model.rope_theta).cuda()
    # Non-zero gate weights so that every branch's gradient path is exercised.
    torch.nn.init.normal_(layer.gate_proj.weight, std=0.02)
    x = torch.randn(params["batch"], params["seq_len"], config.model.d_model, device="cuda")
    upstream = torch.randn_like(x)
    results = {}
    for backend in ("reference", "triton"):
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y, info = layer(xi, backend=backend, return_info=True)
        (y * upstream).sum().backward()
        grads = {n: p.grad.detach().clone() for n, p in layer.named_parameters() if p.grad is not None}
        results[backend] = (y.detach(), xi.grad.detach(), grads, info.selected_blocks)
    checks.backend = "triton"
    ref, tri = results["reference"], results["triton"]
    checks.record("selected_block_mismatch_fraction", float((ref[3] != tri[3]).float().mean()))

    # Some gradients are exactly zero in exact arithmetic and rounding noise in practice (a bias
    # or position row added to every compressed key shifts all of a query's scores equally, and
    # softmax ignores that), so each error is taken relative to the larger of the tensor's own
    # scale and a thousandth of the largest parameter gradient of the layer.
    floor = 1e-3 * max(float(g.abs().max()) for g in ref[2].values())

    def relative(a: torch.Tensor, b: torch.Tensor, minimum: float = 1e-30) -> float:
        return float((a - b).abs().max()) / max(float(b.abs().max()), minimum)

    checks.at_most("output_rel_err", relative(tri[0], ref[0]), GRAD_RELATIVE_TOLERANCE)
    checks.at_most("input_grad_rel_err", relative(tri[1], ref[1]), GRAD_RELATIVE_TOLERANCE)
    errors = {n: relative(tri[2][n], ref[2][n], floor) for n in ref[2]}
    worst = max(errors, key=errors.get)
    checks.at_most("param_grad_rel_err_max", errors[worst], GRAD_RELATIVE_TOLERANCE)
    checks.record(f"worst_param_is_{worst}", errors[worst])


@suite("trainability", "an NSA language model learns retrieval from scratch: CPU loss falls (ci); "
       "64k retrieval >= 99%, loss within 5% of dense, no NaN/inf, Triton grads = reference (full)",
       cases=_cases, timeout_s=900.0)
def trainability(params: dict[str, Any], checks: Checks) -> None:
    # The full case has steps too (its schedule's first guess): "minutes" tells it apart.
    if "minutes" in params:
        _check_full(params, checks)
    elif "steps" in params:
        _check_ci(params, checks)
    else:
        _check_triton_grads(params, checks)
