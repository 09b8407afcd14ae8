"""The output as the users read it: the README's DuckDB, Polars and Spark queries on a real job's part files, whose
manifest carries columns of the types that pandas and DuckDB write (nanosecond timestamps, a time of day, a UUID,
float16); Spark (a real local session, Java and pyspark installed by ``launch/setup.sh``) reading every value as
pyarrow does, and checking the page checksums when asked."""

import datetime
import json
import math
import os
import shutil
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import build_config, validate_config
from pipeline.distributed import DistContext
from pipeline.runner import run_rank
from tests.conftest import base_config, make_corpus

NS = 1_704_164_645_123_456_789  # 2024-01-02 03:04:05.123456789: pandas' datetime64[ns] keeps the last digits
SOURCES = [uuid.UUID(int=i * 0x1111_1111_1111_1111_1111_1111_1111_1111) for i in range(5)]
FILTERS = {"probe": {}, "black_borders": {}, "static": {}, "exposure": {}, "sharpness": {}, "scene_cuts": {},
           "speech_cuts": {}}


@pytest.fixture(scope="module")
def output(tmp_path_factory, media_dir):
    tmp = tmp_path_factory.mktemp("readers")
    rows = make_corpus(str(tmp / "c"), media_dir, 4, kinds=("motion.mp4", "still.mp4", "speech.wav"))
    rows.append({"video_id": "missing", "video_path": "nowhere.mp4", "batch": 0})
    for i, row in enumerate(rows):  # columns in the types pandas and DuckDB write, which Spark refused
        row.update(added=NS + i, start=datetime.time(0, 1, 30 + i), source=SOURCES[i].bytes, score=0.5 * i)
    table = pa.Table.from_pylist(rows).set_column(3, "added", pa.array([r["added"] for r in rows], pa.timestamp("ns")))
    table = table.set_column(5, "source", pa.array([r["source"] for r in rows], pa.uuid()))
    table = table.set_column(6, "score", pa.array([r["score"] for r in rows], pa.float64()).cast(pa.float16()))
    manifest = str(tmp / "m.parquet")
    pq.write_table(table, manifest)
    raw = base_config(manifest, str(tmp / "c"), str(tmp / "out"), str(tmp / "cache"), filters=FILTERS,
                      output={"dir": str(tmp / "out"), "rows_per_file": 2})
    cfg = build_config(raw)
    validate_config(cfg)
    summary = run_rank(cfg, DistContext()).summary
    assert summary["total"]["succeeded"] == 4 and summary["total"]["failed"] == 1
    return str(tmp / "out")


def test_duckdb_reads_the_readme_query_and_nested_columns(output):
    import duckdb

    con = duckdb.connect()
    parts = f"{output}/parts/*.parquet"
    rows = con.execute(f"""
        SELECT video_id, probe.duration_s, probe.video.width
        FROM read_parquet('{parts}') WHERE result_info.succeed""").fetchall()  # the README's query
    assert len(rows) == 4 and all(r[1] > 0 for r in rows)
    assert sorted(r[2] for r in rows if r[2] is not None) == [320, 320, 320]  # three clips, one WAV
    failed = con.execute(f"""
        SELECT video_id, result_info.error_type FROM read_parquet('{parts}') WHERE NOT result_info.succeed""").fetchall()
    assert failed == [("missing", "NotFoundError")]
    speech = con.execute(f"""
        SELECT count(*) FROM (SELECT unnest(speech_cuts.speech) AS s FROM read_parquet('{parts}')
        WHERE result_info.succeed) WHERE s.end_s > s.start_s""").fetchone()[0]
    assert speech >= 1  # the speech WAV has at least one speech segment


def test_duckdb_joins_each_row_to_the_weights_that_made_it(output):
    """The README's lineage query: every success row with the model_history entry of its run."""
    import importlib.metadata
    import json

    import duckdb

    rows = duckdb.connect().execute(f"""
        WITH h AS (SELECT e.from_run, e.models FROM (SELECT unnest(model_history) AS e
                                                     FROM read_json('{output}/_config.json')))
        SELECT r.video_id, r.result_info.run_id, h.models
        FROM read_parquet('{output}/parts/*.parquet') r ASOF LEFT JOIN h ON r.result_info.run_id >= h.from_run
        WHERE r.result_info.succeed""").fetchall()
    history = json.load(open(f"{output}/_config.json"))["model_history"]
    assert len(rows) == 4 and {r[1] for r in rows} == {history[0]["from_run"]}
    assert all(r[2] == {"speech_cuts.vad": f"silero-vad=={importlib.metadata.version('silero-vad')}"} for r in rows)


