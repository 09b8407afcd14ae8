"""Kill soak (slow; run with ``python -m pytest -m slow tests/integration/test_soak.py``): SIGKILL a random rank at
a random moment, rerun, repeat; count lost, duplicated and redone items.

A SIGKILL out of the blue is what the OOM killer does, so with the crash ledger on (the default) the items in
flight become suspects, and one that is running alone when a later kill lands can reach
``resume.max_item_crashes`` and be refused with a ``CrashError`` row, as a poison file would be. With the ledger
off, every item must succeed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import ROOT, base_config, make_corpus, write_manifest
from tests.integration.test_torchrun import _children

ROUNDS = int(os.environ.get("MEDIASIEVE_SOAK_ROUNDS", "20"))


@pytest.mark.slow
@pytest.mark.parametrize("ledger", [False, True], ids=["no-ledger", "ledger"])
def test_kill_soak(tmp_path, media_dir, ledger):
    n = 800
    rows = make_corpus(str(tmp_path / "c"), media_dir, n)
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    raw = base_config(manifest, str(tmp_path / "c"), str(tmp_path / "out"), str(tmp_path / "cache"),
                      output={"dir": str(tmp_path / "out"), "rows_per_file": 3, "flush_interval_s": 1},
                      filters={"noop": {"sleep_s": 0.3}}, resume={} if ledger else {"max_item_crashes": None})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "jobs", "run.py"), "--config", str(tmp_path / "job.yaml")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rng = random.Random(1234)
    kills, finished = 0, False
    committed_before: set[tuple[str, str]] = set()
    redone = 0
    for _round in range(ROUNDS):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 6.0))  # start-up takes ~2 s: some kills land before any work
        workers = _children(proc.pid)
        deadline = time.monotonic() + 30
        while proc.poll() is None and not workers and time.monotonic() < deadline:  # a slow start (a loaded
            time.sleep(0.2)  # machine) had no workers yet: the round went unkilled and ran the job to its end
            workers = _children(proc.pid)
        if proc.poll() is None and workers:
            os.kill(rng.choice(workers), signal.SIGKILL)
            kills += 1
        proc.wait(timeout=120)
        parts = tmp_path / "out" / "parts"
        if parts.exists() and os.listdir(parts):
            t = pq.read_table(str(parts))
            ok = t.filter(pc.struct_field(t["result_info"], "succeed"))
            pairs = set(zip(ok["video_id"].to_pylist(), pc.struct_field(ok["result_info"], "run_id").to_pylist()))
            ids_before = {i for i, _ in committed_before}
            redone += sum(1 for i, r in pairs - committed_before if i in ids_before)
            committed_before = pairs
        if proc.returncode == 0:
            finished = True
            break
    if not finished:  # a last, undisturbed run finishes the job
        assert subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode == 0
    t = pq.read_table(str(tmp_path / "out" / "parts"))
    ok_ids = t.filter(pc.struct_field(t["result_info"], "succeed"))["video_id"].to_pylist()
    refused = {r["video_id"] for r in t.to_pylist()
               if r["video_id"] not in set(ok_ids) and r["result_info"]["error_type"] == "CrashError"}
    lost = n - len(set(ok_ids)) - len(refused)
    duplicated = len(ok_ids) - len(set(ok_ids))
    print(f"\nkill soak ({'ledger' if ledger else 'no ledger'}): {kills} kills over {_round + 1} rounds; lost {lost}, "
          f"duplicated {duplicated}, committed items redone {redone}, refused as crashing {len(refused)}")
    assert kills >= min(ROUNDS, 20) - 1 and lost == 0 and duplicated == 0 and redone == 0
    if ledger:
        crashes = json.load(open(tmp_path / "out" / "_crashes.json"))["items"]
        assert all(crashes[i]["crashes"] >= 2 for i in refused)  # refused only after two deaths, as configured
    else:
        assert not refused
