"""Acceptance rule, rendering, compare, exports (CSV, JSON, JUnit) and heatmaps, on hand-made runs."""

import csv
import io
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from test_store import make_row

from verify import plots, report
from verify.store import RunData

CPU_INFO = {"planned": 3, "not_run": [], "cluster": {"gpus": 0}}
GPU_INFO = {"planned": 3, "not_run": [], "cluster": {"gpus": 1}}


def run_of(rows, info=None, run_id="r"):
    return RunData(run_id, Path(f"/x/run={run_id}/results.parquet"), rows, dict(info or CPU_INFO))


def three(status_b="pass", needs_gpu_c=False, status_c="skip"):
    return [make_row(case_id="a"), make_row(case_id="b", status=status_b, message="err = 1 > 1e-05"),
            make_row(case_id="c", status=status_c, needs_gpu=needs_gpu_c, message="needs a GPU; cluster has none")]


def test_acceptance_rule():
    assert report.acceptance(three(needs_gpu_c=True), CPU_INFO).ok  # GPU skip on a CPU cluster
    assert report.acceptance(three(needs_gpu_c=False), GPU_INFO).ok  # CPU case skip (by design)
    verdict = report.acceptance(three(needs_gpu_c=True), GPU_INFO)
    assert not verdict.ok and "1 GPU case(s) skipped on a cluster that has GPUs" in verdict.reasons
    verdict = report.acceptance(three("fail"), CPU_INFO)
    assert not verdict.ok and verdict.reasons == ["1 case(s) failed"] and verdict.counts["fail"] == 1
    assert report.acceptance(three("error"), CPU_INFO).reasons == ["1 case(s) errored"]
    interrupted = {**CPU_INFO, "planned": 5, "not_run": ["s::d", "s::e"], "interrupted": True}
    assert report.acceptance(three(), interrupted).reasons == ["2 case(s) not run (interrupted)"]
    killed = {**CPU_INFO, "planned": 5}
    assert "run incomplete: 3 of 5" in report.acceptance(three(), killed).reasons[0]
    only_skips = [make_row(status="skip", needs_gpu=True)]
    assert report.acceptance(only_skips, {**CPU_INFO, "planned": 1}).reasons == ["no case passed"]


def render(run, **kwargs):
    console = Console(file=io.StringIO(), width=200, force_terminal=False)
    verdict = report.render_report(run, console, **kwargs)
    return console.file.getvalue(), verdict


def test_render_shows_suites_failures_with_metrics_and_skips():
    rows = three("fail", needs_gpu_c=True)
    rows[1].metrics, rows[1].tolerances, rows[1].bound_kinds = {"err": 1.0, "cos": 0.5}, {"err": 1e-5, "cos": 0.99}, \
        {"err": "max", "cos": "min"}
    text, verdict = render(run_of(rows))
    assert not verdict.ok
    assert "FAIL s::b" in text and "err = 1 > 1e-05" in text
    assert "<= 1e-05" in text and ">= 0.99" in text  # metrics against their bounds
    assert "skipped 1: needs a GPU; cluster has none" in text
    assert "NOT ACCEPTED" in text and "1 case(s) failed" in text
    text, verdict = render(run_of(three(needs_gpu_c=True)))
    assert verdict.ok and "ACCEPTED (2 pass, 0 fail, 0 error, 1 skip)" in text


def test_headroom():
    assert report.headroom(0.5, 1.0, "max") == 0.5
    assert report.headroom(2.0, 1.0, "max") == -1.0
    assert report.headroom(0.995, 0.99, "min") == pytest.approx(0.005 / 0.99)
    assert math.isnan(report.headroom(math.nan, 1.0, "max"))
    assert report.headroom(0.0, 0.0, "max") == math.inf and report.headroom(1e-9, 0.0, "max") == -math.inf


def test_compare_lists_new_failures_regressions_and_time_ratios():
    def row(case_id, status="pass", **metrics):
        kinds = {"err": "max", "cos": "min", "count": "eq"}
        bounds = {"err": 1e-5, "cos": 0.99, "count": 4.0}
        return make_row(case_id=case_id, status=status, metrics=metrics,
                        tolerances={k: bounds[k] for k in metrics if k in bounds},
                        bound_kinds={k: kinds[k] for k in metrics if k in kinds})

    a = run_of([row("new-fail", err=1e-7), row("noise", err=1e-16), row("regress", err=1e-7, cos=0.999),
                row("cos-regress", cos=0.999), row("eq", count=4.0), row("fixed", "fail", err=1.0),
                row("perf", fwd_ms=2.0, bwd_s=1.0, nsa_us=100.0), row("gone")], run_id="A")
    b = run_of([row("new-fail", "fail", err=1.0), row("noise", err=3e-16), row("regress", err=5e-6, cos=0.999),
                row("cos-regress", cos=0.9905), row("eq", count=5.0), row("fixed", err=1e-7),
                row("perf", fwd_ms=3.0, bwd_s=0.5, nsa_us=80.0), row("new")], run_id="B")
    cmp = report.compare_runs(a, b, threshold=0.1)
    assert [n for n, *_ in cmp.new_failures] == ["s::new-fail"]
    assert [n for n, *_ in cmp.fixed] == ["s::fixed"]
    regressed = {(n, m) for n, m, *_ in cmp.regressions}
    # float64 noise far below the bound is not a regression; losing headroom is; a NaN-free eq change is
    assert regressed == {("s::new-fail", "err"), ("s::regress", "err"), ("s::cos-regress", "cos"), ("s::eq", "count")}
    ratios = {(n, m): r for n, m, _, _, r in cmp.performance}
    assert ratios == {("s::perf", "fwd_ms"): 1.5, ("s::perf", "bwd_s"): 0.5, ("s::perf", "nsa_us"): 0.8}
    assert cmp.only_a == ["s::gone"] and cmp.only_b == ["s::new"] and cmp.worse
    # a higher threshold forgives a smaller loss of headroom
    assert ("s::regress", "err") not in {(n, m) for n, m, *_ in report.compare_runs(a, b, 0.6).regressions}
    same = report.compare_runs(a, a, 0.1)
    assert not same.worse and not same.regressions and all(r == 1.0 for *_, r in same.performance)
    console = Console(file=io.StringIO(), width=200)
    report.render_comparison(cmp, a, b, console, 0.1)
    text = console.file.getvalue()
    assert "new failures (1)" in text and "metric regressions" in text and "1.500" in text and "only in A" in text
    nan_b = run_of([row("new-fail", err=math.nan)], run_id="B")
    assert report.compare_runs(a, nan_b, 0.1).regressions[0][:2] == ("s::new-fail", "err")


