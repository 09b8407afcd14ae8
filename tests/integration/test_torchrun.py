"""The job under a real ``torchrun --nproc_per_node=2`` (gloo on CPU): one row per item, crash and resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import ROOT, base_config, make_corpus, probe_type_of_previous_version, write_manifest


def _torchrun(config: str, *overrides: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            os.path.join(ROOT, "jobs", "run.py"), "--config", config, *overrides]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return env


def _setup(tmp_path, media_dir, n, **sections):
    rows = make_corpus(str(tmp_path / "corpus"), media_dir, n, kinds=("motion.mp4", "still.mp4", "speech.wav"))
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    raw = base_config(manifest, str(tmp_path / "corpus"), str(tmp_path / "out"), str(tmp_path / "cache"), **sections)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return rows, str(path)


def _table(tmp_path):
    return pq.read_table(str(tmp_path / "out" / "parts"))


def test_two_ranks_every_item_exactly_one_row(tmp_path, media_dir):
    rows, config = _setup(tmp_path, media_dir, 30)
    proc = subprocess.run(_torchrun(config), env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = _table(tmp_path)
    ids = table["video_id"].to_pylist()
    assert sorted(ids) == sorted(r["video_id"] for r in rows)  # exactly one row each
    assert all(pc.struct_field(table["result_info"], "succeed").to_pylist())
    ranks = set(pc.struct_field(table["result_info"], "rank").to_pylist())
    assert ranks == {0, 1}  # both ranks pulled work units
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert summary["world_size"] == 2 and summary["total"]["succeeded"] == 30
    assert "30 succeeded" in proc.stdout  # the printed summary
    assert len(os.listdir(tmp_path / "out" / "_logs")) == 2  # a metrics log per rank


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    out.append(int(entry))
            except (OSError, IndexError):
                pass
    return out


def test_sigkill_one_rank_then_resume_loses_and_redoes_nothing_committed(tmp_path, media_dir):
    n = 40
    rows, config = _setup(tmp_path, media_dir, n, filters={"probe": {}, "noop": {"sleep_s": 0.15}},
                          output={"dir": str(tmp_path / "out"), "rows_per_file": 3, "flush_interval_s": 1})
    proc = subprocess.Popen(_torchrun(config), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parts = tmp_path / "out" / "parts"
    deadline = time.time() + 120
    while time.time() < deadline and (not parts.exists() or len(os.listdir(parts)) < 4):
        time.sleep(0.1)
    assert parts.exists() and len(os.listdir(parts)) >= 4, "no commits before the kill"
    workers = _children(proc.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    first = _table(tmp_path)
    first_ok = set(first.filter(pc.struct_field(first["result_info"], "succeed"))["video_id"].to_pylist())
    assert 0 < len(first_ok) < n, "the kill should land mid-run"
    assert not (tmp_path / "out" / "_SUCCESS").exists()

    proc2 = subprocess.run(_torchrun(config), env=_env(), capture_output=True, text=True, timeout=300)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    table = _table(tmp_path)
    ok = table.filter(pc.struct_field(table["result_info"], "succeed"))
    ids = ok["video_id"].to_pylist()
    assert sorted(ids) == sorted(r["video_id"] for r in rows)  # every item exactly one success row
    run_ids = pc.struct_field(ok["result_info"], "run_id").to_pylist()
    second_run = {i for i, r in zip(ids, run_ids) if r != pc.struct_field(first["result_info"], "run_id")[0].as_py()}
    assert second_run == {r["video_id"] for r in rows} - first_ok  # committed work was not redone
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert summary["this_run"]["skipped_already_done"] == len(first_ok)
    assert summary["this_run"]["items"] == n - len(first_ok)


def test_sigterm_stops_cleanly_keeps_finished_rows_and_resumes(tmp_path, media_dir):
    n = 60
    rows, config = _setup(tmp_path, media_dir, n, filters={"noop": {"sleep_s": 0.3}},
                          runtime={"metrics_interval_s": 0.2},
                          output={"dir": str(tmp_path / "out"), "rows_per_file": 1000, "flush_interval_s": 600})
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "jobs", "run.py"), "--config", config], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs = tmp_path / "out" / "_logs"
    deadline = time.time() + 60
    done = 0
    while done < 4 and time.time() < deadline:  # some items done, none committed (rows_per_file, flush interval)
        time.sleep(0.1)
        for name in os.listdir(logs) if logs.exists() else []:
            lines = (logs / name).read_text().splitlines()
            done = json.loads(lines[-1])["done"] if lines else 0
    assert not (tmp_path / "out" / "parts").exists() or not os.listdir(tmp_path / "out" / "parts")
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert "rerun the same command to resume" in err
    assert not (tmp_path / "out" / "_lease.json").exists()  # the lease was released
    done = _table(tmp_path).num_rows
    assert 0 < done < n  # the rows finished before the stop were committed on the way out
    proc2 = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "run.py"), "--config", config,
                            "filters.noop.sleep_s=0.0"], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc2.returncode == 2 and "different job" in proc2.stderr  # a changed filter is another job
    proc3 = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "run.py"), "--config", config], env=_env(),
                           capture_output=True, text=True, timeout=120)
    assert proc3.returncode == 0, proc3.stderr[-2000:]
    ids = _table(tmp_path)["video_id"].to_pylist()
    assert sorted(ids) == sorted(r["video_id"] for r in rows)


def test_cli_refuses_an_output_in_use(tmp_path, media_dir):
    rows, config = _setup(tmp_path, media_dir, 20, filters={"noop": {"sleep_s": 0.5}})
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "jobs", "run.py"), "--config", config], env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "out" / "_lease.json").exists() and time.time() < deadline:
            time.sleep(0.1)
        second = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "run.py"), "--config", config],
                                env=_env(), capture_output=True, text=True, timeout=120)
        assert second.returncode == 3
        assert "in use by live run" in second.stderr
    finally:
        first.kill()
        first.wait()


def test_two_ranks_agree_to_stop_or_conform_on_a_schema_change(tmp_path, media_dir, monkeypatch):
    """Parts written by the previous version (its probe had fewer stream fields), resumed on two ranks."""
    from pipeline.config import build_config
    from pipeline.distributed import DistContext
    from pipeline.filters.probe import ProbeFilter
    from pipeline.runner import run_rank

    rows, config = _setup(tmp_path, media_dir, 6)
    older = probe_type_of_previous_version()
    monkeypatch.setattr(ProbeFilter, "output_type", older)
    os.rename(tmp_path / "corpus" / "item_0005.wav", tmp_path / "held.wav")  # fails now, retried by the rerun
    run_rank(build_config(yaml.safe_load(open(config))), DistContext())
    os.rename(tmp_path / "held.wav", tmp_path / "corpus" / "item_0005.wav")
    parts = sorted(os.listdir(tmp_path / "out" / "parts"))

    proc = subprocess.run(_torchrun(config), env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]  # torchrun says 1 when its ranks fail
    assert "added: probe.video.rotation (int32)" in proc.stderr and "on_schema_change=conform" in proc.stderr
    # each rank stops with the config error; under load torchrun may end the slower rank with SIGTERM first
    codes = set(re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr))
    assert "2" in codes and codes <= {"2", "-15", "143"}, proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "out" / "parts")) == parts and not (tmp_path / "out" / "_lease.json").exists()

    proc = subprocess.run(_torchrun(config, "resume.on_schema_change=conform"), env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.load(open(tmp_path / "out" / "summary.json"))["total"]["succeeded"] == 6
    for part in os.listdir(tmp_path / "out" / "parts"):
        assert pq.read_schema(tmp_path / "out" / "parts" / part).field("probe").type.equals(older)


def test_a_listing_is_made_once_by_rank_0_for_every_rank(tmp_path, media_dir, s3, bucket):
    """``input.listing_glob`` over an object store under 2 ranks: one listing (counted at a proxy in front of the S3
    server), snapshotted into the output, which every rank reads; every listed object gets exactly one row."""
    import s3fs

    from tests.s3server import FaultProxy

    name, fs = bucket
    rows = make_corpus(str(tmp_path / "all"), media_dir, 12)
    for r in rows:
        fs.put(str(tmp_path / "all" / r["video_path"]), f"{name}/v/{r['video_path']}")
    proxy = FaultProxy(s3.port)
    try:
        opts = s3.options(endpoint=proxy.endpoint)
        lists = [p for m, p in proxy.seen if m == "GET" and "list-type=2" in p]
        s3fs.S3FileSystem(**opts, skip_instance_cache=True).glob(f"{name}/v/**/*.mp4")  # one listing, as a rank does
        one_listing = len([p for m, p in proxy.seen if m == "GET" and "list-type=2" in p]) - len(lists)
        raw = base_config("unused", "unused", str(tmp_path / "out"), str(tmp_path / "cache"),
                          input={"manifest": None, "listing_glob": f"s3://{name}/v/**/*.mp4", "storage_options": opts},
                          storage={"cache_dir": str(tmp_path / "cache"), "tiers": []})
        config = tmp_path / "job.yaml"
        config.write_text(yaml.safe_dump(raw))
        before = len(proxy.seen)
        proc = subprocess.run(_torchrun(str(config)), env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        job_lists = [p for m, p in proxy.seen[before:] if m == "GET" and "list-type=2" in p and "prefix=v" in p]
    finally:
        proxy.stop()
    assert 1 <= one_listing and len(job_lists) == one_listing  # rank 1 did not list: it read rank 0's snapshot
    table = _table(tmp_path)
    assert sorted(table["video_id"].to_pylist()) == sorted(r["video_path"] for r in rows)  # ids relative to v/
    assert set(pc.struct_field(table["result_info"], "rank").to_pylist()) == {0, 1}
    (snapshot,) = os.listdir(tmp_path / "out" / "_listing")
    assert pq.read_table(str(tmp_path / "out" / "_listing" / snapshot)).num_rows == 12


def test_two_ranks_compact_their_output_at_the_end(tmp_path, media_dir):
    """``output.compact_mb`` under 2 ranks: rank 0 merges both ranks' parts after every rank committed, the other
    waits at the barrier, and the summary and ``_SUCCESS`` come after; a rerun resumes from the merged parts."""
    rows, config = _setup(tmp_path, media_dir, 12, output={"dir": str(tmp_path / "out"), "rows_per_file": 1,
                                                            "compact_mb": 1, "lease_timeout_s": 30})
    proc = subprocess.run(_torchrun(config), env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = os.listdir(tmp_path / "out" / "parts")
    assert len(parts) == 1 and "-c" in parts[0]  # twelve one-row parts of two ranks, merged into one
    table = _table(tmp_path)
    assert sorted(table["video_id"].to_pylist()) == sorted(r["video_id"] for r in rows)
    assert set(pc.struct_field(table["result_info"], "rank").to_pylist()) == {0, 1}
    assert json.load(open(tmp_path / "out" / "summary.json"))["total"]["succeeded"] == 12
    again = subprocess.run(_torchrun(config), env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "12 already done" in again.stdout, again.stderr[-3000:]


@pytest.mark.parametrize("share", ["0", "1"], ids=["agent store", "rank 0's store"])
def test_every_rank_stops_when_another_run_takes_the_output_over(tmp_path, media_dir, share):
    """Rank 0 holds the lease; when another run takes it over, rank 0 raises a flag in torchrun's store and both
    ranks stop, committing nothing more. Also where the store is rank 0's own (torchrun not sharing its rendezvous
    store, as the launchers run it): before, rank 0 exited with it before rank 1 had read the flag, and rank 1 could
    only say that it could not read it."""
    rows, config = _setup(tmp_path, media_dir, 40, filters={"noop": {"sleep_s": 0.3}},
                          runtime={"consumers": 1, "producers": 1, "progress": False},
                          output={"dir": str(tmp_path / "out"), "rows_per_file": 2, "lease_timeout_s": 4})
    env = dict(_env(), TORCH_DISABLE_SHARE_RDZV_TCP_STORE=share)
    proc = subprocess.Popen(_torchrun(config), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parts = tmp_path / "out" / "parts"
    deadline = time.time() + 120
    while not (parts.is_dir() and len(list(parts.iterdir())) >= 2) and time.time() < deadline:
        time.sleep(0.05)
    other = {"run_id": "20261202T000000-0th3r000", "host": "elsewhere", "pid": 1, "pid_start": 1,
             "heartbeat": time.time()}
    (tmp_path / "out" / "_lease.json").write_text(json.dumps(other))
    taken_at = time.time()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert len(re.findall(r"\[rank [01]\].*took over the output directory", err)) >= 2, err[-3000:]
    ranks = {int(m) for m in re.findall(r"\[rank ([01])\].*took over the output directory", err)}
    assert ranks == {0, 1}  # both ranks stopped for it, not only the one holding the lease
    late = [p.name for p in parts.iterdir() if p.stat().st_mtime > taken_at + 3.5]  # heartbeat + poll + loop
    assert late == [] and len(_table(tmp_path)) < 40
    assert json.loads((tmp_path / "out" / "_lease.json").read_text())["run_id"] == other["run_id"]


def test_only_rank_0_reads_the_committed_parts_at_a_restart(tmp_path, media_dir, s3, bucket):
    """A rerun under 2 ranks with its output in an object store (behind a proxy that counts requests): the committed
    parts are read at the start by rank 0 alone (plus once for the summary at the end), and rank 1 reads the
    positions rank 0 shared; both ranks still share the pending work."""
    from pipeline.resume import read_committed
    from tests.s3server import FaultProxy

    name, fs = bucket
    proxy = FaultProxy(s3.port)
    try:
        opts = s3.options(endpoint=proxy.endpoint)
        out = f"s3://{name}/out"
        rows, config = _setup(tmp_path, media_dir, 16, output={"dir": out, "storage_options": opts,
                                                                "rows_per_file": 2, "lease_timeout_s": 30})
        raw = yaml.safe_load(open(config))
        raw["input"]["limit"] = 8  # the first run does half the corpus
        first = tmp_path / "first.yaml"
        first.write_text(yaml.safe_dump(raw))
        proc = subprocess.run(_torchrun(str(first)), env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

        def start_reads(since: int) -> int:
            """GETs of committed parts before the run commits its first part: the resume scan(s) at the start."""
            seen = proxy.seen[since:]
            first_put = next((i for i, (m, p) in enumerate(seen) if m == "PUT" and "/out/parts/part-" in p), len(seen))
            return sum(1 for m, p in seen[:first_put] if m == "GET" and "/out/parts/part-" in p)

        before = len(proxy.seen)
        read_committed(out, opts, "video_id")
        one_scan = start_reads(before)
        before = len(proxy.seen)
        proc = subprocess.run(_torchrun(config), env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rerun_reads = start_reads(before)
    finally:
        proxy.stop()
    assert one_scan >= 4  # the first run's parts, read once
    # rank 0's scan and its read of the newest part's schema; rank 1 read the positions rank 0 shared
    assert rerun_reads == one_scan + 1, (rerun_reads, one_scan)
    assert "8 already done" in proc.stdout
    table = pq.read_table(f"{name}/out/parts", filesystem=fs)
    assert sorted(table["video_id"].to_pylist()) == sorted(r["video_id"] for r in rows)
    assert fs.ls(f"{name}/out/_resume")  # what rank 0 shared


def test_the_manifest_is_read_once_per_node_and_its_spill_shared(tmp_path, media_dir, s3, bucket):
    """Under 2 ranks on one node, local rank 0 streams the manifest (on the S3 server, its GETs counted at a proxy)
    into the node's spill and rank 1 attaches to it: the job reads the manifest as often as one read does, not once
    per rank; every item gets exactly one row, and no spill is left behind."""
    from pipeline.config import InputConfig
    from pipeline.manifest import open_manifest
    from tests.s3server import FaultProxy

    name, fs = bucket
    rows = make_corpus(str(tmp_path / "corpus"), media_dir, 12)
    write_manifest(str(tmp_path / "m.parquet"), rows)
    fs.put(str(tmp_path / "m.parquet"), f"{name}/lists/m.parquet")
    proxy = FaultProxy(s3.port)
    try:
        opts = s3.options(endpoint=proxy.endpoint)

        def manifest_gets(since):
            return len([p for m, p in proxy.seen[since:] if m == "GET" and "/lists/m.parquet" in p])

        before = len(proxy.seen)
        open_manifest(InputConfig(manifest=f"s3://{name}/lists/m.parquet", storage_options=opts),
                      str(tmp_path / "one")).close()
        one_read = manifest_gets(before)
        raw = base_config(f"s3://{name}/lists/m.parquet", str(tmp_path / "corpus"), str(tmp_path / "out"),
                          str(tmp_path / "cache"))
        raw["input"]["storage_options"] = opts
        config = tmp_path / "job.yaml"
        config.write_text(yaml.safe_dump(raw))
        before = len(proxy.seen)
        proc = subprocess.run(_torchrun(str(config)), env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        job_reads = manifest_gets(before)
    finally:
        proxy.stop()
    assert one_read >= 1 and job_reads == one_read, (job_reads, one_read)  # per rank, it would be twice
    table = _table(tmp_path)
    assert sorted(table["video_id"].to_pylist()) == sorted(r["video_id"] for r in rows)
    assert set(pc.struct_field(table["result_info"], "rank").to_pylist()) == {0, 1}
    assert os.listdir(tmp_path / "cache" / "_manifest") == []


def test_a_bad_manifest_stops_every_rank_with_its_error(tmp_path, media_dir):
    """Local rank 0 reads the manifest for the node; its error reaches rank 1 (exit code 2 from both, no rank left
    waiting in a collective)."""
    path = tmp_path / "m.jsonl"
    path.write_text('{"video_id": "a", "video_path": "a.mp4"}\n{"video_id": null, "video_path": "b.mp4"}\n')
    raw = base_config(str(path), str(tmp_path), str(tmp_path / "out"), str(tmp_path / "cache"))
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    proc = subprocess.run(_torchrun(str(config)), env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    said = r"\[rank ([01])\] ERROR .*ManifestError: manifest \S+m\.jsonl has a null video_id at its row 1"
    ranks = {int(m) for m in re.findall(said, proc.stderr)}
    assert ranks == {0, 1}, proc.stderr[-3000:]
    assert os.listdir(tmp_path / "cache" / "_manifest") == []


def test_ranks_on_different_software_are_said_at_the_start_and_recorded(tmp_path, media_dir):
    """A node on another image: rank 1 sees an older silero-vad (its metadata first on its path, as a second
    install would be). The job says so before any work, and the summary and _config.json record both sets."""
    import importlib.metadata

    now = importlib.metadata.version("silero-vad")
    rows, config = _setup(tmp_path, media_dir, 4)
    older = tmp_path / "older" / "silero_vad-5.1.2.dist-info"
    older.mkdir(parents=True)
    (older / "METADATA").write_text("Metadata-Version: 2.1\nName: silero-vad\nVersion: 5.1.2\n")
    wrapper = tmp_path / "rank.sh"
    wrapper.write_text(f'#!/bin/sh\nif [ "$LOCAL_RANK" = 1 ]; then export PYTHONPATH="{older.parent}:$PYTHONPATH"; fi\n'
                       f'exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
           str(wrapper), os.path.join(ROOT, "jobs", "run.py"), "--config", config]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = re.search(rf"the ranks do not run the same software \(silero-vad {re.escape(now)} on ranks 0, 5\.1\.2 on "
                     r"ranks 1\)", proc.stderr)
    assert said, proc.stderr[-3000:]
    work = re.search(r"items in manifest, \d+ committed successes", proc.stderr)
    assert work and said.start() < work.start()  # said before any work
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert [(s["versions"]["silero-vad"], s["ranks"]) for s in summary["software"]] == [(now, [0]), ("5.1.2", [1])]
    assert summary["total"]["succeeded"] == 4
    recorded = json.load(open(tmp_path / "out" / "_config.json"))["software_history"]
    assert [sorted(s["silero-vad"] for s in h["software"]) for h in recorded] == [sorted([now, "5.1.2"])]
    before = sorted(os.listdir(tmp_path / "out" / "parts"))
    strict = subprocess.run(cmd + ["runtime.mixed_software=fail"], env=_env(), capture_output=True, text=True,
                            timeout=300)
    assert strict.returncode != 0
    assert re.search(r"\[rank 1\].*ConfigError: the ranks do not run the same software \(silero-vad .* and "
                     r"runtime.mixed_software is fail", strict.stderr), strict.stderr[-3000:]  # every rank says it
    assert sorted(os.listdir(tmp_path / "out" / "parts")) == before


def test_a_node_with_other_weights_at_the_same_path_stops_the_job_before_any_row(tmp_path, media_dir):
    """Each rank runs from its own directory (as each node has its own disk) where `models/yolo.pt` holds other
    weights on rank 1 (an older image): rank 1 stops naming both digests, and no row is written under rank 0's."""
    import hashlib

    from tests.video.tiny_models import tiny_yolo

    for rank, seed in ((0, 0), (1, 1)):
        (tmp_path / f"node{rank}" / "models").mkdir(parents=True)
        tiny_yolo(str(tmp_path / f"node{rank}" / "models" / "yolo.pt"), seed=seed)
    digests = [hashlib.sha256((tmp_path / f"node{r}" / "models" / "yolo.pt").read_bytes()).hexdigest() for r in (0, 1)]
    assert digests[0] != digests[1]
    rows, config = _setup(tmp_path, media_dir, 4, filters={
        "regions": {"type": "yolo_regions", "model_uri": "models/yolo.pt", "imgsz": 160, "step": 10}})
    wrapper = tmp_path / "rank.sh"
    wrapper.write_text(f'#!/bin/sh\ncd "{tmp_path}/node$LOCAL_RANK" && exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
           str(wrapper), os.path.join(ROOT, "jobs", "run.py"), "--config", config]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert re.search(rf"\[rank 1\].*the weights at models/yolo.pt on \S+ \(sha256:{digests[1][:12]}\.\.\.\) are not "
                     rf"those rank 0 recorded for this run \(sha256:{digests[0][:12]}", proc.stderr), proc.stderr[-3000:]
    parts = tmp_path / "out" / "parts"
    assert not parts.exists() or not os.listdir(parts)
