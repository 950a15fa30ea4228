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


@pytest.fixture
def autotune_relaunches(monkeypatch):
    """Every autotuned launch runs twice under the interpreter, the tensors the launch names as
    changed in place put back in between, as autotuning's timed launches do on a GPU: a kernel
    that changes memory in place without naming it then goes wrong here too (the interpreter
    otherwise launches one config once, so such an error showed on the GPU only). Returns the
    ``data_ptr()`` of every tensor put back."""
    from nsa.ops import triton_common

    group_call = triton_common.GroupTunedKernel.__call__
    size_launch = triton_common.SizeTunedKernel.launch
    restored_pointers = []

    def twice(kernel, args, names, launch):
        named = dict(zip(kernel.arg_names, args))
        restored = {name: named[name].clone() for name in names if torch.is_tensor(named.get(name))}
        launch()
        for name, value in restored.items():
            named[name].copy_(value)
            restored_pointers.append(named[name].data_ptr())
        launch()

    def group_twice(self, grid, *args, **kwargs):
        twice(self.kernel, args, kwargs.get("restore", ()), lambda: group_call(self, grid, *args, **kwargs))

    def size_twice(self, seq_len, grid, args, *rest, **kwargs):
        twice(self.kernel, args, kwargs.get("restore", ()),
              lambda: size_launch(self, seq_len, grid, args, *rest, **kwargs))

    monkeypatch.setattr(triton_common.GroupTunedKernel, "__call__", group_twice)
    monkeypatch.setattr(triton_common.SizeTunedKernel, "launch", size_twice)
    return restored_pointers
