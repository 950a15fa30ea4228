"""Joining an NSA run and its dense twin trained side by side, one process per GPU, into one
comparison at equal steps.

``nsa train --model dense --replay DIR`` trains the twin after NSA has finished, because NSA's
schedule can depend on its own losses (the context warm-up's ``advance_loss`` and ``hold_loss``).
A run with a fixed schedule (a fixed ``steps``, no ``minutes``, and either one context or a
warm-up that moved by step count only) needs no replay: both models can train at once with the
same configuration, NSA on one GPU and the dense twin on another, and are joined afterwards. The
join proves they were twins instead of assuming it: same training configuration, same number of
steps, and the same learning rate and context at every step (the batches then match too: they
are drawn from the configuration's seed, one per step at the step's context).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from nsa.models.train import (
    LOG_BASE_COLUMNS,
    ModelRun,
    _write_json,
    goals,
    load_model_run,
    plot_loss,
    plot_retrieval,
    resume_config,
    weights_path,
    write_table,
)

# Settings that may differ between the twins' commands: which model each trained, how (and for
# how long) each was evaluated (the periodic checks draw from their own generator), how often it
# wrote a checkpoint, and which earlier run each started from (a second stage starts each twin
# from its own first stage; checked separately).
PER_MODEL_KEYS = frozenset({"models", "eval_minutes", "eval_samples", "eval_contexts", "eval_depths",
                            "eval_rope_scaling", "eval_batch_size", "eval_every", "checkpoint_every",
                            "init_weights"})


def join_twin_runs(nsa_dir: Path | str, dense_dir: Path | str, out_dir: Path | str) -> dict[str, Any]:
    """Write one comparison of the NSA run in ``nsa_dir`` and the dense run in ``dense_dir``
    (``train_log.parquet`` and ``retrieval.parquet`` of both, ``loss.png``, the retrieval plots and
    ``summary.json`` with the goals at equal steps) to ``out_dir``, and return the summary.

    Raises ``ValueError`` naming what differs when the two were not trained as twins: a training
    setting, the step count, the learning rate or context of a step, or (for second stages)
    starting points that are not a dense twin's replay of NSA's.
    """
    nsa_dir, dense_dir, out_dir = Path(nsa_dir), Path(dense_dir), Path(out_dir)
    nsa_config, dense_config = resume_config(nsa_dir).to_dict(), resume_config(dense_dir).to_dict()
    differing = [f"{key}: {nsa_config.get(key)!r} vs {dense_config.get(key)!r}"
                 for key in sorted((nsa_config.keys() | dense_config.keys()) - PER_MODEL_KEYS)
                 if nsa_config.get(key) != dense_config.get(key)]
    if differing:
        raise ValueError(f"nsa_dir {nsa_dir} and dense_dir {dense_dir} were trained with different settings "
                         f"({'; '.join(differing)}): they are not twins")
    if nsa_config["minutes"] is not None:
        raise ValueError(f"nsa_dir {nsa_dir} was trained with minutes={nsa_config['minutes']}: each model's "
                         f"schedule was fitted to its own speed, so side-by-side twins need a fixed --steps "
                         f"(or train the dense twin afterwards with --replay)")
    sources = {"nsa": nsa_dir, "dense": dense_dir}
    earlier = {name: json.loads((source / "summary.json").read_text()) for name, source in sources.items()}
    _check_starting_points(nsa_config.get("init_weights"), dense_config.get("init_weights"), earlier["dense"])
    runs = {"nsa": load_model_run(nsa_dir, "nsa"), "dense": load_model_run(dense_dir, "dense")}
    _check_same_schedule(runs["nsa"], runs["dense"])

    began = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_table([r for run in runs.values() for r in run.rows], out_dir / "train_log.parquet",
                LOG_BASE_COLUMNS)
    write_table([r for run in runs.values() for r in run.eval_rows], out_dir / "retrieval.parquet",
                ("model", "task", "context", "depth", "status"))
    for name, run in runs.items():
        plot_retrieval(run, out_dir / f"retrieval_{name}.png")
    plot_loss(runs, out_dir / "loss.png")
    configs = {"nsa": nsa_config, "dense": dense_config}
    models = {name: {**earlier[name]["models"][name], "joined_from": str(sources[name]),
                     "init_weights": configs[name].get("init_weights")} for name in runs}
    for name, source in sources.items():  # so that the joined directory can start a next stage
        if weights_path(source, name).is_file():
            shutil.copy2(weights_path(source, name), weights_path(out_dir, name))
    summary = {"config": {**nsa_config, "models": ["nsa", "dense"]}, "device": earlier["nsa"].get("device"),
               "torch_version": earlier["nsa"].get("torch_version"), "models": models, "status": "done",
               "joined": True, "goals": goals(runs), "wall_seconds": time.perf_counter() - began}
    _write_json(summary, out_dir / "summary.json")
    return summary


def _check_same_schedule(nsa: ModelRun, dense: ModelRun) -> None:
    if nsa.steps != dense.steps:
        raise ValueError(f"the NSA run took {nsa.steps} steps and the dense run {dense.steps}: "
                         f"not the same schedule")
    for a, b in zip(nsa.rows, dense.rows):
        if (a["step"], a["lr"], a["context"]) != (b["step"], b["lr"], b["context"]):
            raise ValueError(f"the runs' schedules differ at step {a['step']}: NSA lr {a['lr']!r} context "
                             f"{a['context']}, dense step {b['step']} lr {b['lr']!r} context {b['context']} "
                             f"(a schedule that moved on the loss needs --replay)")


def _check_starting_points(nsa_init: str | None, dense_init: str | None,
                           dense_summary: dict[str, Any]) -> None:
    """Twins start from twins: both fresh (the dense twin copies NSA's initial draw), one directory
    holding both models' weights, or a dense run whose first stage replayed the NSA run that NSA
    starts from (its directory, or a weights file in it such as an archived
    ``nsa-weights-bf16.pt``). The replay is recorded by ``run_training`` as
    ``init_weights_replayed_from``, so the check needs neither directory to be at hand."""
    if nsa_init == dense_init:
        return
    replayed = dense_summary.get("init_weights_replayed_from")
    if nsa_init is not None and replayed is not None:
        source = os.path.dirname(nsa_init) if nsa_init.endswith(".pt") else nsa_init
        if os.path.normpath(replayed) == os.path.normpath(source):
            return
    raise ValueError(f"init_weights differ: NSA starts from {nsa_init!r}, the dense twin from "
                     f"{dense_init!r}, whose run "
                     f"{'replayed ' + repr(replayed) if replayed else 'replayed no NSA run'}: "
                     f"twins start fresh or from the two models of one earlier pair")