def test_polars_reads_the_readme_expression(output):
    import polars as pl

    ok = pl.scan_parquet(f"{output}/parts/*.parquet").filter(pl.col("result_info").struct.field("succeed")).collect()
    assert ok.height == 4
    assert ok.select(pl.col("probe").struct.field("duration_s")).to_series().min() > 0
    # speech_cuts is set exactly on the items with an audio stream (the WAV and the clips with a tone), null on the
    # still clip without one
    with_audio = ok.select(pl.col("probe").struct.field("audio_streams") > 0).to_series()
    has_cuts = ok.select(pl.col("speech_cuts").is_not_null()).to_series()
    assert with_audio.to_list() == has_cuts.to_list() and 0 < has_cuts.sum() < ok.height
    stamps = ok.select(pl.col("result_info").struct.field("end_time")).to_series()
    assert str(stamps.dtype).startswith("Datetime") and stamps.null_count() == 0


def _plain(value, t: pa.DataType):
    """A pyarrow value of type ``t`` as PySpark's ``Row.asDict(recursive=True)`` gives it: maps as dicts, timestamps
    as naive local times (PySpark's own conversion), NaN as a string so that it compares equal."""
    if value is None:
        return None
    if pa.types.is_struct(t):
        return {f.name: _plain(value[f.name], f.type) for f in t}
    if pa.types.is_map(t):
        return {k: _plain(v, t.item_type) for k, v in value}
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return [_plain(v, t.value_type) for v in value]
    if pa.types.is_timestamp(t) and t.tz is not None:
        return value.astimezone().replace(tzinfo=None)
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return value


