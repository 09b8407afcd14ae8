"""A manifest's columns come out in types that every reader of the output reads (``pipeline.portable``).

The manifests here are written by the tools the users make them with: DuckDB (UUID ids, ``TIME``,
``TIMESTAMP_NS``), pyarrow as pandas does (nanosecond timestamps), a CSV with times of day, a JSONL file with an
empty object. That Spark, DuckDB and Polars then read the job's output is ``tests/integration/test_readers.py``."""

from __future__ import annotations

import datetime
import decimal
import json
import logging
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import InputConfig
from pipeline.errors import ConfigError, ManifestError
from pipeline.manifest import open_manifest
from pipeline.portable import portable_type, to_portable, uuid_strings
from pipeline.resume import writer_schema

NS = 1_704_164_645_123_456_789  # 2024-01-02 03:04:05.123456789 UTC
AT = datetime.datetime(2024, 1, 2, 3, 4, 5, 123456)


def _rows(cfg: InputConfig, spill) -> tuple[pa.Schema, list[dict]]:
    m = open_manifest(cfg, str(spill))
    try:
        return m.schema, m.rows(list(range(len(m))))
    finally:
        m.close()


def test_a_duckdb_manifest_with_uuid_ids_times_and_nanoseconds(tmp_path, caplog):
    import duckdb

    path = str(tmp_path / "m.parquet")
    duckdb.sql(f"""COPY (SELECT * FROM (VALUES
        ('6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b'::UUID, 'a.mp4', TIME '00:01:30.5', TIMESTAMP_NS '2024-01-02 03:04:05.123456789',
         'a3bb189e-8bf9-4888-9912-ace4e6543002'::UUID, {{'at': TIMESTAMP_NS '2024-01-02 03:04:05.123456789'}}),
        ('00000000-0000-0000-0000-0000000000ff'::UUID, 'b.mp4', NULL, TIMESTAMP_NS '2024-02-03 00:00:00', NULL, NULL))
        AS t(video_id, video_path, start, added, source, meta)) TO '{path}'""")
    assert str(pq.read_schema(path).field("video_id").type) == "extension<arrow.uuid>"  # as pyarrow reads it
    with caplog.at_level(logging.WARNING, "pipeline.manifest"):
        schema, rows = _rows(InputConfig(manifest=path), tmp_path / "spill")
    assert schema.field("video_id").type == pa.string() and schema.field("start").type == pa.string()
    assert schema.field("added").type == pa.timestamp("us") and schema.field("source").type == pa.string()
    assert schema.field("meta").type == pa.struct([("at", pa.timestamp("us"))])
    # the oracle: Python's own uuid and datetime
    assert rows == [
        {"video_id": "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b", "video_path": "a.mp4", "start": "00:01:30.500000",
         "added": AT, "source": str(uuid.UUID("a3bb189e-8bf9-4888-9912-ace4e6543002")), "meta": {"at": AT}},
        {"video_id": "00000000-0000-0000-0000-0000000000ff", "video_path": "b.mp4", "start": None,
         "added": datetime.datetime(2024, 2, 3), "source": None, "meta": None}]
    said = caplog.text
    assert "start (time64[us] -> string)" in said and "added (timestamp[ns] -> timestamp[us])" in said
    assert "source (extension<arrow.uuid> -> string)" in said and "input.portable_types=false keeps them" in said
    assert "['added', 'meta.at'] hold times below a microsecond" in said


def test_an_id_column_of_uuids_is_their_canonical_string_even_as_read(tmp_path):
    """Cast as it was, a UUID id's 16 bytes were taken for UTF-8: an error, or where they happen to be UTF-8, a
    garbled id that no other tool would match."""
    ids = [uuid.UUID(int=0x41424344_45464748_494A4B4C_4D4E4F50), uuid.uuid4()]  # the first's bytes are "ABCD...P"
    table = pa.table({"video_id": pa.array([u.bytes for u in ids], pa.uuid()), "video_path": ["a", "b"]})
    pq.write_table(table, tmp_path / "m.parquet")
    _, rows = _rows(InputConfig(manifest=str(tmp_path / "m.parquet"), portable_types=False), tmp_path / "spill")
    assert [r["video_id"] for r in rows] == [str(u) for u in ids]


def test_pandas_style_nanoseconds_float16_decimals_lists_and_maps(tmp_path):
    ns = pa.timestamp("ns", tz="UTC")
    table = pa.table({
        "video_id": ["a", "b", "c"], "video_path": ["a", "b", "c"],
        "added": pa.array([NS, None, 0], ns),
        "score": pa.array([1.5, None, -0.25], pa.float16()),
        "big": pa.array([decimal.Decimal("1" * 39 + ".5"), None, decimal.Decimal("-2")], pa.decimal256(40, 1)),
        "small": pa.array([decimal.Decimal("12.50"), None, decimal.Decimal("0")], pa.decimal256(20, 2)),
        "stamps": pa.array([[NS, None], None, []], pa.list_(ns)),
        "fixed": pa.array([[NS, 0], None, [0, 0]], pa.list_(ns, 2)),
        "tags": pa.array([[1, 2], None, []], pa.list_view(pa.int64())),
        "by_name": pa.array([[("k", NS)], None, []], pa.map_(pa.string(), ns)),
    })
    at = AT.replace(tzinfo=datetime.timezone.utc)
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    pq.write_table(table, tmp_path / "m.parquet")
    schema, rows = _rows(InputConfig(manifest=str(tmp_path / "m.parquet")), tmp_path / "spill")
    assert [str(f.type) for f in schema][2:] == [
        "timestamp[us, tz=UTC]", "float", "string", "decimal128(20, 2)", "list<element: timestamp[us, tz=UTC]>",
        "fixed_size_list<element: timestamp[us, tz=UTC]>[2]", "list<element: int64>",
        "map<string, timestamp[us, tz=UTC] ('by_name')>"]
    assert [r["added"] for r in rows] == [at, None, epoch]
    assert [r["score"] for r in rows] == [1.5, None, -0.25]
    assert [r["big"] for r in rows] == ["1" * 39 + ".5", None, "-2.0"]
    assert [r["small"] for r in rows] == [decimal.Decimal("12.50"), None, decimal.Decimal("0.00")]
    assert [r["stamps"] for r in rows] == [[at, None], None, []]
    assert [r["fixed"] for r in rows] == [[at, epoch], None, [epoch, epoch]]
    assert [r["tags"] for r in rows] == [[1, 2], None, []]
    assert [r["by_name"] for r in rows] == [[("k", at)], None, []]


