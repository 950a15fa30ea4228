"""`nsa train`: train the NSA language model and/or its dense twin on synthetic long-context
retrieval, evaluate retrieval at several contexts and depths, and write the log, plots and
summary (see docs/TRAINING.md)."""

from __future__ import annotations

import math
from pathlib import Path

import click

DEPTH_HELP = "Comma-separated needle depths in percent (0-100)."


def _parse_ints(text: str, hint: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=hint) from None
    if not values or any(v <= 0 for v in values):
        raise click.BadParameter(f"expected positive integers, got {text!r}", param_hint=hint)
    return values


def _parse_depths(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated percentages, got {text!r}",
                                 param_hint="--eval-depths") from None
    if not values or any(not 0 <= v <= 100 for v in values):
        raise click.BadParameter(f"depths must be percentages in [0, 100], got {text!r}",
                                 param_hint="--eval-depths")
    return tuple(v / 100 for v in values)


def _parse_fractions(text: str) -> tuple[float, float]:
    try:
        start, end = (float(x) for x in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected START,END (two fractions of the schedule), got {text!r}",
                                 param_hint="--selection-anneal") from None
    return start, end


@click.command("train")
@click.option("--model", "which", type=click.Choice(["nsa", "dense", "both"]), default="both", show_default=True,
              help="Which attention to train; 'both' trains NSA, then the dense twin for as many steps.")
@click.option("--context", type=click.IntRange(min=16), default=None,
              help="Training context in tokens [default: 4096; 64 with --tiny].")
@click.option("--start-context", type=click.IntRange(min=16), default=None,
              help="Sequence-length warm-up start [default: 512; 32 with --tiny]; equal to --context "
                   "disables the warm-up.")
@click.option("--hold-loss", type=click.FloatRange(min=0), default=None,
              help="Warm-up stages wait while the loss is above this (nats), for at most half the "
                   "schedule; 0 disables [default: 3.5; off with --tiny].")
@click.option("--sparse-warmup/--no-sparse-warmup", default=None,
              help="During the context warm-up, scale NSA's selection count and window with the "
                   "context, so every stage is as sparse as the final one [default: off].")
@click.option("--selection-anneal", default=None, metavar="START,END",
              help="Fractions of the schedule: before START NSA selects every block (dense "
                   "selection), from START to END its selection count falls linearly to the model's "
                   "own [default: off].")
@click.option("--gate-lr-scale", type=click.FloatRange(min=0), default=None,
              help="Learning-rate multiplier of NSA's gate MLP; 0 freezes the gates at 0.5 "
                   "[default: 1].")
@click.option("--gate-freeze", type=click.FloatRange(min=0, max=1), default=None, metavar="FRACTION",
              help="The gates stay at 0.5 for this fraction of the schedule, then train at "
                   "--gate-lr-scale [default: 0].")
@click.option("--adjacent-rate", type=click.FloatRange(min=0, max=1), default=None, metavar="FRACTION",
              help="Fraction of training sequences whose first asked needle sits right before the "
                   "queries (depth 100%; RetrievalTask.adjacent_rate). Default 0: uniform depths.")
@click.option("--init-weights", type=click.Path(exists=True), default=None,
              help="Start from an earlier run's trained weights instead of a fresh draw: a second "
                   "training stage with a fresh optimizer and schedule. Its --out directory (each model "
                   "from its weights_<model>.pt) or one weights file (with one --model).")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Learning-rate schedule length [default: 3000; 300 with --tiny].")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Training time budget per model; the schedule is fitted to it after timing the "
                   "first steps.")
@click.option("--eval-minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Evaluation time budget per model; cells not reached are recorded as not_run.")
@click.option("--eval-contexts", default=None,
              help="Comma-separated evaluation contexts [default: 4096,16384,65536; 64,256 with --tiny].")
@click.option("--eval-depths", default="0,10,20,30,40,50,60,70,80,90,100", show_default=True, help=DEPTH_HELP)
@click.option("--eval-rope-scaling", default=None, metavar="METHODS",
              help="Comma-separated RoPE methods at evaluation contexts longer than the training one: "
                   "none (as trained), yarn, linear (position interpolation); each method gets its own "
                   "rows [default: none,linear,yarn; none with --tiny].")
@click.option("--eval-samples", type=click.IntRange(min=1), default=None,
              help="Sequences per (context, depth) cell [default: 8; 16 with --tiny].")
