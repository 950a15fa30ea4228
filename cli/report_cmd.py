"""`nsa report`: show, compare, export and plot stored `nsa verify` runs.

RUN is a run id (``20261128T112600Z-ab12``), ``run=<id>``, ``latest``, a run directory or a
results.parquet path; ids are looked up in ``--out`` (default ``reports/``). A missing, corrupt or
unknown-schema file is an error (exit 1) naming the path and the problem.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

OUT_OPTION = click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
                          default=Path("reports"), show_default=True, help="Where runs are stored.")


def _read(out_dir: Path, run: str | None):
    from verify.store import StoreError, read_run

    try:
        return read_run(out_dir, run)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None


def _console():
    from verify.report import make_console

    return make_console()


@click.group("report")
def report() -> None:
    """Show, compare, export and plot stored verification runs."""


@report.command("show")
@click.argument("run", required=False)
@OUT_OPTION
def show(run: str | None, out_dir: Path) -> None:
    """Render the acceptance report of RUN (default: the latest run in --out)."""
    from verify.report import render_report

    render_report(_read(out_dir, run), _console())


@report.command("compare")
@click.argument("run_a")
@click.argument("run_b")
@OUT_OPTION
@click.option("--threshold", type=click.FloatRange(min=0), default=0.1, show_default=True,
              help="A bounded metric regresses when it loses more than this fraction of its headroom; "
                   "time ratios beyond 1 +/- this are highlighted.")
def compare(run_a: str, run_b: str, out_dir: Path, threshold: float) -> None:
    """New failures, metric regressions and performance ratios from RUN_A to RUN_B.
    Exits 1 when B has new failures or regressions."""
    from verify.report import compare_runs, render_comparison

    a, b = _read(out_dir, run_a), _read(out_dir, run_b)
    result = compare_runs(a, b, threshold)
    render_comparison(result, a, b, _console(), threshold)
    raise SystemExit(1 if result.worse else 0)


@report.command("export")
@click.argument("run")
@OUT_OPTION
@click.option("--format", "fmt", type=click.Choice(("csv", "json", "junit")), required=True)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File to write (default: standard output).")
def export(run: str, out_dir: Path, fmt: str, output: Path | None) -> None:
    """Write RUN as CSV, JSON or JUnit XML (for CI test reports)."""
    from verify.report import EXPORTERS

    text = EXPORTERS[fmt](_read(out_dir, run))
    if output is None:
        click.echo(text, nl=False)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, output)
    click.echo(f"wrote {output}", err=True)


@report.command("plot")
@click.argument("run")
@click.argument("case")
@OUT_OPTION
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the PNGs go (default: the run's directory, plots/).")
def plot(run: str, case: str, out_dir: Path, output_dir: Path | None) -> None:
    """PNG heatmaps (queries x blocks) of CASE's p_cmp, selection scores and selected blocks.
    CASE is SUITE::CASE_ID, or a CASE_ID that only one suite has."""
    from verify.plots import plot_case

    data = _read(out_dir, run)
    row = _find_case(data.rows, case, data.path)
    inputs = None
    hook = _plot_hook(row.suite)
    if hook is not None:
        inputs = hook(dict(row.params))
    try:
        paths = plot_case(row.suite, row.case_id, row.params, output_dir or data.path.parent / "plots", inputs)
    except (ValueError, TypeError) as exc:
        raise click.ClickException(f"{row.name}: cannot rebuild its inputs from params {row.params}: {exc}") from None
    for path in paths:
        click.echo(str(path))


def _find_case(rows, case: str, path: Path):
    if "::" in case:
        matches = [row for row in rows if row.name == case]
    else:
        matches = [row for row in rows if row.case_id == case]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise click.ClickException(f"{path}: case id {case!r} is in several suites; use one of "
                                   f"{', '.join(row.name for row in matches)}")
    known = ", ".join(row.name for row in rows[:12]) + (" ..." if len(rows) > 12 else "")
    raise click.ClickException(f"{path}: no case {case!r} in this run (cases: {known or 'none'})")


def _plot_hook(suite_name: str):
    from verify.registry import all_suites

    suite = all_suites().get(suite_name)
    return suite.plot_inputs if suite is not None else None