def test_a_csv_time_of_day_and_a_jsonl_empty_object(tmp_path):
    (tmp_path / "m.csv").write_text("video_id,video_path,start\n1,a.mp4,00:01:30\n2,b.mp4,01:00:00\n")
    schema, rows = _rows(InputConfig(manifest=str(tmp_path / "m.csv")), tmp_path / "spill")
    assert schema.field("start").type == pa.string() and [r["start"] for r in rows] == ["00:01:30", "01:00:00"]

    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"video_id": str(i), "video_path": "a", "meta": {},
                                                          "more": {"inner": {}, "n": i}}) + "\n" for i in range(2)))
    schema, rows = _rows(InputConfig(manifest=str(tmp_path / "m.jsonl")), tmp_path / "spill")
    assert schema.field("meta").type == pa.null() and [r["meta"] for r in rows] == [None, None]
    assert [r["more"] for r in rows] == [{"inner": None, "n": 0}, {"inner": None, "n": 1}]
    # kept as read, Parquet cannot hold it: a clear error before any work (it stopped the job at its first write)
    with pytest.raises(ManifestError, match="a column that Parquet cannot hold .*input.portable_types=true"):
        _rows(InputConfig(manifest=str(tmp_path / "m.jsonl"), portable_types=False), tmp_path / "spill")
    assert not list((tmp_path / "spill").glob("*.parquet"))


def test_types_every_reader_reads_are_kept_and_sliced_arrays_convert_at_their_offset():
    for t in (pa.string(), pa.large_string(), pa.timestamp("us", "UTC"), pa.timestamp("ms"), pa.uint64(),
              pa.decimal128(38, 2), pa.list_(pa.struct([("a", pa.int32())])), pa.map_(pa.string(), pa.float64()),
              pa.json_(), pa.binary(16), pa.dictionary(pa.int32(), pa.string()), pa.null(), pa.date32()):
        assert portable_type(t).equals(t), t
    values = pa.array([{"t": NS, "e": {}}, None, {"t": 0, "e": None}, {"t": NS + 1000, "e": {}}],
                      pa.struct([("t", pa.timestamp("ns")), ("e", pa.struct([]))]))[1:]
    truncated: set[str] = set()
    out = to_portable(values, portable_type(values.type), truncated, "col")
    assert out.to_pylist() == [None, {"t": datetime.datetime(1970, 1, 1), "e": None},
                               {"t": AT + datetime.timedelta(microseconds=1), "e": None}]
    assert truncated == {"col.t"}
    lists = pa.array([[NS], None, [0, NS]], pa.list_(pa.timestamp("ns")))[1:]
    assert to_portable(lists, portable_type(lists.type)).to_pylist() == [None, [datetime.datetime(1970, 1, 1), AT]]
    views = pa.array([[1, 2], None, [], [3, None]], pa.list_view(pa.int64()))[1:]
    plain = to_portable(views, portable_type(views.type))
    plain.validate(full=True)  # pyarrow's own cast of a list view makes an invalid array
    assert plain.type == pa.list_(pa.int64()) and plain.to_pylist() == [None, [], [3, None]]
    ids = pa.array([None, uuid.UUID(int=1).bytes, uuid.UUID(int=2).bytes], pa.uuid())[1:]
    assert uuid_strings(ids).to_pylist() == [str(uuid.UUID(int=1)), str(uuid.UUID(int=2))]


def test_an_output_begun_before_portable_types_names_the_setting_that_resumes_it(tmp_path):
    """Its parts hold a manifest column as read: the rerun's portable type is a changed type, refused as before, and
    the message says that input.portable_types=false writes it so again."""
    out = tmp_path / "out"
    (out / "parts").mkdir(parents=True)
    committed = pa.schema([("video_id", pa.string()), ("added", pa.timestamp("ns")), ("start", pa.time64("us"))])
    pq.write_table(committed.empty_table(), out / "parts" / "part-1.parquet")
    current = pa.schema([("video_id", pa.string()), ("added", pa.timestamp("us")), ("start", pa.string())])
    with pytest.raises(ConfigError, match=r"changed: added \(timestamp\[ns\] -> timestamp\[us\]\).*"
                                          r"manifest column\(s\) \['added', 'start'\] as read.*"
                                          r"input.portable_types=false writes them so again"):
        writer_schema(str(out), {}, str(out / "parts" / "part-1.parquet"), current, "fail")
    assert writer_schema(str(out), {}, str(out / "parts" / "part-1.parquet"), committed, "fail") == committed
    other = pa.schema([("video_id", pa.string()), ("added", pa.int64()), ("start", pa.time64("us"))])
    with pytest.raises(ConfigError) as e:
        writer_schema(str(out), {}, str(out / "parts" / "part-1.parquet"), other, "fail")
    assert "portable_types" not in str(e.value)  # another change is not the setting's
