"""The Ray runner on a real local Ray instance with 2 CPUs and 2 pretend GPUs (started once here):
GPU cases land on GPU slots, crashed and hung workers become error rows while the rest runs,
--fail-fast, Ctrl-C, the backend injection and the checkpointed results file."""

import dataclasses
import logging
import os

import demo_suites
import pytest
import ray

from verify import runner, store
from verify.registry import all_suites

pytestmark = pytest.mark.xdist_group("ray")


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=runner.OBJECT_STORE_BYTES, logging_level=logging.WARNING)
    with demo_suites.registered():
        yield runner.connect(None)  # joins the instance above; does not own it
    ray.shutdown()


def _run(cluster, tmp_path, suites, **options):
    opts = runner.RunOptions(suites=suites, out_dir=tmp_path, **options)
    plan = runner.plan_cases(opts.suites, opts.scale, opts.backend)
    return runner.run_cases(plan, cluster, opts)


def _by_name(outcome):
    return {row.name: row for row in outcome.rows}


def test_connect_reuses_the_running_instance(cluster):
    assert not cluster.owned
    assert cluster.cpus == 2 and cluster.gpus == 2 and cluster.max_node_gpus == 2


def test_gpu_cases_land_on_gpu_slots_and_cpu_cases_run_alongside(cluster, tmp_path):
    outcome = _run(cluster, tmp_path, ["demo-gpu", "demo-ok"])
    rows = _by_name(outcome)
    assert len(rows) == 4 and all(r.status == "pass" for r in rows.values()), [r.message for r in rows.values()]
    for name in ("demo-gpu::gpu-a", "demo-gpu::gpu-b"):
        assert rows[name].needs_gpu
        assert rows[name].metrics["gpus_seen"] == 1  # ray.get_gpu_ids() inside the case
        assert rows[name].metrics["gpu_id"] in (0.0, 1.0)
    assert not rows["demo-ok::small"].needs_gpu


def test_fractional_gpus_share_a_card_and_oversized_requests_are_refused(cluster, tmp_path):
    outcome = _run(cluster, tmp_path, ["demo-gpu"], gpus_per_case=0.5)
    assert [r.status for r in outcome.rows] == ["pass", "pass"]
    with pytest.raises(runner.RunnerError, match="gpus-per-case 3"):
        _run(cluster, tmp_path, ["demo-gpu"], gpus_per_case=3.0)


def test_crash_raise_and_hang_become_error_rows_and_the_rest_runs(cluster, tmp_path):
    outcome = _run(cluster, tmp_path, ["demo-mixed", "demo-ok"])  # demo-mixed has timeout_s=3
    rows = _by_name(outcome)
    assert rows["demo-mixed::fine"].status == "pass"
    assert rows["demo-mixed::after"].status == "pass"
    assert rows["demo-ok::small"].status == rows["demo-ok::medium"].status == "pass"
    raised = rows["demo-mixed::raises"]
    assert raised.status == "error" and "demo case raised on purpose" in raised.message
    crashed = rows["demo-mixed::crashes"]
    assert crashed.status == "error" and "worker process died" in crashed.message
    hung = rows["demo-mixed::hangs"]
    assert hung.status == "error" and "timed out" in hung.message and "limit 3s" in hung.message
    assert 3.0 <= hung.duration_s < 10.0
    assert outcome.info["complete"] and not outcome.info["not_run"]
    # the file on disk holds every row
    assert len(store.read_run(tmp_path, outcome.run_id).rows) == 7


def test_timeout_option_overrides_case_timeouts(cluster, tmp_path):
    plan = [(s, c) for s, c in runner.plan_cases(["demo-mixed"], "ci", "auto") if c.case_id in ("hangs", "fine")]
    outcome = runner.run_cases(plan, cluster, runner.RunOptions(out_dir=tmp_path, timeout_s=1.0))
    rows = _by_name(outcome)
    assert rows["demo-mixed::hangs"].status == "error" and "limit 1s" in rows["demo-mixed::hangs"].message
    assert rows["demo-mixed::fine"].status == "pass"


