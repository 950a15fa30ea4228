"""Result tables on disk: ``<out>/run=<run_id>/results.parquet``, one directory per run.

Writes are atomic (a temp file in the same directory, fsync, ``os.replace``), so a run killed at
any moment leaves either the previous complete file or none, never half of one. The runner
rewrites the file as cases finish, so a killed run still leaves what had finished.
Reading checks the schema version and columns (:func:`verify.schema.check_schema`) and turns every
problem (missing directory or file, corrupt Parquet, unknown schema) into a :class:`StoreError`
that names the path and the problem.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from verify.schema import ResultRow, SchemaError, check_schema, rows_to_table, run_info_of, table_to_rows

RUN_PREFIX = "run="
RESULTS_FILE = "results.parquet"
DEFAULT_OUT = Path("reports")


class StoreError(Exception):
    """A run that cannot be found or read; the message names the path and the problem."""


@dataclass
class RunData:
    """One run read back: its rows, its run-level info and where it came from."""

    run_id: str
    path: Path
    rows: list[ResultRow]
    info: dict[str, Any]


def new_run_id() -> str:
    """UTC time to the millisecond plus a random suffix: sorts by start time, unique across
    concurrent runs (``20261128T115242.123Z-ab12``)."""
    now = datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%S}.{now.microsecond // 1000:03d}Z-{secrets.token_hex(2)}"


def run_dir(out_dir: Path | str, run_id: str) -> Path:
    return Path(out_dir) / f"{RUN_PREFIX}{run_id}"


def write_run(out_dir: Path | str, run_id: str, rows: list[ResultRow], run_info: dict[str, Any]) -> Path:
    """Write (or replace) run ``run_id``'s table atomically; returns the Parquet path."""
    import pyarrow.parquet as pq

    target = run_dir(out_dir, run_id)
    target.mkdir(parents=True, exist_ok=True)
    path = target / RESULTS_FILE
    tmp = target / f".{RESULTS_FILE}.{os.getpid()}.tmp"
    try:
        pq.write_table(rows_to_table(rows, run_info), tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def list_runs(out_dir: Path | str) -> list[str]:
    """Run ids under ``out_dir`` that have a results file, oldest first."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    return sorted(p.name[len(RUN_PREFIX):] for p in out.iterdir()
                  if p.name.startswith(RUN_PREFIX) and (p / RESULTS_FILE).is_file())


def latest_run(out_dir: Path | str) -> str:
    runs = list_runs(out_dir)
    if not runs:
        where = Path(out_dir)
        problem = "does not exist" if not where.exists() else f"holds no {RUN_PREFIX}<id>/{RESULTS_FILE}"
        raise StoreError(f"{where}: {problem}; run `nsa verify --out {where}` first")
    return runs[-1]


def results_path(out_dir: Path | str, run: str | None) -> Path:
    """The results file of ``run``: a run id, ``run=<id>``, a run directory or a Parquet file
    path; ``None`` or ``"latest"`` means the latest run in ``out_dir``."""
    if run is None or run == "latest":
        return run_dir(out_dir, latest_run(out_dir)) / RESULTS_FILE
    candidate = Path(run)
    if candidate.suffix == ".parquet":
        return candidate
    if candidate.is_dir() and candidate.name.startswith(RUN_PREFIX):
        return candidate / RESULTS_FILE
    run_id = run.removeprefix(RUN_PREFIX)
    path = run_dir(out_dir, run_id) / RESULTS_FILE
    if not path.is_file():
        known = list_runs(out_dir)
        hint = f"known runs: {', '.join(known[-10:])}" if known else f"{out_dir} holds no runs"
        raise StoreError(f"{path}: no such run {run!r} in {out_dir} ({hint})")
    return path


def read_run(out_dir: Path | str = DEFAULT_OUT, run: str | None = None) -> RunData:
    """Read a run (see :func:`results_path` for ``run``); every failure is a :class:`StoreError`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = results_path(out_dir, run)
    if not path.is_file():
        raise StoreError(f"{path}: no such file")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise StoreError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from exc
    try:
        check_schema(schema, str(path))
    except SchemaError as exc:
        raise StoreError(str(exc)) from exc
    try:
        table = pq.read_table(path)
        rows = table_to_rows(table)
    except (pa.ArrowException, OSError, ValueError, TypeError, KeyError) as exc:
        raise StoreError(f"{path}: corrupt result table ({type(exc).__name__}: {exc})") from exc
    info = run_info_of(schema)
    run_id = info.get("run_id") or (rows[0].run_id if rows else path.parent.name.removeprefix(RUN_PREFIX))
    return RunData(run_id, path, rows, info)
