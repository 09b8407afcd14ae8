"""Elastic restarts and two torchrun "nodes" on one machine (c10d rendezvous on loopback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from tests.conftest import ROOT, base_config, make_corpus, write_manifest
from tests.s3server import free_port


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _ok_ids(out):
    t = pq.read_table(os.path.join(out, "parts"))
    ok = t.filter(pc.struct_field(t["result_info"], "succeed"))
    return ok["video_id"].to_pylist(), pc.struct_field(ok["result_info"], "run_id").to_pylist()


def test_max_restarts_recovers_from_a_dead_worker(tmp_path, media_dir):
    n = 30
    rows = make_corpus(str(tmp_path / "c"), media_dir, n)
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    raw = base_config(manifest, str(tmp_path / "c"), str(tmp_path / "out"), str(tmp_path / "cache"),
                      output={"dir": str(tmp_path / "out"), "rows_per_file": 2, "flush_interval_s": 1},
                      filters={"noop": {"sleep_s": 0.1},
                               "crash": {"type": "crash_once", "marker": str(tmp_path / "crashed"), "after_items": 8}})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "2", os.path.join(ROOT, "jobs", "run.py"), "--config", str(tmp_path / "job.yaml")]
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.run(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, timeout=120)
    assert proc.returncode == 0, (tmp_path / "log.txt").read_text()[-3000:]
    assert (tmp_path / "crashed").exists()  # a worker did die
    ids, runs = _ok_ids(str(tmp_path / "out"))
    assert sorted(ids) == sorted(r["video_id"] for r in rows)  # every item exactly once
    assert len(set(runs)) == 2  # the first attempt's committed rows were kept, the restart did the rest
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert summary["this_run"]["skipped_already_done"] == runs.count(sorted(set(runs))[0])


def test_two_nodes_on_one_machine(tmp_path, media_dir, s3, bucket):
    from tests.video.tiny_models import tiny_videomae

    name, fs = bucket
    model = tiny_videomae(str(tmp_path / "model"))
    fs.put(model, f"{name}/models/cls", recursive=True)
    rows = make_corpus(str(tmp_path / "c"), media_dir, 16)
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    raw = base_config(manifest, str(tmp_path / "c"), str(tmp_path / "out"), str(tmp_path / "cache"),
                      filters={"probe": {}, "cls": {"type": "clip_classifier", "model_uri": f"s3://{name}/models/cls",
                                                    "storage_options": s3.options()}})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
               "--rdzv_id", "two-nodes", os.path.join(ROOT, "jobs", "run.py"), "--config", str(tmp_path / "job.yaml"),
               f"storage.cache_dir={tmp_path / f'node{node}-cache'}"]
        procs.append(subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_o, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    ids, _runs = _ok_ids(str(tmp_path / "out"))
    assert sorted(ids) == sorted(r["video_id"] for r in rows)
    table = pq.read_table(str(tmp_path / "out" / "parts"))
    assert set(pc.struct_field(table["result_info"], "rank").to_pylist()) == {0, 1}
    for node in (0, 1):  # the model was copied once into each node's own cache
        models = tmp_path / f"node{node}-cache" / "models"
        copies = [c for c in os.listdir(models) if not c.endswith((".part", ".source"))]
        assert len(copies) == 1, copies
        assert (models / (copies[0] + ".source")).read_text() == f"s3://{name}/models/cls"  # the URL it came from
    logs = outs[0][1] + outs[1][1]
    assert logs.count("copied to node cache") == 2
