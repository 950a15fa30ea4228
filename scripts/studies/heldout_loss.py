"""Loss of trained `nsa train` models on fresh batches of their training task, at their training
context, in bfloat16 autocast and in float32, on the same batches for every model.

    python scripts/studies/heldout_loss.py WEIGHTS [WEIGHTS ...] [--batches 40] [--batch-size 8]
        [--precisions bf16,fp32] [--device cuda] [--seed 12345] [--misses NATS] [--out FILE]

WEIGHTS is a ``weights_<model>.pt`` or ``checkpoints/<model>.pt`` of a run (anything
:func:`nsa.models.train.load_model` reads). The training log's loss is a mean over the weights of
the last steps (they still move); this is the final weights' loss on batches no step saw (the
seed differs from training's), with the answers counted as wrong when the argmax is not the
value. Needles are placed uniformly (``adjacent_rate`` 0) whatever the run trained on, so runs
with and without adjacent needles compare on one distribution. Prints one line per (model,
precision); ``--out`` writes them as JSON. ``--misses NATS`` also lists every answer above that
loss: where its needle sat (depth, offset inside its selection block, tokens before the query)
and whether each NSA layer's selection held the needle's block at the answer position.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nsa.models.tasks import make_batch, needle_block_selected  # noqa: E402
from nsa.models.train import TrainConfig, model_from_state  # noqa: E402

PRECISIONS = {"bf16": torch.bfloat16, "fp32": None}


def describe_misses(per_answer: torch.Tensor, predicted: torch.Tensor, batch, infos: list,
                    select_block: int | None, threshold: float) -> list[dict]:
    """One dict per answer of ``per_answer`` ([B, Q] nats) above ``threshold``; ``predicted`` is
    the argmax token per answer ([B, Q]). ``predicted_answer_of`` lists the sequence's other
    queries whose answer is the predicted token (the model read another needle)."""
    misses = []
    for row, query in (per_answer > threshold).nonzero().tolist():
        start = int(batch.needle_starts[row, query])
        given = int(predicted[row, query])
        others = [q for q in (batch.answers[row] == given).nonzero().flatten().tolist() if q != query]
        miss = {"loss": round(float(per_answer[row, query]), 3), "row": row, "query": query,
                "depth": round(float(batch.depths[row, query]), 4),
                "tokens_before_query": int(batch.answer_positions[row, query]) - start,
                "correct": given == int(batch.answers[row, query]), "predicted_answer_of": others}
        if select_block is not None:
            miss["offset_in_block"] = start % select_block
            for layer, info in enumerate(infos):
                selected = needle_block_selected(info.selected_blocks.cpu(), batch, select_block, query)
                miss[f"selected_layer{layer}"] = bool(selected[row])
        misses.append(miss)
    return misses


@torch.no_grad()
def heldout_loss(model, config: TrainConfig, precision: str, batches: int, batch_size: int,
                 seed: int, device: str, misses_over: float | None = None) -> dict:
    generator = torch.Generator().manual_seed(seed)
    autocast = PRECISIONS[precision]
    select_block = model.config.nsa.select_block if model.config.attention == "nsa" else None
    losses, misses, wrong, answers = [], [], 0, 0
    for index in range(batches):
        batch = make_batch(config.task, batch_size, config.context, generator).to(device)
        with torch.autocast(torch.device(device).type, dtype=autocast, enabled=autocast is not None):
            logits = model(batch.tokens, logits_at=batch.answer_positions,
                           collect_info=misses_over is not None and select_block is not None)
        per_answer = F.cross_entropy(logits.flatten(0, 1), batch.answers.flatten(), reduction="none")
        if not torch.isfinite(per_answer).all():
            raise RuntimeError(f"non-finite loss in {precision}")
        losses.append(per_answer.double().cpu())
        predicted = logits.argmax(-1)
        wrong += int((predicted != batch.answers).sum())
        answers += batch.answers.numel()
        if misses_over is not None:
            misses += [dict(miss, batch=index) for miss in describe_misses(
                per_answer.view_as(batch.answers).cpu(), predicted.cpu(), batch.to("cpu"),
                model.last_infos, select_block, misses_over)]
    every = torch.cat(losses)
    return {"precision": precision, "answers": answers, "mean_loss": float(every.mean()),
            "max_loss": float(every.max()), "answers_over_0.1": int((every > 0.1).sum()), "wrong": wrong,
            "misses": misses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", type=Path, nargs="+")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precisions", default="bf16,fp32")
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--misses", type=float, default=None, metavar="NATS",
                        help="list every answer above this loss, with where its needle sat")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    precisions = args.precisions.split(",")
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        parser.error(f"--precisions: unknown {unknown}; accepted: {sorted(PRECISIONS)}")
    rows = []
    for path in args.weights:
        state = torch.load(path, map_location="cpu", weights_only=False)
        config = TrainConfig.from_dict(state["train_config"])
        config = config.replace(task=config.task.replace(adjacent_rate=0.0))
        model, step = model_from_state(state, args.device), int(state["step"])
        model.eval()
        for precision in precisions:
            start = time.time()
            row = heldout_loss(model, config, precision, args.batches, args.batch_size, args.seed,
                               args.device, args.misses)
            row.update(weights=str(path), model=model.config.attention, step=step,
                       context=config.context, seconds=round(time.time() - start, 1))
            rows.append(row)
            print(f"{path}: {row['model']} step {step}, {precision}, {row['answers']} answers at "
                  f"{config.context} tokens: mean loss {row['mean_loss']:.5f}, max {row['max_loss']:.3f}, "
                  f"{row['answers_over_0.1']} over 0.1 nats, {row['wrong']} wrong ({row['seconds']} s)",
                  flush=True)
            for miss in row["misses"]:
                print("  miss:", " ".join(f"{k}={v}" for k, v in miss.items()), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
