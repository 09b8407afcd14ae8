"""The parts of the crash ledger (``pipeline.crashes``); the whole under torchrun is in
tests/integration/test_poison_items.py."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from pipeline.config import FilterSpec, VideoConfig, build_config, validate_config
from pipeline.crashes import (
    InflightJournal,
    SuspectGate,
    collect_suspects,
    job_key,
    read_ledger,
    rehearse,
    update_ledger,
)
from pipeline.errors import ConfigError, MediasieveError
from tests.conftest import base_config


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _left_behind(cache, key, host, lines, pid=None) -> str:
    folder = os.path.join(cache, "_inflight")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{key}__{host}__{pid or _dead_pid()}.log")
    with open(path, "w") as f:
        f.write(lines)
    return path


def test_journal_of_a_dead_process_names_what_it_had_in_flight(tmp_path):
    cache, key = str(tmp_path), job_key("s3://b/out")
    j = InflightJournal(cache, key, "node-a")
    for i in ("a", "b\nnewline", "c"):
        j.start(i)
    j.end("a")
    j.start("a")  # retried in the same process: in flight again
    j.end("c")
    # the process "dies": its file stays as written, and a half-written last line is ignored
    with open(j.path, "a") as f:
        f.write('["+", "d')
    dead = _left_behind(cache, key, "node-a", open(j.path).read())
    os.remove(j.path)
    suspects, read = collect_suspects(cache, key, "node-a")
    assert suspects == {"a": 1, "b\nnewline": 1} and read == [dead]


def test_only_dead_processes_of_this_job_on_this_host_are_read(tmp_path):
    cache, key = str(tmp_path), job_key("/out")
    line = json.dumps(["+", "x"]) + "\n"
    _left_behind(cache, key, "node-a", line, pid=os.getpid())  # alive (this process)
    _left_behind(cache, job_key("/other-out"), "node-a", line)  # another job
    _left_behind(cache, key, "node-b", line)  # another host sharing the directory
    assert collect_suspects(cache, key, "node-a") == ({}, [])
    mine = [_left_behind(cache, key, "node-a", line) for _ in range(2)]  # two deaths with x in flight
    # a restarted container's fresh pid namespace hands the dead process's pid to a live one at once: the start
    # time in the name tells them apart
    mine.append(_left_behind(cache, key, "node-a", line, pid=f"{os.getpid()}-1"))
    suspects, read = collect_suspects(cache, key, "node-a")
    assert suspects == {"x": 3} and sorted(read) == sorted(mine)
    for path in read:
        os.remove(path)
    j = InflightJournal(cache, key, "node-a")  # a live journal (this process, named with its start time)
    j.start("y")
    assert collect_suspects(cache, key, "node-a") == ({}, [])
    j.close()


def test_a_clean_close_leaves_no_journal(tmp_path):
    j = InflightJournal(str(tmp_path), "k", "h")
    j.start("a")
    j.close()
    j.end("a")  # the watchdog may let an item go after the close: ignored
    assert not os.path.exists(j.path)


def test_ledger_adds_up_across_runs_and_nodes(tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(out)
    assert update_ledger(out, {}, [{}, {}], "r1") == {} and not os.path.exists(f"{out}/_crashes.json")
    assert update_ledger(out, {}, [{"a": 1}, {"b": 1}], "r1") == {"a": 1, "b": 1}
    assert update_ledger(out, {}, [{"a": 1}, {}], "r2") == {"a": 2, "b": 1}
    assert read_ledger(out, {})["items"]["a"] == {"crashes": 2, "found_by_runs": ["r1", "r2"]}


def test_ledger_on_the_object_store(s3, bucket):
    name, fs = bucket
    out = f"s3://{name}/out"
    assert update_ledger(out, s3.options(), [{"a": 1}], "r1") == {"a": 1}
    assert json.loads(fs.cat(f"{name}/out/_crashes.json"))["items"]["a"]["crashes"] == 1


@pytest.mark.parametrize("body", ["{not json", "[1, 2]"])
def test_a_broken_ledger_stops_with_its_path(tmp_path, body):
    (tmp_path / "_crashes.json").write_text(body)
    with pytest.raises(MediasieveError, match=r"_crashes.json .*fix or delete it"):
        update_ledger(str(tmp_path), {}, [{"a": 1}], "r")


def test_gate_lets_a_suspect_in_alone():
    gate, stop, order = SuspectGate(), threading.Event(), []
    assert gate.enter(1, False, stop) and gate.enter(2, False, stop)  # ordinary items share it

    def suspect():
        assert gate.enter(3, True, stop)
        order.append("suspect in")
        time.sleep(0.3)
        order.append("suspect out")
        gate.leave(3)

    def ordinary():
        assert gate.enter(4, False, stop)  # arrives while the suspect waits: waits behind it
        order.append("ordinary in")
        gate.leave(4)

    t = threading.Thread(target=suspect)
    t.start()
    time.sleep(0.2)
    u = threading.Thread(target=ordinary)
    u.start()
    time.sleep(0.2)
    assert order == []  # 1 and 2 still hold it
    gate.leave(1)
    gate.leave(2)
    gate.leave(2)  # idempotent (the watchdog may have left for it)
    t.join(5)
    u.join(5)
    assert order == ["suspect in", "suspect out", "ordinary in"]


def test_gate_gives_up_on_stop():
    gate, stop = SuspectGate(), threading.Event()
    assert gate.enter(1, False, stop)
    stop.set()
    assert gate.enter(2, True, stop) is False


def _specs(**noop):
    return [FilterSpec("probe", "probe", True, {}), FilterSpec("sharpness", "sharpness", True, {}),
            FilterSpec("noop", "noop", True, noop)]


def test_rehearsal_of_a_real_clip_finishes(media_dir):
    seen = rehearse("x", f"{media_dir}/motion.mp4", 1, _specs(), VideoConfig(), ["pyav"], 60)
    assert seen.crashed is None and not seen.timed_out


def test_rehearsal_reports_the_signal_that_killed_the_child(media_dir):
    seen = rehearse("x", f"{media_dir}/motion.mp4", 1, _specs(crash_ids=["x"]), VideoConfig(), ["pyav"], 60)
    assert seen.crashed == "SIGSEGV" and "Segmentation fault" in seen.detail  # faulthandler's last words


def test_rehearsal_of_a_hanging_item_is_cut_off(media_dir):
    seen = rehearse("x", f"{media_dir}/motion.mp4", 1, _specs(hang_ids=["x"], hang_s=60), VideoConfig(), ["pyav"], 8)
    assert seen.timed_out and seen.crashed is None and seen.seconds < 30


def test_a_rehearsal_gets_more_time_for_longer_media(media_dir):
    """The child reports the probed duration first; the limit grows by ``per_hour_s`` per hour of it, as the job's
    item limit does (a film in flight at a crash is not timed out at a clip's limit in its rehearsal)."""
    from pipeline.crashes import Rehearser

    r = Rehearser(_specs(hang_ids=["x"], hang_s=2.5), VideoConfig(), ["pyav"])
    clip = f"{media_dir}/motion.mp4"
    try:
        assert r.rehearse("warm", clip, 1, 60).crashed is None  # the child started: its imports take no limit below
        longer = r.rehearse("x", clip, 1, 1.0, per_hour_s=14400)  # 1 s + 4 s per second of media
        assert not longer.timed_out and longer.crashed is None and longer.seconds > 2.5
        assert longer.limit_s == pytest.approx(5.0, abs=0.1)
        same = r.rehearse("x", clip, 1, 1.0)
        assert same.timed_out and same.limit_s == 1.0 and same.seconds < 2.5
    finally:
        r.close()


def test_rehearsal_of_a_broken_file_is_the_job_processes_to_report(media_dir):
    # an ordinary decode error is not a crash: the item then runs in the job, which writes its DecodeError row
    seen = rehearse("x", f"{media_dir}/broken/random.mp4", 1, _specs(), VideoConfig(), ["pyav"], 60)
    assert seen.crashed is None and not seen.timed_out and "DecodeError" in seen.detail


def test_max_item_crashes_must_be_positive(tmp_path):
    raw = base_config(str(tmp_path / "m.parquet"), str(tmp_path), str(tmp_path / "o"), str(tmp_path / "c"),
                      resume={"max_item_crashes": 0})
    with pytest.raises(ConfigError, match="max_item_crashes"):
        validate_config(build_config(raw))


def test_one_child_serves_suspect_after_suspect_and_a_fresh_one_follows_a_death(media_dir):
    from pipeline.crashes import Rehearser
    from pipeline.errors import ShutdownError

    r = Rehearser(_specs(crash_ids=["bad"]), VideoConfig(), ["pyav"])
    clip = f"{media_dir}/motion.mp4"
    first = r.rehearse("a", clip, 1, 60)
    second = r.rehearse("b", clip, 1, 60)
    assert first.crashed is None and second.crashed is None and r.started == 1
    broken = r.rehearse("c", f"{media_dir}/broken/empty.mp4", 1, 60)
    assert broken.crashed is None and "DecodeError" in broken.detail and r.started == 1  # an error is no death
    dead = r.rehearse("bad", clip, 1, 60)
    assert dead.crashed == "SIGSEGV" and "_segfault" in dead.detail
    after = r.rehearse("d", clip, 1, 60)
    assert after.crashed is None and r.started == 2
    print(f"\nrehearsal: first {first.seconds:.2f}s (a child starts), next {second.seconds:.2f}s")
    r.close()
    with pytest.raises(ShutdownError):
        r.rehearse("e", clip, 1, 60)


def test_a_death_after_a_stop_was_asked_for_names_no_suspect(tmp_path):
    # Slurm and torchrun send SIGTERM, then SIGKILL after their grace: what was still in flight then did nothing
    cache, key = str(tmp_path), job_key("/out")
    j = InflightJournal(cache, key, "h")
    j.start("slow")
    j.stopping()
    text = open(j.path).read()
    j.close()
    _left_behind(cache, key, "h", text)
    assert collect_suspects(cache, key, "h")[0] == {}


def test_a_rehearsal_child_ignores_the_stop_its_process_group_gets(media_dir):
    # torchrun and Slurm signal the whole process group: a child that died of that SIGTERM gave an innocent item a
    # CrashError row (seen in the kill soak); now the child lives on, and ends when its parent lets it go
    import signal

    from pipeline.crashes import Rehearser

    r = Rehearser(_specs(), VideoConfig(), ["pyav"])
    assert r.rehearse("a", f"{media_dir}/motion.mp4", 1, 60).crashed is None
    r._proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert r._proc.poll() is None
    seen = r.rehearse("b", f"{media_dir}/motion.mp4", 1, 60)
    assert seen.crashed is None and r.started == 1
    r._proc.send_signal(signal.SIGKILL)  # whatever else ends it is not the item's doing unless it is a crash signal
    r._proc.wait()
    r.close()


def test_a_child_that_cannot_start_accuses_no_item(media_dir, monkeypatch):
    from pipeline.crashes import Rehearser

    r = Rehearser(_specs(), VideoConfig(), ["pyav"])
    monkeypatch.setattr(sys, "executable", "/bin/false")  # the child exits 1 at once
    r._setup = b"x" * (1 << 20)  # more than a pipe holds: writing it fails for certain (it did only now and then)
    seen = r.rehearse("a", f"{media_dir}/motion.mp4", 1, 60)
    assert seen.crashed is None and not seen.timed_out and "inconclusive" in seen.detail
