"""Chains of `nsa train` runs, one chain ("lane") per GPU, carried on across device commands that
may each run only so long (issue 6: both twins through two training stages, 10-minute commands).

    python3 scripts/gpu/train_lanes.py PLAN.json --deadline-s 585 [--runs /tmp/nsa-train] [--out $OUT]

PLAN.json holds ``{"lanes": [[RUN, ...], ...]}``; lane i trains on GPU i, its runs in order. A RUN
is ``{"name": ..., "options": "nsa train options", "after": [names], "follows": name,
"train_s": seconds, "eval_s": seconds}`` (``follows``: a dense twin replaying that run, which
may still be paused: it replays as far as that run has logged, waits, and goes on after it has;
``train_s``, ``eval_s``: its expected training and final evaluation times);
``{runs}`` in the options stands for ``--runs``, where run NAME writes (``--out {runs}/NAME``:
outside the repository copy, which a later command replaces, so it lasts while the machine is held).

Every call does, in each lane, as much as fits before the deadline (seconds from the start):
a run whose ``summary.json`` says ``done`` is skipped; the others wait until every run in their
``after`` is done (and a follower until its leader has logged more steps); a run with a
checkpoint or a paused summary goes on with ``nsa train --resume``, any other starts; each gets
``--leg-minutes`` for the time left less a start-up margin and, when it is expected to finish in
this call, its ``eval_s`` (:func:`leg_seconds`); none is begun with under a minute of training
left. A run stopped that way is paused and resumes in the next call; console logs go to
``{runs}/NAME.log``. At the end ``--out`` gets what fits the device tool's return
(:func:`write_outputs`: one archive of tables, plots, summaries and logs, and the weights files),
and a status line per run is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

START_MARGIN_S = 45  # process start, CUDA context, the first steps' autotuning
MIN_LEG_S = 60
END_BUFFER_S = 90


def read_summary(run_dir: Path) -> dict:
    """The run's ``summary.json`` (``{}`` before its first leg has ended)."""
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def run_status(run_dir: Path) -> str:
    """``done``, ``paused`` (a summary or checkpoint to resume from) or ``new``."""
    summary = read_summary(run_dir)
    if summary.get("status") == "done":
        return "done"
    if summary or any((run_dir / "checkpoints").glob("*.pt")):
        return "paused"
    return "new"


def trained_seconds(run_dir: Path) -> float:
    """Training seconds of the paused model of an earlier leg (0 for a run not begun)."""
    models = read_summary(run_dir).get("models", {}).values()
    return sum(info.get("train_seconds", 0.0) for info in models if info.get("paused"))


def leg_seconds(run: dict, run_dir: Path, left_s: float) -> float:
    """This leg's training time. A run expected to finish in it (``train_s`` in the plan: its
    total training seconds, estimated) keeps ``eval_s`` for its final evaluation; one that cannot
    trains to the deadline, but stops ``END_BUFFER_S`` short of its expected end, so that a
    misestimate never starts an evaluation the deadline would cut (the next call finishes it)."""
    usable = left_s - START_MARGIN_S
    remaining = run.get("train_s", float("inf")) - trained_seconds(run_dir)
    if remaining + run.get("eval_s", 60) <= usable:
        return usable - run.get("eval_s", 60)
    return min(usable, remaining - END_BUFFER_S)


def own_steps(run_dir: Path) -> int:
    """Steps the run's own model (the last of its configured models) has logged; 0 before any."""
    summary = read_summary(run_dir)
    if not summary:
        return 0
    return summary["models"].get(summary["config"]["models"][-1], {}).get("steps", 0)


def ready(run: dict, runs: Path) -> bool:
    """Every run in ``after`` is done, and the run it ``follows`` (if any) has logged steps this
    one has not replayed yet, or is done."""
    if any(run_status(runs / other) != "done" for other in run.get("after", [])):
        return False
    leader = run.get("follows")
    if leader is None:
        return True
    return run_status(runs / leader) == "done" or own_steps(runs / leader) > own_steps(runs / run["name"])


