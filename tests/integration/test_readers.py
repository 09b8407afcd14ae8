"""The output as the users read it: the README's DuckDB and Polars queries on a real job's part files, and a
schema that Spark's Parquet reader accepts (no unsigned integers, no nanosecond timestamps, no 64-bit-offset
types, column names Spark allows)."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import build_config, validate_config
from pipeline.distributed import DistContext
from pipeline.runner import run_rank
from tests.conftest import base_config, make_corpus, write_manifest

FILTERS = {"probe": {}, "black_borders": {}, "static": {}, "exposure": {}, "sharpness": {}, "scene_cuts": {},
           "speech_cuts": {}}


@pytest.fixture(scope="module")
def output(tmp_path_factory, media_dir):
    tmp = tmp_path_factory.mktemp("readers")
    rows = make_corpus(str(tmp / "c"), media_dir, 4, kinds=("motion.mp4", "still.mp4", "speech.wav"))
    rows.append({"video_id": "missing", "video_path": "nowhere.mp4", "batch": 0})
    manifest = write_manifest(str(tmp / "m.parquet"), rows)
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


def _spark_problems(t: pa.DataType, where: str) -> list[str]:
    if pa.types.is_struct(t):
        out = []
        for f in t:
            if any(c in f.name for c in " ,;{}()\n\t="):
                out.append(f"{where}.{f.name}: a name Spark refuses")
            out += _spark_problems(f.type, f"{where}.{f.name}")
        return out
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return (["large_list"] if pa.types.is_large_list(t) else []) + _spark_problems(t.value_type, f"{where}[]")
    if pa.types.is_map(t):
        return _spark_problems(t.key_type, f"{where}.key") + _spark_problems(t.item_type, f"{where}.value")
    if pa.types.is_unsigned_integer(t):
        return [f"{where}: unsigned {t}"]
    if pa.types.is_timestamp(t) and t.unit == "ns":
        return [f"{where}: nanosecond timestamp"]
    if pa.types.is_large_string(t) or pa.types.is_large_binary(t) or pa.types.is_float16(t):
        return [f"{where}: {t}"]
    return []


def test_schema_is_one_that_spark_reads(output):
    import glob

    files = sorted(glob.glob(f"{output}/parts/*.parquet"))
    assert len(files) >= 3  # rows_per_file=2: several parts, one schema
    schemas = {pq.read_schema(f).remove_metadata() for f in files}
    assert len(schemas) == 1
    (schema,) = schemas
    # the check itself catches what Spark refuses
    bad = pa.struct([("n", pa.uint32()), ("t", pa.timestamp("ns")), ("x y", pa.list_(pa.large_string()))])
    assert len(_spark_problems(bad, "bad")) == 4
    problems = []
    for field in schema:
        if any(c in field.name for c in " ,;{}()\n\t="):
            problems.append(f"{field.name}: a name Spark refuses")
        problems += _spark_problems(field.type, field.name)
    assert problems == []
