import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipeline.config import InputConfig
from pipeline.errors import ConfigError, ManifestError
from pipeline.manifest import check_input_exists, read_manifest

ROWS = [{"video_id": "a", "video_path": "x/a.mp4", "lang": "en"},
        {"video_id": "b", "video_path": "x/b.mp4", "lang": "de"}]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_formats_pass_columns_through(tmp_path, fmt):
    path = tmp_path / f"m.{fmt}"
    table = pa.Table.from_pylist(ROWS)
    if fmt == "parquet":
        pq.write_table(table, path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    else:
        pacsv.write_csv(table, path)
    out = read_manifest(InputConfig(manifest=str(path)))
    assert out.to_pylist() == ROWS


def test_numeric_looking_ids_stay_strings(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("clip,file\n007,a.mp4\n8,b.mp4\n")
    out = read_manifest(InputConfig(manifest=str(path), id_column="clip", path_column="file"))
    assert out["clip"].to_pylist() == ["007", "8"]


def test_duplicates_error_names_them_or_drop(tmp_path):
    path = tmp_path / "m.jsonl"
    rows = ROWS + [{"video_id": "a", "video_path": "other.mp4", "lang": "fr"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ManifestError, match="duplicate id.*'a'"):
        read_manifest(InputConfig(manifest=str(path)))
    out = read_manifest(InputConfig(manifest=str(path), on_duplicate_ids="drop"))
    assert out["video_path"].to_pylist() == ["x/a.mp4", "x/b.mp4"]


def test_missing_column_and_missing_file(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a", "video_path": "p"}\n')
    with pytest.raises(ManifestError, match="no column 'video_id'"):
        read_manifest(InputConfig(manifest=str(path)))
    with pytest.raises(ConfigError, match="does not exist"):
        check_input_exists(InputConfig(manifest=str(tmp_path / "nope.parquet")))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ManifestError, match="cannot read manifest"):
        read_manifest(InputConfig(manifest=str(tmp_path / "bad.parquet")))


def test_listing_mode_over_s3(bucket):
    name, fs = bucket
    for key in ("v/a.mp4", "v/sub/b.mp4", "v/c.txt"):
        fs.pipe(f"{name}/{key}", b"x")
    from tests.conftest import MotoS3  # noqa: F401 - the fixture's server is running

    opts = fs.storage_options
    out = read_manifest(InputConfig(listing_glob=f"s3://{name}/v/**/*.mp4", storage_options=opts))
    assert out["video_id"].to_pylist() == ["a.mp4", "sub/b.mp4"]
    assert out["video_path"].to_pylist() == [f"s3://{name}/v/a.mp4", f"s3://{name}/v/sub/b.mp4"]


def test_bad_glob_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="listing_glob"):
        read_manifest(InputConfig(listing_glob=str(tmp_path) + "/a**b"))
