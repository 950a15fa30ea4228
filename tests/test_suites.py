"""Every suite's ``ci`` cases run under pytest too (so ``make test`` covers them)."""

import json

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


@pytest.fixture
def fake_decode_bench(monkeypatch):
    """The performance suite's decode cases on a pretend GPU: the bench's timing functions give
    fixed rows (NSA 100 us over 369 MB; cuDNN 950 us, FlashAttention 1000 us, one backend that
    cannot run), so the case's ranking, bandwidth and gates are checked without CUDA."""
    from nsa.bench.decode import DecodeRow
    from suites import performance

    state = {"nsa_us": 100.0, "dense_us": (950.0, 1000.0)}

    def nsa_row(batch, context, dk, dv):
        nbytes = 369_000_000
        return DecodeRow("nsa-triton", context, batch, dk, dv, us=state["nsa_us"], bytes_read=nbytes,
                         gbps=nbytes / (state["nsa_us"] * 1e-6) / 1e9, cuda_graph=True)

    def dense_rows(batch, context, dk, dv):
        (cudnn, flash) = state["dense_us"]
        rows = [DecodeRow("sdpa-cudnn", context, batch, dk, dv, us=cudnn),
                DecodeRow("sdpa-flash", context, batch, dk, dv, us=flash),
                DecodeRow("sdpa-math", context, batch, dk, dv, note="RuntimeError: no kernel")]
        return [r for r in rows if r.us is not None or r.note]

    monkeypatch.setattr(performance.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(performance.torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(performance.decode, "copy_bandwidth_gbps", lambda: 4000.0)
    monkeypatch.setattr(performance.decode, "nsa_row", nsa_row)
    monkeypatch.setattr(performance.decode, "dense_rows", dense_rows)
    return state


def _decode_case(context: int, batch: int):
    cases = {c.case_id: c for c in all_suites()["performance"].cases("full")}
    return cases[f"decode-S{context}-B{batch}-d128x128"]


def test_performance_lists_decode_cases_at_full_scale_only():
    suite = all_suites()["performance"]
    assert not suite.cases("ci")
    decode_ids = [c.case_id for c in suite.cases("full") if c.case_id.startswith("decode-")]
    assert len(decode_ids) == 5 * 2 * 2 and "decode-S131072-B32-d192x128" in decode_ids
    assert all(c.needs_gpu for c in suite.cases("full"))


def test_decode_performance_case_ranks_against_the_best_dense(fake_decode_bench):
    result = all_suites()["performance"].run(_decode_case(65536, 32))
    assert result.status == "pass", result.message
    m = result.metrics
    assert m["speedup_vs_best_dense"] == pytest.approx(9.5) and result.tolerances["speedup_vs_best_dense"] == 1.0
    assert m["nsa_gbps"] == pytest.approx(3690.0) and m["nsa_copy_fraction"] == pytest.approx(3690.0 / 4000.0)
    assert m["sdpa-cudnn_us"] == 950.0 and "sdpa-math_us" not in m
    assert m["speedup_target_64k"] == 10.0 and m["copy_fraction_target_64k_b32"] == 0.6
    assert "copy_fraction_target_64k_b32" not in all_suites()["performance"].run(_decode_case(65536, 1)).metrics


def test_decode_performance_case_fails_slower_than_dense_and_skips_without_dense(fake_decode_bench):
    fake_decode_bench["nsa_us"] = 2000.0
    slow = all_suites()["performance"].run(_decode_case(8192, 1))
    assert slow.status == "fail" and "speedup_vs_best_dense" in slow.message
    fake_decode_bench["dense_us"] = (None, None)
    alone = all_suites()["performance"].run(_decode_case(8192, 1))
    assert alone.status == "skip" and "no torch SDPA backend ran" in alone.message and "sdpa-math" in alone.message


def _method_goal(min_accuracy, not_measured=0):
    return {"min_accuracy_longest": min_accuracy, "cells_not_measured_longest": not_measured,
            "retrieval_goal_met": False, "min_needle_selected_longest": {"layer0": 0.5}}


@pytest.mark.parametrize("by_method, passes, best", [
    # RoPE as trained misses, position interpolation meets the goal: pass, named.
    ({"none": _method_goal(0.5), "linear": _method_goal(1.0)}, True, "linear"),
    # Every method misses: fail on the best one's number.
    ({"none": _method_goal(0.5), "yarn": _method_goal(0.875)}, False, "yarn"),
    # A perfect method with unmeasured cells loses to a measured one and fails the cell count.
    ({"none": _method_goal(0.25), "linear": _method_goal(1.0, not_measured=3)}, False, "none"),
])
def test_trainability_retrieval_goal_takes_the_best_rope_method(by_method, passes, best):
    from suites.trainability import _check_retrieval_goal
    from verify.registry import Checks

    checks = Checks()
    _check_retrieval_goal({"nsa_by_rope_scaling": by_method}, checks)
    assert (not checks.failures) == passes, checks.failures
    assert checks.metrics[f"nsa_best_rope_scaling_is_{best}"] == 1.0
    for method, result in by_method.items():
        assert checks.metrics[f"nsa_min_accuracy_64k_{method}"] == result["min_accuracy_longest"]


def test_trainability_retrieval_goal_reads_runs_without_methods():
    from suites.trainability import _check_retrieval_goal
    from verify.registry import Checks

    checks = Checks()
    _check_retrieval_goal({"nsa_min_accuracy_longest": 1.0, "nsa_cells_not_measured_longest": 0,
                           "nsa_min_needle_selected_longest": {"layer0": 1.0}}, checks)
    assert not checks.failures and checks.metrics["nsa_min_accuracy_64k"] == 1.0


def test_trainability_dispatches_each_case_to_its_check(monkeypatch):
    """The full case has ``steps`` too (its schedule's first guess): it must reach the GPU check,
    not the CPU one."""
    from suites import trainability

    ran = []
    for check in ("_check_ci", "_check_full", "_check_triton_grads"):
        monkeypatch.setattr(trainability, check, lambda params, checks, check=check: ran.append(check))
    routes = {}
    for scale in ("ci", "full"):
        for case in trainability.trainability.cases(scale):
            trainability.trainability.check_fn(case.params, None)
            routes[case.case_id] = ran.pop()
    assert routes == {"tiny-cpu-300steps": "_check_ci", "h200-nsa-vs-dense-8k": "_check_full",
                      "triton-grad-model-shapes": "_check_triton_grads"}


def test_trainability_full_case_trains_two_stages_and_checks_the_last(tmp_path, monkeypatch):
    """The full case's flow on the CPU: a tiny stand-in for the GPU config, both twins, two stages;
    the second starts from the first's weights with adjacent needles, and the goals are read from it."""
    from nsa.models.train import read_table, tiny_config
    from suites import trainability
    from verify.registry import Checks

    def tiny_gpu_config(**changes):
        config = tiny_config(models=("nsa", "dense"), eval_contexts=(64, 128), eval_depths=(0.0, 1.0),
                             eval_samples=2, **changes)
        return config.replace(model=config.model.replace(backend="reference"))

    monkeypatch.setattr(trainability, "gpu_config", tiny_gpu_config)
    monkeypatch.setattr(trainability, "_require_cuda", lambda: None)
    params = {"context": 64, "steps": 6, "minutes": 5.0, "gate_freeze": 0.5, "eval_minutes": 5.0, "seed": 0,
              "backend": "reference", "out_dir": str(tmp_path), "total_minutes": 9.0,
              "second_stage": {"steps": 4, "lr": 1e-3, "adjacent_rate": 0.5, "seed": 1}}
    checks = Checks()
    trainability.trainability.check_fn(params, checks)  # the suite's own dispatch picks the full check
    metrics = checks.metrics
    assert metrics["stage1_nsa_steps"] == metrics["stage1_dense_steps"] == 6
    assert metrics["stage2_nsa_steps"] == metrics["stage2_dense_steps"] == 4
    summary = json.loads((tmp_path / "stage2" / "summary.json").read_text())
    assert summary["config"]["init_weights"] == str(tmp_path / "stage1")
    # The second stage gets what the first left of total_minutes, and the sum is a checked bound.
    first_s = metrics["stage1_nsa_train_seconds"]
    assert summary["config"]["minutes"] * 60 == pytest.approx(9.0 * 60 - first_s - trainability.BUDGET_MARGIN_S)
    assert metrics["nsa_train_minutes_total"] == pytest.approx((first_s + metrics["stage2_nsa_train_seconds"]) / 60)
    assert not any(f.startswith("nsa_train_minutes_total") for f in checks.failures)
    assert summary["config"]["task"]["adjacent_rate"] == 0.5 and summary["config"]["start_context"] is None
    # The goals come from the second stage; a 10-step model misses retrieval: a recorded failure.
    goals = summary["goals"]
    assert metrics["loss_ratio_nsa_over_dense"] == pytest.approx(goals["loss_ratio_nsa_over_dense"])
    assert metrics["nsa_min_accuracy_64k_none"] == goals["nsa_min_accuracy_longest"]
    assert metrics["stage1_nonfinite_steps"] == metrics["stage2_nonfinite_steps"] == 0
    assert any(f.startswith("nsa_min_accuracy_64k ") for f in checks.failures), checks.failures
    assert len(read_table(tmp_path / "stage2" / "train_log.parquet")) == 8


def test_compile_audit_names_unknown_kernels():
    from nsa.ops.compile_check import KERNELS, audit

    with pytest.raises(ValueError, match=r"kernels: unknown \['selected-bwd'\]; known: compressed-fwd"):
        audit([(128, 128)], [16], kernels=("selected-fwd", "selected-bwd"))
    assert len(KERNELS) == 14


def test_compile_suite_bounds_catch_an_unpipelined_loop_and_a_spilling_list(monkeypatch):
    """The prefill check fails a list whose pipelined configs have no asynchronous copies, or
    whose best config spills more than the allowance; rows as the compile subprocess prints."""
    import suites.compile as compile_suite
    from verify.registry import Checks

    def rows(copies, spills):
        return [{"kernel": "selected-fwd", "dk": 32, "dv": 32, "group": 4, "config": f"c{i}", "num_warps": 4,
                 "num_stages": 2, "registers": 100, "spill_bytes": s, "shared_bytes": 0, "async_copies": c}
                for i, (c, s) in enumerate(zip(copies, spills))]

    for copies, spills, failure in (([4, 4], [0, 300], None), ([4, 0], [0, 0], "async_copies_min"),
                                    ([4, 4], [65, 300], "spill_bytes_best")):
        compiled = rows(copies, spills)
        monkeypatch.setattr(compile_suite, "_compiled_rows", lambda code, compiled=compiled: compiled)
        checks = Checks()
        compile_suite._check_prefill({"head_dims": "32/32", "groups": "4"}, checks)
        result = checks.result()
        assert (result.status == "pass") == (failure is None), result.message
        assert failure is None or f"selected-fwd_d32_G4_{failure}" in result.message
