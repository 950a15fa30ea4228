"""`nsa verify` stopped with SIGTERM (how CI systems stop jobs) writes what finished and exits 130."""

import signal
import subprocess
import sys
import time

import pytest

SCRIPT = r"""
import sys, time
from verify.registry import Suite, register

def cases(scale):
    for i in range(40):
        yield f"slow-{i}", {"i": i}

def check(params, checks):
    time.sleep(0.5)
    checks.at_most("err", 0.0, 1.0)

register(Suite("demo-sigterm", "sleeps", cases, check))
from cli.main import nsa
nsa(["verify", "demo-sigterm", "--out", sys.argv[1]], prog_name="nsa")
"""


@pytest.mark.xdist_group("ray")
def test_sigterm_writes_finished_cases_and_exits_130(tmp_path):
    out = tmp_path / "reports"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    # Wait until the run has written partial results (cases are running), then stop it.
    while time.monotonic() < deadline and not list(out.glob("run=*/results.parquet")):
        if proc.poll() is not None:
            pytest.fail(f"verify exited early: {proc.stdout.read()}")
        time.sleep(0.5)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    assert "interrupted" in output
    from verify.store import read_run

    stored = read_run(out)
    assert stored.info["interrupted"]
    assert 0 < len(stored.rows) < 40
    assert {row.status for row in stored.rows} == {"pass"}
