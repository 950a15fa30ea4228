"""Result tables: Arrow schema round trip, atomic Parquet writes, run listing, clear read errors."""

import math
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from verify import schema, store
from verify.schema import RESULT_SCHEMA, ResultRow


def make_row(run_id="r1", suite="s", case_id="c", status="pass", **extra):
    values = {"params": {"seq_len": 64, "backend": "auto", "phi": "mlp"}, "scale": "ci",
              "metrics": {"err": 1e-7, "nan_metric": math.nan, "inf_metric": math.inf, "fwd_ms": 3.5},
              "tolerances": {"err": 1e-5}, "bound_kinds": {"err": "max"}, "message": "", "duration_s": 0.25,
              "needs_gpu": False, "device": "cpu: test", "backend": "reference", "torch_version": "2.13",
              "triton_version": "3.9", "nsa_version": "0.1.0", "python_version": "3.11", "git_sha": "abc",
              "host": "h", "started_at": datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)}
    values.update(extra)
    return ResultRow(run_id=run_id, suite=suite, case_id=case_id, status=status, **values)


def test_schema_has_explicit_types_and_a_version():
    assert RESULT_SCHEMA.metadata[schema.VERSION_KEY] == str(schema.SCHEMA_VERSION).encode()
    types = {f.name: f.type for f in RESULT_SCHEMA}
    assert types["schema_version"] == pa.int32()
    assert types["metrics"] == pa.map_(pa.string(), pa.float64())
    assert types["started_at"] == pa.timestamp("us", tz="UTC")
    assert types["duration_s"] == pa.float64() and types["needs_gpu"] == pa.bool_()
    for name in ("run_id", "suite", "case_id", "params", "status", "message", "device", "backend",
                 "torch_version", "triton_version", "nsa_version", "python_version", "git_sha", "host", "scale"):
        assert types[name] == pa.string(), name
    assert not any(f.nullable for f in RESULT_SCHEMA)


def test_round_trip_keeps_every_value(tmp_path):
    rows = [make_row(), make_row(case_id="d", status="fail", message="err = 1 > 1e-05\nsecond line",
                                 metrics={"err": 1.0}, params={"nested": [1, 2], "x": 0.5})]
    path = store.write_run(tmp_path, "r1", rows, {"planned": 2, "weird": math.nan})
    assert path == tmp_path / "run=r1" / "results.parquet"
    assert pq.read_schema(path).remove_metadata().equals(RESULT_SCHEMA.remove_metadata())
    back = store.read_run(tmp_path, "r1")
    assert back.run_id == "r1" and back.info == {"planned": 2, "weird": "nan"}
    for original, read in zip(rows, back.rows):
        assert read.params == original.params and read.status == original.status
        assert read.message == original.message and read.started_at == original.started_at
        assert read.tolerances == original.tolerances and read.bound_kinds == original.bound_kinds
        assert read.metrics.keys() == original.metrics.keys()
        for key, value in original.metrics.items():
            assert (math.isnan(value) and math.isnan(read.metrics[key])) or read.metrics[key] == value


def test_bad_status_is_refused():
    with pytest.raises(ValueError, match="status must be one of"):
        make_row(status="passed")


def test_write_is_atomic_and_replaces(tmp_path):
    store.write_run(tmp_path, "r1", [make_row()], {})
    store.write_run(tmp_path, "r1", [make_row(), make_row(case_id="e")], {})
    assert [p.name for p in (tmp_path / "run=r1").iterdir()] == ["results.parquet"]
    assert len(store.read_run(tmp_path, "r1").rows) == 2


