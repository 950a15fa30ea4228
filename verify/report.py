"""Acceptance verdict, rich report, run comparison and exports (CSV, JSON, JUnit XML) of result tables.

The acceptance rule (what makes ``nsa verify`` exit 0) lives in :func:`acceptance`:

- no case failed or errored;
- every planned case was recorded (an interrupted, ``--fail-fast``-stopped or killed run is not
  accepted);
- a skipped case is accepted only when it does not need a GPU (e.g. parity under
  ``--backend reference``, which has nothing to compare) or the cluster had no GPU at all (the
  GPU-only cases of a CPU machine). A GPU case skipped on a cluster *with* GPUs (missing
  cuDNN, a CPU-only torch on the GPU box) is a gap in the acceptance, so it fails the run;
- at least one case passed (a run that verified nothing accepts nothing).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from verify.schema import RESULT_SCHEMA, STATUSES, ResultRow, json_safe
from verify.store import RunData

TIME_SUFFIXES = ("_us", "_ms", "_s")
STATUS_STYLE = {"pass": "green", "fail": "red", "error": "bold red", "skip": "yellow"}
EXPORT_FORMATS = ("csv", "json", "junit")


# ----------------------------------------------------------------------------------------------
# Verdict


@dataclass
class Verdict:
    ok: bool
    reasons: list[str]
    counts: dict[str, int]


def cluster_had_gpus(info: dict[str, Any]) -> bool:
    return float((info.get("cluster") or {}).get("gpus", 0) or 0) > 0


def acceptance(rows: list[ResultRow], info: dict[str, Any]) -> Verdict:
    """Whether a run accepts the build, and every reason it does not (see the module docstring)."""
    counts = Counter(row.status for row in rows)
    counts = {status: counts.get(status, 0) for status in STATUSES}
    reasons = []
    if counts["fail"]:
        reasons.append(f"{counts['fail']} case(s) failed")
    if counts["error"]:
        reasons.append(f"{counts['error']} case(s) errored")
    not_run = info.get("not_run") or []
    if not_run:
        why = "interrupted" if info.get("interrupted") else "stopped by --fail-fast" if info.get(
            "fail_fast_stopped") else "not run"
        reasons.append(f"{len(not_run)} case(s) not run ({why})")
    planned = int(info.get("planned", len(rows)))
    if len(rows) + len(not_run) < planned:
        reasons.append(f"run incomplete: {len(rows)} of {planned} planned cases recorded (was it killed?)")
    if cluster_had_gpus(info):
        gpu_skips = [row for row in rows if row.status == "skip" and row.needs_gpu]
        if gpu_skips:
            reasons.append(f"{len(gpu_skips)} GPU case(s) skipped on a cluster that has GPUs")
    if not counts["pass"]:
        reasons.append("no case passed")
    return Verdict(not reasons, reasons, counts)


# ----------------------------------------------------------------------------------------------
# Rendering


def make_console():
    """A rich console; when output is not a terminal (CI logs, files) lines are 160 wide, not 80,
    so tables keep their metric names."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return f"{value:.4g}"


def headroom(value: float, bound: float, kind: str) -> float:
    """How far ``value`` is from failing ``bound``, as a fraction of the bound (negative: failing,
    NaN: never passes)."""
    if kind == "eq" or not math.isfinite(value):
        return 0.0 if value == bound else float("nan")
    gap = bound - value if kind == "max" else value - bound
    if bound == 0:  # an exactness check: either it holds or it does not
        return math.inf if gap >= 0 else -math.inf
    return gap / abs(bound) if bound else gap


def _bound_text(kind: str, bound: float) -> str:
    return {"max": "<= ", "min": ">= ", "eq": "== "}.get(kind, "") + _fmt(bound)


