"""scripts/gpu/run_cases.py (suite cases in one process, without Ray) on CPU: a passing case
is reported and written as JSON with exit 0; a pattern that matches nothing is an error."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu" / "run_cases.py"


def _run(*args):
    return subprocess.run([sys.executable, "-W", "ignore", str(SCRIPT), *args], capture_output=True,
                          text=True, timeout=600, check=False)


def test_runs_a_ci_case_and_writes_json(tmp_path):
    out = tmp_path / "cases.json"
    done = _run("parity", "--scale", "ci", "--case", "parity::T67-*", "--out", str(out))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [r["case"] for r in rows] == ["parity::T67-G2-d32x16"] and rows[0]["status"] == "pass"
    assert rows[0]["metrics"]["dq_rel_rms"] < 1e-5
    assert done.stdout.startswith("pass  parity::T67-G2-d32x16")


def test_a_pattern_matching_no_case_is_an_error():
    done = _run("parity", "--scale", "ci", "--case", "parity::nothing-*")
    assert done.returncode == 2 and "matches no ci-scale case" in done.stderr
    assert "Traceback" not in done.stderr
