"""Retrieval of a trained `nsa train` model beyond its training context, with RoPE as trained and
extended (nsa.rope.RopeScaling: YaRN, position interpolation), on the same sequences.

    python scripts/studies/rope_extension.py CHECKPOINT [--contexts 4096] [--methods none,yarn,linear]
        [--depths 0,25,50,75,100] [--samples 16] [--tasks single,multikey] [--device cpu] [--out FILE]

CHECKPOINT is ``<run>/checkpoints/<model>.pt`` (or a file holding at least its ``model``,
``lm_config`` and ``train_config``: the weights alone, without the optimizer). The run's own
training context is the ``original_context`` of the scaling. Prints accuracy and, for NSA, how
often each layer selected the needle's block, per (task, context, method, depth); ``--out``
writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nsa.models.train import (  # noqa: E402
    TrainConfig,
    evaluate_retrieval,
    model_from_state,
    needle_selected_columns,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--contexts", default="4096")
    parser.add_argument("--methods", default="none,yarn,linear")
    parser.add_argument("--depths", default="0,25,50,75,100", help="percent")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    model = model_from_state(state, args.device)
    config = TrainConfig.from_dict(state["train_config"]).replace(
        eval_contexts=tuple(int(c) for c in args.contexts.split(",")),
        eval_depths=tuple(int(d) / 100 for d in args.depths.split(",")),
        eval_rope_scaling=tuple(args.methods.split(",")), eval_samples=args.samples,
        eval_batch_size=args.batch_size, eval_minutes=None, device=args.device)
    name = model.config.attention
    start = time.time()
    rows = evaluate_retrieval(model, name, config, report=lambda line: None)
    print(f"{args.checkpoint}: {name}, trained at {config.context} tokens, step {state.get('step')}, "
          f"{args.samples} sequences per cell, {time.time() - start:.0f} s")
    for row in rows:
        selected = "/".join(f"{row[k]:.2f}" for k in needle_selected_columns([row]))
        where = f"{row['task']:8} {row['context']:6} {row['rope_scaling']:6} depth {row['depth']:.2f}"
        print(f"{where}: {row['accuracy']:.2f}" + (f"  needle block selected per layer {selected}"
                                                   if selected else ""))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
