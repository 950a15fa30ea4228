"""scripts/gpu/train_lanes.py: chains of `nsa train` runs per GPU, carried across commands (on
the CPU with the `--tiny` model, margins scaled down to its seconds)."""

import importlib.util
import json
import sys
import tarfile
from pathlib import Path

import pytest

from nsa.models.train import read_table
from nsa.models.twins import join_twin_runs

ROOT = Path(__file__).resolve().parents[1]
TINY = "--tiny --device cpu --eval-contexts 64 --eval-samples 2 --eval-depths 50"


@pytest.fixture
def lanes(monkeypatch):
    spec = importlib.util.spec_from_file_location("train_lanes", ROOT / "scripts" / "gpu" / "train_lanes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "START_MARGIN_S", 1)
    monkeypatch.setattr(module, "MIN_LEG_S", 1)
    monkeypatch.setattr(module, "END_BUFFER_S", 0)
    monkeypatch.chdir(ROOT)  # the runs are `python -m cli.main train`
    return module


def _call(lanes, plan: dict, tmp_path: Path, deadline_s: float) -> None:
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    argv = ["train_lanes.py", str(tmp_path / "plan.json"), "--deadline-s", str(deadline_s),
            "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    old, sys.argv = sys.argv, argv
    try:
        lanes.main()
    finally:
        sys.argv = old


def test_leg_seconds_keeps_evaluation_time_only_for_a_run_that_can_finish(lanes, tmp_path):
    run = {"train_s": 100, "eval_s": 20}
    assert lanes.leg_seconds(run, tmp_path / "new", left_s=200) == 200 - 1 - 20  # finishes and evaluates
    assert lanes.leg_seconds(run, tmp_path / "new", left_s=50) == 50 - 1  # pauses: no evaluation reserved
    assert lanes.leg_seconds({}, tmp_path / "new", left_s=50) == 49  # no estimate: train to the deadline
    assert lanes.run_status(tmp_path / "new") == "new"


def test_two_stage_twin_plan_runs_to_the_end_and_joins(lanes, tmp_path):
    """Lane 0: NSA stage 1 then stage 2; lane 1: the dense twin following stage 1, then its own
    stage 2 after it. One call with time enough runs everything; the twins' second stages join."""
    stage2 = f"{TINY} --start-context 64 --adjacent-rate 0.1 --seed 1 --steps 8"
    plan = {"lanes": [
        [{"name": "s1-nsa", "options": f"{TINY} --model nsa --steps 24", "train_s": 5, "eval_s": 5},
         {"name": "s2-nsa", "after": ["s1-nsa"], "train_s": 5, "eval_s": 5,
          "options": f"{stage2} --model nsa --init-weights {{runs}}/s1-nsa"}],
        [{"name": "s1-dense", "follows": "s1-nsa", "train_s": 5, "eval_s": 5,
          "options": f"{TINY} --model dense --replay {{runs}}/s1-nsa"},
         {"name": "s2-dense", "after": ["s1-dense"], "train_s": 5, "eval_s": 5,
          "options": f"{stage2} --model dense --init-weights {{runs}}/s1-dense"}],
    ]}
    _call(lanes, plan, tmp_path, deadline_s=240)
    runs = tmp_path / "runs"
    assert {name: lanes.run_status(runs / name) for name in ("s1-nsa", "s2-nsa", "s1-dense", "s2-dense")} == \
        dict.fromkeys(("s1-nsa", "s2-nsa", "s1-dense", "s2-dense"), "done")
    log = read_table(runs / "s1-dense" / "train_log.parquet")
    by_model = {m: [(r["lr"], r["context"]) for r in log if r["model"] == m] for m in ("nsa", "dense")}
    assert len(by_model["dense"]) == 24 and by_model["dense"] == by_model["nsa"]
    # What comes back: one archive without checkpoints or weights, and each model's weights file.
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["lanes.tgz", "s1-dense-weights_dense.pt",
                                                     "s1-nsa-weights_nsa.pt", "s2-dense-weights_dense.pt",
                                                     "s2-nsa-weights_nsa.pt"]
    with tarfile.open(out / "lanes.tgz") as archive:
        members = archive.getnames()
        archive.extractall(tmp_path / "back", filter="data")
    assert "s2-dense/summary.json" in members and "s1-dense.log" in members
    assert not any("checkpoints" in m or m.endswith(".pt") for m in members)
    assert "--replay" in (tmp_path / "back" / "s1-dense.log").read_text()
    back = tmp_path / "back"
    summary = join_twin_runs(back / "s2-nsa", back / "s2-dense", tmp_path / "joined")
    assert summary["goals"]["equal_steps"] == 8
    # A second call finds everything done and starts nothing.
    _call(lanes, plan, tmp_path, deadline_s=5)
    assert (runs / "s2-nsa.log").read_text().count("$ CUDA_VISIBLE_DEVICES") == 1


def test_a_plan_naming_unknown_runs_is_refused(lanes, tmp_path):
    plan = {"lanes": [[{"name": "a", "options": TINY}], [{"name": "b", "follows": "c", "options": TINY}]]}
    with pytest.raises(SystemExit, match="unknown: \\['c'\\]"):
        _call(lanes, plan, tmp_path, deadline_s=5)


def test_a_failing_follower_is_not_retried_without_progress(lanes, tmp_path):
    """A twin whose command fails (here: it replays a run of another seed) is tried once, not
    again and again until the deadline."""
    plan = {"lanes": [
        [{"name": "nsa", "options": f"{TINY} --model nsa --steps 6", "train_s": 5, "eval_s": 5}],
        [{"name": "twin", "follows": "nsa", "train_s": 5, "eval_s": 5,
          "options": f"{TINY} --model dense --seed 3 --replay {{runs}}/nsa"}],
    ]}
    _call(lanes, plan, tmp_path, deadline_s=60)
    log = (tmp_path / "runs" / "twin.log").read_text()
    assert log.count("$ CUDA_VISIBLE_DEVICES") == 1 and "seed" in log
    assert lanes.run_status(tmp_path / "runs" / "twin") == "new"


PLANS = sorted((ROOT / "scripts" / "gpu" / "plans").glob("*.json"))


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.name)
def test_every_gpu_plan_names_its_runs_and_parses_as_nsa_train_options(plan, tmp_path, monkeypatch):
    """A plan is spent on GPU minutes: its runs' names are unique, its dependencies name runs of
    the plan, and every run's options are ones `nsa train` accepts, files they start from
    included (parsed, not run; the plan's own runs stand in as empty folders)."""
    import shlex

    from cli.train_cmd import train

    monkeypatch.chdir(ROOT)  # the plans name archived weights relative to the repository
    lanes = json.loads(plan.read_text())["lanes"]
    runs = [run for lane in lanes for run in lane]
    names = [run["name"] for run in runs]
    assert len(set(names)) == len(names)
    for name in names:
        (tmp_path / name).mkdir()
    for run in runs:
        assert set(run.get("after", [])) | {run.get("follows")} - {None} <= set(names)
        options = run["options"].replace("{runs}", str(tmp_path))
        context = train.make_context("train", shlex.split(options))
        assert context.params["which"] in ("nsa", "dense")
