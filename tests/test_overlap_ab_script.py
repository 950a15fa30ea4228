"""scripts/gpu/overlap_ab.py in its CPU smoke mode (interpreter): the backward schedules' plumbing,
and every schedule's gradients equal to the one-stream schedule's."""

import json

from nsa.ops.triton_nsa import BACKWARD_SCHEDULES


def test_schedules_run_and_agree(tmp_path, run_gpu_script):
    out = tmp_path / "overlap.json"
    done = run_gpu_script("overlap_ab.py", "--smoke", "--heads", "8/2", "--parts", "schedules", "--out", str(out))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["schedule"] for r in rows] == list(BACKWARD_SCHEDULES)
    # On CPU the side stream's passes run in line; the dq adds differ only in order (exact in fp32).
    assert all(r["max_rel_diff_vs_one_stream"] <= 1e-6 for r in rows), rows


def test_pairs_filter_runs_only_the_named_pairs(tmp_path, run_gpu_script):
    out = tmp_path / "pairs.json"
    done = run_gpu_script("overlap_ab.py", "--smoke", "--heads", "8/2", "--parts", "pairs",
                          "--pairs", "cmp-fwd|sel-fwd,scoring|sel-fwd", "--no-pinned", "--out", str(out))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert [r["pair"] for r in json.loads(out.read_text())] == ["cmp-fwd | sel-fwd", "scoring | sel-fwd"]


def test_unknown_pair_is_named(run_gpu_script):
    done = run_gpu_script("overlap_ab.py", "--smoke", "--parts", "pairs", "--pairs", "cmp-fwd|nope")
    assert done.returncode != 0
    assert "--pairs: unknown pair(s) ['cmp-fwd|nope']" in done.stderr and "scoring|sel-fwd" in done.stderr