@click.option("--eval-every", type=click.IntRange(min=1), default=None,
              help="Quick accuracy at the training context (32 sequences, random depths) every this "
                   "many steps, counted in the training time [default: 250; 100 with --tiny].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Training sequences per step [default: 16].")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Peak learning rate [default: 2e-3; 3e-3 with --tiny].")
@click.option("--backend", type=click.Choice(["auto", "reference", "triton"]), default="auto", show_default=True,
              help="NSA backend (auto: Triton on CUDA when its kernels are available).")
@click.option("--rope-theta", type=click.FloatRange(min=0, min_open=True), default=None,
              help="RoPE base of both models [default: 1e8; 1e4 with --tiny].")
@click.option("--seed", type=int, default=0, show_default=True, help="Model init and data seed.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="reports/train", show_default=True,
              help="Output directory (train_log.parquet, retrieval.parquet, loss.png, summary.json, "
                   "checkpoints/).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: cuda when available.")
@click.option("--replay", "replay_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="With --model dense: the --out directory of an earlier NSA run; dense replays its "
                   "schedule (same steps, learning rates, contexts, batches) and the outputs cover both.")
@click.option("--tiny", is_flag=True, help="A one-layer model and 64-token task that train on a CPU in ~20 s.")
@click.option("--leg-minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop training after this many minutes of this command and checkpoint, to go on "
                   "with --resume (a run longer than one job allows). Unlike --minutes it does not "
                   "change the schedule.")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out (its configuration; only --leg-minutes may be given "
                   "with it): paused models go on from their checkpoints, finished ones stand.")
