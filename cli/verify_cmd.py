"""`nsa verify`: run the verification suites over Ray and say whether the build is accepted.

Exit status: 0 accepted (rule: ``verify.report.acceptance``), 1 not accepted, 2 bad usage (unknown
suite, impossible option, unreachable cluster), 130 interrupted (what finished is written).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import click

from verify.registry import SCALES

# nsa.backends.BACKEND_CHOICES, spelled out so that `nsa --help` need not import torch
# (tests/test_cli.py checks that the two agree).
BACKEND_CHOICES = ("auto", "reference", "triton")
EXIT_ACCEPTED, EXIT_NOT_ACCEPTED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageProblem(click.ClickException):
    exit_code = EXIT_USAGE


def _cluster_text(cluster) -> str:
    return (f"{cluster.address} ({cluster.nodes} node(s), {cluster.cpus:g} CPU, {cluster.gpus:g} GPU"
            f"{', started here' if cluster.owned else ''})")


class _Tally:
    """Per-suite counts shared by both progress displays."""

    def __init__(self) -> None:
        self.total: Counter = Counter()
        self.done: Counter = Counter()
        self.statuses: dict[str, Counter] = {}
        self.seconds: Counter = Counter()

    def begin(self, plan) -> None:
        self.total = Counter(case.suite for case in plan)
        self.statuses = {suite: Counter() for suite in self.total}

    def add(self, row) -> bool:
        """Count ``row``; True when its suite is now complete."""
        self.done[row.suite] += 1
        self.statuses[row.suite][row.status] += 1
        self.seconds[row.suite] += row.duration_s
        return self.done[row.suite] == self.total[row.suite]

    def suite_line(self, suite: str) -> str:
        counts = self.statuses[suite]
        parts = ", ".join(f"{counts[s]} {s}" for s in ("pass", "fail", "error", "skip") if counts[s])
        return f"suite {suite}: {parts} ({self.seconds[suite]:.1f}s in workers)"


class PlainProgress:
    """One line per finished case and per finished suite, flushed at once: CI logs never look hung."""

    def __init__(self, echo=click.echo) -> None:
        self.echo, self.tally, self.count, self.planned = echo, _Tally(), 0, 0

    def begin(self, plan, cluster, run_id) -> None:
        self.tally.begin(plan)
        self.planned = len(plan)
        self.echo(f"nsa verify: run {run_id}: {len(plan)} case(s) in {len(self.tally.total)} suite(s) on "
                  f"{_cluster_text(cluster)}")

    def case_started(self, case) -> None:
        pass

    def case_finished(self, row) -> None:
        self.count += 1
        note = f": {row.message.splitlines()[0][:160]}" if row.status != "pass" and row.message else ""
        self.echo(f"[{self.count:>{len(str(self.planned))}}/{self.planned}] {row.status:<5} {row.name} "
                  f"({row.duration_s:.2f}s){note}")
        if self.tally.add(row):
            self.echo(self.tally.suite_line(row.suite))

    def heartbeat(self, running) -> None:
        if running:
            self.echo("still running: " + ", ".join(f"{case.name} ({seconds:.0f}s)" for case, seconds in running))

    def end(self) -> None:
        pass


class LiveProgress:
    """A rich progress bar per suite; non-passing cases are printed above the bars as they finish."""

    def __init__(self, console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console, self.tally = console, _Tally()
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[counts]}"), TimeElapsedColumn(), console=console)
        self.tasks: dict[str, int] = {}

    def begin(self, plan, cluster, run_id) -> None:
        self.tally.begin(plan)
        self.console.print(f"nsa verify: run [bold]{run_id}[/bold]: {len(plan)} case(s) on {_cluster_text(cluster)}")
        self.overall = self.progress.add_task("[bold]all[/bold]", total=len(plan), counts="")
        for suite, total in self.tally.total.items():
            self.tasks[suite] = self.progress.add_task(suite, total=total, counts="")
        self.progress.start()

    def case_started(self, case) -> None:
        pass

    def case_finished(self, row) -> None:
        from verify.report import STATUS_STYLE

        self.tally.add(row)
        if row.status != "pass":
            style = STATUS_STYLE[row.status]
            first = row.message.splitlines()[0][:160] if row.message else ""
            self.console.print(f"[{style}]{row.status}[/{style}] {row.name}: {first}", highlight=False)
        counts = self.tally.statuses[row.suite]
        text = " ".join(f"[{STATUS_STYLE[s]}]{counts[s]} {s}[/]" for s in ("fail", "error", "skip") if counts[s])
        self.progress.update(self.tasks[row.suite], advance=1, counts=text)
        self.progress.update(self.overall, advance=1)

    def heartbeat(self, running) -> None:
        pass  # the bars' elapsed clocks already show that work goes on

    def end(self) -> None:
        self.progress.stop()


def _list_cases(options) -> None:
    """One line per planned case: name, where it runs, its expected seconds when it has a hint."""
    from verify import runner

    try:
        plan = runner.plan_cases(options.suites, options.scale, options.backend, options.cases)
    except runner.RunnerError as exc:
        raise UsageProblem(str(exc)) from None
    for _, case in plan:
        hint = case.params.get("expected_s")
        columns = [case.name, "gpu" if case.needs_gpu else "cpu"] + ([] if hint is None else [f"expected {hint:g}s"])
        click.echo("\t".join(columns))
    left_out = runner.opt_in_left_out(options.suites, options.scale, options.cases)
    click.echo(f"{len(plan)} case(s) at scale {options.scale}"
               + (f"; opt-in, not planned unless their suite is named: {', '.join(left_out)}" if left_out else ""))


@click.command("verify")
@click.argument("suites", nargs=-1)
@click.option("--scale", type=click.Choice(SCALES), default="ci", show_default=True,
              help="ci: CPU-sized cases (seconds); full: real sizes, GPU.")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True,
              help="Backend the cases run (a case that pins its own backend keeps it).")
@click.option("--address", default=None, metavar="ADDR",
              help="Join a Ray cluster (auto, HOST:PORT, ray://HOST:PORT) instead of starting a local one.")
@click.option("--gpus-per-case", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="GPUs reserved by each GPU case (fractions share a card).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("reports"),
              show_default=True, help="Results go to OUT/run=<id>/results.parquet.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="SECONDS", help="Per-case time limit (default: each case's own, 600s for most).")
@click.option("--fail-fast", is_flag=True, help="Stop scheduling new cases after the first failure.")
@click.option("--case", "case_patterns", multiple=True, metavar="GLOB",
              help="Only cases whose name (suite::case) matches GLOB; repeatable (any may match).")
@click.option("--list", "list_only", is_flag=True, help="Print the planned cases and exit (starts no Ray).")
def verify(suites: tuple[str, ...], scale: str, backend: str, address: str | None, gpus_per_case: float,
           out_dir: Path, timeout_s: float | None, fail_fast: bool, case_patterns: tuple[str, ...],
           list_only: bool) -> None:
    """Run the verification SUITES (default: all) and exit 0 only if the build is accepted."""
    from verify import runner
    from verify.report import make_console, render_report
    from verify.store import RunData

    options = runner.RunOptions(suites=list(suites), cases=list(case_patterns), scale=scale, backend=backend,
                                address=address, gpus_per_case=gpus_per_case, out_dir=out_dir,
                                timeout_s=timeout_s, fail_fast=fail_fast)
    if list_only:
        _list_cases(options)
        return
    console = make_console()
    progress = LiveProgress(console) if console.is_terminal else PlainProgress()
    start = time.monotonic()
    try:
        outcome = runner.verify(options, progress=progress)
    except runner.RunnerError as exc:
        raise UsageProblem(str(exc)) from None
    except KeyboardInterrupt:  # before any case ran (Ctrl-C during a run is handled by the runner)
        console.print("[yellow]interrupted before any case ran; nothing written[/yellow]")
        raise SystemExit(EXIT_INTERRUPTED) from None
    verdict = render_report(RunData(outcome.run_id, outcome.path, outcome.rows, outcome.info), console)
    console.print(f"results: {outcome.path} ({time.monotonic() - start:.1f}s wall, Ray start included)",
                  highlight=False)
    if outcome.interrupted:
        console.print("[yellow]interrupted: the cases that finished are written[/yellow]")
        raise SystemExit(EXIT_INTERRUPTED)
    raise SystemExit(EXIT_ACCEPTED if verdict.ok else EXIT_NOT_ACCEPTED)