def test_two_cpu_cases_run_at_once(cluster, tmp_path):
    outcome = _run(cluster, tmp_path, ["demo-slow"])  # 4 cases x 1.5 s
    assert all(r.status == "pass" for r in outcome.rows)
    assert len({r.metrics["pid"] for r in outcome.rows}) == 2  # two workers
    spans = [(r.started_at.timestamp(), r.started_at.timestamp() + r.duration_s) for r in outcome.rows]
    assert any(a0 < b1 and b0 < a1 for i, (a0, a1) in enumerate(spans) for b0, b1 in spans[i + 1:])  # overlap


def test_fail_fast_stops_scheduling(cluster, tmp_path):
    plan = runner.plan_cases(["demo-fail", "demo-slow"], "ci", "auto")
    outcome = runner.run_cases(plan, cluster, runner.RunOptions(out_dir=tmp_path, fail_fast=True))
    statuses = {r.name: r.status for r in outcome.rows}
    assert statuses["demo-fail::too-big"] == "fail"
    assert outcome.info["fail_fast_stopped"]
    # 2 slots: at most the one case dispatched alongside the failure ran; the rest were not run
    assert len(outcome.info["not_run"]) >= 3 and len(outcome.rows) + len(outcome.info["not_run"]) == 5
    assert not outcome.info["complete"]


def test_ctrl_c_writes_what_finished(cluster, tmp_path):
    class InterruptAfterFirst(runner.SilentProgress):
        def case_finished(self, row):
            raise KeyboardInterrupt

    plan = runner.plan_cases(["demo-slow"], "ci", "auto")
    outcome = runner.run_cases(plan, cluster, runner.RunOptions(out_dir=tmp_path), progress=InterruptAfterFirst())
    assert outcome.interrupted
    stored = store.read_run(tmp_path, outcome.run_id)
    assert len(stored.rows) == 1 and stored.rows[0].status == "pass"
    assert stored.info["interrupted"] and not stored.info["complete"]
    assert len(stored.info["not_run"]) == 3


def test_backend_is_injected_unless_the_case_pins_one(cluster, tmp_path):
    plan = runner.plan_cases(["demo-ok"], "ci", "reference")
    assert all(case.params["backend"] == "reference" for _, case in plan)
    outcome = runner.run_cases(plan, cluster, runner.RunOptions(out_dir=tmp_path, backend="reference"))
    assert all(r.metrics["backend_is_reference"] == 1.0 and r.backend == "reference" for r in outcome.rows)
    suite = demo_suites.SUITES[0]
    pinned = suite.cases("ci")[0]
    pinned = type(pinned)(pinned.suite, pinned.case_id, {**pinned.params, "backend": "triton"}, "ci")
    suite.cases_fn, original = (lambda scale: [(pinned.case_id, pinned.params)]), suite.cases_fn
    try:
        assert runner.plan_cases(["demo-ok"], "ci", "reference")[0][1].params["backend"] == "triton"
    finally:
        suite.cases_fn = original


def test_unknown_suite_names_the_known_ones(cluster):
    with pytest.raises(runner.RunnerError, match=r"unknown suite\(s\) 'nope'.*known suites: .*demo-ok"):
        runner.plan_cases(["demo-ok", "nope"], "ci", "auto")


def test_rows_carry_environment_and_the_file_is_written_atomically(cluster, tmp_path):
    outcome = _run(cluster, tmp_path, ["demo-ok"], scale="full")
    assert len(outcome.rows) == 3
    row = outcome.rows[0]
    assert row.scale == "full" and row.device.startswith("cpu: ") and row.host and row.python_version
    assert row.torch_version and row.nsa_version and row.run_id == outcome.run_id
    assert sorted(p.name for p in outcome.path.parent.iterdir()) == ["results.parquet"]  # no temp files left
    assert store.latest_run(tmp_path) == outcome.run_id


