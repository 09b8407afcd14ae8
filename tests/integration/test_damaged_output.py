"""Part files damaged after their commit (zero bytes or cut short: a node that lost power before its filesystem wrote
a renamed file's data; a bad page): the next run moves them to ``_quarantine/parts/`` and redoes their items,
compaction does the same, ``jobs/status.py`` names them and moves nothing, and a fault of the store is never taken
for damage. Before, one such part stopped every later run, status and compaction with it."""

from __future__ import annotations

import json
import os

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.compaction import compact
from pipeline.config import build_config, validate_config
from pipeline.quarantine import QUARANTINE_DIR, part_fault, read_past_damaged
from pipeline.resume import read_committed
from pipeline.status import format_status, job_status
from tests.integration.test_compaction import _job, _parts, _run

N = 40


def _output(tmp_path, where, s3, bucket):
    if where == "s3":
        name, fs = bucket
        return f"s3://{name}/out", s3.options(), fs, f"{name}/out"
    return str(tmp_path / "out"), {}, fsspec.filesystem("file"), str(tmp_path / "out")


def _rows(fs, path) -> int:
    with fs.open(path, "rb") as f:
        return pq.read_metadata(f).num_rows


def _zero(fs, path) -> None:
    fs.pipe_file(path, b"")


def _cut(fs, path) -> None:
    data = fs.cat_file(path)
    fs.pipe_file(path, data[:len(data) // 2])


def _garble_column(fs, path, column: str) -> None:
    """Garble the pages of one column chunk, leaving the footer whole: the file opens, that column does not read
    (and a multi-file scan's error then names no file)."""
    data = bytearray(fs.cat_file(path))
    with fs.open(path, "rb") as f:
        meta = pq.read_metadata(f)
    chunk = next(meta.row_group(0).column(i) for i in range(meta.num_columns)
                 if meta.row_group(0).column(i).path_in_schema == column)
    for i in range(chunk.data_page_offset + 2, chunk.data_page_offset + chunk.total_compressed_size - 2):
        data[i] ^= 0x5A
    fs.pipe_file(path, bytes(data))


def _success_ids(fs, root) -> list[str]:
    table = pq.ParquetDataset(_parts(fs, root), filesystem=fs).read(columns=["video_id", "result_info"])
    return sorted(i for i, r in zip(table["video_id"].to_pylist(), table["result_info"].to_pylist()) if r["succeed"])


def _in_quarantine(fs, root) -> dict[str, dict]:
    folder = f"{root}/{QUARANTINE_DIR}"
    fs.invalidate_cache()
    if not fs.exists(folder):
        return {}
    return {p.rsplit("/", 1)[-1][:-len(".json")]: json.loads(fs.cat_file(p)) for p in fs.find(folder)
            if p.endswith(".json")}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_next_run_moves_damaged_parts_aside_and_redoes_their_items(tmp_path, where, s3, bucket):
    out, opts, fs, root = _output(tmp_path, where, s3, bucket)
    raw = _job(tmp_path, out, n=N, storage_options=opts)
    assert _run(raw).summary["this_run"]["succeeded"] == N
    parts = _parts(fs, root)
    zeroed, cut, garbled = parts[0], parts[3], parts[6]
    lost = sum(_rows(fs, p) for p in (zeroed, cut, garbled))
    originals = {p: fs.cat_file(p) for p in (zeroed, cut, garbled)}
    _zero(fs, zeroed)
    _cut(fs, cut)
    _garble_column(fs, garbled, "video_id")  # a page the resume scan reads: its error names no file

    again = _run(raw)
    assert again.summary["this_run"]["items"] == lost and again.summary["this_run"]["succeeded"] == lost
    assert again.summary["total"]["succeeded"] == N and again.summary["total"]["parts_quarantined"] == 3
    assert _success_ids(fs, root) == [f"id-{i:04d}" for i in range(N)]  # each item once
    notes = _in_quarantine(fs, root)
    names = {p.rsplit("/", 1)[-1]: p for p in (zeroed, cut, garbled)}
    assert set(notes) == set(names)
    assert "0 bytes" in notes[zeroed.rsplit("/", 1)[-1]]["why"]
    assert "magic bytes" in notes[cut.rsplit("/", 1)[-1]]["why"]
    assert notes[garbled.rsplit("/", 1)[-1]]["by"] == again.run_id
    for name, path in names.items():  # nothing is deleted: the damaged bytes are kept as they were
        assert not fs.exists(path)
        kept = fs.cat_file(f"{root}/{QUARANTINE_DIR}/{name}")
        assert kept != originals[path] and len(kept) <= len(originals[path])

    third = _run(raw)  # the quarantine is outside parts/: nothing more to do
    assert third.summary["this_run"]["items"] == 0
    if where == "local":  # and every reader reads the output again
        import duckdb
        import polars as pl

        n = duckdb.connect().execute(
            f"SELECT count(*) FROM read_parquet('{root}/parts/*.parquet') WHERE result_info.succeed").fetchone()
        assert n == (N,)
        assert pl.scan_parquet(f"{root}/parts/*.parquet").select(pl.len()).collect().item() == N


def _local_job(tmp_path):
    """A job of ``N`` items run to its end on a local output: ``(out, fs, root, its config, its parts)``."""
    out = str(tmp_path / "out")
    raw = _job(tmp_path, out, n=N)
    _run(raw)
    fs = fsspec.filesystem("file")
    return out, fs, out, raw, _parts(fs, out)


def test_status_names_damaged_parts_and_moves_nothing(tmp_path):
    out, fs, root, raw, parts = _local_job(tmp_path)
    held = _rows(fs, parts[1]) + _rows(fs, parts[2])
    _zero(fs, parts[1])
    _garble_column(fs, parts[2], "result_info.succeed")
    before = {p: fs.cat_file(p) for p in parts}
    cfg = build_config(raw)
    validate_config(cfg)
    status = job_status(cfg)
    damaged = status["output"]["damaged_parts"]
    assert set(damaged) == {parts[1].rsplit("/", 1)[-1], parts[2].rsplit("/", 1)[-1]}
    assert status["output"]["part_files"] == len(parts) and status["output"]["quarantined_parts"] == 0
    assert status["items"]["succeeded"] == N - held and status["next_run"]["would_process"] == held
    assert "2 DAMAGED part file(s)" in format_status(status)
    assert {p: fs.cat_file(p) for p in _parts(fs, root)} == before  # not moved, not changed
    assert not fs.exists(f"{root}/{QUARANTINE_DIR}")

    _run(raw)
    status = job_status(cfg)
    assert status["output"]["damaged_parts"] == {} and status["output"]["quarantined_parts"] == 2
    assert status["items"]["succeeded"] == N
    assert "2 damaged part file(s) moved to _quarantine/parts/ earlier" in format_status(status)


def test_compaction_moves_a_part_with_a_damaged_page_the_run_does_not_read(tmp_path):
    """A page of a column the resume scan skips (the path) reads nowhere but in a reader that wants it, and in
    compaction, which reads every column: there the part goes to the quarantine, the rest are merged, and the next
    run redoes its items."""
    out, fs, root, raw, parts = _local_job(tmp_path)
    held = _rows(fs, parts[4]) + _rows(fs, parts[8])
    zeroed = _rows(fs, parts[8])
    _garble_column(fs, parts[4], "video_path")
    _zero(fs, parts[8])
    assert len(read_committed(out, {}, "video_id", [p for p in parts if p != parts[8]]).succeeded) == N - zeroed

    target = int(max(fs.size(p) for p in parts) * 100)
    dry = compact(out, {}, target_bytes=target, scratch_dir=str(tmp_path), dry_run=True, id_column="video_id")
    assert dry.quarantined == 1 and _parts(fs, root) == parts  # the footer's damage: found, nothing moved

    report = compact(out, {}, target_bytes=target, scratch_dir=str(tmp_path), id_column="video_id")
    assert report.quarantined == 2 and report.written == 1
    assert report.rows == N - held
    assert set(_in_quarantine(fs, root)) == {parts[4].rsplit("/", 1)[-1], parts[8].rsplit("/", 1)[-1]}
    assert len(_parts(fs, root)) == report.files_after == 1
    assert len(_success_ids(fs, root)) == N - held

    again = _run(raw)
    assert again.summary["this_run"]["items"] == held and _success_ids(fs, root) == [f"id-{i:04d}" for i in range(N)]


def _two_parts(tmp_path) -> tuple[fsspec.AbstractFileSystem, str, list[str]]:
    fs, root = fsspec.filesystem("file"), str(tmp_path / "o")
    for i in range(2):
        fs.makedirs(f"{root}/parts", exist_ok=True)
        pq.write_table(pa.table({"video_id": [f"a{i}"]}), f"{root}/parts/p{i}.parquet")
    return fs, root, sorted(fs.find(f"{root}/parts"))


def test_a_fault_of_the_store_is_never_taken_for_damage(tmp_path, monkeypatch):
    fs, root, files = _two_parts(tmp_path)

    calls = []

    def flaky(files):  # fails once, as a dropped connection does, then reads
        calls.append(list(files))
        if len(calls) == 1:
            raise OSError("Connection reset by peer")
        return len(files)

    assert read_past_damaged(fs, root, files, flaky, "run")[0] == 2 and len(calls) == 2

    def naming(files):  # an error that names a part which reads whole: raised after one retry, nothing moved
        raise OSError(f"Could not open Parquet input source '{files[0]}': Connection reset by peer")

    with pytest.raises(OSError, match="Connection reset"):
        read_past_damaged(fs, root, files, naming, "run")

    def unnamed(files):  # the same error twice, naming no part: every part is checked, none is damaged
        raise OSError("Couldn't deserialize thrift")

    with pytest.raises(OSError, match="thrift"):
        read_past_damaged(fs, root, files, unnamed, "run")
    assert sorted(fs.find(f"{root}/parts")) == files and not fs.exists(f"{root}/{QUARANTINE_DIR}")

    _zero(fs, files[0])  # damaged, but the store fails the check's own read: no verdict, not moved
    real_cat = type(fs).cat_file
    monkeypatch.setattr(type(fs), "cat_file", lambda self, path, *a, **k: (_ for _ in ()).throw(
        OSError("Connection reset by peer")))
    with pytest.raises(OSError):
        part_fault(fs, files[0])
    with pytest.raises(pa.ArrowInvalid, match="0 bytes"):
        read_past_damaged(fs, root, files, lambda fl: pq.ParquetDataset(fl, filesystem=fs).read(), "run")
    assert sorted(fs.find(f"{root}/parts")) == files
    monkeypatch.setattr(type(fs), "cat_file", real_cat)
    table, read, found = read_past_damaged(fs, root, files, lambda fl: pq.ParquetDataset(fl, filesystem=fs).read(),
                                           "run")
    assert table["video_id"].to_pylist() == ["a1"] and read == files[1:] and list(found) == files[:1]


def test_a_valid_parquet_file_is_never_moved_and_a_taken_name_is_kept(tmp_path):
    fs, root, files = _two_parts(tmp_path)

    def foreign(files):  # a read that fails on a part that is whole Parquet (another schema): its error stands
        raise pa.ArrowInvalid(f"No match for FieldRef.Nested in '{files[1]}'")

    with pytest.raises(pa.ArrowInvalid, match="FieldRef"):
        read_past_damaged(fs, root, files, foreign, "run")
    assert sorted(fs.find(f"{root}/parts")) == files

    fs.makedirs(f"{root}/{QUARANTINE_DIR}", exist_ok=True)
    fs.pipe_file(f"{root}/{QUARANTINE_DIR}/p0.parquet", b"earlier")  # a part of that name moved before
    _cut(fs, files[0])
    read_past_damaged(fs, root, files, lambda fl: pq.ParquetDataset(fl, filesystem=fs).read(), "run")
    moved = sorted(os.listdir(f"{root}/{QUARANTINE_DIR}"))
    assert len(moved) == 3 and fs.cat_file(f"{root}/{QUARANTINE_DIR}/p0.parquet") == b"earlier"


def test_the_command_lines_say_what_they_found_and_moved(tmp_path):
    import subprocess
    import sys

    import yaml

    from tests.conftest import ROOT

    out, fs, root, raw, parts = _local_job(tmp_path)
    _zero(fs, parts[5])
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))

    def command(script, *args):
        done = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", script), "--config", str(config), *args],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    assert "1 DAMAGED part file(s)" in command("status.py")
    assert json.loads(command("status.py", "--json"))["output"]["damaged_parts"] == {
        parts[5].rsplit("/", 1)[-1]: "ArrowInvalid: Parquet file size is 0 bytes"}
    assert "found 1 damaged part file(s)" in command("compact.py", "--dry-run") and fs.exists(parts[5])
    assert ("moved 1 damaged part file(s) (cut short, garbled, or failing their page checksums) to "
            "_quarantine/parts/") in command("compact.py")
    assert not fs.exists(parts[5]) and set(_in_quarantine(fs, root)) == {parts[5].rsplit("/", 1)[-1]}