def test_a_failed_write_leaves_the_previous_file(tmp_path, monkeypatch):
    store.write_run(tmp_path, "r1", [make_row()], {})

    def broken(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        store.write_run(tmp_path, "r1", [make_row(), make_row(case_id="e")], {})
    monkeypatch.undo()
    assert len(store.read_run(tmp_path, "r1").rows) == 1
    assert [p.name for p in (tmp_path / "run=r1").iterdir()] == ["results.parquet"]


def test_list_and_latest_runs(tmp_path):
    assert store.list_runs(tmp_path / "missing") == []
    first, second = store.new_run_id(), store.new_run_id()
    assert first != second
    for run_id in ("20260101T000000Z-aaaa", "20260102T000000Z-bbbb"):
        store.write_run(tmp_path, run_id, [make_row(run_id=run_id)], {})
    (tmp_path / "run=empty").mkdir()  # no results file: not a run
    (tmp_path / "bench").mkdir()
    assert store.list_runs(tmp_path) == ["20260101T000000Z-aaaa", "20260102T000000Z-bbbb"]
    assert store.latest_run(tmp_path) == "20260102T000000Z-bbbb"
    assert store.read_run(tmp_path).run_id == "20260102T000000Z-bbbb"
    assert store.read_run(tmp_path, "latest").run_id == "20260102T000000Z-bbbb"
    # a run can be named by id, run=<id>, its directory or its file
    for name in ("20260101T000000Z-aaaa", "run=20260101T000000Z-aaaa", str(tmp_path / "run=20260101T000000Z-aaaa"),
                 str(tmp_path / "run=20260101T000000Z-aaaa" / "results.parquet")):
        assert store.read_run(tmp_path, name).run_id == "20260101T000000Z-aaaa"


def test_missing_runs_give_clear_errors(tmp_path):
    with pytest.raises(store.StoreError, match="does not exist"):
        store.read_run(tmp_path / "nowhere")
    with pytest.raises(store.StoreError, match=r"holds no run=<id>/results.parquet"):
        store.read_run(tmp_path)
    store.write_run(tmp_path, "r1", [make_row()], {})
    with pytest.raises(store.StoreError, match=r"no such run 'r2'.*known runs: r1"):
        store.read_run(tmp_path, "r2")
    with pytest.raises(store.StoreError, match="other.parquet: no such file"):
        store.read_run(tmp_path, str(tmp_path / "other.parquet"))


def test_corrupt_file_is_named(tmp_path):
    path = store.write_run(tmp_path, "r1", [make_row()], {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(store.StoreError, match=rf"{path}: not a readable Parquet file"):
        store.read_run(tmp_path, "r1")
    path.write_text("not parquet at all")
    with pytest.raises(store.StoreError, match="not a readable Parquet file"):
        store.read_run(tmp_path, "r1")


def _write_table(path, table):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def test_unknown_schema_versions_and_columns_are_refused(tmp_path):
    good = schema.rows_to_table([make_row()])
    newer = good.replace_schema_metadata({schema.VERSION_KEY: b"99"})
    _write_table(tmp_path / "run=new" / "results.parquet", newer)
    with pytest.raises(store.StoreError, match="schema version 99; this nsa reads version 1"):
        store.read_run(tmp_path, "new")
    _write_table(tmp_path / "run=foreign" / "results.parquet", pa.table({"x": [1, 2]}))
    with pytest.raises(store.StoreError, match="not an nsa result table"):
        store.read_run(tmp_path, "foreign")
    missing = good.drop_columns(["host"]).replace_schema_metadata(good.schema.metadata)
    _write_table(tmp_path / "run=missing" / "results.parquet", missing)
    with pytest.raises(store.StoreError, match="column 'host' is missing"):
        store.read_run(tmp_path, "missing")
    retyped = good.set_column(good.schema.get_field_index("duration_s"), "duration_s",
                              pa.array(["1.0"])).replace_schema_metadata(good.schema.metadata)
    _write_table(tmp_path / "run=retyped" / "results.parquet", retyped)
    with pytest.raises(store.StoreError, match="column 'duration_s' has type string, expected double"):
        store.read_run(tmp_path, "retyped")


def test_previous_durations_come_from_the_latest_readable_run_of_that_scale(tmp_path):
    from verify.runner import previous_durations

    assert previous_durations(tmp_path, "ci") == {}
    store.write_run(tmp_path, "20260101T000000.000Z-aaaa",
                    [make_row(case_id="a", duration_s=3.0), make_row(case_id="b", status="skip")], {"scale": "ci"})
    store.write_run(tmp_path, "20260102T000000.000Z-bbbb", [make_row(case_id="a", duration_s=9.0, scale="full")],
                    {"scale": "full"})
    broken = store.write_run(tmp_path, "20260103T000000.000Z-cccc", [make_row()], {"scale": "ci"})
    broken.write_bytes(b"garbage")
    assert previous_durations(tmp_path, "ci") == {"s::a": 3.0}
    assert previous_durations(tmp_path, "full") == {"s::a": 9.0}