def _spark_plain(value):
    if isinstance(value, dict):
        return {k: _spark_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_spark_plain(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return value


def _sorted(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True, default=str))


def _arrow_rows(path: str) -> list[dict]:
    table = pq.read_table(path)
    return _sorted([{f.name: _plain(r[f.name], f.type) for f in table.schema} for r in table.to_pylist()])


def _spark_rows(frame) -> list[dict]:
    return _sorted([_spark_plain(r.asDict(recursive=True)) for r in frame.collect()])


@pytest.fixture(scope="module")
def spark():
    pytest.importorskip("pyspark", reason="pyspark (the dev extra) is not installed")
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("no Java for Spark: launch/setup.sh installs it")
    from pyspark.sql import SparkSession

    session = (SparkSession.builder.master("local[1]").appName("mediasieve-readers")
               .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "1").getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()
    # stop() leaves the JVM running (about 20% of a core and 0.7 GB for the rest of the test run): end it too
    from pyspark import SparkContext

    gateway = SparkContext._gateway
    if gateway is not None:
        gateway.shutdown()
        proc = getattr(gateway, "proc", None)
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        SparkContext._gateway = SparkContext._jvm = None


def test_spark_reads_every_value_as_pyarrow_does(output, spark):
    """Every column of every row, the filters' nested structs, lists and maps and the manifest's columns alike;
    before, the manifest's nanosecond timestamp made Spark refuse the whole output ("Illegal Parquet type: INT64
    (TIMESTAMP(NANOS,false))"), and its time of day, UUID and float16 each did too."""
    parts = f"{output}/parts"
    frame = spark.read.parquet(parts)
    assert frame.count() == 5
    assert _spark_rows(frame) == _arrow_rows(parts)
    by_id = {r["video_id"]: r for r in (r.asDict() for r in frame.select(
        "video_id", "added", "start", "source", "score").collect())}
    assert by_id["id-0001"] == {"video_id": "id-0001", "added": datetime.datetime(2024, 1, 2, 3, 4, 5, 123456),
                                "start": "00:01:31.000000", "source": str(SOURCES[1]), "score": 0.5}


def test_spark_runs_the_readme_query(output, spark):
    rows = spark.sql(f"""
        SELECT video_id, probe.duration_s, probe.video.width
        FROM parquet.`{output}/parts` WHERE result_info.succeed""").collect()
    assert len(rows) == 4 and all(r.duration_s > 0 for r in rows)
    assert sorted(r.width for r in rows if r.width is not None) == [320, 320, 320]
    failed = spark.sql(f"SELECT video_id, result_info.error_type FROM parquet.`{output}/parts` "
                       "WHERE NOT result_info.succeed").collect()
    assert [tuple(r) for r in failed] == [("missing", "NotFoundError")]


def test_spark_checks_the_page_checksums_when_asked(output, spark, tmp_path):
    """With parquet-java's ``parquet.page.verify-checksum.enabled`` (a read option, or
    ``spark.hadoop.parquet.page.verify-checksum.enabled`` for the session), a part whose bytes changed after its
    commit fails the read, naming it; without, Spark reads the other value, as every reader does."""
    from tests.integration.test_page_checksums import _flip_silently

    parts = tmp_path / "parts"
    shutil.copytree(f"{output}/parts", parts)
    import fsspec

    damaged = sorted(str(p) for p in parts.glob("*.parquet"))[0]
    before, after = _flip_silently(fsspec.filesystem("file"), damaged, "result_info.cost_s")
    changed = {a for b, a in zip(before, after) if a != b}
    unchecked = spark.read.parquet(str(parts)).select("result_info.cost_s").collect()
    assert changed <= {r.cost_s for r in unchecked}  # the flipped value, read without a word
    with pytest.raises(Exception, match="CRC checksum verification failed") as e:
        spark.read.option("parquet.page.verify-checksum.enabled", "true").parquet(str(parts)).collect()
    assert os.path.basename(damaged) in str(e.value)


def _value(t: pa.DataType, i: int):
    """A value of type ``t`` (the ``i``-th of its kind, so that rows differ)."""
    if pa.types.is_struct(t):
        return {f.name: _value(f.type, i + j) for j, f in enumerate(t)}
    if pa.types.is_map(t):
        return [(_value(t.key_type, i), _value(t.item_type, i)), (_value(t.key_type, i + 1), None)]
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return [_value(t.value_type, i), _value(t.value_type, i + 1)]
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return f"s{i}"
    if pa.types.is_boolean(t):
        return i % 2 == 0
    if pa.types.is_integer(t):
        return i + 1
    if pa.types.is_floating(t):
        return i + 0.25
    if pa.types.is_timestamp(t):
        return datetime.datetime(2024, 1, 1, 0, 0, i, 500, tzinfo=datetime.timezone.utc if t.tz else None)
    raise AssertionError(f"a type the filters' columns do not use yet: {t}")


def test_every_filters_columns_read_in_spark_as_in_pyarrow(spark, tmp_path):
    """The columns of every registered filter, not only those the job above ran (YOLO's regions and crop, the
    classifiers' windows, the audio's chunks): a part in the job's format with one full row and one of nulls."""
    from pipeline import part_format
    from pipeline.filters import FILTERS
    from pipeline.writer import result_schema

    schema = result_schema(pa.schema([("video_id", pa.string()), ("video_path", pa.string())]),
                           [(name, cls.output_type) for name, cls in FILTERS.items()])
    full = {f.name: _value(f.type, k) for k, f in enumerate(schema)}
    empty = {"video_id": "nulls", "video_path": "n.mp4"}
    (tmp_path / "parts").mkdir()
    part_format.write_table(pa.Table.from_pylist([full, empty], schema=schema), tmp_path / "parts" / "part.parquet")
    frame = spark.read.parquet(str(tmp_path / "parts"))
    assert [f.name for f in frame.schema.fields] == schema.names
    assert _spark_rows(frame) == _arrow_rows(str(tmp_path / "parts"))


def test_column_names_that_differ_only_in_case_are_said_and_read_in_spark_when_told(spark, tmp_path, media_dir,
                                                                                  caplog):
    """pyarrow, DuckDB and Polars read a table with ``Lang`` and ``lang``; Spark, case-insensitive by default, refuses
    it whole. The job says so at the start, naming the columns and Spark's setting that reads it."""
    import logging

    rows = make_corpus(str(tmp_path / "c"), media_dir, 1)
    rows[0].update(Lang="EN", lang="en")
    manifest = str(tmp_path / "m.parquet")
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    cfg = build_config(base_config(manifest, str(tmp_path / "c"), str(tmp_path / "out"), str(tmp_path / "cache")))
    validate_config(cfg)
    with caplog.at_level(logging.WARNING, "pipeline.runner"):
        assert run_rank(cfg, DistContext()).summary["total"]["succeeded"] == 1
    assert "differ only in case (Lang / lang): Spark refuses such a table unless spark.sql.caseSensitive=true" \
        in caplog.text
    parts = str(tmp_path / "out" / "parts")
    with pytest.raises(Exception, match="already exists"):
        spark.read.parquet(parts).collect()
    spark.conf.set("spark.sql.caseSensitive", "true")
    try:
        (row,) = spark.read.parquet(parts).select("Lang", "lang").collect()
    finally:
        spark.conf.unset("spark.sql.caseSensitive")
    assert tuple(row) == ("EN", "en")