def test_results_are_checkpointed_during_the_run(cluster, tmp_path):
    seen = []

    class ReadWhileRunning(runner.SilentProgress):
        def case_finished(self, row):
            if store.list_runs(tmp_path):
                stored = store.read_run(tmp_path)
                seen.append((len(stored.rows), stored.info["complete"]))

    plan = runner.plan_cases(["demo-ok"], "ci", "auto")
    outcome = runner.run_cases(plan, cluster, runner.RunOptions(out_dir=tmp_path), progress=ReadWhileRunning())
    # the first finished case is on disk (marked incomplete) before the second finishes
    assert seen == [(1, False)]
    assert store.read_run(tmp_path, outcome.run_id).info["complete"]


def test_workers_that_cannot_be_placed_give_error_rows_not_a_hang(cluster, tmp_path):
    # the cluster claims 4 GPUs on a node but has 2: a 4-GPU worker can never be placed
    claimed = dataclasses.replace(cluster, gpus=4.0, max_node_gpus=4.0)
    plan = runner.plan_cases(["demo-gpu"], "ci", "auto")
    options = runner.RunOptions(out_dir=tmp_path, gpus_per_case=4.0, startup_timeout_s=2.0)
    outcome = runner.run_cases(plan, claimed, options)
    rows = _by_name(outcome)
    for name in ("demo-gpu::gpu-a", "demo-gpu::gpu-b"):
        assert rows[name].status == "error" and "no gpu worker" in rows[name].message
        assert "started within 2s" in rows[name].message


def test_a_gpu_worker_is_replaced_after_an_error(cluster, tmp_path):
    outcome = _run(cluster, tmp_path, ["demo-gpu-error"], gpus_per_case=2.0)  # one GPU worker at a time
    rows = _by_name(outcome)
    assert rows["demo-gpu-error::boom"].status == "error" and "illegal memory access" in rows["demo-gpu-error::boom"].message
    assert rows["demo-gpu-error::after"].status == "pass"
    assert rows["demo-gpu-error::after"].metrics["pid"] != rows["demo-gpu-error::boom"].metrics["pid"]


def test_opt_in_cases_run_only_when_their_suite_is_named():
    default = {case.name for _, case in runner.plan_cases([], "full", "auto")}
    named = {case.name for _, case in runner.plan_cases(["trainability"], "full", "auto")}
    long_run = "trainability::h200-nsa-vs-dense-8k"
    assert long_run not in default and long_run in named
    assert "trainability::triton-grad-model-shapes" in default  # only the opt-in case is left out
    compile_cases = [c.name for c in all_suites()["compile"].cases("full")]
    assert len(compile_cases) == 4
    assert set(runner.opt_in_left_out([], "full")) == {*compile_cases, long_run}
    assert runner.opt_in_left_out(["trainability"], "full") == []
    assert runner.opt_in_left_out([], "ci") == []


def test_longest_first_uses_history_then_hints():
    """expected_duration: the last run's time wins, then the expected_s hint; an unknown case
    counts as long when there is a history (a new case) and as 0 without one."""
    from verify.registry import Case

    hinted = Case("s", "hinted", {"expected_s": 40}, "full")
    plain = Case("s", "plain", {}, "full")
    assert runner.expected_duration(hinted, {}) == 40 and runner.expected_duration(plain, {}) == 0
    history = {"s::hinted": 3.0}
    assert runner.expected_duration(hinted, history) == 3.0
    assert runner.expected_duration(plain, history) == float("inf")


def test_full_plan_without_history_starts_with_the_hinted_slow_cases():
    """Without a previous run the full-scale plan is ordered by the hints: the ~120 s training-shape
    gradient check, the two 128k performance cases and the 64k continuity run start before the
    sub-second cases."""
    plan = runner.plan_cases([], "full", "auto")
    ordered = sorted(plan, key=lambda item: -runner.expected_duration(item[1], {}))
    first = [case.name for _, case in ordered[:4]]
    assert "performance::T131072-d128x128" in first
    assert "trainability::triton-grad-model-shapes" in first
    assert "decode::continuity-8k-64k-float32-auto" in first
    assert runner.expected_duration(ordered[-1][1], {}) == 0
