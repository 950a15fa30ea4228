"""The versioned Arrow schema of `nsa verify` result tables: one row per case.

Every column has an explicit type, so a table written by one machine reads the same on another
and a reader can tell a file it understands from one it does not. Bump ``SCHEMA_VERSION`` on any
change to the columns; readers refuse versions they do not know instead of guessing.

Columns:

- ``schema_version`` int32, ``run_id`` string, ``suite`` string, ``case_id`` string;
- ``params`` string: the case's parameters as JSON (sorted keys), including the ``backend`` the
  runner asked for;
- ``status`` string: one of ``pass``, ``fail``, ``error``, ``skip``;
- ``metrics``, ``tolerances`` map<string, float64>: measured numbers and, under the same key, the
  bound each was checked against; ``bound_kinds`` map<string, string>: ``max`` (metric <= bound),
  ``min`` (>=) or ``eq``;
- ``message`` string: why a case failed, errored or was skipped (empty on a pass);
- ``duration_s`` float64: wall time of the case in its worker;
- ``needs_gpu`` bool, ``device`` string (GPU name, or ``cpu: <model>``), ``backend`` string;
- ``torch_version``, ``triton_version``, ``nsa_version``, ``python_version`` string;
- ``git_sha`` string (the driver's checkout, ``-dirty`` when it had uncommitted changes);
- ``host`` string (the worker that ran the case), ``scale`` string (``ci`` or ``full``);
- ``started_at`` timestamp[us, UTC].

Run-level facts (the command, how many cases were planned, whether the run completed, the
cluster's GPUs) travel as JSON in the Parquet schema metadata under ``nsa.run``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 1
VERSION_KEY = b"nsa.schema_version"
RUN_INFO_KEY = b"nsa.run"
STATUSES = ("pass", "fail", "error", "skip")

RESULT_SCHEMA = pa.schema(
    [
        pa.field("schema_version", pa.int32(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("suite", pa.string(), nullable=False),
        pa.field("case_id", pa.string(), nullable=False),
        pa.field("params", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("metrics", pa.map_(pa.string(), pa.float64()), nullable=False),
        pa.field("tolerances", pa.map_(pa.string(), pa.float64()), nullable=False),
        pa.field("bound_kinds", pa.map_(pa.string(), pa.string()), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        pa.field("duration_s", pa.float64(), nullable=False),
        pa.field("needs_gpu", pa.bool_(), nullable=False),
        pa.field("device", pa.string(), nullable=False),
        pa.field("backend", pa.string(), nullable=False),
        pa.field("torch_version", pa.string(), nullable=False),
        pa.field("triton_version", pa.string(), nullable=False),
        pa.field("nsa_version", pa.string(), nullable=False),
        pa.field("python_version", pa.string(), nullable=False),
        pa.field("git_sha", pa.string(), nullable=False),
        pa.field("host", pa.string(), nullable=False),
        pa.field("scale", pa.string(), nullable=False),
        pa.field("started_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
    metadata={VERSION_KEY: str(SCHEMA_VERSION).encode()},
)


class SchemaError(ValueError):
    """A table that is not a result table this version of nsa can read."""


@dataclass
class ResultRow:
    """One case's result, as stored. ``params`` is a dict here and JSON in the table."""

    run_id: str
    suite: str
    case_id: str
    params: dict[str, Any]
    status: str
    scale: str
    metrics: dict[str, float] = field(default_factory=dict)
    tolerances: dict[str, float] = field(default_factory=dict)
    bound_kinds: dict[str, str] = field(default_factory=dict)
    message: str = ""
    duration_s: float = 0.0
    needs_gpu: bool = False
    device: str = ""
    backend: str = ""
    torch_version: str = ""
    triton_version: str = ""
    nsa_version: str = ""
    python_version: str = ""
    git_sha: str = ""
    host: str = ""
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"ResultRow.status must be one of {STATUSES}, got {self.status!r}")

    @property
    def name(self) -> str:
        return f"{self.suite}::{self.case_id}"

    def as_record(self) -> dict[str, Any]:
        """The row as the table stores it (params as JSON, maps as dicts of floats)."""
        record = {f.name: getattr(self, f.name) for f in fields(self)}
        record["params"] = json.dumps(self.params, sort_keys=True, default=str)
        record["metrics"] = {k: float(v) for k, v in self.metrics.items()}
        record["tolerances"] = {k: float(v) for k, v in self.tolerances.items()}
        record["duration_s"] = float(self.duration_s)
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ResultRow:
        values = dict(record)
        values["params"] = json.loads(values["params"])
        for key in ("metrics", "tolerances", "bound_kinds"):
            # pyarrow reads a map column back as a list of (key, value) pairs
            values[key] = dict(values[key] or [])
        return cls(**values)


def rows_to_table(rows: list[ResultRow], run_info: dict[str, Any] | None = None) -> pa.Table:
    """Result rows as an Arrow table of :data:`RESULT_SCHEMA`, ``run_info`` in its metadata."""
    table = pa.Table.from_pylist([row.as_record() for row in rows], schema=RESULT_SCHEMA)
    metadata = dict(RESULT_SCHEMA.metadata)
    metadata[RUN_INFO_KEY] = json.dumps(json_safe(run_info or {}), sort_keys=True).encode()
    return table.replace_schema_metadata(metadata)


def table_to_rows(table: pa.Table) -> list[ResultRow]:
    return [ResultRow.from_record(record) for record in table.to_pylist()]


def run_info_of(table_schema: pa.Schema) -> dict[str, Any]:
    raw = (table_schema.metadata or {}).get(RUN_INFO_KEY)
    return json.loads(raw) if raw else {}


def check_schema(schema: pa.Schema, where: str) -> None:
    """Raise :class:`SchemaError` naming ``where`` unless ``schema`` is this version's result schema."""
    version = (schema.metadata or {}).get(VERSION_KEY)
    if version is None:
        raise SchemaError(f"{where}: not an nsa result table (no {VERSION_KEY.decode()!r} in its metadata)")
    if version.decode() != str(SCHEMA_VERSION):
        raise SchemaError(f"{where}: written with result schema version {version.decode()}; this nsa "
                          f"reads version {SCHEMA_VERSION} (use the nsa release that wrote it)")
    for expected in RESULT_SCHEMA:
        if expected.name not in schema.names:
            raise SchemaError(f"{where}: column {expected.name!r} is missing (schema version {SCHEMA_VERSION} "
                              f"has {', '.join(RESULT_SCHEMA.names)})")
        found = schema.field(expected.name).type
        if not found.equals(expected.type):
            raise SchemaError(f"{where}: column {expected.name!r} has type {found}, expected {expected.type}")
    extra = [name for name in schema.names if name not in RESULT_SCHEMA.names]
    if extra:
        raise SchemaError(f"{where}: unexpected columns {extra} for schema version {SCHEMA_VERSION}")


def json_safe(value: Any) -> Any:
    """JSON cannot hold NaN or infinities; keep them readable as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value

