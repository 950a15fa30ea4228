"""Suite registry: what a verification suite is, its cases, and how a case reports.

A suite is a named set of parametrised cases at two scales (``ci``: CPU, seconds; ``full``:
GPU, real sizes). Running a case returns a :class:`CaseResult` built from :class:`Checks`, so
every number a case measured travels with its tolerance into the result tables. The same cases
run under pytest (``tests/test_suites.py``) and under ``nsa verify``; no check is written twice.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

SCALES = ("ci", "full")
STATUSES = ("pass", "fail", "error", "skip")


@dataclass(frozen=True)
class Case:
    """One parametrised check of a suite. ``params`` are JSON-friendly scalars."""

    suite: str
    case_id: str
    params: dict[str, Any]
    scale: str
    needs_gpu: bool = False
    timeout_s: float = 600.0

    @property
    def opt_in(self) -> bool:
        """A long case (a training run) that runs only when its suite is named, never by default."""
        return bool(self.params.get("opt_in", False))

    @property
    def name(self) -> str:
        return f"{self.suite}::{self.case_id}"


@dataclass
class CaseResult:
    """What running a case found. ``metrics`` and ``tolerances`` share keys where a bound exists."""

    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    tolerances: dict[str, float] = field(default_factory=dict)
    message: str = ""
    backend: str = ""
    duration_s: float = 0.0
    # Which way each bound points ("max": metric <= bound, "min": >=, "eq": ==), so reports can
    # tell a regression from an improvement.
    bound_kinds: dict[str, str] = field(default_factory=dict)


class Checks:
    """Collects measured numbers and their bounds; any failed bound fails the case. NaN never passes."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.tolerances: dict[str, float] = {}
        self.failures: list[str] = []
        self.bound_kinds: dict[str, str] = {}
        self.backend = ""

    def record(self, name: str, value: float) -> None:
        """A number worth keeping that has no bound (a time, a count)."""
        self.metrics[name] = float(value)

    def at_most(self, name: str, value: float, bound: float) -> None:
        self.metrics[name], self.tolerances[name] = float(value), float(bound)
        self.bound_kinds[name] = "max"
        if not (math.isfinite(float(value)) and float(value) <= bound):
            self.failures.append(f"{name} = {float(value):.4g} > {bound:.4g}")

    def at_least(self, name: str, value: float, bound: float) -> None:
        self.metrics[name], self.tolerances[name] = float(value), float(bound)
        self.bound_kinds[name] = "min"
        if not (math.isfinite(float(value)) and float(value) >= bound):
            self.failures.append(f"{name} = {float(value):.4g} < {bound:.4g}")

    def equal(self, name: str, value: float, expected: float) -> None:
        self.metrics[name], self.tolerances[name] = float(value), float(expected)
        self.bound_kinds[name] = "eq"
        if float(value) != float(expected):
            self.failures.append(f"{name} = {value} != {expected}")

    def true(self, name: str, ok: bool, detail: str = "") -> None:
        self.metrics[name] = 1.0 if ok else 0.0
        if not ok:
            self.failures.append(f"{name} failed" + (f": {detail}" if detail else ""))

    def result(self) -> CaseResult:
        status = "fail" if self.failures else "pass"
        return CaseResult(status, dict(self.metrics), dict(self.tolerances), "; ".join(self.failures),
                          self.backend, bound_kinds=dict(self.bound_kinds))


class SkipCase(Exception):
    """Raised by a case that cannot run here (e.g. needs CUDA); the reason is recorded."""


@dataclass
class Suite:
    """A named verification suite: ``cases(scale)`` lists its cases, ``check(params, checks)`` runs one."""

    name: str
    description: str
    cases_fn: Callable[[str], Iterable[tuple[str, dict[str, Any]]]]
    check_fn: Callable[[dict[str, Any], Checks], None]
    needs_gpu: bool = False
    timeout_s: float = 600.0
    # Optional: ``plot_inputs(params) -> {"q": [1, T, G, Dk], "k": [1, T, 1, Dk], "config": NSAConfig}``
    # for ``nsa report plot`` when a suite's inputs are not plain random (e.g. a planted needle).
    plot_inputs: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    def cases(self, scale: str) -> list[Case]:
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        return [Case(self.name, case_id, dict(params), scale,
                     self.needs_gpu or bool(params.get("needs_gpu", False)), self.timeout_s)
                for case_id, params in self.cases_fn(scale)]

    def run(self, case: Case) -> CaseResult:
        """Run one case in this process; exceptions become an ``error`` result, never a crash."""
        checks = Checks()
        start = time.perf_counter()
        try:
            self.check_fn(dict(case.params), checks)
            result = checks.result()
        except SkipCase as exc:
            result = CaseResult("skip", dict(checks.metrics), dict(checks.tolerances), str(exc), checks.backend,
                                bound_kinds=dict(checks.bound_kinds))
        except Exception as exc:  # a broken case is reported, not fatal
            result = CaseResult("error", dict(checks.metrics), dict(checks.tolerances),
                                f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}", checks.backend,
                                bound_kinds=dict(checks.bound_kinds))
        result.duration_s = time.perf_counter() - start
        return result


_SUITES: dict[str, Suite] = {}


def register(suite: Suite) -> Suite:
    if suite.name in _SUITES and _SUITES[suite.name] is not suite:
        raise ValueError(f"suite {suite.name!r} is registered twice")
    _SUITES[suite.name] = suite
    return suite


def unregister(name: str) -> None:
    """Forget suite ``name`` (tests register throw-away suites and remove them afterwards)."""
    _SUITES.pop(name, None)


def suite(name: str, description: str, *, cases: Callable[[str], Iterable[tuple[str, dict[str, Any]]]],
          needs_gpu: bool = False, timeout_s: float = 600.0,
          plot_inputs: Callable[[dict[str, Any]], dict[str, Any]] | None = None):
    """Register the decorated ``check(params, checks)`` as suite ``name``::

        def _cases(scale):
            yield "T64-G2", {"seq_len": 64, "group": 2}

        @suite("causality", "changing inputs after t changes nothing at or before t", cases=_cases)
        def causality(params, checks): ...
    """
    def wrap(check_fn: Callable[[dict[str, Any], Checks], None]) -> Suite:
        return register(Suite(name, description, cases, check_fn, needs_gpu, timeout_s, plot_inputs))
    return wrap


def all_suites() -> dict[str, Suite]:
    """Every registered suite, by name (importing ``suites`` registers the built-in ones)."""
    import suites  # noqa: F401

    return dict(_SUITES)


def get_suite(name: str) -> Suite:
    known = all_suites()
    if name not in known:
        raise KeyError(f"unknown suite {name!r}; known suites: {', '.join(sorted(known))}")
    return known[name]
