"""The `nsa` command line through click's CliRunner, on a real local Ray instance with 2 CPUs and no
GPU (started once here): verify with demo suites, report show/compare/export/plot, bad inputs."""

import json
import logging
import os
import xml.etree.ElementTree as ET

import demo_suites
import pytest
import ray
from click.testing import CliRunner

from cli.main import nsa
from cli.verify_cmd import BACKEND_CHOICES
from verify import runner, store

pytestmark = pytest.mark.xdist_group("ray")


@pytest.fixture(scope="module")
def ray_cpu():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=runner.OBJECT_STORE_BYTES, logging_level=logging.WARNING)
    with demo_suites.registered():
        yield
    ray.shutdown()


@pytest.fixture(scope="module")
def runs(ray_cpu, tmp_path_factory):
    """Two verify runs into one directory: A all good, B with a failure; (out, a_id, b_id, results)."""
    out = tmp_path_factory.mktemp("reports")
    cli = CliRunner()
    first = cli.invoke(nsa, ["verify", "demo-ok", "demo-gpu", "--out", str(out)])
    second = cli.invoke(nsa, ["verify", "demo-ok", "demo-fail", "--out", str(out), "--scale", "full"])
    a_id, b_id = store.list_runs(out)
    return out, a_id, b_id, first, second


def test_verify_accepts_and_prints_plain_lines(runs):
    out, a_id, _, first, _ = runs
    assert first.exit_code == 0, first.output
    lines = first.output.splitlines()
    # not a terminal: one plain line per case and per suite, no live display
    assert lines[0].startswith(f"nsa verify: run {a_id}: 4 case(s) in 2 suite(s) on local")
    assert "[1/4] " in first.output and "[4/4] " in first.output
    assert "suite demo-ok: 2 pass" in first.output and "suite demo-gpu: 2 skip" in first.output
    assert "skip  demo-gpu::gpu-a (0.00s): needs a GPU; cluster has none" in first.output
    assert "\x1b[" not in first.output  # no terminal control codes in a CI log
    assert "ACCEPTED (2 pass, 0 fail, 0 error, 2 skip)" in first.output
    rows = store.read_run(out, a_id).rows
    assert {(r.case_id, r.status) for r in rows} == {("small", "pass"), ("medium", "pass"), ("gpu-a", "skip"),
                                                     ("gpu-b", "skip")}


def test_verify_failure_exits_1(runs):
    second = runs[4]
    assert second.exit_code == 1, second.output
    assert "fail  demo-fail::too-big" in second.output and "NOT ACCEPTED" in second.output


