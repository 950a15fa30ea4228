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


def test_decode_reads_check_catches_a_wrong_count():
    """The decode suite's read check passes exact counts and flags one token's extra read."""
    from nsa import NSAConfig
    from suites.decode import BRANCHES, check_reads, exact_reads
    from verify.registry import Checks

    config = NSAConfig(num_heads=2, num_kv_heads=1, head_dim=8, compress_block=8, compress_stride=4,
                       select_block=8, select_count=3, window=16)
    positions = torch.arange(70)
    reads = {b: torch.tensor([[exact_reads(config, int(p) + 1)[b]] * 2 for p in positions]) for b in BRANCHES}
    good = Checks()
    check_reads(config, reads, positions, good)
    assert not good.failures and good.metrics["reads_slc_mismatches"] == 0
    reads["slc"][50, 1] += 1
    bad = Checks()
    check_reads(config, reads, positions, bad)
    assert bad.metrics["reads_slc_mismatches"] == 1 and bad.failures
