"""How much neighbouring query positions of a trained NSA model share their selected blocks: the
case for a selection kernel that loads each block once per tile of positions (issue 3).

    python scripts/studies/selection_overlap.py WEIGHTS [--context 8192] [--sequences 2]
        [--from-position 4096] [--tiles 1,4,16,64] [--seed 777] [--threads 2]

WEIGHTS is a trained NSA model (``weights_nsa.pt`` of `nsa train`, or a checkpoint). Per layer
and tile size P (P consecutive positions from ``--from-position`` on, per KV head), prints the
tile's distinct selected blocks over one position's count: a tile kernel walking that union
loads P / ratio times fewer blocks than one load per position and selected block, and does
ratio times the per-position dot work (masked). Sequences are the model's training task with
uniform needles, on the CPU reference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nsa.models.tasks import make_batch  # noqa: E402
from nsa.models.train import TrainConfig, model_from_state  # noqa: E402
from nsa.ops import distinct_blocks_per_list  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", type=Path)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--sequences", type=int, default=2)
    parser.add_argument("--from-position", type=int, default=4096)
    parser.add_argument("--tiles", default="1,4,16,64")
    parser.add_argument("--seed", type=int, default=777)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    state = torch.load(args.weights, map_location="cpu", weights_only=False)
    config = TrainConfig.from_dict(state["train_config"])
    model, step = model_from_state(state), int(state["step"])
    if model.config.attention != "nsa":
        parser.error(f"WEIGHTS: an NSA model is needed, {args.weights} holds a {model.config.attention} one")
    if not 0 <= args.from_position < args.context:
        parser.error(f"--from-position must be in [0, --context), got {args.from_position}")
    model.eval()
    batch = make_batch(config.task.replace(adjacent_rate=0.0), args.sequences, args.context, args.seed)
    with torch.no_grad():
        model(batch.tokens, logits_at=batch.answer_positions, collect_info=True)
    nsa = model.config.nsa
    print(f"{args.weights} (step {step}): {args.sequences} sequences of {args.context} tokens, "
          f"positions >= {args.from_position}, n = {nsa.select_count} blocks of {nsa.select_block}")
    for layer, info in enumerate(model.last_infos):
        for tile in (int(t) for t in args.tiles.split(",")):
            ratio = distinct_blocks_per_list(info.selected_blocks, tile, args.from_position)
            print(f"layer {layer}, tile of {tile:3d} positions: distinct blocks {ratio:.2f} x one "
                  f"position's; block loads {tile / ratio:.1f}x fewer, dot work {ratio:.2f}x per position")


if __name__ == "__main__":
    main()
