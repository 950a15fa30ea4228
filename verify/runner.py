"""The `nsa verify` engine: fan suite cases out over Ray, survive broken workers, store one row per case.

Scheduling. Cases run on a small pool of long-lived Ray actors (``CaseWorker``), one case at a
time each: ``num_cpus=1`` actors for CPU cases, ``num_gpus=--gpus-per-case`` actors for cases that
need a GPU. Why actors and not one Ray task per case or per chunk:

- most ``ci`` cases take 1-50 ms while a fresh worker process spends seconds importing torch; an
  actor pays that once and then costs ~1 ms per case, so no grouping is needed to amortise it,
  and every case keeps its own timeout and its own crash isolation;
- Ray forces ``max_calls=1`` on GPU tasks because a reused task worker may be handed a different
  GPU than the one CUDA was initialised on; an actor keeps its GPU for life, so reuse is safe;
- the runner only dispatches to an actor that is up and idle, so a case's timeout counts from
  when it really starts, not from when it was queued behind others.

A case that needs a GPU on a cluster without one is recorded as ``skip`` ("needs a GPU; cluster
has none") and never submitted, so nothing waits forever for a resource that does not exist.

Failure handling. A worker that crashes (segfault, ``os._exit``, OOM kill) turns its case into an
``error`` row with Ray's reason and is replaced; a case that outlives its timeout (``--timeout``, else
the case's ``timeout_s``) has its worker killed (``ray.kill``; the actor-task form of
``ray.cancel(force=True)``) and becomes an ``error`` row. Case calls are never retried
(``max_restarts=0``, ``max_task_retries=0``): a crash is a result, not a hiccup. Ctrl-C kills the
workers and writes what finished. The results file is rewritten atomically as cases finish,
so even a killed driver leaves what had finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import logging
import math
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from verify import environment, store
from verify.registry import Case, CaseResult, Suite, get_suite
from verify.schema import ResultRow

GPU_SKIP_REASON = "needs a GPU; cluster has none"
# Ray's object store holds only small result dicts here; a fixed, modest size keeps Ray from
# claiming 30% of RAM (and from failing on machines with a small /dev/shm).
OBJECT_STORE_BYTES = 512 * 1024**2
CHECKPOINT_EVERY_S = 2.0
HEARTBEAT_EVERY_S = 30.0
MAX_WORKER_START_FAILURES = 3


class RunnerError(Exception):
    """A run that cannot start: unknown suite, unreachable cluster, impossible resources."""


@dataclass
class RunOptions:
    """What ``nsa verify`` was asked to do (see ``nsa verify --help``)."""

    suites: list[str] = field(default_factory=list)  # empty: every registered suite
    # Glob patterns on case names (``suite::case``); empty: every case of the suites.
    cases: list[str] = field(default_factory=list)
    scale: str = "ci"
    backend: str = "auto"
    address: str | None = None
    gpus_per_case: float = 1.0
    out_dir: Path = store.DEFAULT_OUT
    timeout_s: float | None = None
    fail_fast: bool = False
    # How long an actor may take to come up (imports, placement) before its cases are errors.
    startup_timeout_s: float = 300.0
    connect_timeout_s: float = 60.0


@dataclass
class Cluster:
    """The Ray cluster a run uses. ``owned``: this process started it (and shuts it down)."""

    address: str
    cpus: float
    gpus: float
    max_node_gpus: float
    nodes: int
    owned: bool


@dataclass
class RunOutcome:
    run_id: str
    path: Path
    rows: list[ResultRow]
    info: dict[str, Any]

    @property
    def interrupted(self) -> bool:
        return bool(self.info.get("interrupted"))


class Progress(Protocol):
    """What the runner reports while it works (the CLI renders it live or as plain lines)."""

    def begin(self, plan: list[Case], cluster: Cluster, run_id: str) -> None: ...

    def case_started(self, case: Case) -> None: ...

    def case_finished(self, row: ResultRow) -> None: ...

    def heartbeat(self, running: list[tuple[Case, float]]) -> None: ...

    def end(self) -> None: ...


class SilentProgress:
    def begin(self, plan, cluster, run_id) -> None:
        pass

    def case_started(self, case) -> None:
        pass

    def case_finished(self, row) -> None:
        pass

    def heartbeat(self, running) -> None:
        pass

    def end(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------
# Planning


def matches(name: str, patterns: list[str]) -> bool:
    """Whether case ``name`` (``suite::case``) matches any glob of ``patterns`` (all when empty)."""
    return not patterns or any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def plan_cases(suite_names: list[str], scale: str, backend: str,
               case_patterns: list[str] | None = None) -> list[tuple[Suite, Case]]:
    """Every case of the named suites (all suites when empty) at ``scale`` whose name matches one
    of ``case_patterns`` (globs, all cases when empty), with ``params["backend"] = backend``
    unless the case pins a backend of its own (a case written to test one backend, e.g. decode's
    float64 reference run, keeps it). Opt-in cases (a training run of many minutes) are planned
    only when their suite is named: see :func:`opt_in_left_out`. Patterns that match no case are
    an error (a typo must not pass as an empty, accepted run)."""
    from verify.registry import all_suites

    known = all_suites()
    names = list(suite_names) or list(known)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise RunnerError(f"unknown suite(s) {', '.join(map(repr, unknown))}; known suites: "
                          f"{', '.join(sorted(known))}")
    plan = []
    for name in dict.fromkeys(names):
        suite = get_suite(name)
        for case in suite.cases(scale):
            if (case.opt_in and not suite_names) or not matches(case.name, case_patterns or []):
                continue
            params = {**case.params, "backend": case.params.get("backend", backend)}
            plan.append((suite, dataclasses.replace(case, params=params)))
    if case_patterns and not plan:
        raise RunnerError(f"--case {' '.join(map(repr, case_patterns))} matches no {scale}-scale case of "
                          f"{', '.join(dict.fromkeys(names))}; case names look like "
                          f"'decode::continuity-*' (see `nsa verify --list`)")
    return plan


def opt_in_left_out(suite_names: list[str], scale: str, case_patterns: list[str] | None = None) -> list[str]:
    """The opt-in cases matching ``case_patterns`` that a run of ``suite_names`` at ``scale``
    leaves out (none when suites are named)."""
    if suite_names:
        return []
    from verify.registry import all_suites

    return [case.name for suite in all_suites().values() for case in suite.cases(scale)
            if case.opt_in and matches(case.name, case_patterns or [])]


# ----------------------------------------------------------------------------------------------
# Cluster


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def connect(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
            timeout_s: float = 60.0) -> Cluster:
    """Join the cluster at ``address`` (``auto``, ``host:port``, ``ray://host:port``) or, with
    ``None``, start a local Ray instance sized to this machine. A process already connected to
    Ray (an embedding program, the test suite) keeps its connection."""
    import ray

    if address not in (None, "local", "auto"):
        _check_reachable(address, min(timeout_s, 10.0))
    owned = False
    if not ray.is_initialized():
        quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
        with _sigint_deferred() as interrupted:
            if address in (None, "local"):
                # A throw-away single-user instance: token auth only adds a file race between runs.
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")
                ray.init(address="local", num_cpus=num_cpus or available_cpus(), num_gpus=num_gpus,
                         object_store_memory=OBJECT_STORE_BYTES, **quiet)
                owned = True
            else:
                _init_with_deadline(address, timeout_s, quiet)
        if interrupted:
            if owned:
                ray.shutdown()
            raise KeyboardInterrupt
    resources = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return Cluster(address=address or "local", cpus=float(resources.get("CPU", 0.0)),
                   gpus=float(resources.get("GPU", 0.0)),
                   max_node_gpus=max((float(n["Resources"].get("GPU", 0.0)) for n in nodes), default=0.0),
                   nodes=len(nodes), owned=owned)


@contextlib.contextmanager
def _sigint_deferred():
    """Hold Ctrl-C while Ray starts: interrupting ``ray.init`` half-way leaves its background
    processes half set up and can crash the interpreter at exit. Yields a list that is non-empty
    when Ctrl-C was pressed, so the caller can shut Ray down and then stop."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield received
        return
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def _sigterm_as_ctrl_c():
    """CI systems and job schedulers stop a run with SIGTERM: treat it as Ctrl-C while the run
    goes on, so the cases that finished are written and the exit status says "interrupted"."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def disconnect(cluster: Cluster) -> None:
    import ray

    if cluster.owned and ray.is_initialized():
        ray.shutdown()


def _check_reachable(address: str, timeout_s: float) -> None:
    """Fail fast, naming the address, when nothing listens there (Ray itself retries for minutes)."""
    import socket

    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise RunnerError(f"--address {address!r} is not auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise RunnerError(f"cannot reach the Ray cluster at {address}: {exc}") from None


def _init_with_deadline(address: str, timeout_s: float, options: dict[str, Any]) -> None:
    import ray

    runtime_env = {}
    if (environment.REPO_ROOT / "pyproject.toml").is_file():
        # Ship this checkout so every node runs the code whose git sha the results record.
        runtime_env = {"working_dir": str(environment.REPO_ROOT),
                       "excludes": [".venv", ".git", "reports", "*.egg-info", "__pycache__", ".pytest_cache"]}
    outcome: dict[str, BaseException | None] = {}

    def attempt() -> None:
        try:
            ray.init(address=address, runtime_env=runtime_env or None, **options)
            outcome["error"] = None
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, which reports it
            outcome["error"] = exc

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise RunnerError(f"no answer from the Ray cluster at {address} within {timeout_s:.0f}s")
    if outcome["error"] is not None:
        error = outcome["error"]
        raise RunnerError(f"cannot join the Ray cluster at {address}: {type(error).__name__}: {error}")


# ----------------------------------------------------------------------------------------------
# Workers


class CaseWorker:
    """Runs cases in a long-lived worker process (a Ray actor; see the module docstring)."""

    def __init__(self) -> None:
        import ray

        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        if not self.gpu_ids:
            # Triton kernels on CPU tensors need its interpreter, switched on before any kernel
            # is defined (as tests/conftest.py does); a no-op for code that never calls Triton.
            os.environ.setdefault("TRITON_INTERPRET", "1")

    def ready(self) -> str:
        return environment.host_name()

    def run(self, suite: Suite, case: Case) -> dict[str, Any]:
        started_at = datetime.now(timezone.utc)
        result = suite.run(case)
        if self.gpu_ids and "torch" in sys.modules:
            sys.modules["torch"].cuda.empty_cache()  # the next case gets the whole card
        return {"result": result, "started_at": started_at, "device": environment.device_name(bool(self.gpu_ids)),
                "host": environment.host_name()}


@dataclass
class _Slot:
    """One actor and what it is doing."""

    pool: str
    actor: Any
    ready_ref: Any
    created_at: float
    ready: bool = False
    work: tuple[Suite, Case] | None = None
    ref: Any = None
    started_at: float = 0.0  # monotonic, for timeouts
    started_wall: datetime | None = None  # for the rows of cases that never report back
    deadline: float = math.inf


@dataclass
class _Pool:
    name: str
    options: dict[str, Any]
    capacity: int
    queue: deque = field(default_factory=deque)
    start_failures: int = 0


class _Run:
    """The driver loop's state for one ``run_cases`` call."""

    def __init__(self, plan: list[tuple[Suite, Case]], cluster: Cluster, options: RunOptions, run_id: str,
                 info: dict[str, Any], progress: Progress) -> None:
        import ray

        self.ray = ray
        self.cluster, self.options, self.run_id, self.info, self.progress = cluster, options, run_id, info, progress
        self.plan = plan
        self.rows: list[ResultRow] = []
        self.slots: list[_Slot] = []
        self.last_write = 0.0
        self.last_heartbeat = time.monotonic()
        self.versions = environment.library_versions()
        self.git_sha = info.get("git_sha", "")
        self.worker_class = ray.remote(max_restarts=0, max_task_retries=0)(CaseWorker)
        gpu_slots = math.floor(cluster.gpus / options.gpus_per_case + 1e-9) if cluster.gpus else 0
        # A GPU case also keeps a core busy, but on a machine with no spare core the GPU actors
        # take none, or they would starve every CPU case of a slot.
        gpu_cpus = 1 if cluster.cpus >= gpu_slots + 1 else 0
        cpu_slots = max(1, int(cluster.cpus - gpu_cpus * gpu_slots))
        self.pools = {
            "cpu": _Pool("cpu", {"num_cpus": 1, "num_gpus": 0}, cpu_slots),
            "gpu": _Pool("gpu", {"num_cpus": gpu_cpus, "num_gpus": options.gpus_per_case}, gpu_slots),
        }

    # -- rows ---------------------------------------------------------------------------------

    def _row(self, case: Case, status: str, message: str, *, result: CaseResult | None = None,
             started_at: datetime | None = None, duration_s: float = 0.0, device: str = "",
             host: str = "") -> ResultRow:
        result = result or CaseResult(status, message=message)
        return ResultRow(
            run_id=self.run_id, suite=case.suite, case_id=case.case_id, params=case.params, status=status,
            scale=case.scale, metrics=result.metrics, tolerances=result.tolerances,
            bound_kinds=result.bound_kinds, message=message, duration_s=duration_s, needs_gpu=case.needs_gpu,
            device=device, backend=result.backend or str(case.params.get("backend", "")),
            torch_version=self.versions["torch"], triton_version=self.versions["triton"],
            nsa_version=self.versions["nsa"], python_version=self.versions["python"], git_sha=self.git_sha,
            host=host or environment.host_name(), started_at=started_at or datetime.now(timezone.utc))

    def _record(self, row: ResultRow) -> None:
        self.rows.append(row)
        self.progress.case_finished(row)
        if row.status in ("fail", "error") and self.options.fail_fast:
            self._stop_scheduling("fail_fast_stopped")
        if time.monotonic() - self.last_write > CHECKPOINT_EVERY_S:
            self.write(complete=False)

    def write(self, complete: bool) -> Path:
        self.info.update(complete=complete, finished_at=datetime.now(timezone.utc).isoformat(),
                         recorded=len(self.rows))
        self.last_write = time.monotonic()
        return store.write_run(self.options.out_dir, self.run_id, self.rows, self.info)

    def _stop_scheduling(self, reason: str) -> None:
        self.info[reason] = True
        for pool in self.pools.values():
            self.info["not_run"].extend(case.name for _, case in pool.queue)
            pool.queue.clear()

    # -- actors -------------------------------------------------------------------------------

    def _start_slot(self, pool: _Pool) -> None:
        actor = self.worker_class.options(**pool.options).remote()
        self.slots.append(_Slot(pool.name, actor, actor.ready.remote(), time.monotonic()))

    def _retire(self, slot: _Slot) -> None:
        self.slots.remove(slot)
        with contextlib.suppress(ValueError, self.ray.exceptions.RayError):  # already dead: nothing to free
            self.ray.kill(slot.actor, no_restart=True)

    def _fill(self) -> None:
        """Start actors where queued work has none, dispatch to idle ones, retire unneeded ones."""
        for pool in self.pools.values():
            mine = [s for s in self.slots if s.pool == pool.name]
            idle = [s for s in mine if s.ready and s.work is None]
            for slot in idle:
                if not pool.queue:
                    self._retire(slot)
                    continue
                suite, case = pool.queue.popleft()
                limit = self.options.timeout_s or case.timeout_s
                slot.work, slot.ref = (suite, case), slot.actor.run.remote(suite, case)
                slot.started_at, slot.deadline = time.monotonic(), time.monotonic() + limit
                slot.started_wall = datetime.now(timezone.utc)
                self.progress.case_started(case)
            starting = [s for s in mine if not s.ready]
            # Work left for fewer actors than are starting (fail-fast, finished early): stop the
            # extras, or one that cannot be placed would hold the run until its startup timeout.
            for slot in starting[len(pool.queue):]:
                self._retire(slot)
            starting = min(len(starting), len(pool.queue))
            busy = sum(1 for s in mine if s.work is not None)
            wanted = min(pool.capacity, busy + len(pool.queue)) - busy - starting
            for _ in range(max(0, wanted)):
                self._start_slot(pool)

    def _finish_work(self, slot: _Slot, ref: Any) -> None:
        _, case = slot.work
        elapsed, started_wall = time.monotonic() - slot.started_at, slot.started_wall
        slot.work = slot.ref = None
        try:
            payload = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as exc:
            self._record(self._row(case, "error", f"the worker process died while running the case: "
                                   f"{_first_lines(exc)}", duration_s=elapsed, started_at=started_wall))
            self._retire(slot)
            return
        except self.ray.exceptions.RayError as exc:
            self._record(self._row(case, "error", f"the case could not run in its worker: {_first_lines(exc, 20)}",
                                   duration_s=elapsed, started_at=started_wall))
            return
        result: CaseResult = payload["result"]
        if slot.pool == "gpu" and result.status == "error":
            # A CUDA error (illegal address, device-side assert) poisons the process's context:
            # every later case there would error too. A fresh worker costs seconds.
            self._retire(slot)
        self._record(self._row(case, result.status, result.message, result=result,
                               started_at=payload["started_at"], duration_s=result.duration_s,
                               device=payload["device"], host=payload["host"]))

    def _slot_ready(self, slot: _Slot) -> None:
        pool = self.pools[slot.pool]
        try:
            self.ray.get(slot.ready_ref)
            slot.ready = True
            pool.start_failures = 0
        except self.ray.exceptions.RayError as exc:
            self._worker_start_failed(slot, pool, f"a {pool.name} worker failed to start: {_first_lines(exc)}")

    def _worker_start_failed(self, slot: _Slot, pool: _Pool, why: str, retry: bool = True) -> None:
        self._retire(slot)
        pool.start_failures = pool.start_failures + 1 if retry else MAX_WORKER_START_FAILURES
        if pool.start_failures >= MAX_WORKER_START_FAILURES:
            while pool.queue:
                _, case = pool.queue.popleft()
                self._record(self._row(case, "error", why))

    def _check_clocks(self) -> None:
        now = time.monotonic()
        for slot in list(self.slots):
            if slot.work is not None and now > slot.deadline:
                _, case = slot.work
                limit = self.options.timeout_s or case.timeout_s
                self._retire(slot)
                self._record(self._row(case, "error", f"timed out after {now - slot.started_at:.1f}s "
                                       f"(limit {limit:g}s); its worker was killed", duration_s=now - slot.started_at,
                                       started_at=slot.started_wall))
            elif not slot.ready and now - slot.created_at > self.options.startup_timeout_s:
                pool = self.pools[slot.pool]
                self._worker_start_failed(slot, pool, f"no {pool.name} worker ({pool.options}) started within "
                                          f"{self.options.startup_timeout_s:g}s; does the cluster have those "
                                          f"resources free?", retry=False)
        if now - self.last_heartbeat > HEARTBEAT_EVERY_S:
            self.last_heartbeat = now
            self.progress.heartbeat([(s.work[1], now - s.started_at) for s in self.slots if s.work])

    # -- loop ---------------------------------------------------------------------------------

    def execute(self) -> None:
        known = previous_durations(self.options.out_dir, self.options.scale)
        plan = sorted(self.plan, key=lambda item: -expected_duration(item[1], known))
        for suite, case in plan:
            if case.needs_gpu and self.pools["gpu"].capacity == 0:
                self._record(self._row(case, "skip", GPU_SKIP_REASON))
            else:
                self.pools["gpu" if case.needs_gpu else "cpu"].queue.append((suite, case))
        while True:
            self._fill()
            waiting = {}
            for slot in self.slots:
                if not slot.ready:
                    waiting[slot.ready_ref] = slot
                elif slot.work is not None:
                    waiting[slot.ref] = slot
            if not waiting:
                break
            next_deadline = min((s.deadline for s in self.slots if s.work is not None), default=math.inf)
            wait_s = max(0.01, min(0.5, next_deadline - time.monotonic()))
            done, _ = self.ray.wait(list(waiting), num_returns=len(waiting), timeout=wait_s, fetch_local=True)
            for ref in done:
                slot = waiting[ref]
                if slot not in self.slots:
                    continue
                if slot.ready:
                    self._finish_work(slot, ref)
                else:
                    self._slot_ready(slot)
            self._check_clocks()

    def abort(self) -> None:
        """Ctrl-C: kill every worker; cases in flight or queued are listed as not run."""
        self.info["interrupted"] = True
        self.info["not_run"].extend(s.work[1].name for s in self.slots if s.work)
        for slot in list(self.slots):
            self._retire(slot)
        self._stop_scheduling("interrupted")


def expected_duration(case: Case, known: dict[str, float]) -> float:
    """The sort key of longest-first scheduling, so that a few slow cases do not start last and
    leave the other workers idle at the end: the case's time in the last run (``known``), else
    its ``expected_s`` hint (seconds on one H200, set on the slowest full-scale cases), else
    unknown, which counts as long when there is a history (a new case) and as 0 without one."""
    if case.name in known:
        return known[case.name]
    if "expected_s" in case.params:
        return float(case.params["expected_s"])
    return math.inf if known else 0.0


def previous_durations(out_dir: Path | str, scale: str) -> dict[str, float]:
    """Case name -> duration in the latest readable run at ``scale`` under ``out_dir`` (empty when
    there is none: ordering is an optimisation, never a reason to fail)."""
    for run_id in reversed(store.list_runs(out_dir)[-5:]):
        try:
            run = store.read_run(out_dir, run_id)
        except store.StoreError:
            continue
        if run.info.get("scale") == scale:
            return {row.name: row.duration_s for row in run.rows if row.status != "skip"}
    return {}


def _first_lines(exc: BaseException, lines: int = 6) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return "\n".join(text.splitlines()[:lines])


def run_cases(plan: list[tuple[Suite, Case]], cluster: Cluster, options: RunOptions, *,
              progress: Progress | None = None, run_id: str | None = None) -> RunOutcome:
    """Run ``plan`` on ``cluster``; returns the rows and where they were written.

    Ctrl-C during the run kills the workers, writes what finished (``info["interrupted"]``) and
    returns normally, so the caller decides the exit status.
    """
    progress = progress or SilentProgress()
    run_id = run_id or store.new_run_id()
    if (any(case.needs_gpu for _, case in plan) and cluster.gpus
            and not 0 < options.gpus_per_case <= cluster.max_node_gpus):
            raise RunnerError(f"--gpus-per-case {options.gpus_per_case:g} cannot be placed: it must be > 0 and at "
                              f"most the GPUs of one node ({cluster.max_node_gpus:g})")
    info: dict[str, Any] = {
        "run_id": run_id, "scale": options.scale, "backend": options.backend,
        "suites": sorted({case.suite for _, case in plan}), "planned": len(plan), "not_run": [],
        "opt_in_left_out": opt_in_left_out(options.suites, options.scale, options.cases),
        "case_patterns": list(options.cases),
        "cluster": dataclasses.asdict(cluster), "gpus_per_case": options.gpus_per_case,
        "timeout_s": options.timeout_s, "git_sha": environment.git_sha(),
        "driver_host": environment.host_name(), "started_at": datetime.now(timezone.utc).isoformat(),
        "command": " ".join(sys.argv), "interrupted": False, "fail_fast_stopped": False,
    }
    state = _Run(plan, cluster, options, run_id, info, progress)
    progress.begin([case for _, case in plan], cluster, run_id)
    try:
        state.execute()
    except KeyboardInterrupt:
        state.abort()
    finally:
        progress.end()
    path = state.write(complete=not info["interrupted"] and not info["not_run"])
    return RunOutcome(run_id, path, state.rows, info)


def verify(options: RunOptions, *, progress: Progress | None = None, num_cpus: int | None = None,
           num_gpus: int | None = None) -> RunOutcome:
    """Plan, connect, run and store: the whole of ``nsa verify``."""
    plan = plan_cases(options.suites, options.scale, options.backend, options.cases)
    cluster = connect(options.address, num_cpus=num_cpus, num_gpus=num_gpus, timeout_s=options.connect_timeout_s)
    try:
        # After ray.init: Ray installs its own SIGTERM handler in the driver, which exits at once.
        with _sigterm_as_ctrl_c():
            return run_cases(plan, cluster, options, progress=progress)
    finally:
        disconnect(cluster)
