"""Every suite's ``ci`` cases run under pytest too (so ``make test`` covers them)."""

import pytest
import torch

from verify.registry import all_suites

CASES = [case for s in all_suites().values() for case in s.cases("ci")]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_suite_case(case):
    if case.needs_gpu and not torch.cuda.is_available():
        pytest.skip(f"{case.name} needs CUDA")
    result = all_suites()[case.suite].run(case)
    assert result.status == "pass", f"{case.name}: {result.status}: {result.message}"
