"""scripts/gpu/run_cases.py (suite cases in one process, without Ray) on CPU: a passing case
is reported and written as JSON with exit 0; a pattern that matches nothing is an error."""

import json


def test_runs_a_ci_case_and_writes_json(tmp_path, run_gpu_script):
    out = tmp_path / "cases.json"
    done = run_gpu_script("run_cases.py", "parity", "--scale", "ci", "--case", "parity::T67-*", "--out", str(out))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [r["case"] for r in rows] == ["parity::T67-G2-d32x16"] and rows[0]["status"] == "pass"
    assert rows[0]["metrics"]["dq_rel_rms"] < 1e-5
    assert done.stdout.startswith("pass  parity::T67-G2-d32x16")


def test_a_pattern_matching_no_case_is_an_error(run_gpu_script):
    done = run_gpu_script("run_cases.py", "parity", "--scale", "ci", "--case", "parity::nothing-*")
    assert done.returncode == 2 and "matches no ci-scale case" in done.stderr
    assert "Traceback" not in done.stderr
