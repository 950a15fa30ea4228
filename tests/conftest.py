"""Test-session setup.

Without CUDA, Triton kernels run through Triton's CPU interpreter. Triton reads
``TRITON_INTERPRET`` when a kernel is defined, so it is set here, before any test module imports
``nsa.ops.*.triton``. ``backend="auto"`` still picks the reference for CPU tensors; only tests that
ask for ``backend="triton"`` (or call kernels directly) run the interpreter.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist runs one worker per core; one intra-op thread per worker avoids oversubscription.
torch.set_num_threads(1)
