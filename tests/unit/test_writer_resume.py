import json
import os
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import ConfigError, OutputLockedError
from pipeline.resume import (
    OutputLease,
    check_or_record_config,
    failed_for_good,
    pending_indices,
    read_committed,
    redact,
)
from pipeline.writer import ResultWriter, result_schema

SCHEMA = result_schema(pa.schema([("video_id", pa.string()), ("video_path", pa.string())]),
                       [("noop", pa.struct([("bytes", pa.int64())]))])


def _row(i, ok=True):
    return {"video_id": f"id{i}", "video_path": f"p{i}", "noop": {"bytes": i} if ok else None,
            "result_info": {"succeed": ok, "error_type": None if ok else "DecodeError", "rank": 0, "run_id": "r"}}


def test_parts_by_rows_and_resume_state(tmp_path):
    w = ResultWriter(str(tmp_path), {}, SCHEMA, "run1", 3, rows_per_file=4, flush_interval_s=999)
    for i in range(10):
        w.add(_row(i, ok=i % 5 != 0))
    assert w.files_committed == 2 and w.buffered == 2
    w.close()
    files = sorted(os.listdir(tmp_path / "parts"))
    assert files == [f"part-run1-r00003-{s:06d}.parquet" for s in range(3)]
    assert os.listdir(tmp_path / "_tmp") == []
    table = pq.read_table(tmp_path / "parts")
    assert table.num_rows == 10 and table.schema.field("noop").type == pa.struct([("bytes", pa.int64())])
    state = read_committed(str(tmp_path), {}, "video_id")
    assert set(state.succeeded.to_pylist()) == {f"id{i}" for i in range(10) if i % 5}
    assert set(state.failed_only.to_pylist()) == {"id0", "id5"}
    ids = pa.array([f"id{i}" for i in range(12)])
    assert pending_indices(ids, state, retry_failed=True).to_pylist() == [0, 5, 10, 11]
    assert pending_indices(ids, state, retry_failed=False).to_pylist() == [10, 11]


def test_retry_failed_retryable_skips_items_whose_latest_failure_is_for_good(tmp_path):
    """Two runs' rows: the latest failure row of an item decides (by end time, whichever part holds it)."""
    import datetime as dt

    import fsspec

    def failure(i, error_type, retryable, hour):
        return {"video_id": f"id{i}", "video_path": f"p{i}", "noop": None, "result_info": {
            "succeed": False, "error_type": error_type, "retryable": retryable, "rank": 0, "run_id": "r",
            "end_time": dt.datetime(2026, 12, 1, hour, tzinfo=dt.timezone.utc)}}

    first = [failure(0, "DecodeError", False, 1), failure(1, "FetchTimeout", True, 1),
             failure(2, "FetchTimeout", True, 1), failure(3, "DecodeError", False, 1),
             failure(4, "DecodeError", False, 1), {**_row(5), "result_info": {**_row(5)["result_info"]}}]
    later = [failure(2, "DecodeError", False, 2),  # retryable, then for good: for good
             failure(3, "FetchTimeout", True, 2),  # for good, then retryable: retried
             _row(4)]  # failed, then succeeded: done
    for n, rows in enumerate((first, later)):
        w = ResultWriter(str(tmp_path), {}, SCHEMA, f"run{n}", 0, rows_per_file=100, flush_interval_s=999)
        for r in rows:
            w.add(r)
        w.close()
    state = read_committed(str(tmp_path), {}, "video_id")
    fs = fsspec.filesystem("file")
    files = sorted(str(p) for p in (tmp_path / "parts").iterdir())
    assert sorted(failed_for_good(fs, files, state, "video_id").to_pylist()) == ["id0", "id2"]
    ids = pa.array([f"id{i}" for i in range(7)])
    for_good = failed_for_good(fs, files, state, "video_id")
    assert pending_indices(ids, state, "retryable", for_good=for_good).to_pylist() == [1, 3, 6]
    assert pending_indices(ids, state, True).to_pylist() == [0, 1, 2, 3, 6]
    assert pending_indices(ids, state, False).to_pylist() == [6]
    assert failed_for_good(fs, [], state, "video_id").to_pylist() == []