def run_lane(gpu: int, lane: list[dict], runs: Path, deadline: float) -> None:
    for run in lane:
        run_dir = runs / run["name"]
        while run_status(run_dir) != "done":
            while not ready(run, runs):
                if time.monotonic() > deadline:
                    return
                time.sleep(5)
            leg_s = leg_seconds(run, run_dir, deadline - time.monotonic())
            if leg_s < MIN_LEG_S:
                return
            before = own_steps(run_dir)
            if run_status(run_dir) == "paused":
                options = ["--resume", "--out", str(run_dir)]
            else:
                options = shlex.split(run["options"].replace("{runs}", str(runs))) + ["--out", str(run_dir)]
            command = [sys.executable, "-m", "cli.main", "train", *options,
                       "--leg-minutes", f"{leg_s / 60:.2f}"]
            with open(runs / f"{run['name']}.log", "a") as log:
                log.write(f"\n$ CUDA_VISIBLE_DEVICES={gpu} {shlex.join(command)}\n")
                log.flush()
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
                # The leg limit stops training in time; the timeout only guards against a hang (a
                # killed run resumes from its last checkpoint).
                try:
                    subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False,
                                   timeout=max(1.0, deadline - time.monotonic() + 30))
                except subprocess.TimeoutExpired:
                    log.write("\n(killed at the deadline)\n")
            if run_status(run_dir) != "done" and ("follows" not in run or own_steps(run_dir) == before):
                # Paused by the deadline, or failed (its log says why); a follower that made
                # progress instead waits for its leader to go on.
                return


def write_outputs(runs: Path, names: list[str], out: Path) -> None:
    """What comes back through the device tool (at most 8 files of 16 MiB): ``lanes.tgz`` with
    every run's directory but its checkpoints and weights, and its console log ``NAME.log``; and
    each finished model's weights as ``NAME-weights_<model>.pt`` (a few MB each)."""
    def small(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        return None if "/checkpoints" in info.name or info.name.endswith(".pt") else info

    with tarfile.open(out / "lanes.tgz", "w:gz") as archive:
        for name in names:
            for path in (runs / name, runs / f"{name}.log"):
                if path.exists():
                    archive.add(path, arcname=path.name, filter=small)
    for name in names:
        for weights in sorted((runs / name).glob("weights_*.pt")):
            shutil.copy2(weights, out / f"{name}-{weights.name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("plan", type=Path)
    parser.add_argument("--deadline-s", type=float, required=True)
    parser.add_argument("--runs", type=Path, default=Path("/tmp/nsa-train"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "reports/train-logs")))
    args = parser.parse_args()
    deadline = time.monotonic() + args.deadline_s
    lanes = json.loads(args.plan.read_text())["lanes"]
    names = [run["name"] for lane in lanes for run in lane]
    named = {a for lane in lanes for run in lane for a in [*run.get("after", []), run.get("follows")]}
    unknown = named - set(names) - {None}
    if len(set(names)) != len(names) or unknown:
        raise SystemExit(f"{args.plan}: run names must be unique and 'after' must name runs of the plan "
                         f"(unknown: {sorted(unknown)})")
    import torch

    gpus = torch.cuda.device_count()
    if gpus and len(lanes) > gpus:  # (no GPU at all: the runs are CPU runs, e.g. the tests')
        raise SystemExit(f"{args.plan}: {len(lanes)} lanes need {len(lanes)} GPUs, this host has {gpus}")
    args.runs.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    threads = [threading.Thread(target=run_lane, args=(gpu, lane, args.runs, deadline))
               for gpu, lane in enumerate(lanes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    write_outputs(args.runs, names, args.out)
    for name in names:
        run_dir = args.runs / name
        models = read_summary(run_dir).get("models", {})
        steps = ", ".join(f"{m} {info.get('steps')} steps, loss {info.get('final_loss', math.nan):.4f}"
                          for m, info in models.items())
        print(f"{name}: {run_status(run_dir)} {steps}")


if __name__ == "__main__":
    main()
