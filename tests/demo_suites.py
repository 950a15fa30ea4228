"""Throw-away suites for the harness tests (test_runner.py, test_cli.py): cases that pass, fail,
raise, crash their worker, hang, or need a GPU. ``registered()`` adds them to the registry for the
duration of a test module and removes them afterwards.

Ray workers cannot import this module (tests/ is not on their path), so it is pickled by value.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

from verify.registry import Suite, register, unregister

DEMO_PREFIX = "demo-"


def _ok_cases(scale):
    yield "small", {"err": 1e-6, "fwd_ms": 2.0}
    yield "medium", {"err": 2e-4, "fwd_ms": 4.0}
    if scale == "full":
        yield "large", {"err": 5e-4, "fwd_ms": 8.0}


def _ok(params, checks):
    checks.at_most("err", params["err"], 1e-3)
    checks.at_least("cosine", 1.0 - params["err"], 0.99)
    checks.record("fwd_ms", params["fwd_ms"])
    # what the runner injected, so tests can see it
    checks.record("backend_is_reference", float(params.get("backend") == "reference"))
    checks.backend = str(params.get("backend", ""))


def _fail_cases(scale):
    yield "too-big", {"err": 0.5}


def _fail(params, checks):
    checks.at_most("err", params["err"], 1e-3)


def _mixed_cases(scale):
    yield "fine", {"mode": "pass"}
    yield "raises", {"mode": "raise"}
    yield "crashes", {"mode": "crash"}
    yield "hangs", {"mode": "hang"}
    yield "after", {"mode": "pass"}


def _mixed(params, checks):
    mode = params["mode"]
    if mode == "raise":
        raise ValueError("demo case raised on purpose")
    if mode == "crash":
        os._exit(3)  # the worker dies as in a segfault: no exception, no cleanup
    if mode == "hang":
        time.sleep(120)
    checks.true("ran", True)


def _gpu_cases(scale):
    yield "gpu-a", {}
    yield "gpu-b", {}


def _gpu(params, checks):
    import ray

    ids = ray.get_gpu_ids()
    checks.at_least("gpus_seen", len(ids), 1)
    checks.record("gpu_id", float(ids[0]) if ids else -1.0)
    checks.record("pid", float(os.getpid()))


def _gpu_error_cases(scale):
    yield "boom", {"raise": True}
    yield "after", {"raise": False}


def _gpu_error(params, checks):
    checks.record("pid", float(os.getpid()))
    if params["raise"]:
        raise RuntimeError("CUDA error: an illegal memory access was encountered (pretend)")
    checks.true("ran", True)


def _slow_cases(scale):
    for i in range(4):
        yield f"s{i}", {"sleep": 1.5}


def _slow(params, checks):
    time.sleep(params["sleep"])
    checks.record("pid", float(os.getpid()))
    checks.true("ran", True)


SUITES = [
    Suite(f"{DEMO_PREFIX}ok", "always passes", _ok_cases, _ok),
    Suite(f"{DEMO_PREFIX}fail", "always fails a bound", _fail_cases, _fail),
    Suite(f"{DEMO_PREFIX}mixed", "pass, raise, crash, hang, pass", _mixed_cases, _mixed, timeout_s=3.0),
    Suite(f"{DEMO_PREFIX}gpu", "needs a GPU slot", _gpu_cases, _gpu, needs_gpu=True),
    Suite(f"{DEMO_PREFIX}gpu-error", "a GPU case errors, the next one runs", _gpu_error_cases, _gpu_error,
          needs_gpu=True),
    Suite(f"{DEMO_PREFIX}slow", "sleeps, to show two cases run at once", _slow_cases, _slow),
]


@contextlib.contextmanager
def registered():
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    for suite in SUITES:
        register(suite)
    try:
        yield {suite.name: suite for suite in SUITES}
    finally:
        for suite in SUITES:
            unregister(suite.name)
