"""Where a training step of issue 6's model goes: NSA against its dense twin, in one process.

    python3 scripts/gpu/profile_train_step.py [--context 8192] [--batch-size 16] [--steps 30]
        [--nsa-weights FILE] [--out FILE]

Times (wall clock around synchronised calls, after warm-up, medians over ``--steps``): making a
batch on the CPU; a whole training step (batch made, moved, forward and backward in bf16
autocast, clipping, AdamW; the loss read back, which synchronises); the same with the next batch
drawn on a thread meanwhile (``BatchStream``, as ``nsa train`` runs it); with the gate statistics
collected (every ``log_every``-th step); and the periodic accuracy check (32 sequences at the
training context, every ``eval_every`` steps). Then the CUDA kernels of a few NSA steps, by total
time (torch profiler). Prints a table last; ``--out`` writes everything as JSON.

``--nsa-weights`` starts NSA from a trained model's weights (a weights file of ``nsa train``):
its selection then has the trained pattern, in which neighbouring positions share blocks (the
selection kernels' position tiles load a block once for all positions that list it), where a
fresh model's selection is close to random.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nsa.models import RetrievalLM, make_batch, retrieval_accuracy
from nsa.models.tasks import BatchStream
from nsa.models.train import (
    _forward_backward,
    gpu_config,
    load_initial_weights,
    make_optimizer,
    set_learning_rate,
)


def timed(fn, repeats: int) -> float:
    """Median wall milliseconds of ``fn()`` (synchronised before and after each call)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def train_step(model: RetrievalLM, config, args, draw, device: torch.device, autocast):
    """One ``nsa train`` step of ``model`` (its own optimizer), as a callable; ``step(True)``
    also collects the gate statistics; ``draw()`` gives the step's CPU batch. A factory, so each
    model's step keeps its own model."""
    optimizer = make_optimizer(model, config)
    set_learning_rate(optimizer, 1e-4)

    def step(want_info: bool = False) -> None:
        batch = draw().to(device)
        _forward_backward(model, batch, want_info, autocast, device)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--nsa-weights", type=Path, default=None,
                        help="start NSA from these trained weights (default: a fresh draw)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself")
    args = parser.parse_args()
    device = torch.device(args.device)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    torch.backends.cuda.matmul.allow_tf32 = True
    config = gpu_config(context=args.context, start_context=None, batch_size=args.batch_size)
    gen = torch.Generator().manual_seed(0)
    result: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "torch": torch.__version__,
                    "context": args.context, "batch_size": args.batch_size,
                    "nsa_weights": None if args.nsa_weights is None else str(args.nsa_weights), "models": {}}
    result["make_batch_ms"] = timed(lambda: make_batch(config.task, args.batch_size, args.context, gen), 10)
    steps = {}
    for name in ("nsa", "dense"):
        lm_config = config.model if name == "nsa" else config.model.twin()
        model = RetrievalLM(lm_config).to(device).train()
        if name == "nsa" and args.nsa_weights is not None:
            load_initial_weights(model, args.nsa_weights)
        draw = partial(make_batch, config.task, args.batch_size, args.context, gen)
        step = train_step(model, config, args, draw, device, autocast)
        for _ in range(5):  # autotuning, allocator growth
            step()
        row = {"step_ms": timed(step, args.steps), "step_with_info_ms": timed(partial(step, True), 5)}
        # As `nsa train` runs it now: the next batch drawn on a thread while the step runs.
        stream = BatchStream(config.task, args.batch_size, gen)
        streamed = train_step(model, config, args, partial(stream.next, args.context), device, autocast)
        streamed()
        row["step_streamed_ms"] = timed(streamed, args.steps)
        stream.close()
        model.eval()
        check = config.task.replace(num_needles=1, num_queries=1)
        row["accuracy_check_ms"] = timed(partial(
            retrieval_accuracy, model, check, args.context, None, num_samples=32,
            batch_size=config.eval_batch_size, seed=7, device=device, autocast_dtype=autocast), 3)
        model.train()
        row["accuracy_check_per_step_ms"] = row["accuracy_check_ms"] / config.eval_every
        result["models"][name] = row
        steps[name] = step
    activities = torch.profiler.ProfilerActivity
    activity = activities.CUDA if device.type == "cuda" else activities.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(5):
            steps["nsa"]()
    events = [e for e in prof.key_averages() if device.type != "cuda" or e.device_time_total > 0]
    time_of = (lambda e: e.device_time_total) if device.type == "cuda" else (lambda e: e.self_cpu_time_total)
    kernels = sorted(events, key=time_of, reverse=True)[:20]
    result["nsa_kernels"] = [{"name": e.key[:90], "calls": e.count, "ms_per_step": time_of(e) / 5e3}
                             for e in kernels]
    result["nsa_kernel_ms_per_step"] = sum(time_of(e) for e in events) / 5e3
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))
    print(f"{result['device']}, torch {result['torch']}, context {args.context}, batch {args.batch_size}, "
          f"NSA weights {result['nsa_weights'] or 'fresh'}; "
          f"make_batch {result['make_batch_ms']:.1f} ms; "
          f"NSA kernels {result['nsa_kernel_ms_per_step']:.1f} ms/step")
    for k in result["nsa_kernels"]:
        print(f"  {k['ms_per_step']:7.2f} ms  x{k['calls'] // 5:<4} {k['name']}")
    print("| model | step ms | batch drawn on a thread | with gate stats | accuracy check ms (per step) |")
    for name, row in result["models"].items():
        print(f"| {name} | {row['step_ms']:.1f} | {row['step_streamed_ms']:.1f} | "
              f"{row['step_with_info_ms']:.1f} | "
              f"{row['accuracy_check_ms']:.0f} ({row['accuracy_check_per_step_ms']:.1f}) |")


if __name__ == "__main__":
    main()