def _metric_table(row: ResultRow, title: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for column in ("metric", "value", "bound", "headroom"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name, value in sorted(row.metrics.items()):
        if name in row.tolerances:
            kind = row.bound_kinds.get(name, "")
            room = headroom(value, row.tolerances[name], kind)
            ok = room >= 0 if kind in ("max", "min") else room == 0.0
            style = "green" if ok else "red"
            table.add_row(name, f"[{style}]{_fmt(value)}[/{style}]", _bound_text(kind, row.tolerances[name]),
                          "-" if kind == "eq" else f"{room:.0%}" if math.isfinite(room) else "NaN")
        else:
            table.add_row(f"[dim]{name}[/dim]", _fmt(value), "", "")
    return table


def render_report(run: RunData, console, *, max_message_lines: int = 12, closest: int = 3) -> Verdict:
    """Print run ``run`` to a rich ``console``: header, per-suite table, failures with their
    metrics against bounds, each suite's metrics closest to their bounds, skips by reason, verdict."""
    from rich.panel import Panel
    from rich.table import Table

    rows, info = run.rows, run.info
    verdict = acceptance(rows, info)
    devices = sorted({row.device for row in rows if row.device})
    first = rows[0] if rows else None
    header = [(f"run [bold]{run.run_id}[/bold]  scale {info.get('scale', first.scale if first else '?')}  "
               f"backend {info.get('backend', '?')}  started {info.get('started_at', '?')}"),
              (f"git {info.get('git_sha') or (first.git_sha if first else '') or 'unknown'}  "
               f"driver {info.get('driver_host', '?')}  cluster {_cluster_text(info)}"),
              f"devices: {', '.join(devices) or '-'}"]
    if first:
        header.append(f"torch {first.torch_version}  triton {first.triton_version}  nsa {first.nsa_version}  "
                      f"python {first.python_version}")
    header.append(f"file {run.path}" + ("" if info.get("complete", True) else "  [yellow](incomplete)[/yellow]"))
    console.print(Panel("\n".join(header), title="nsa acceptance report", expand=False))

    by_suite: dict[str, list[ResultRow]] = defaultdict(list)
    for row in rows:
        by_suite[row.suite].append(row)
    summary = Table(title="suites", title_justify="left")
    for column in ("suite", "cases", *STATUSES, "time s"):
        summary.add_column(column, justify="left" if column == "suite" else "right")
    for name, suite_rows in sorted(by_suite.items()):
        counts = Counter(row.status for row in suite_rows)
        cells = [f"[{STATUS_STYLE[s]}]{counts[s]}[/{STATUS_STYLE[s]}]" if counts[s] else "0" for s in STATUSES]
        summary.add_row(name, str(len(suite_rows)), *cells, f"{sum(r.duration_s for r in suite_rows):.1f}")
    console.print(summary)

    for row in rows:
        if row.status in ("fail", "error"):
            message = "\n".join(row.message.splitlines()[:max_message_lines])
            console.print(f"[{STATUS_STYLE[row.status]}]{row.status.upper()}[/] [bold]{row.name}[/bold] "
                          f"({row.device or 'no device'}, backend {row.backend or '-'}, {row.duration_s:.2f}s)")
            console.print(f"  {message}", markup=False, highlight=False)
            if row.metrics:
                console.print(_metric_table(row, f"  {row.name}: metrics vs bounds"))

    tight = Table(title=f"closest to their bounds (top {closest} per suite)", title_justify="left")
    for column in ("suite", "case", "metric", "value", "bound", "headroom"):
        tight.add_column(column, justify="right" if column in ("value", "bound", "headroom") else "left")
    for name, suite_rows in sorted(by_suite.items()):
        margins = [(headroom(v, row.tolerances[m], row.bound_kinds.get(m, "")), row, m, v)
                   for row in suite_rows for m, v in row.metrics.items()
                   if m in row.tolerances and row.bound_kinds.get(m) in ("max", "min") and row.tolerances[m] != 0]
        margins.sort(key=lambda item: (not math.isnan(item[0]), item[0]))
        for room, row, metric, value in margins[:closest]:
            style = "red" if not room >= 0 else "yellow" if room < 0.1 else "green"
            tight.add_row(name, row.case_id, metric, _fmt(value),
                          _bound_text(row.bound_kinds[metric], row.tolerances[metric]),
                          f"[{style}]{room:.0%}[/{style}]" if math.isfinite(room) else "[red]NaN[/red]")
    if tight.row_count:
        console.print(tight)

    skips: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        if row.status == "skip":
            skips[row.message.splitlines()[0] if row.message else "(no reason given)"].append(row.name)
    for reason, names in sorted(skips.items()):
        shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
        console.print(f"[yellow]skipped[/yellow] {len(names)}: {reason} [dim]({shown})[/dim]")
    if info.get("not_run"):
        console.print(f"[yellow]not run[/yellow] {len(info['not_run'])}: "
                      f"{', '.join(info['not_run'][:6])}{' ...' if len(info['not_run']) > 6 else ''}")
    if info.get("case_patterns"):
        # A filtered run accepts only what it ran: say so next to the verdict.
        console.print(f"[yellow]filtered[/yellow]: only cases matching {' '.join(info['case_patterns'])} "
                      f"({info.get('planned', len(rows))} planned)", highlight=False)
    if info.get("opt_in_left_out"):
        left_out = info["opt_in_left_out"]
        console.print(f"[dim]opt-in, not in this run[/dim] {len(left_out)}: {', '.join(left_out)} "
                      "[dim](long runs; name the suite to run them, e.g. nsa verify trainability --scale full)[/dim]")
    render_verdict(verdict, console)
    return verdict


def render_verdict(verdict: Verdict, console) -> None:
    counts = ", ".join(f"{verdict.counts[s]} {s}" for s in STATUSES)
    if verdict.ok:
        console.print(f"[bold green]ACCEPTED[/bold green] ({counts})")
    else:
        console.print(f"[bold red]NOT ACCEPTED[/bold red] ({counts}): {'; '.join(verdict.reasons)}")


def _cluster_text(info: dict[str, Any]) -> str:
    cluster = info.get("cluster") or {}
    if not cluster:
        return "?"
    return (f"{cluster.get('address', '?')} ({cluster.get('nodes', '?')} node(s), {cluster.get('cpus', 0):g} CPU, "
            f"{cluster.get('gpus', 0):g} GPU)")


# ----------------------------------------------------------------------------------------------
# Compare


@dataclass
class Comparison:
    """What changed from run A to run B (see :func:`compare_runs`)."""

    new_failures: list[tuple[str, str, str, str]] = field(default_factory=list)  # name, A, B, message
    fixed: list[tuple[str, str, str]] = field(default_factory=list)  # name, A, B
    regressions: list[tuple[str, str, float, float, float, str]] = field(default_factory=list)
    performance: list[tuple[str, str, float, float, float]] = field(default_factory=list)  # ..., B/A
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)

    @property
    def worse(self) -> bool:
        return bool(self.new_failures or self.regressions)


def is_time_metric(name: str) -> bool:
    return name.endswith(TIME_SUFFIXES)


def compare_runs(a: RunData, b: RunData, threshold: float = 0.1) -> Comparison:
    """Cases present in both runs are compared:

    - a new failure: ``fail``/``error`` in B where A passed or skipped;
    - a metric regression: a bounded metric that lost more than ``threshold`` of its headroom to
      its bound (``headroom = (bound - value)/|bound|`` for ``<=`` bounds, ``(value - bound)/|bound|``
      for ``>=``), or an ``==`` metric that moved off its expected value, or one that became NaN.
      Measuring against the bound keeps float64 round-off (1e-16 -> 3e-16 under a 1e-10 bound)
      from being listed;
    - a performance ratio B/A for every unbounded metric named ``*_us``, ``*_ms`` or ``*_s`` (times:
      the decode performance cases report microseconds).
    """
    rows_a = {row.name: row for row in a.rows}
    rows_b = {row.name: row for row in b.rows}
    result = Comparison(only_a=sorted(set(rows_a) - set(rows_b)), only_b=sorted(set(rows_b) - set(rows_a)))
    for name in sorted(set(rows_a) & set(rows_b)):
        ra, rb = rows_a[name], rows_b[name]
        bad = ("fail", "error")
        if rb.status in bad and ra.status not in bad:
            result.new_failures.append((name, ra.status, rb.status, rb.message.splitlines()[0] if rb.message else ""))
        elif ra.status in bad and rb.status == "pass":
            result.fixed.append((name, ra.status, rb.status))
        for metric in sorted(set(ra.metrics) & set(rb.metrics)):
            va, vb = ra.metrics[metric], rb.metrics[metric]
            kind = rb.bound_kinds.get(metric) or ra.bound_kinds.get(metric, "")
            if metric in rb.tolerances and kind:
                bound = rb.tolerances[metric]
                if _regressed(va, vb, bound, kind, threshold):
                    result.regressions.append((name, metric, va, vb, bound, kind))
            elif is_time_metric(metric) and va > 0 and math.isfinite(va) and math.isfinite(vb):
                result.performance.append((name, metric, va, vb, vb / va))
    return result


def _regressed(va: float, vb: float, bound: float, kind: str, threshold: float) -> bool:
    if kind == "eq":
        return vb != bound and vb != va
    if math.isnan(vb):
        return not math.isnan(va)
    if math.isnan(va):
        return False
    room_a, room_b = headroom(va, bound, kind), headroom(vb, bound, kind)
    return room_b < room_a and (room_a - room_b) > threshold * max(abs(room_a), 1e-300)


def render_comparison(cmp: Comparison, a: RunData, b: RunData, console, threshold: float) -> None:
    from rich.table import Table

    console.print(f"comparing A = [bold]{a.run_id}[/bold] ({a.path}) with B = [bold]{b.run_id}[/bold] ({b.path})")
    if cmp.new_failures:
        table = Table(title=f"new failures ({len(cmp.new_failures)})", title_justify="left")
        for column in ("case", "A", "B", "message"):
            table.add_column(column)
        for name, sa, sb, message in cmp.new_failures:
            table.add_row(name, sa, f"[red]{sb}[/red]", message[:120])
        console.print(table)
    else:
        console.print("[green]no new failures[/green]")
    if cmp.fixed:
        console.print(f"[green]fixed[/green] ({len(cmp.fixed)}): {', '.join(n for n, _, _ in cmp.fixed)}")
    if cmp.regressions:
        table = Table(title=f"metric regressions (lost > {threshold:.0%} of headroom to the bound)",
                      title_justify="left")
        for column in ("case", "metric", "A", "B", "bound"):
            table.add_column(column, justify="left" if column in ("case", "metric") else "right")
        for name, metric, va, vb, bound, kind in cmp.regressions:
            table.add_row(name, metric, _fmt(va), f"[red]{_fmt(vb)}[/red]", _bound_text(kind, bound))
        console.print(table)
    else:
        console.print(f"[green]no metric regressions beyond {threshold:.0%}[/green]")
    if cmp.performance:
        table = Table(title="performance (B / A; > 1 is slower)", title_justify="left")
        for column in ("case", "metric", "A", "B", "B/A"):
            table.add_column(column, justify="left" if column in ("case", "metric") else "right")
        for name, metric, va, vb, ratio in cmp.performance:
            style = "red" if ratio > 1 + threshold else "green" if ratio < 1 / (1 + threshold) else "white"
            table.add_row(name, metric, _fmt(va), _fmt(vb), f"[{style}]{ratio:.3f}[/{style}]")
        console.print(table)
    for label, names in (("only in A", cmp.only_a), ("only in B", cmp.only_b)):
        if names:
            console.print(f"[yellow]{label}[/yellow] ({len(names)}): {', '.join(names[:8])}"
                          f"{' ...' if len(names) > 8 else ''}")


# ----------------------------------------------------------------------------------------------
# Export


def _flat_record(row: ResultRow) -> dict[str, Any]:
    record = row.as_record()
    record["started_at"] = row.started_at.isoformat()
    return record


def export_csv(run: RunData) -> str:
    """One CSV line per case; params, metrics, tolerances and bound kinds as JSON cells."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RESULT_SCHEMA.names, lineterminator="\n")
    writer.writeheader()
    for row in run.rows:
        record = _flat_record(row)
        for key in ("metrics", "tolerances", "bound_kinds"):
            record[key] = json.dumps(json_safe(record[key]), sort_keys=True)
        writer.writerow(record)
    return buffer.getvalue()


def export_json(run: RunData) -> str:
    """``{"run": <run info>, "verdict": ..., "rows": [...]}``; NaN and infinities as strings."""
    verdict = acceptance(run.rows, run.info)
    rows = []
    for row in run.rows:
        record = _flat_record(row)
        record["params"] = row.params
        rows.append(record)
    document = {"run": run.info, "verdict": {"accepted": verdict.ok, "reasons": verdict.reasons,
                                             "counts": verdict.counts}, "rows": rows}
    return json.dumps(json_safe(document), indent=2, sort_keys=True) + "\n"


# XML 1.0 cannot carry most control characters, not even escaped.
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _xml_text(text: str) -> str:
    return _XML_INVALID.sub("?", text)


def export_junit(run: RunData) -> str:
    """JUnit XML: ``<testsuites>``, one ``<testsuite>`` per suite, one ``<testcase>`` per case
    (``classname`` ``nsa.<suite>``), with ``<failure>``, ``<error>`` or ``<skipped>`` and the case's
    metrics as ``system-out``."""
    by_suite: dict[str, list[ResultRow]] = defaultdict(list)
    for row in run.rows:
        by_suite[row.suite].append(row)
    counts = Counter(row.status for row in run.rows)
    root = ET.Element("testsuites", name=f"nsa verify {run.run_id}", tests=str(len(run.rows)),
                      failures=str(counts["fail"]), errors=str(counts["error"]), skipped=str(counts["skip"]),
                      time=f"{sum(r.duration_s for r in run.rows):.3f}")
    for suite_name, rows in sorted(by_suite.items()):
        suite_counts = Counter(row.status for row in rows)
        first = rows[0]
        element = ET.SubElement(root, "testsuite", name=suite_name, tests=str(len(rows)),
                                failures=str(suite_counts["fail"]), errors=str(suite_counts["error"]),
                                skipped=str(suite_counts["skip"]), time=f"{sum(r.duration_s for r in rows):.3f}",
                                timestamp=first.started_at.replace(tzinfo=None).isoformat(timespec="seconds"),
                                hostname=_xml_text(first.host or "unknown"))
        properties = ET.SubElement(element, "properties")
        for key, value in (("run_id", run.run_id), ("scale", first.scale), ("git_sha", first.git_sha),
                           ("torch", first.torch_version), ("triton", first.triton_version),
                           ("nsa", first.nsa_version), ("python", first.python_version)):
            ET.SubElement(properties, "property", name=key, value=_xml_text(str(value)))
        for row in rows:
            case = ET.SubElement(element, "testcase", classname=f"nsa.{suite_name}", name=_xml_text(row.case_id),
                                 time=f"{row.duration_s:.3f}")
            message = _xml_text(row.message)
            headline = message.splitlines()[0] if message else row.status
            if row.status == "fail":
                ET.SubElement(case, "failure", message=headline, type="AcceptanceCheckFailed").text = message
            elif row.status == "error":
                ET.SubElement(case, "error", message=headline, type="CaseError").text = message
            elif row.status == "skip":
                ET.SubElement(case, "skipped", message=headline)
            lines = [f"{m} = {_fmt(v)}" + (f" (bound {_bound_text(row.bound_kinds.get(m, ''), row.tolerances[m])})"
                                          if m in row.tolerances else "")
                     for m, v in sorted(row.metrics.items())]
            lines.append(f"device = {row.device}; backend = {row.backend}; params = {json.dumps(row.params)}")
            ET.SubElement(case, "system-out").text = _xml_text("\n".join(lines))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


EXPORTERS = {"csv": export_csv, "json": export_json, "junit": export_junit}
