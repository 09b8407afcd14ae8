#!/usr/bin/env python
"""Peer comparison: the same corpus and the same default filter set through Ray Data and through our job, on
this machine, in one run: items/s (wall, start-up included), peak memory (all processes of each), and output
equality item by item.

Ray Data: ``read_parquet`` of the manifest, ``map_batches`` with an actor pool (one actor per CPU) holding the
same filters, ``write_parquet``. Ours: ``torchrun --nproc_per_node=2 jobs/run.py``. Ray is a benchmark-only
extra (``pip install 'mediasieve[bench]'``), never a dependency of the job.

Usage: python tests/benchmarks/bench_ray.py [--items 48]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import yaml  # noqa: E402

FILTERS = ["probe", "black_borders", "static", "exposure", "sharpness", "scene_cuts", "speech_cuts"]

RAY_SCRIPT = r'''
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import ray, ray.data

manifest, out = sys.argv[2], sys.argv[3]

class SieveActor:
    def __init__(self, root, names):
        sys.path.insert(0, root)  # the actor runs in a Ray worker process
        from pipeline.config import FilterSpec, VideoConfig
        from pipeline.filters import build_filters, frame_requests_of
        from pipeline.filters.base import FilterContext, SetupContext
        from pipeline.model_pool import ModelPool
        from pipeline.video.decoders import available_backends
        self.filters = build_filters(tuple(FilterSpec(n, n) for n in names))
        self.pool = ModelPool("cpu", instances=1)
        for f in self.filters:
            f.setup(SetupContext("cpu", self.pool, lambda u, o=None: u))
        self.reqs = frame_requests_of(self.filters)
        self.backends = available_backends(("decord", "torchcodec", "pyav"))
        self.ctx = FilterContext("cpu", self.pool)
        self.video_cfg = VideoConfig()

    def __call__(self, batch):
        from pipeline.media.item import MediaItem
        out = {"video_id": [], "result": []}
        for vid, path in zip(batch["video_id"], batch["video_path"]):
            item = MediaItem(str(vid), str(path), os.path.getsize(path), self.reqs, self.video_cfg, self.backends)
            res = {}
            try:
                for f in self.filters:
                    res[f.name] = f.apply(item, self.ctx)
            except Exception as e:
                res = {"error": f"{type(e).__name__}: {e}"}
            out["video_id"].append(str(vid))
            out["result"].append(json.dumps(res, default=float))
        return out

# two actors do the filter work; two more CPU slots for the read and write tasks (else they wait on the actors)
ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
t = time.perf_counter()
ds = ray.data.read_parquet(manifest)
ds = ds.map_batches(SieveActor, fn_constructor_kwargs={"root": sys.argv[1], "names": json.loads(sys.argv[4])},
                    batch_size=4, concurrency=2, num_cpus=1)
ds.write_parquet(out)
print(json.dumps({"wall_s": time.perf_counter() - t}))
'''


def peak_tree_rss(proc: subprocess.Popen, stop: threading.Event, out: list) -> None:
    """Sample the summed RSS of a process and all its descendants (Ray's raylet and workers, or torchrun's ranks)."""
    import psutil

    peak = 0
    root = psutil.Process(proc.pid)
    while not stop.is_set():
        try:
            procs = [root] + root.children(recursive=True)
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, total)
        except psutil.Error:
            break
        time.sleep(0.1)
    out.append(peak)


def run_measured(cmd: list[str], env: dict) -> tuple[float, float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    stop, peak = threading.Event(), []
    sampler = threading.Thread(target=peak_tree_rss, args=(proc, stop, peak), daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    return wall, (peak[0] if peak else 0) / 2**20, subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def close(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(a)))
    return a == b


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=48)
    args = parser.parse_args()
    from pipeline.media import synthetic

    work = tempfile.mkdtemp(prefix="ms-ray-")
    try:
        corpus = os.path.join(work, "corpus")
        os.makedirs(corpus)
        base = [synthetic.motion_clip(os.path.join(work, "motion.mp4"), seconds=3.0),
                synthetic.still_clip(os.path.join(work, "still.mp4"), seconds=3.0, speech="A still image with speech."),
                synthetic.speech_wav(os.path.join(work, "speech.wav"), "Speech for the peer comparison benchmark.")]
        rows = []
        for i in range(args.items):
            src = base[i % len(base)]
            dst = os.path.join(corpus, f"{i:04d}{os.path.splitext(src)[1]}")
            shutil.copy(src, dst)
            rows.append({"video_id": f"id-{i:04d}", "video_path": dst})
        manifest = os.path.join(work, "m.parquet")
        pq.write_table(pa.Table.from_pylist(rows), manifest)
        env = dict(os.environ, OMP_NUM_THREADS="1")

        cfg = {"input": {"manifest": manifest}, "storage": {"cache_dir": os.path.join(work, "cache"),
                                                             "use_cache": False},
               "runtime": {"producers": 2, "consumers": 2, "unit_size": 4, "progress": False},
               "model_pool": {"instances": 1}, "output": {"dir": os.path.join(work, "ours")},
               "filters": {n: {} for n in FILTERS}}
        with open(os.path.join(work, "job.yaml"), "w") as f:
            yaml.safe_dump(cfg, f)
        ours_wall, ours_mem, proc = run_measured(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             os.path.join(ROOT, "jobs", "run.py"), "--config", os.path.join(work, "job.yaml")], env)
        assert proc.returncode == 0, proc.stderr[-3000:]

        script = os.path.join(work, "ray_job.py")
        with open(script, "w") as f:
            f.write(RAY_SCRIPT)
        ray_wall, ray_mem, proc = run_measured([sys.executable, script, ROOT, manifest, os.path.join(work, "ray"),
                                                json.dumps(FILTERS)], env)
        assert proc.returncode == 0, proc.stderr[-3000:]

        ours = {r["video_id"]: {n: r[n] for n in FILTERS}
                for r in pq.read_table(os.path.join(work, "ours", "parts")).to_pylist()}
        for r in ours.values():  # map columns come back as lists of pairs
            if r["speech_cuts"]:
                r["speech_cuts"].pop("separator_runtime", None)
        theirs = {}
        for r in pq.read_table(os.path.join(work, "ray")).to_pylist():
            res = json.loads(r["result"])
            if res.get("speech_cuts"):
                res["speech_cuts"].pop("separator_runtime", None)
            theirs[r["video_id"]] = res
        equal = sum(1 for k in ours if k in theirs and close(json.loads(json.dumps(ours[k], default=float)), theirs[k]))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = args.items
    print(f"\npeer comparison: {n} items (clips with motion, a still image over speech, speech WAVs), default "
          f"filter set {FILTERS}, 2 processes each, {os.cpu_count()} cores")
    print(f"{'system':<34}{'wall s':>8}{'items/s':>9}{'peak RSS MB (all processes)':>30}")
    print(f"{'mediasieve (torchrun, 2 ranks)':<34}{ours_wall:>8.1f}{n / ours_wall:>9.2f}{ours_mem:>30.0f}")
    print(f"{'Ray Data (actor pool of 2)':<34}{ray_wall:>8.1f}{n / ray_wall:>9.2f}{ray_mem:>30.0f}")
    print(f"throughput ratio {ray_wall / ours_wall:.2f}x (target >= 1.5x); outputs equal for {equal} of {n} items")
    return 0


if __name__ == "__main__":
    sys.exit(main())
