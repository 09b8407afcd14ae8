"""A bit flipped in a committed part after its commit (a disk, a copy, memory on the way) reads, in every Parquet
reader, as another value: no error, another table. Parts now carry a CRC-32 on every page: the job's reads,
compaction and ``jobs/verify.py`` check them, so such a part is named and moved aside and its items redone, where
before it was read as good (the resume scan took a garbled id as a finished item, compaction merged the garbled values
into a new part whose checksums then vouched for them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.compaction import compact
from pipeline.quarantine import check_part, verify_parts
from pipeline.resume import OutputLease
from tests.conftest import ROOT
from tests.integration.test_compaction import _job, _parts, _run
from tests.integration.test_damaged_output import _in_quarantine, _output, _rows, _success_ids

N = 40


def _column(table: pa.Table, column: str) -> list:
    head, *rest = column.split(".")
    values = table[head]
    for name in rest:
        values = pa.compute.struct_field(values, name)
    return values.to_pylist()


def _flip_silently(fs, path: str, column: str) -> tuple[list, list]:
    """Flip one bit in a page of ``column`` such that a reader that does not verify checksums reads the whole part
    without error and gets other values in that column (the first such bit from the column chunk's start). Returns
    the column's values before and after, as that reader sees them."""
    data = fs.cat_file(path)
    meta = pq.ParquetFile(pa.BufferReader(data)).metadata
    chunk = next(meta.row_group(0).column(i) for i in range(meta.num_columns)
                 if meta.row_group(0).column(i).path_in_schema == column)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    before = _column(pq.read_table(pa.BufferReader(data)), column)
    for at in range(start, start + chunk.total_compressed_size):
        for bit in (0x10, 0x01):
            flipped = bytearray(data)
            flipped[at] ^= bit
            try:
                after = _column(pq.read_table(pa.BufferReader(bytes(flipped))), column)
            except (pa.ArrowException, OSError, ValueError):
                continue
            if after != before and len(after) == len(before):
                fs.pipe_file(path, bytes(flipped))
                return before, after
    raise AssertionError(f"no single bit of {column}'s pages in {path} reads as other values")


def _verify(tmp_path, raw, *args) -> subprocess.CompletedProcess:
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    return subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "verify.py"), "--config", str(config), *args],
                          capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_verify_names_a_part_whose_values_changed_and_quarantine_has_the_rerun_redo_it(tmp_path, where, s3, bucket):
    out, opts, fs, root = _output(tmp_path, where, s3, bucket)
    raw = _job(tmp_path, out, n=N, storage_options=opts)
    _run(raw)
    parts = _parts(fs, root)
    assert all(check_part(fs, p).checksums for p in parts)  # every part the job wrote carries them
    clean = _verify(tmp_path, raw)
    assert clean.returncode == 0, clean.stderr[-2000:]
    assert "every part reads whole, every page matching its checksum" in clean.stdout

    damaged = parts[2]
    before, after = _flip_silently(fs, damaged, "result_info.cost_s")  # a column the resume scan does not read
    if where == "local":  # what a reader sees: the other value, and no error
        import duckdb

        read = duckdb.connect().execute(
            f"SELECT result_info.cost_s FROM read_parquet('{damaged}')").fetchall()
        assert [r[0] for r in read] == after != before

    found = _verify(tmp_path, raw)
    assert found.returncode == 4, found.stderr[-2000:]
    name = damaged.rsplit("/", 1)[-1]
    assert f"DAMAGED {name}: a page's bytes do not match its checksum" in found.stdout
    assert f"1 damaged part file(s), {len(before)} rows" in found.stdout
    assert _parts(fs, root) == parts and not _in_quarantine(fs, root)  # named, not moved

    report = json.loads(_verify(tmp_path, raw, "--json", "--quarantine").stdout)
    assert list(report["damaged"]) == [name] and report["moved"] and report["damaged_rows"] == len(before)
    assert report["parts"] == len(parts) and report["unchecked"] == 0 and report["unread"] == {}
    notes = _in_quarantine(fs, root)
    assert set(notes) == {name} and notes[name]["by"].startswith("verify-")
    assert "checksum" in notes[name]["why"]

    again = _run(raw)
    assert again.summary["this_run"]["items"] == len(before) and again.summary["this_run"]["succeeded"] == len(before)
    assert _success_ids(fs, root) == [f"id-{i:04d}" for i in range(N)]
    last = _verify(tmp_path, raw)
    assert last.returncode == 0 and "1 damaged part file(s) moved to _quarantine/parts/ earlier" in last.stdout


def test_the_rerun_catches_a_garbled_id_instead_of_taking_it_for_a_finished_item(tmp_path):
    """The resume scan reads the id column: a flipped bit there made another id "done" (a row no manifest item has)
    and its own item redone beside it. The scan's checksums now fail; the part goes to the quarantine and its items
    are redone, each once."""
    out, opts, fs, root = _output(tmp_path, "local", None, None)
    raw = _job(tmp_path, out, n=N)
    _run(raw)
    damaged = _parts(fs, root)[5]
    before, after = _flip_silently(fs, damaged, "video_id")
    assert set(after) - set(before)  # an id that is no item's

    again = _run(raw)
    assert again.summary["this_run"]["items"] == len(before)
    assert again.summary["total"]["parts_quarantined"] == 1
    assert set(_in_quarantine(fs, root)) == {damaged.rsplit("/", 1)[-1]}
    assert _success_ids(fs, root) == [f"id-{i:04d}" for i in range(N)]  # each item once, no stranger


