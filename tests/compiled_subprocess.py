"""Run Python code in a fresh interpreter without ``TRITON_INTERPRET``: for the tests that compile
kernels for an NVIDIA target (Triton's bundled ptxas), which the test process, interpreting its
kernels, cannot do."""

import pytest

from nsa.ops.offline_compile import run_compiling


def run_compiled(code: str, timeout: int = 600) -> str:
    """``code``'s standard output; fails the test with its output when it exits non-zero."""
    try:
        return run_compiling(code, timeout)
    except RuntimeError as exc:
        pytest.fail(str(exc))