def test_concurrent_writers_cut_full_parts(tmp_path):

    w = ResultWriter(str(tmp_path), {}, SCHEMA, "run1", 0, rows_per_file=50, flush_interval_s=999)

    def add(base):
        for i in range(250):
            w.add(_row(base + i))

    threads = [threading.Thread(target=add, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert w.files_committed == 20 and w.buffered == 0  # 1000 rows in full parts of 50, no small remainders
    w.close()
    assert w.files_committed == 20 and pq.read_table(tmp_path / "parts").num_rows == 1000


def test_flush_by_time(tmp_path):
    w = ResultWriter(str(tmp_path), {}, SCHEMA, "run1", 0, rows_per_file=100, flush_interval_s=0.0)
    w.add(_row(1))
    w.flush_if_due()
    assert w.files_committed == 1


def test_failed_commit_keeps_rows_and_name(tmp_path, monkeypatch):
    import pipeline.writer as writer_mod

    w = ResultWriter(str(tmp_path), {}, SCHEMA, "run1", 0, rows_per_file=100, commit_retries=0)
    w.add(_row(1))
    real = writer_mod.commit_bytes
    monkeypatch.setattr(writer_mod, "commit_bytes", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        w.flush()
    assert w.buffered == 1 and not os.listdir(tmp_path / "parts")
    monkeypatch.setattr(writer_mod, "commit_bytes", real)
    w.flush()
    assert os.listdir(tmp_path / "parts") == ["part-run1-r00000-000000.parquet"]


def test_a_part_is_on_the_disk_before_its_name_is(tmp_path, monkeypatch):
    """A rename is atomic but a new file's data is written late (ext4, XFS): a node that lost power after the rename
    left a part of zero bytes. The commit syncs the temporary file before renaming it and the directory after."""
    import errno

    import pipeline.writer as writer_mod

    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((path, os.listdir(tmp_path / "parts")))  # what the directory held then
        real_fsync(fd)

    monkeypatch.setattr(writer_mod.os, "fsync", fsync)
    w = ResultWriter(str(tmp_path), {}, SCHEMA, "run1", 0, rows_per_file=100, commit_retries=0)
    w.add(_row(1))
    w.flush()
    final = "part-run1-r00000-000000.parquet"
    (tmp_file, seen_then), (folder, seen_after) = synced
    assert tmp_file.startswith(str(tmp_path / "_tmp")) and tmp_file.endswith(".tmp") and seen_then == []
    assert folder == str(tmp_path / "parts") and seen_after == [final]

    def failing(fd):  # the disk fails the file's sync: the commit fails (and is retried), nothing is in place
        if not os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(writer_mod.os, "fsync", failing)
    w.add(_row(2))
    with pytest.raises(OSError, match="Input/output"):
        w.flush()
    assert os.listdir(tmp_path / "parts") == [final] and not os.listdir(tmp_path / "_tmp") and w.buffered == 1

    def no_directory_sync(fd):  # some network filesystems cannot sync a directory: the commit stands
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(writer_mod.os, "fsync", no_directory_sync)
    w.flush()
    assert sorted(os.listdir(tmp_path / "parts")) == [final, "part-run1-r00000-000001.parquet"]


def test_writer_on_s3_is_one_put_per_part(s3, bucket):
    name, fs = bucket
    out = f"s3://{name}/out"
    w = ResultWriter(out, s3.options(), SCHEMA, "run1", 1, rows_per_file=3)
    for i in range(7):
        w.add(_row(i))
    w.close()
    assert len(fs.ls(f"{name}/out/parts")) == 3
    assert set(read_committed(out, s3.options(), "video_id").succeeded.to_pylist()) == {f"id{i}" for i in range(7)}


def test_lease_refuses_a_live_run_and_takes_over_a_dead_one(tmp_path):
    a = OutputLease(str(tmp_path), {}, "run-a", timeout_s=60)
    a.acquire()
    with pytest.raises(OutputLockedError, match="in use by live run run-a"):
        OutputLease(str(tmp_path), {}, "run-b", timeout_s=60).acquire()
    a.release()
    b = OutputLease(str(tmp_path), {}, "run-b", timeout_s=60)
    b.acquire()
    b._stop.set()
    # a crashed holder on this host: its pid is gone, so the lease is free at once
    rec = json.loads((tmp_path / "_lease.json").read_text())
    rec["pid"] = 2**22 + 12345
    (tmp_path / "_lease.json").write_text(json.dumps(rec))
    OutputLease(str(tmp_path), {}, "run-c", timeout_s=60).acquire()
    # a restarted container (same host name, fresh pid namespace) whose new processes took the dead holder's pid:
    # the pid is alive, but its start time is not the holder's, so the lease is free at once (it waited for the
    # heartbeat to age before: a crash-looping container refused to start with exit code 3 meanwhile)
    rec = json.loads((tmp_path / "_lease.json").read_text())
    assert rec["pid"] == os.getpid() and rec["pid_start"] > 0
    live = OutputLease(str(tmp_path), {}, "run-c2", timeout_s=60)
    with pytest.raises(OutputLockedError):  # the same pid and start: the holder is alive
        live.acquire()
    rec["pid_start"] += 1
    (tmp_path / "_lease.json").write_text(json.dumps(rec))
    OutputLease(str(tmp_path), {}, "run-c3", timeout_s=60).acquire()
    # another host's lease with an old heartbeat has expired
    rec = {"run_id": "run-d", "host": "elsewhere", "pid": 1, "heartbeat": 0}
    (tmp_path / "_lease.json").write_text(json.dumps(rec))
    OutputLease(str(tmp_path), {}, "run-e", timeout_s=60).acquire()


def _race(out: str, options: dict, runs: int = 3) -> list[str]:
    """Start ``runs`` leases on one output at the same instant (the check-then-write window of each is open at
    once); returns the run ids that acquired."""
    barrier = threading.Barrier(runs)
    won, leases = [], [OutputLease(out, options, f"run-{i}", timeout_s=60) for i in range(runs)]

    def start(lease):
        barrier.wait()
        try:
            lease.acquire()
            won.append(lease.run_id)
        except OutputLockedError:
            pass

    threads = [threading.Thread(target=start, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for lease in leases:
        lease._stop.set()
    return won


def test_runs_started_at_the_same_moment_get_one_lease(tmp_path, s3, bucket):
    name, _ = bucket
    for trial in range(4):  # without the read-back every racer won (measured: 5 of 5 trials, 2 processes)
        won = _race(str(tmp_path / f"out{trial}"), {})
        assert len(won) == 1, won
        assert json.loads((tmp_path / f"out{trial}" / "_lease.json").read_text())["run_id"] == won[0]
    assert len(_race(f"s3://{name}/out", s3.options())) == 1  # an object store: PUTs race the same way


def test_a_lease_taken_over_while_held_is_never_overwritten_and_says_so(tmp_path):
    lease = OutputLease(str(tmp_path), {}, "run-slow", timeout_s=4)  # a heartbeat every second
    lease.acquire()
    try:
        other = {"run_id": "run-new", "host": "elsewhere", "pid": 1, "pid_start": 1, "heartbeat": time.time()}
        (tmp_path / "_lease.json").write_text(json.dumps(other))  # it found this run's heartbeat stale
        deadline = time.time() + 10
        while lease.lost is None and time.time() < deadline:
            time.sleep(0.1)
        assert lease.lost is not None and lease.lost["run_id"] == "run-new"
        time.sleep(1.5)
        assert json.loads((tmp_path / "_lease.json").read_text())["run_id"] == "run-new"  # not written over
    finally:
        lease.release()
    assert (tmp_path / "_lease.json").exists()  # nor removed by this run's release


def _a_row(out) -> None:
    """A committed part: rows of the recorded job, which a different one may not mix with."""
    (out / "parts").mkdir(exist_ok=True)
    pq.write_table(pa.table({"video_id": ["a"]}), str(out / "parts" / "part-r-r00000-000000.parquet"))


def test_a_record_without_rows_is_replaced_not_held_against_the_next_run(tmp_path, caplog):
    """A run that stopped before its first row (a model that did not load, a setting fixed since): the next run
    with the setting changed goes on, its own config recorded in place, with a warning."""
    import logging

    ident = {"input": {"manifest": "m1"}, "filters": {"probe": {}}, "models": {"r.model_uri": "sha256:aa"}}
    check_or_record_config(str(tmp_path), {}, {}, ident, False, run_id="run-1")
    fixed = {**ident, "models": {"r.model_uri": "sha256:bb"}}
    with caplog.at_level(logging.WARNING, logger="pipeline.resume"):
        check_or_record_config(str(tmp_path), {}, {}, fixed, False, run_id="run-2")
    assert "holds no rows yet: the config an earlier run recorded (models.r.model_uri differ) is replaced" in caplog.text
    rec = json.loads((tmp_path / "_config.json").read_text())
    assert rec["identity"] == fixed
    assert rec["model_history"] == [{"from_run": "run-2", "models": fixed["models"]}]  # run-1 made no row
    _a_row(tmp_path)
    with pytest.raises(ConfigError, match=r"models\.r\.model_uri differs"):
        check_or_record_config(str(tmp_path), {}, {}, ident, False, run_id="run-3")


def test_config_record_refuses_other_job_and_redacts_secrets(tmp_path):
    ident = {"input": {"manifest": "m1"}, "filters": {"probe": {}}}
    resolved = {"storage": {"tiers": [{"storage_options": {"secret": "s3cr3t", "key_id": "AK", "anon": False}}]}}
    check_or_record_config(str(tmp_path), {}, resolved, ident, False)
    text = (tmp_path / "_config.json").read_text()
    assert "s3cr3t" not in text and "AK" not in text and '"anon": false' in text
    check_or_record_config(str(tmp_path), {}, resolved, ident, False)
    _a_row(tmp_path)
    with pytest.raises(ConfigError, match="different job"):
        check_or_record_config(str(tmp_path), {}, resolved, {**ident, "filters": {"noop": {}}}, False)
    check_or_record_config(str(tmp_path), {}, resolved, {**ident, "filters": {"noop": {}}}, True)
    assert redact({"a": [{"password": "x"}]}) == {"a": [{"password": "***"}]}


@pytest.mark.parametrize("damage", [b"", b'{"identity": {"input"', b"\xff\xfe", b"[1, 2]"],
                         ids=["zero-bytes", "cut-short", "not-text", "not-a-mapping"])
def test_an_unreadable_config_record_is_a_clear_error_that_touches_nothing(tmp_path, damage):
    ident = {"input": {"manifest": "m1"}}
    (tmp_path / "_config.json").write_bytes(damage)
    with pytest.raises(ConfigError, match="delete _config.json .*and rerun; no row was touched"):
        check_or_record_config(str(tmp_path), {}, {}, ident, False)
    assert (tmp_path / "_config.json").read_bytes() == damage
    (tmp_path / "_config.json").unlink()  # what the message says to do
    check_or_record_config(str(tmp_path), {}, {}, ident, False)
    assert json.loads((tmp_path / "_config.json").read_text())["identity"] == ident


def test_config_record_names_what_differs_and_takes_an_older_record(tmp_path, caplog):
    """The settings that change the pictures are part of the job; a record written before they were (no ``video``
    in it, or fewer keys) is resumed with a warning and completed, and from then on they hold."""
    import logging

    from pipeline.resume import identity_changes

    video = {"decode_max_side": None, "square_pixels": True, "tone_map": True, "deinterlace": True}
    ident = {"input": {"manifest": "m1"}, "filters": {"probe": {"type": "probe"}}, "video": video}
    older = {"input": {"manifest": "m1"}, "filters": {"probe": {"type": "probe"}}}
    check_or_record_config(str(tmp_path), {}, {}, older, False)
    with caplog.at_level(logging.WARNING, logger="pipeline.resume"):
        check_or_record_config(str(tmp_path), {}, {}, ident, False)
    assert "did not record video.decode_max_side, video.deinterlace, video.square_pixels, video.tone_map" in caplog.text
    assert json.loads((tmp_path / "_config.json").read_text())["identity"]["video"] == video  # recorded now
    _a_row(tmp_path)
    with pytest.raises(ConfigError, match=r"\(video\.deinterlace, video\.tone_map differ"):
        check_or_record_config(str(tmp_path), {}, {}, {**ident, "video": {**video, "tone_map": False,
                                                                           "deinterlace": False}}, False)
    # a key the record lacks outside video (a filter added, an input setting) is another job, not an older record
    assert identity_changes(ident, {**ident, "filters": {**ident["filters"], "noop": {}}}) == (["filters.noop"], [])
    assert identity_changes(ident, {**ident, "input": {"manifest": "m1", "limit": None}}) == (["input.limit"], [])
    assert identity_changes({**ident, "filters": {}}, ident) == (["filters", "filters.probe.type"], [])


def test_log_lines_scrub_credential_values(monkeypatch, capfd):
    import logging

    from pipeline.metrics import setup_logging

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "topsecretvalue123")
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(3)
        logging.getLogger("pipeline.x").warning("connecting with %s", "topsecretvalue123")
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    err = capfd.readouterr().err
    assert "[rank 3]" in err and "***" in err and "topsecretvalue123" not in err


def test_schema_drift_names_fields_at_any_depth():
    from pipeline.resume import schema_drift

    video = pa.struct([("codec", pa.string()), ("width", pa.int32())])
    windows = pa.list_(pa.struct([("start_s", pa.float64()), ("label", pa.string())]))
    old = pa.schema([("id", pa.string()), ("probe", pa.struct([("video", video)])), ("windows", windows)])
    assert not schema_drift(old, old)
    # order is not drift: rows are matched to the schema by name
    assert not schema_drift(old, pa.schema([old.field("windows"), old.field("probe"), old.field("id")]))
    new = pa.schema([
        ("id", pa.string()),
        ("probe", pa.struct([("video", pa.struct([("codec", pa.string()), ("width", pa.int64()),
                                                   ("rotation", pa.int32())]))])),
        ("windows", pa.list_(pa.struct([("start_s", pa.float64())]))),
        ("extra", pa.bool_()),
    ])
    drift = schema_drift(old, new)
    assert drift.added == ("probe.video.rotation (int32)", "extra (bool)")
    assert drift.removed == ("windows[].label (string)",)
    assert drift.changed == ("probe.video.width (int32 -> int64)",)
    assert "added: probe.video.rotation (int32), extra (bool)" in drift.describe()


def _committed_part(tmp_path, schema):
    w = ResultWriter(str(tmp_path), {}, schema, "20260101T000000-aaaa", 0, rows_per_file=10)
    w.add({"id": "a", "probe": {"w": 1}, "result_info": {"succeed": True}})
    w.close()
    return read_committed(str(tmp_path), {}, "id").newest_part


def test_writer_schema_keeps_the_committed_table_one_table(tmp_path):
    from pipeline.resume import writer_schema

    old = result_schema(pa.schema([("id", pa.string())]), [("probe", pa.struct([("w", pa.int32())]))])
    part = _committed_part(tmp_path, old)
    assert writer_schema(str(tmp_path), {}, None, old, "fail") is old  # a new output writes what it has
    same = writer_schema(str(tmp_path), {}, part, old, "fail")
    assert same.equals(old)
    added = result_schema(pa.schema([("id", pa.string())]),
                          [("probe", pa.struct([("w", pa.int32()), ("rotation", pa.int32())]))])
    with pytest.raises(ConfigError, match=r"added: probe.rotation \(int32\).*on_schema_change=conform"):
        writer_schema(str(tmp_path), {}, part, added, "fail")
    assert writer_schema(str(tmp_path), {}, part, added, "conform").equals(old)
    retyped = result_schema(pa.schema([("id", pa.string())]), [("probe", pa.struct([("w", pa.string())]))])
    for policy in ("fail", "conform"):
        with pytest.raises(ConfigError, match=r"changed: probe.w \(int32 -> string\).*new output.dir"):
            writer_schema(str(tmp_path), {}, part, retyped, policy)


def test_newest_part_is_the_latest_runs(tmp_path):
    schema = result_schema(pa.schema([("id", pa.string())]), [])
    for run_id in ("20260102T000000-bbbb", "20260101T000000-cccc"):
        w = ResultWriter(str(tmp_path), {}, schema, run_id, 3, rows_per_file=10)
        w.add({"id": run_id, "result_info": {"succeed": True}})
        w.close()
    assert "20260102T000000-bbbb" in read_committed(str(tmp_path), {}, "id").newest_part


def test_a_discarding_writer_commits_nothing_more(tmp_path):
    w = ResultWriter(str(tmp_path / "out"), {}, SCHEMA, "run", 0, rows_per_file=2, flush_interval_s=3600)
    for i in range(3):
        w.add(_row(i))  # one part of two committed, one row buffered
    assert w.discard() == 1
    for i in range(3, 7):
        w.add(_row(i))  # rows finished after the discard: dropped, no part is cut
    w.close()
    assert w.rows_committed == 2 and len(os.listdir(tmp_path / "out" / "parts")) == 1


def test_bounded_returns_raises_or_gives_up():
    from pipeline.errors import OutputHungError
    from pipeline.writer import bounded

    assert bounded(lambda: 7, 1.0, "x") == 7 and bounded(lambda: 8, None, "x") == 8
    with pytest.raises(KeyError):
        bounded(lambda: {}["missing"], 1.0, "x")  # the call's own error, on the caller's thread
    gate = threading.Event()
    with pytest.raises(OutputHungError, match="the commit of p did not finish in output.commit_timeout_s=0.2s"):
        bounded(lambda: gate.wait(30), 0.2, "the commit of p")
    gate.set()


def _join_new_threads(before, timeout_s=10.0):
    """Wait for the threads that ``bounded`` started since ``before`` (named ``*-output``) to return."""
    for t in set(threading.enumerate()) - before:
        if not t.name.endswith("-output"):
            continue
        t.join(timeout_s)
        assert not t.is_alive(), t.name


def test_a_hung_commit_stops_the_writer_and_its_part_never_lands_late(tmp_path, monkeypatch):
    """A commit that does not finish in ``commit_timeout_s`` raises ``OutputHungError``; every later flush (and the
    close) raises it at once instead of blocking again; and when the hung write returns after all, its part is not
    renamed into place: the rows were counted as uncommitted, so the rerun redoes them, and a late part would give
    them a second row."""
    from pipeline.errors import OutputHungError

    w = ResultWriter(str(tmp_path / "out"), {}, SCHEMA, "run", 0, rows_per_file=2, flush_interval_s=3600,
                     commit_timeout_s=0.3)
    real, gate, calls = w.fs.pipe_file, threading.Event(), []

    def hangs_after_the_first(path, *args, **kwargs):  # the second part's write blocks (a hung mount)
        calls.append(path)
        if len(calls) > 1:
            gate.wait(30)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(w.fs, "pipe_file", hangs_after_the_first)
    before = set(threading.enumerate())  # earlier tests' abandoned threads may still be out
    w.add(_row(0))
    w.add(_row(1))  # the first part commits
    w.add(_row(2))
    with pytest.raises(OutputHungError, match=r"the commit of .*part-run-r00000-000001.parquet did not finish"):
        w.add(_row(3))
    started = time.monotonic()
    with pytest.raises(OutputHungError):
        w.close()
    assert time.monotonic() - started < 0.2 and len(calls) == 2  # not tried again: no second thread on the mount
    assert w.rows_committed == 2 and w.buffered == 2
    gate.set()  # the mount answers again: the abandoned write finishes
    _join_new_threads(before)
    assert sorted(os.listdir(tmp_path / "out" / "parts")) == ["part-run-r00000-000000.parquet"]
    assert os.listdir(tmp_path / "out" / "_tmp") == []  # its temporary file was removed, not renamed
