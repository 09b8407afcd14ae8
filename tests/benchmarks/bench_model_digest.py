#!/usr/bin/env python
"""What recording the models' weights in the job identity costs a run's start, measured in one run.

``pipeline.weights.weigh_models`` on rank 0, side by side for each model size: the node's model copy alone
(``localize_model``: what a node's first run did before, the baseline), the first start of an output as it is now
(the copy, then the digest of the copy: a remote model is downloaded once), the digest read from the source instead
(the copy would then be a second download), and a later start with the weights unchanged (a listing only: the
recorded digest stands). On a local file (used in place: no copy) and on a moto S3 server on loopback (the real S3
path through s3fs; a real bucket adds its own bandwidth).

Usage: python tests/benchmarks/bench_model_digest.py [--sizes-mb 6 50 300] [--repeat 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from pipeline.model_pool import localize_model  # noqa: E402
from pipeline.weights import ModelSource, weigh_models  # noqa: E402
from tests.s3server import MotoS3  # noqa: E402


def _median_s(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[6, 50, 300])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    base = tempfile.mkdtemp(prefix="bench-digest-")
    server = MotoS3()
    options = server.options()
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    fs.mkdir("models")
    print(f"{'where':<6} {'model MB':>8} {'node copy s':>12} {'copy+digest s':>14} {'digest from source s':>21} "
          f"{'later start s':>14}")
    try:
        for mb in args.sizes_mb:
            local = os.path.join(base, f"w{mb}.pt")
            with open(local, "wb") as f:
                f.write(os.urandom(mb << 20))
            url = f"s3://models/w{mb}.pt"
            fs.put_file(local, url)
            for where, source in (("local", ModelSource(local)), ("s3", ModelSource(url, options))):
                def fresh(fn):
                    def run():
                        cache = tempfile.mkdtemp(dir=base)
                        try:
                            fn(cache)
                        finally:
                            shutil.rmtree(cache)
                    return run

                copy = _median_s(fresh(lambda c: localize_model(source.uri, c, 0, lambda: None,
                                                                source.storage_options)), args.repeat)
                both = _median_s(fresh(lambda c: weigh_models({"m": source}, {}, c)), args.repeat)
                apart = _median_s(lambda: weigh_models({"m": source}, {}), args.repeat)
                _, known = weigh_models({"m": source}, {})
                later = _median_s(lambda: weigh_models({"m": source}, known, base), args.repeat)
                print(f"{where:<6} {mb:>8} {copy:>12.3f} {both:>14.3f} {apart:>21.3f} {later:>14.4f}", flush=True)
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
