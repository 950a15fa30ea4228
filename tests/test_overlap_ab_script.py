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