def train(which: str, context: int | None, start_context: int | None, hold_loss: float | None,
          sparse_warmup: bool | None, selection_anneal: str | None, gate_lr_scale: float | None,
          gate_freeze: float | None, adjacent_rate: float | None, init_weights: str | None,
          steps: int | None,
          minutes: float | None, eval_minutes: float | None, eval_contexts: str | None, eval_depths: str,
          eval_rope_scaling: str | None, eval_samples: int | None, eval_every: int | None,
          batch_size: int | None, lr: float | None,
          backend: str,
          rope_theta: float | None, seed: int,
          out_dir: str, device: str, replay_dir: str | None, tiny: bool, leg_minutes: float | None,
          resume: bool) -> None:
    """Train NSA and/or its dense twin on synthetic retrieval; report loss curves and retrieval
    accuracy by context and depth."""
    import torch

    from nsa.models.train import gpu_config, resume_config, tiny_config

    if resume:
        source = click.get_current_context().get_parameter_source
        given = [f"--{name.replace('_', '-')}" for name in click.get_current_context().params
                 if name not in ("out_dir", "leg_minutes", "resume")
                 and source(name) is click.core.ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(f"--resume continues the run in --out with its own configuration; "
                                   f"drop {', '.join(given)} (only --out and --leg-minutes go with it)")
        try:
            config = resume_config(out_dir)
        except (OSError, ValueError) as exc:
            raise click.BadParameter(str(exc), param_hint="--out") from None
        _run(config, out_dir, replay_dir=None, resume=True, leg_minutes=leg_minutes)
        return
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available to torch here", param_hint="--device")
    base = tiny_config() if tiny else gpu_config()
    changes: dict = {"device": device, "seed": seed, "models": ("nsa", "dense") if which == "both" else (which,),
                     "eval_depths": _parse_depths(eval_depths), "minutes": minutes, "eval_minutes": eval_minutes}
    for key, value in (("context", context), ("steps", steps), ("eval_samples", eval_samples),
                       ("eval_every", eval_every),
                       ("batch_size", batch_size), ("lr", lr), ("gate_lr_scale", gate_lr_scale),
                       ("gate_freeze", gate_freeze)):
        if value is not None:
            changes[key] = value
    if hold_loss is not None:
        changes["hold_loss"] = hold_loss or None
    if adjacent_rate is not None:
        changes["task"] = base.task.replace(adjacent_rate=adjacent_rate)
    if init_weights is not None:
        changes["init_weights"] = init_weights
    if sparse_warmup is not None:
        changes["sparse_warmup"] = sparse_warmup
    if selection_anneal is not None:
        changes["selection_anneal"] = _parse_fractions(selection_anneal)
    if eval_contexts is not None:
        changes["eval_contexts"] = _parse_ints(eval_contexts, "--eval-contexts")
    if eval_rope_scaling is not None:
        changes["eval_rope_scaling"] = tuple(m.strip() for m in eval_rope_scaling.split(",") if m.strip())
    target_context = changes.get("context", base.context)
    start = start_context if start_context is not None else base.start_context
    changes["start_context"] = None if start is None or start >= target_context else start
    if replay_dir is not None and which != "dense":
        raise click.BadParameter("--replay trains the dense twin: use it with --model dense", param_hint="--replay")
    try:
        config = base.replace(**changes)
        model_changes = {"backend": backend}
        if rope_theta is not None:
            model_changes["rope_theta"] = rope_theta
        config = config.replace(model=config.model.replace(**model_changes))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    _run(config, out_dir, replay_dir=replay_dir, resume=False, leg_minutes=leg_minutes)


def _run(config, out_dir: str, *, replay_dir: str | None, resume: bool, leg_minutes: float | None) -> None:
    """Train with live progress, then print the summary table and the goals."""
    from rich.console import Console
    from rich.table import Table

    from nsa.models.train import run_training

    console = Console()
    minutes = config.minutes
    console.print(f"[bold]nsa train[/bold]{' --resume' if resume else ''}: models {', '.join(config.models)} "
                  f"on {config.device}, context {config.context} "
                  f"(warm-up from {config.start_context or config.context}), up to "
                  f"{config.steps} steps" + (f", {minutes:g} min per model" if minutes else "")
                  + (f", this leg {leg_minutes:g} min" if leg_minutes else "") + f"; outputs in {out_dir}")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # The bar only draws on a terminal; elsewhere (CI logs, remote runs) the periodic lines that
    # `report` prints are the progress.
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[loss]}"), TimeElapsedColumn(), console=console,
                  disable=not console.is_terminal) as bar:
        bars: dict[str, int] = {}

        def progress(name: str, step: int, total: int, row: dict) -> None:
            if name not in bars:
                bars[name] = bar.add_task(name, total=total, loss="")
            bar.update(bars[name], completed=step, total=total, loss=f"loss {row['loss']:.4f}")

        try:
            summary = run_training(config, Path(out_dir), progress=progress, replay_dir=replay_dir,
                                   resume=resume, leg_minutes=leg_minutes,
                                   # One line per report, never wrapped: logs are grepped.
                                   report=lambda line: console.print(line, markup=False, highlight=False,
                                                                     soft_wrap=True))
        except ValueError as exc:  # a checkpoint that cannot be resumed, a replay that does not match
            raise click.UsageError(str(exc)) from None

    table = Table(title="trainability")
    for column in ("model", "backend", "steps", "train s", "ms per step (median, p90)", "initial loss",
                   "final loss"):
        table.add_column(column)
    for name, info in summary["models"].items():
        table.add_row(name, info["backend"], str(info["steps"]), f"{info['train_seconds']:.0f}",
                      # Summaries written before 2026-12-05 (a replayed run's) have no step times.
                      f"{info.get('step_ms_median', math.nan):.1f}, {info.get('step_ms_p90', math.nan):.1f}",
                      f"{info['initial_loss']:.3f}", f"{info['final_loss']:.4f}")
    console.print(table)
    if summary["status"] == "paused":
        console.print(f"paused by --leg-minutes; continue with: nsa train --resume --out {out_dir}")
    goals = summary["goals"] or {}
    for key in sorted(goals):
        console.print(f"  {key}: {goals[key]}")
    console.print(f"wall time {summary['wall_seconds']:.0f} s; summary in {Path(out_dir) / 'summary.json'}")


@click.command("train-join")
@click.argument("nsa_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("dense_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Output directory for the joined log, plots and summary (and both weights files).")
def train_join(nsa_dir: str, dense_dir: str, out_dir: str) -> None:
    """Join an NSA run and a dense run trained side by side (one per GPU, same options, a fixed
    --steps) into one comparison at equal steps, after checking that they were twins: same
    settings, and the same learning rate and context at every step."""
    from rich.console import Console

    from nsa.models.twins import join_twin_runs

    try:
        summary = join_twin_runs(nsa_dir, dense_dir, out_dir)
    except (ValueError, FileNotFoundError) as exc:
        raise click.UsageError(str(exc)) from None
    console = Console()
    for key in sorted(summary["goals"]):
        console.print(f"  {key}: {summary['goals'][key]}", markup=False, highlight=False)
    console.print(f"joined into {Path(out_dir) / 'summary.json'}")


if __name__ == "__main__":  # `python -m cli.train_cmd ...` until `train` is in the `nsa` group
    train()
