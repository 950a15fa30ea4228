"""scripts/gpu/overlap_ab.py in its CPU smoke mode (interpreter): the backward schedules' plumbing,
and every schedule's gradients equal to the one-stream schedule's."""

import json
import subprocess
import sys
from pathlib import Path

from nsa.ops.triton_nsa import BACKWARD_SCHEDULES


def test_schedules_run_and_agree(tmp_path):
    out = tmp_path / "overlap.json"
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu" / "overlap_ab.py"
    command = [sys.executable, "-W", "ignore", str(script), "--smoke", "--heads", "8/2", "--parts", "schedules",
               "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["schedule"] for r in rows] == list(BACKWARD_SCHEDULES)
    # On CPU the side stream's passes run in line; the dq adds differ only in order (exact in fp32).
    assert all(r["max_rel_diff_vs_one_stream"] <= 1e-6 for r in rows), rows
