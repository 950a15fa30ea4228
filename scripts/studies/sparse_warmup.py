"""CPU proxy of the H200 trainability runs: the context warm-up's loss jumps and what changes them
(``sparse_warmup``, ``selection_anneal``, frozen gates), and retrieval far beyond the training length
(``--eval-contexts``) with how often each layer selected the needle's block (``--context``,
``--rope-theta``, ``--pattern`` vary the setup).

    python scripts/studies/sparse_warmup.py {off,on,anneal,frozen,release} [--seed 0] [--steps 2000] [--out DIR]
        [--eval-contexts 256,1024] [--context 256] [--rope-theta 1e8] [--pattern 4,2,8,8] [--tag SUFFIX]
        [--twin]

``off``: the plain warm-up; ``on``: ``sparse_warmup``; ``anneal``: ``selection_anneal=(0.6, 0.85)``
(dense selection through the warm-up, which ends by 60% of the schedule, then ``n`` falls to 8 at
256 tokens until 85%); ``frozen``: the plain warm-up with the gates frozen at 0.5
(``gate_lr_scale=0``); ``release``: frozen for the first half of the schedule, then trained
(``gate_freeze=0.5``). Every mode also prints the per-layer mean gates every 200 steps.

A small NSA model (2 layers of width 64, 4 query / 2 key-value heads of dim 16) on the GPU run's
task (4 needles, 4 queries, vocabulary 264) with the paper's pattern scaled down by 8
(l=4, d=2, l'=8, n=8, w=16): selection covers ``n * l' = 64`` tokens, so the warm-up 32 -> 64 ->
128 -> 256 crosses it as the H200 model's 512 -> ... -> 4096 crosses 1024. Same curriculum as
``gpu_config`` otherwise (hold at 3.5 nats, advance at 0.3, phi at 0.03x the learning rate). One
thread; about 12 minutes per run on one core of the CI machine. Prints the loss around each
context change, the mean loss of the last 200 steps and retrieval at 256 and 1024 tokens
(``--eval-contexts``) with how often each layer selected the needle's block; writes
``<out>/<mode>-<seed>.json``. ``--twin`` then trains the dense twin on NSA's schedule (same
batches, learning rates and contexts, NSA's initial weights where shared) and prints both final
losses as the trainability goal measures them (mean of the last 10% of steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nsa import NSAConfig  # noqa: E402
from nsa.models.lm import LMConfig  # noqa: E402
from nsa.models.tasks import RetrievalTask  # noqa: E402
from nsa.models.train import (  # noqa: E402
    TrainConfig,
    evaluate_retrieval,
    needle_selected_columns,
    smoothed_final_loss,
    train_model,
)


ANNEAL = (0.6, 0.85)


def study_config(mode: str, seed: int, steps: int, eval_contexts: tuple[int, ...] = (256, 1024),
                 context: int = 256, rope_theta: float = 1e8,
                 pattern: tuple[int, int, int, int] = (4, 2, 8, 8)) -> TrainConfig:
    """``pattern``: ``(l, d, l', n)``; the window stays 16."""
    task = RetrievalTask(num_needles=4, num_queries=4)
    block, stride, select_block, select_count = pattern
    nsa = NSAConfig(num_heads=4, num_kv_heads=2, head_dim=16, compress_block=block, compress_stride=stride,
                    select_block=select_block, select_count=select_count, window=16)
    model = LMConfig(vocab_size=task.vocab_size, d_model=64, num_layers=2, nsa=nsa, rope_theta=rope_theta)
    return TrainConfig(models=("nsa",), model=model, task=task, context=context, start_context=32,
                       context_warmup=0.6,
                       advance_loss=0.3, hold_loss=3.5, hold_until=0.5, sparse_warmup=mode == "on",
                       selection_anneal=ANNEAL if mode == "anneal" else None,
                       gate_lr_scale=0.0 if mode == "frozen" else 1.0,
                       gate_freeze=0.5 if mode == "release" else 0.0, steps=steps,
                       batch_size=16, lr=3e-3, warmup_steps=20, phi_lr_scale=0.03, log_every=50,
                       eval_every=steps + 1, eval_contexts=eval_contexts,
                       eval_depths=(0.0, 0.25, 0.5, 0.75, 1.0),
                       eval_samples=16, eval_batch_size=16, checkpoint_every=steps + 1, device="cpu", seed=seed)


def mean_loss(rows: list[dict], first: int, last: int) -> float:
    return statistics.mean(r["loss"] for r in rows if first <= r["step"] < last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["off", "on", "anneal", "frozen", "release"],
                        help="plain warm-up, sparse_warmup, selection_anneal, frozen gates, or gates "
                             "frozen for the first half")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", default="reports/studies/sparse_warmup")
    parser.add_argument("--eval-contexts", default="256,1024", help="comma-separated retrieval contexts")
    parser.add_argument("--context", type=int, default=256,
                        help="final training context (the warm-up doubles from 32 up to it)")
    parser.add_argument("--rope-theta", type=float, default=1e8)
    parser.add_argument("--pattern", default="4,2,8,8",
                        help="l,d,l',n of the NSA layers (default: the paper's 32,16,64,16 scaled down by 8, "
                        "where the 3-token needle fills most of a compressed token; 16,8,16,6 dilutes it "
                        "nearer to the paper's 3 of 32)")
    parser.add_argument("--tag", default="", help="suffix of the output names (runs with other options)")
    parser.add_argument("--twin", action="store_true", help="also train the dense twin on NSA's schedule")
    args = parser.parse_args()
    torch.set_num_threads(1)
    contexts = tuple(int(c) for c in args.eval_contexts.split(","))
    pattern = tuple(int(x) for x in args.pattern.split(","))
    config = study_config(args.mode, args.seed, args.steps, contexts, args.context, args.rope_theta, pattern)
    name = f"{args.mode}-{args.seed}{args.tag}"
    out = Path(args.out)
    start = time.time()
    model, run = train_model("nsa", config, out / name, report=lambda line: None)
    retrieval = evaluate_retrieval(model, "nsa", config, report=lambda line: None)
    rows = run.rows
    changes = [(rows[i]["step"], rows[i - 1]["context"], rows[i]["context"]) for i in range(1, len(rows))
               if rows[i]["context"] != rows[i - 1]["context"]]
    result = {
        "mode": args.mode, "seed": args.seed, "context": args.context, "rope_theta": args.rope_theta,
        "pattern": args.pattern,
        "steps": run.steps, "seconds": time.time() - start,
        "context_changes": [{"step": step, "from": a, "to": b, "loss_20_before": mean_loss(rows, step - 20, step),
                             "loss_20_after": mean_loss(rows, step, step + 20)} for step, a, b in changes],
        "loss_last_200": mean_loss(rows, run.steps - 200, run.steps),
        "loss_per_100": [mean_loss(rows, s, min(s + 100, run.steps)) for s in range(0, run.steps, 100)],
        "select_count_per_100": [rows[s]["select_count"] for s in range(0, run.steps, 100)],
        "gates_per_200": [{"step": r["step"], **{k: r[k] for k in r if k.startswith("gate_mean/L")}}
                          for r in rows if r["step"] % 200 == 0 and r.get("gate_mean/cmp") is not None],
        "retrieval": [{k: r[k] for k in ("task", "context", "depth", "accuracy")}
                      | {"needle_selected": [r[k] for k in needle_selected_columns([r])]}
                      for r in retrieval],
    }
    if args.twin:
        dense, dense_run = train_model("dense", config.replace(models=("dense",)), out / f"{name}-dense",
                                       replay=run, report=lambda line: None)
        result["final_loss_nsa"] = smoothed_final_loss(rows, run.steps)
        result["final_loss_dense"] = smoothed_final_loss(dense_run.rows, dense_run.steps)
        result["dense_loss_per_100"] = [mean_loss(dense_run.rows, s, min(s + 100, dense_run.steps))
                                        for s in range(0, dense_run.steps, 100)]
        dense_rows = evaluate_retrieval(dense, "dense", config, report=lambda line: None)
        result["dense_retrieval"] = [{k: r[k] for k in ("task", "context", "depth", "accuracy")}
                                     for r in dense_rows]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    for change in result["context_changes"]:
        print(f"step {change['step']}: {change['from']} -> {change['to']} tokens, loss (20 steps) "
              f"{change['loss_20_before']:.3f} -> {change['loss_20_after']:.3f}")
    print(f"mean loss, last 200 steps: {result['loss_last_200']:.4f}")
    if args.twin:
        print(f"final loss (last 10% of steps): NSA {result['final_loss_nsa']:.4f}, dense "
              f"{result['final_loss_dense']:.4f}")
        print("dense mean loss per 100 steps:", " ".join(f"{x:.2f}" for x in result["dense_loss_per_100"]))
        for r in result["dense_retrieval"]:
            print(f"dense {r['task']:8} {r['context']:5} depth {r['depth']:.2f}: {r['accuracy']:.2f}")
    print("mean loss per 100 steps:", " ".join(f"{x:.2f}" for x in result["loss_per_100"]))
    print("select_count every 100 steps:", result["select_count_per_100"])
    for gates in result["gates_per_200"]:
        print(f"step {gates['step']}: mean gates " + " ".join(
            f"L{layer} " + "/".join(f"{gates[f'gate_mean/L{layer}/{b}']:.2f}" for b in ("cmp", "slc", "win"))
            for layer in (0, 1)))
    for r in result["retrieval"]:
        print(f"{r['task']:8} {r['context']:5} depth {r['depth']:.2f}: {r['accuracy']:.2f}, "
              "needle block selected per layer " + "/".join(f"{x:.2f}" for x in r["needle_selected"]))


if __name__ == "__main__":
    main()
