"""Elastic restarts and two torchrun "nodes" on one machine (c10d rendezvous on loopback)."""

from __future__ import annotations

import json
import os
import re
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
    # torchrun by hand, its rendezvous store shared (torch's default): said on rank 0, a hang waiting at a restart
    assert "torchrun shares its rendezvous store with the workers on 2 nodes" in "".join(err for _o, err in outs)
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


def _two_nodes(tmp_path, job, extra, cwd=(None, None)):
    """Launch two one-rank torchrun "nodes" of one job, each with its own node cache, overrides and directory."""
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
               "--rdzv_id", f"nodes-{port}", os.path.join(ROOT, "jobs", "run.py"), "--config", str(job),
               f"storage.cache_dir={tmp_path / f'node{node}-cache'}", *extra[node]]
        procs.append(subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=cwd[node]))
    outs = [p.communicate(timeout=300) for p in procs]
    return [(p.returncode, err) for p, (_o, err) in zip(procs, outs)]


def test_nodes_must_be_given_the_same_job_and_read_the_same_manifest(tmp_path, media_dir):
    import random

    import pyarrow as pa
    import pyarrow.dataset as ds

    rows = make_corpus(str(tmp_path / "c"), media_dir, 12)
    for i, row in enumerate(rows):
        row["lang"] = ["en", "de"][i % 2]
    out = tmp_path / "out"
    raw = base_config("m.parquet", str(tmp_path / "c"), str(out), str(tmp_path / "cache"))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))

    def nothing_done():
        assert not (out / "parts").exists() or not os.listdir(out / "parts")
        for node in (0, 1):  # and no spill is left in either node's cache
            spills = tmp_path / f"node{node}-cache" / "_manifest"
            assert not spills.exists() or not os.listdir(spills)

    # 1. a node launched with another override (or another copy of the config): it would write another job's rows
    (tmp_path / "n0").mkdir()
    (tmp_path / "n1").mkdir()
    write_manifest(str(tmp_path / "n0" / "m.parquet"), rows)
    results = _two_nodes(tmp_path, tmp_path / "job.yaml", [[], ["video.decode_max_side=256"]],
                         cwd=(tmp_path / "n0", tmp_path / "n0"))
    for code, err in results:
        assert code == 1 and "exitcode  : 2" in err, err[-3000:]  # torchrun says 1; its rank's exit code is 2
        assert "the ranks were not given the same job (video.decode_max_side: " in err
        assert "on rank 0; 256 on rank 1" in err
    nothing_done()

    # 2. a node that cannot reach the manifest (its image lacks a mount or a credential): every rank stops with that
    # node's error and exit code 2; rank 0's log said only "Connection closed by peer" (exit code 1) before
    results = _two_nodes(tmp_path, tmp_path / "job.yaml", [[], []], cwd=(tmp_path / "n0", tmp_path / "n1"))
    for code, err in results:
        assert code == 1 and "exitcode  : 2" in err, err[-3000:]
        assert re.search(r"ConfigError: input.manifest m.parquet does not exist \(on rank 1 on \S+\)", err), err[-3000:]
    nothing_done()

    # 3. the same config, but the nodes see different files at the manifest's URL (here a relative path read from
    # each node's own directory: another mount, a manifest rewritten while the job started): node 1 reads the same
    # items in another order, so the positions that rank 0 shares would name other items there
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)
    write_manifest(str(tmp_path / "n1" / "m.parquet"), shuffled)
    results = _two_nodes(tmp_path, tmp_path / "job.yaml", [[], []], cwd=(tmp_path / "n0", tmp_path / "n1"))
    for code, err in results:
        assert code == 1 and "exitcode  : 2" in err, err[-3000:]
        assert "the nodes read different manifests: node 0" in err and "as many, with other ids or paths" in err
    nothing_done()

    # 4. a node whose image put other weights at the model's local path (here a relative path read from each node's
    # directory): its rank's check against rank 0's digest failed, and rank 0 said only "Connection closed by peer"
    # (exit code 1); now every rank stops with that node's error and exit code 2, before any item
    from tests.video.tiny_models import tiny_videomae

    tiny_videomae(str(tmp_path / "n0" / "clf"), image_size=32)
    tiny_videomae(str(tmp_path / "n1" / "clf"), image_size=32, seed=1)
    classifier = [f"input.manifest={tmp_path / 'n0' / 'm.parquet'}", "filters.clf.type=clip_classifier",
                  "filters.clf.model_uri=clf"]
    results = _two_nodes(tmp_path, tmp_path / "job.yaml", [classifier] * 2, cwd=(tmp_path / "n0", tmp_path / "n1"))
    for code, err in results:
        assert code == 1 and "exitcode  : 2" in err, err[-3000:]
        assert re.search(r"ConfigError: the weights at clf on \S+ \(sha256:\w+\.\.\.\) are not those rank 0 recorded "
                         r".*\(on rank 1 on \S+\)", err), err[-3000:]
    nothing_done()

    # 5. the same job over a directory that Spark's partitionBy would write (lang=en/part-*.parquet, no lang column
    # in the files, a _SUCCESS beside them), read by both nodes alike
    dataset = tmp_path / "manifest"
    ds.write_dataset(pa.Table.from_pylist(rows), dataset, format="parquet", max_rows_per_file=3,
                     max_rows_per_group=3, partitioning=ds.partitioning(pa.schema([("lang", pa.string())]),
                                                                        flavor="hive"))
    (dataset / "_SUCCESS").write_text("")
    results = _two_nodes(tmp_path, tmp_path / "job.yaml", [[f"input.manifest={dataset}"]] * 2)
    for code, err in results:
        assert code == 0, err[-3000:]
    table = pq.read_table(str(out / "parts"))
    ok = table.filter(pc.struct_field(table["result_info"], "succeed"))
    assert sorted(zip(ok["video_id"].to_pylist(), ok["lang"].to_pylist())) == \
        sorted((r["video_id"], r["lang"]) for r in rows)
    assert set(pc.struct_field(ok["result_info"], "rank").to_pylist()) == {0, 1}