def test_export_csv_and_json():
    run = run_of(three("fail"))
    table = list(csv.DictReader(io.StringIO(report.export_csv(run))))
    assert [r["case_id"] for r in table] == ["a", "b", "c"] and table[1]["status"] == "fail"
    assert json.loads(table[0]["metrics"])["err"] == 1e-7 and json.loads(table[0]["metrics"])["nan_metric"] == "nan"
    assert json.loads(table[0]["params"]) == {"seq_len": 64, "backend": "auto", "phi": "mlp"}
    document = json.loads(report.export_json(run))  # strict JSON: no NaN literals
    assert document["verdict"]["accepted"] is False and len(document["rows"]) == 3
    assert document["rows"][0]["metrics"]["inf_metric"] == "inf"
    assert document["rows"][0]["started_at"] == "2026-01-02T03:04:05.678901+00:00"


def test_export_junit_is_valid_xml_for_ci():
    rows = three("fail") + [make_row(suite="t", case_id="boom", status="error", message="Trace\x00back\x1b[0m <&>")]
    root = ET.fromstring(report.export_junit(run_of(rows, {**CPU_INFO, "planned": 4})))
    assert root.tag == "testsuites" and root.get("tests") == "4"
    assert (root.get("failures"), root.get("errors"), root.get("skipped")) == ("1", "1", "1")
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert set(suites) == {"s", "t"} and suites["s"].get("tests") == "3"
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert cases["a"].get("classname") == "nsa.s" and float(cases["a"].get("time")) == 0.25
    assert cases["b"].find("failure").get("message") == "err = 1 > 1e-05"
    assert cases["c"].find("skipped") is not None
    assert "<&>" in cases["boom"].find("error").text and "\x00" not in cases["boom"].find("error").text
    assert "err = 1e-07 (bound <= 1e-05)" in cases["a"].find("system-out").text


PARAMS = {"heads": 4, "kv_heads": 2, "dk": 16, "l": 8, "d": 4, "lp": 16, "n": 4, "seq_len": 200}


def test_heatmap_data_matches_the_reference_ops():
    data = plots.heatmap_data(plots.random_inputs(PARAMS))
    config = data["config"]
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.select_count) == (4, 2, 16, 4)
    p_cmp, scores, selected = data["p_cmp"], data["block_scores"], data["selected"]
    num_cmp, num_blocks = (200 - 8) // 4 + 1, -(-200 // 16)
    assert p_cmp.shape == (200, num_cmp) and scores.shape == selected.shape == (200, num_blocks)
    positions = np.arange(200)
    visible = np.where(positions + 1 >= 8, (positions + 1 - 8) // 4 + 1, 0)
    assert np.allclose(p_cmp.sum(1), (visible > 0).astype(float), atol=1e-5)  # rows sum to 1 where tokens exist
    assert not p_cmp[np.arange(num_cmp)[None, :] >= visible[:, None]].any()  # nothing after the visible ones
    counts = selected.sum(1)
    assert counts.max() == 4 and counts.min() >= 1
    assert (selected[:, 0] == 1).all() and selected[np.arange(200), positions // 16].all()  # forced blocks
    assert not selected[np.arange(num_blocks)[None, :] > (positions // 16)[:, None]].any()  # causal


def test_heatmaps_are_deterministic_pngs(tmp_path):
    first = plots.plot_case("causality", "G2/odd id", PARAMS, tmp_path / "one")
    second = plots.plot_case("causality", "G2/odd id", PARAMS, tmp_path / "two")
    assert [p.name for p in first] == ["causality__G2_odd_id__p_cmp.png", "causality__G2_odd_id__selection_scores.png",
                                       "causality__G2_odd_id__selected_blocks.png"]
    for a, b in zip(first, second):
        assert a.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and a.read_bytes() == b.read_bytes()
    other = plots.plot_case("causality", "x", {**PARAMS, "seed": 7}, tmp_path / "three")
    assert other[0].read_bytes() != first[0].read_bytes()


def test_plot_params_and_limits():
    config = plots.config_from_params({"num_kv_heads": 2, "group": 8, "head_dim": 64, "compress_block": 16,
                                       "compress_stride": 8, "select_block": 32, "select_count": 5})
    assert (config.num_heads, config.group_size, config.select_count) == (16, 8, 5)
    inputs = plots.random_inputs({"seq_len": 5000})
    assert inputs["q"].shape == (1, plots.MAX_QUERIES, 4, 32) and inputs["k"].shape == (1, 5000, 1, 32)
    assert inputs["q_offset"] == 5000 - plots.MAX_QUERIES and inputs["q"].dtype == torch.float32
    assert plots.seed_from_params({"a": 1, "backend": "x"}) == plots.seed_from_params({"a": 1, "backend": "y"})
    with pytest.raises(ValueError, match="compress_stride must divide"):
        plots.config_from_params({"l": 8, "d": 3})
