"""Run Python code in a fresh interpreter without ``TRITON_INTERPRET``: for the tests that compile
kernels for an NVIDIA target (Triton's bundled ptxas), which the test process, interpreting its
kernels, cannot do."""

import os
import subprocess
import sys


def run_compiled(code: str, timeout: int = 600) -> str:
    """``code``'s standard output; fails the test with its output when it exits non-zero."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    return done.stdout