def test_compaction_leaves_a_part_whose_values_changed_out_of_the_merge(tmp_path):
    """Compaction rewrites what it reads under fresh checksums: a garbled page merged in would be vouched for from
    then on. It now fails the merge's read, goes to the quarantine, and the merged part holds the rest."""
    out, opts, fs, root = _output(tmp_path, "local", None, None)
    raw = _job(tmp_path, out, n=N)
    _run(raw)
    parts = _parts(fs, root)
    damaged = parts[4]
    held = _rows(fs, damaged)
    _flip_silently(fs, damaged, "result_info.start_time")

    report = compact(out, {}, target_bytes=int(max(fs.size(p) for p in parts) * 100), scratch_dir=str(tmp_path),
                     id_column="video_id")
    assert report.quarantined == 1 and report.written == 1 and report.rows == N - held
    assert set(_in_quarantine(fs, root)) == {damaged.rsplit("/", 1)[-1]}
    (merged,) = _parts(fs, root)
    assert check_part(fs, merged).checksums and check_part(fs, merged).fault is None
    assert _run(raw).summary["this_run"]["items"] == held
    assert _success_ids(fs, root) == [f"id-{i:04d}" for i in range(N)]


def test_parts_of_an_earlier_version_read_as_before_and_are_counted_unchecked(tmp_path):
    out, opts, fs, root = _output(tmp_path, "local", None, None)
    raw = _job(tmp_path, out, n=N)
    _run(raw)
    parts = _parts(fs, root)
    old = parts[:3]
    for path in old:  # as the last version wrote them: no page checksums, no footer key
        table = pq.read_table(path)
        pq.write_table(table.replace_schema_metadata(None), path, compression="zstd")
        assert not check_part(fs, path).checksums

    report = verify_parts(fs, parts)
    assert report.unchecked == old and not report.damaged and report.parts == len(parts)
    said = _verify(tmp_path, raw)
    assert said.returncode == 0 and "3 part file(s) carry no page checksums" in said.stdout
    assert _run(raw).summary["this_run"]["items"] == 0  # resumed over them as before

    compact(out, {}, target_bytes=int(max(fs.size(p) for p in parts) * 100), scratch_dir=str(tmp_path))
    assert verify_parts(fs, _parts(fs, root)).unchecked == []  # merged into a part that carries them


def test_verify_says_what_it_could_not_do(tmp_path, monkeypatch):
    out, opts, fs, root = _output(tmp_path, "local", None, None)
    raw = _job(tmp_path, out, n=9)

    missing = _verify(tmp_path, raw)  # no output there yet: a mistyped output.dir
    assert missing.returncode == 2 and "no output at" in missing.stderr

    _run(raw)
    assert _verify(tmp_path, raw, "--threads", "0").returncode == 2

    lease = OutputLease(out, {}, "20260101T000000-live0000", 600)  # a live run holds the output
    lease.acquire()
    try:
        locked = _verify(tmp_path, raw, "--quarantine")
        assert locked.returncode == 3 and "in use" in locked.stderr
        assert _verify(tmp_path, raw).returncode == 0  # reading needs no lease
    finally:
        lease.release()

    parts = _parts(fs, root)
    real = type(fs).cat_file

    def flaky(self, path, *a, **k):  # the store fails one part's read: no verdict on it, and no move
        if path == parts[1]:
            raise OSError("Connection reset by peer")
        return real(self, path, *a, **k)

    monkeypatch.setattr(type(fs), "cat_file", flaky)
    report = verify_parts(fs, parts + [f"{root}/parts/gone.parquet"])
    assert list(report.unread) == [parts[1]] and "Connection reset" in report.unread[parts[1]]
    assert report.gone == 1 and report.parts == len(parts) - 1 and not report.damaged


def test_bytes_garbled_on_the_way_are_read_again_not_taken_for_damage(tmp_path, monkeypatch):
    out, opts, fs, root = _output(tmp_path, "local", None, None)
    raw = _job(tmp_path, out, n=9)
    _run(raw)
    part = _parts(fs, root)[0]
    copy = str(tmp_path / "copy.parquet")
    fs.copy(part, copy)
    _flip_silently(fs, copy, "result_info.cost_s")
    garbled = fs.cat_file(copy)
    real, reads = type(fs).cat_file, []

    def once(self, path, *a, **k):  # the first read of the part comes garbled, as over a bad link; the next whole
        reads.append(path)
        return garbled if path == part and len(reads) == 1 else real(self, path, *a, **k)

    monkeypatch.setattr(type(fs), "cat_file", once)
    checked = check_part(fs, part)
    assert checked.fault is None and checked.checksums and reads == [part, part]
    assert check_part(fs, copy).fault is not None  # damaged in the file: the second read says the same
