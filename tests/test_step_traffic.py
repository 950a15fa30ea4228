"""scripts/studies/step_traffic.py counts the PyTorch ops of a training step, by issuing line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "studies" / "step_traffic.py"


def traffic(tmp_path, *options) -> dict:
    out = tmp_path / "traffic.json"
    command = [sys.executable, "-W", "ignore", str(SCRIPT), "--model", "dense", "--seq-len", "64",
               "--out", str(out), *options]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("rotary_kernel", [False, True])
def test_rope_traffic_moves_into_the_kernel(tmp_path, rotary_kernel):
    result = traffic(tmp_path, *(["--rotary-kernel"] if rotary_kernel else []))
    forward_ops = {name for name, *_ in result["forward"]["ops"]}
    rope_lines = {name for name in forward_ops if "nsa/ops/rotary/naive.py" in name}
    assert result["forward"]["total_mb"] > 0 and result["backward"]["total_mb"] > 0
    # The MLP's matmul is counted and located; views are not counted at all.
    assert any(name.startswith("mm @ nsa/models/lm.py") for name in forward_ops)
    assert not any(name.startswith(("view ", "transpose ")) for name in forward_ops)
    if rotary_kernel:
        assert not rope_lines and result["rotary_kernel_mb"] > 0
    else:
        assert rope_lines and result["rotary_kernel_mb"] == 0
