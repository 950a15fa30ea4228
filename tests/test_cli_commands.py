"""The `nsa` group exposes every command, and each loads and prints its help."""

import pytest
from click.testing import CliRunner

from cli.main import nsa


@pytest.mark.parametrize("command", ["verify", "report", "bench", "train", "train-join"])
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


def test_bench_decode_writes_rows_json_and_the_kernel_breakdown(tmp_path, monkeypatch):
    """`nsa bench decode` on a pretend GPU (the measurement faked): the Parquet table, --json-out
    and the per-kernel breakdown of the NSA rows."""
    import json

    import torch

    from nsa.bench import decode
    from nsa.bench.decode import DecodeRow

    rows = [DecodeRow("nsa-triton", 65536, 32, 128, 128, us=142.5, bytes_read=369_000_000, gbps=2590.0,
                      copy_fraction=0.61, speedup_vs_dense=6.64, cuda_graph=True,
                      kernels_us="_range_kernel 82.2, _select_kernel 35.5"),
            DecodeRow("sdpa-cudnn", 65536, 32, 128, 128, us=945.8, bytes_read=4_295_000_000, cuda_graph=True)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Pretend GPU")
    monkeypatch.setattr(decode, "measure", lambda *a, **k: (rows, 4244.0))
    out = tmp_path / "rows.json"
    result = CliRunner().invoke(nsa, ["bench", "decode", "--contexts", "65536", "--batches", "32",
                                      "--head-dims", "128/128", "--out", str(tmp_path), "--json-out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    records = json.loads(out.read_text())
    assert [r["impl"] for r in records] == ["nsa-triton", "sdpa-cudnn"] and records[0]["copy_gbps"] == 4244.0
    assert "_range_kernel 82.2" in result.output and list(tmp_path.glob("bench/run=*/decode.parquet"))


@pytest.mark.parametrize("heads,why", [("64x4", "expected HQ/HK"), ("64/5", "multiple of HK"),
                                       ("4/8", "multiple"), ("8/0", "multiple")])
def test_bench_rejects_a_bad_head_layout(heads, why):
    result = CliRunner().invoke(nsa, ["bench", "--heads", heads])
    assert result.exit_code == 2 and "--heads" in result.output and why in result.output


def test_bench_prefill_benchmarks_the_head_layout_asked_for(tmp_path, monkeypatch):
    """`nsa bench --heads 16/4` on a pretend GPU (the measurements faked): every row builder gets
    the layout, and the rows and the table say which it was."""
    import json

    import torch

    from nsa.bench import prefill
    from nsa.bench.prefill import BenchRow

    calls = []

    def fake(impl):
        def build(seq_len, head_dim, v_head_dim, *args, num_heads, num_kv_heads, **kwargs):
            calls.append((impl, num_heads, num_kv_heads))
            row = BenchRow(impl, seq_len, head_dim, v_head_dim, num_heads, num_kv_heads, fwd_ms=2.0,
                           bwd_ms=4.0)
            return [row] if impl != "nsa-triton" else row
        return build

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Pretend GPU")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(prefill, "dense_rows", fake("sdpa-cudnn"))
    monkeypatch.setattr(prefill, "nsa_row", fake("nsa-triton"))
    monkeypatch.setattr(prefill, "nsa_branch_rows", fake("nsa-branch-selection"))
    out = tmp_path / "rows.json"
    result = CliRunner().invoke(nsa, ["bench", "--seq-lens", "8192", "--head-dims", "128/128",
                                      "--heads", "16/4", "--no-peer", "--out", str(tmp_path),
                                      "--json-out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert sorted(calls) == [("nsa-branch-selection", 16, 4), ("nsa-triton", 16, 4), ("sdpa-cudnn", 16, 4)]
    records = json.loads(out.read_text())
    assert {(r["num_heads"], r["num_kv_heads"]) for r in records} == {(16, 4)}
    assert "HQ=16 HK=4" in result.output


def test_bench_repeats_pairs_ratios_within_each_round_and_summarises_them(tmp_path, monkeypatch):
    """`nsa bench --repeats 3` on a pretend GPU: each round's NSA row is divided by that round's
    baseline (not another round's), the breakdown runs once, and the summary gives the median and
    range of each ratio."""
    import json

    import torch

    from nsa.bench import prefill
    from nsa.bench.prefill import BenchRow

    rounds = {"sdpa-cudnn": iter([(100.0, 300.0), (120.0, 330.0), (110.0, 320.0)]),
              "nsa-triton": iter([(40.0, 60.0), (40.0, 66.0), (44.0, 64.0)])}
    breakdowns = []

    def timed(impl, seq_len, head_dim, v_head_dim, layout):
        fwd, bwd = next(rounds[impl])
        return BenchRow(impl, seq_len, head_dim, v_head_dim, **layout, fwd_ms=fwd, bwd_ms=bwd)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Pretend GPU")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(prefill, "dense_rows",
                        lambda n, dk, dv, **layout: [timed("sdpa-cudnn", n, dk, dv, layout)])
    monkeypatch.setattr(prefill, "nsa_row", lambda n, dk, dv, **layout: timed("nsa-triton", n, dk, dv, layout))
    monkeypatch.setattr(prefill, "nsa_branch_rows", lambda *a, **k: breakdowns.append(a) or [])
    out = tmp_path / "rows.json"
    result = CliRunner().invoke(nsa, ["bench", "--seq-lens", "8192", "--head-dims", "128/128", "--no-peer",
                                      "--repeats", "3", "--out", str(tmp_path), "--json-out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    nsa_rows = [r for r in json.loads(out.read_text()) if r["impl"] == "nsa-triton"]
    assert [(r["repeat"], r["fwd_x_cudnn"], r["bwd_x_cudnn"]) for r in nsa_rows] == [
        (0, 2.5, 5.0), (1, 3.0, 5.0), (2, 2.5, 5.0)]
    assert len(breakdowns) == 1
    assert "nsa-triton (round 3)" in result.output
    assert "2.50 (2.50-3.00)" in result.output and "5.00 (5.00-5.00)" in result.output
    with_zero = CliRunner().invoke(nsa, ["bench", "--repeats", "0"])
    assert with_zero.exit_code == 2 and "--repeats" in with_zero.output