def test_verify_usage_errors_exit_2(ray_cpu, tmp_path):
    cli = CliRunner()
    result = cli.invoke(nsa, ["verify", "demo-ok", "no-such-suite", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown suite(s) 'no-such-suite'" in result.output
    assert "known suites:" in result.output and "demo-ok" in result.output
    result = cli.invoke(nsa, ["verify", "demo-ok", "--address", "127.0.0.1:1", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "cannot reach the Ray cluster at 127.0.0.1:1" in result.output
    result = cli.invoke(nsa, ["verify", "demo-ok", "--address", "nonsense", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "'nonsense' is not auto, HOST:PORT or ray://HOST:PORT" in result.output
    for bad in (["--scale", "huge"], ["--backend", "cuda"], ["--gpus-per-case", "0"], ["--timeout", "-1"]):
        result = cli.invoke(nsa, ["verify", "demo-ok", *bad, "--out", str(tmp_path)])
        assert result.exit_code == 2 and bad[0] in result.output, bad
    assert not tmp_path.exists() or not list(tmp_path.iterdir())  # nothing written for a bad command


def test_verify_fail_fast_and_timeout(ray_cpu, tmp_path):
    result = CliRunner().invoke(nsa, ["verify", "demo-mixed", "--timeout", "2", "--out", str(tmp_path)])
    assert result.exit_code == 1
    rows = {r.case_id: r for r in store.read_run(tmp_path).rows}
    assert rows["hangs"].status == "error" and "limit 2s" in rows["hangs"].message
    assert rows["crashes"].status == "error" and rows["after"].status == "pass"
    result = CliRunner().invoke(nsa, ["verify", "demo-fail", "demo-slow", "--fail-fast", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "stopped by --fail-fast" in result.output


def test_verify_case_filter_runs_only_matching_cases(ray_cpu, tmp_path):
    result = CliRunner().invoke(nsa, ["verify", "demo-ok", "demo-fail", "--case", "demo-ok::med*",
                                      "--case", "*::small", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = store.read_run(tmp_path).rows
    assert sorted(r.name for r in rows) == ["demo-ok::medium", "demo-ok::small"]
    assert store.read_run(tmp_path).info["case_patterns"] == ["demo-ok::med*", "*::small"]
    assert "filtered: only cases matching demo-ok::med* *::small (2 planned)" in result.output


def test_verify_list_prints_the_plan_and_runs_nothing(ray_cpu, tmp_path):
    cli = CliRunner()
    result = cli.invoke(nsa, ["verify", "demo-ok", "demo-gpu", "--list", "--case", "*::gpu-*",
                              "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["demo-gpu::gpu-a\tgpu", "demo-gpu::gpu-b\tgpu", "2 case(s) at scale ci"]
    # A pattern that matches nothing is a usage error, not an empty accepted run.
    result = cli.invoke(nsa, ["verify", "demo-ok", "--list", "--case", "demo-ok::typo"])
    assert result.exit_code == 2 and "--case 'demo-ok::typo' matches no ci-scale case of demo-ok" in result.output
    assert not tmp_path.exists() or not list(tmp_path.iterdir())


def test_backend_choices_match_the_library():
    from nsa.backends import BACKEND_CHOICES as LIBRARY

    assert BACKEND_CHOICES == LIBRARY


def test_report_show(runs):
    out, a_id, b_id, _, _ = runs
    result = CliRunner().invoke(nsa, ["report", "show", "--out", str(out)])  # latest = B
    assert result.exit_code == 0, result.output
    assert b_id in result.output and "FAIL demo-fail::too-big" in result.output and "err = 0.5 > 0.001" in result.output
    result = CliRunner().invoke(nsa, ["report", "show", a_id, "--out", str(out)])
    assert result.exit_code == 0 and a_id in result.output and "ACCEPTED" in result.output


def test_report_compare(runs):
    out, a_id, b_id, _, _ = runs
    result = CliRunner().invoke(nsa, ["report", "compare", a_id, b_id, "--out", str(out)])
    assert result.exit_code == 0, result.output  # demo-fail is new in B, not a new failure of a shared case
    assert "no new failures" in result.output and "only in B" in result.output and "demo-fail::too-big" in result.output
    assert "fwd_ms" in result.output and "1.000" in result.output  # a time ratio
    result = CliRunner().invoke(nsa, ["report", "compare", b_id, b_id, "--out", str(out), "--threshold", "0.2"])
    assert result.exit_code == 0 and "no metric regressions beyond 20%" in result.output


def test_report_export(runs, tmp_path):
    out, a_id, b_id, _, _ = runs
    cli = CliRunner()
    result = cli.invoke(nsa, ["report", "export", b_id, "--format", "json", "--out", str(out)])
    assert result.exit_code == 0
    assert json.loads(result.output)["verdict"]["accepted"] is False
    target = tmp_path / "ci" / "junit.xml"
    result = cli.invoke(nsa, ["report", "export", "latest", "--format", "junit", "--output", str(target),
                              "--out", str(out)])
    assert result.exit_code == 0 and target.is_file()
    root = ET.parse(target).getroot()
    assert root.get("tests") == "4" and root.get("failures") == "1"
    result = cli.invoke(nsa, ["report", "export", a_id, "--format", "csv", "--out", str(out)])
    assert result.exit_code == 0 and result.output.splitlines()[0].startswith("schema_version,run_id,suite,case_id")
    assert len(result.output.splitlines()) == 5
    result = cli.invoke(nsa, ["report", "export", a_id, "--format", "xml", "--out", str(out)])
    assert result.exit_code == 2 and "--format" in result.output


def test_report_plot(runs, tmp_path):
    out, a_id, _, _, _ = runs
    cli = CliRunner()
    result = cli.invoke(nsa, ["report", "plot", a_id, "demo-ok::small", "--out", str(out), "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    paths = result.output.split()
    assert len(paths) == 3 and all(p.endswith(".png") and os.path.getsize(p) > 1000 for p in paths)
    result = cli.invoke(nsa, ["report", "plot", a_id, "medium", "--out", str(out)])  # default: next to the run
    assert result.exit_code == 0 and f"run={a_id}/plots/demo-ok__medium__p_cmp.png" in result.output
    result = cli.invoke(nsa, ["report", "plot", a_id, "nope", "--out", str(out)])
    assert result.exit_code == 1 and "no case 'nope' in this run" in result.output


def test_report_bad_inputs(tmp_path):
    cli = CliRunner()
    result = cli.invoke(nsa, ["report", "show", "--out", str(tmp_path / "none")])
    assert result.exit_code == 1 and f"{tmp_path / 'none'}: does not exist" in result.output
    run_dir = tmp_path / "run=broken"
    run_dir.mkdir()
    (run_dir / "results.parquet").write_bytes(b"PAR1 garbage")
    result = cli.invoke(nsa, ["report", "show", "broken", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "results.parquet: not a readable Parquet file" in result.output
    result = cli.invoke(nsa, ["report", "export", "other", "--format", "csv", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "no such run 'other'" in result.output and "known runs: broken" in result.output
    result = cli.invoke(nsa, ["report", "compare", "broken", "missing", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "not a readable Parquet file" in result.output


def test_help_lists_commands():
    result = CliRunner().invoke(nsa, ["--help"])
    assert result.exit_code == 0 and all(c in result.output for c in ("verify", "report", "bench"))
    result = CliRunner().invoke(nsa, ["verify", "--help"])
    for option in ("--scale", "--backend", "--address", "--gpus-per-case", "--out", "--timeout", "--fail-fast"):
        assert option in result.output


def test_live_progress_on_a_terminal():
    import io

    from rich.console import Console
    from test_store import make_row

    from cli.verify_cmd import LiveProgress, PlainProgress
    from verify.registry import Case

    plan = [Case("s", "a", {}, "ci"), Case("s", "b", {}, "ci")]
    cluster = runner.Cluster("local", 2.0, 0.0, 0.0, 1, True)
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    live = LiveProgress(console)
    live.begin(plan, cluster, "r1")
    live.case_finished(make_row(case_id="a"))
    live.case_finished(make_row(case_id="b", status="fail", message="err = 1 > 1e-05"))
    live.end()
    text = console.file.getvalue()
    assert "\x1b[" in text and "2/2" in text and "s::b: err = 1 > 1e-05" in text
    lines = []
    plain = PlainProgress(lines.append)
    plain.begin(plan, cluster, "r1")
    plain.case_finished(make_row(case_id="a"))
    plain.heartbeat([(plan[1], 42.0)])
    plain.case_finished(make_row(case_id="b", status="fail", message="err = 1 > 1e-05\nmore"))
    assert lines[1:] == ["[1/2] pass  s::a (0.25s)", "still running: s::b (42s)",
                         "[2/2] fail  s::b (0.25s): err = 1 > 1e-05", "suite s: 1 pass, 1 fail (0.5s in workers)"]
