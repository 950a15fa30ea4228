"""The `nsa` group exposes every command, and each loads and prints its help."""

import pytest
from click.testing import CliRunner

from cli.main import nsa


@pytest.mark.parametrize("command", ["verify", "report", "bench", "train"])
def test_command_is_listed_and_loads(command):
    runner = CliRunner()
    listed = runner.invoke(nsa, ["--help"])
    assert listed.exit_code == 0 and command in listed.output
    result = runner.invoke(nsa, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_bench_without_cuda_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this checks the message on machines without CUDA")
    result = CliRunner().invoke(nsa, ["bench", "--seq-lens", "1024", "--no-peer"])
    assert result.exit_code != 0 and "CUDA" in result.output


def test_bench_rejects_malformed_head_dims():
    result = CliRunner().invoke(nsa, ["bench", "--head-dims", "128x128"])
    assert result.exit_code == 2 and "--head-dims" in result.output and "128/128" in result.output
