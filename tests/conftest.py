"""Test-session setup.

Without CUDA, Triton kernels run through Triton's CPU interpreter. Triton reads
``TRITON_INTERPRET`` when a kernel is defined, so it is set here, before any test module imports
``nsa.ops.*.triton``. ``backend="auto"`` still picks the reference for CPU tensors; only tests that
ask for ``backend="triton"`` (or call kernels directly) run the interpreter.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist runs one worker per core; one intra-op thread per worker avoids oversubscription.
torch.set_num_threads(1)


@pytest.fixture
def run_gpu_script():
    """Runs ``scripts/gpu/<name>`` with ``args`` in a fresh interpreter (warnings off), as its CPU
    smoke tests do; returns the ``CompletedProcess`` (stdout and stderr as text)."""
    scripts = Path(__file__).resolve().parents[1] / "scripts" / "gpu"

    def run(name: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-W", "ignore", str(scripts / name), *args], capture_output=True,
                              text=True, timeout=600, check=False)
    return run
