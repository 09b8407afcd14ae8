#!/usr/bin/env python
"""What many small part files cost the readers, and what compaction buys back, measured in one run.

A real job (the ``noop`` filter, no media) writes ``--items`` rows as parts of ``--rows-per-file`` rows, to a local
directory and to a local S3 server (moto, through s3fs). Side by side, before and after ``pipeline.compaction``:
part files, the resume scan (``read_committed``, what every rank of a rerun does), a full pyarrow read, and on the
local copy a DuckDB and a Polars count; then the compaction's own time.

Usage: python tests/benchmarks/bench_compaction.py [--items 20000] [--rows-per-file 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import fsspec  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.dataset as ds  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def _readers(out: str, options: dict, local: bool) -> dict[str, float]:
    from pipeline.resume import part_files, read_committed

    fs, root = fsspec.core.url_to_fs(out, **options)
    fs.invalidate_cache()
    files = part_files(fs, root)
    row = {"parts": len(files)}
    row["resume scan s"], state = _timed(lambda: read_committed(out, options, "video_id"))
    row["pyarrow read s"], _ = _timed(lambda: ds.dataset(part_files(fs, root), format="parquet",
                                                         filesystem=fs).to_table())
    if local:
        import duckdb
        import polars as pl

        query = f"SELECT count(*) FROM read_parquet('{root}/parts/*.parquet') WHERE result_info.succeed"
        row["duckdb count s"], _ = _timed(lambda: duckdb.connect().execute(query).fetchall())
        row["polars count s"], _ = _timed(lambda: pl.scan_parquet(f"{root}/parts/*.parquet").select(pl.len()).collect())
    assert len(state.succeeded) > 0
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--rows-per-file", type=int, default=10)
    parser.add_argument("--target-mb", type=float, default=64.0)
    args = parser.parse_args()
    from pipeline.compaction import compact
    from pipeline.config import build_config, validate_config
    from pipeline.distributed import DistContext
    from pipeline.runner import run_rank
    from tests.s3server import MotoS3

    work = tempfile.mkdtemp(prefix="ms-compact-")
    server = MotoS3()
    try:
        import s3fs

        s3 = s3fs.S3FileSystem(**server.options(), skip_instance_cache=True)
        s3.mkdir("bench")
        rows = pa.table({"video_id": [f"clip-{i:08d}" for i in range(args.items)],
                         "video_path": [f"v/{i}.mp4" for i in range(args.items)]})
        pq.write_table(rows, os.path.join(work, "m.parquet"))
        results = []
        for where, out, options in (("local", os.path.join(work, "out"), {}),
                                    ("s3 (moto)", "s3://bench/out", server.options())):
            raw = {"input": {"manifest": os.path.join(work, "m.parquet")},
                   "storage": {"cache_dir": os.path.join(work, "cache"), "fetch": False},
                   "runtime": {"producers": 2, "consumers": 2, "unit_size": 64, "progress": False},
                   "output": {"dir": out, "storage_options": options, "rows_per_file": args.rows_per_file},
                   "filters": {"noop": {}}}
            cfg = build_config(raw)
            validate_config(cfg)
            job_s, _ = _timed(lambda: run_rank(cfg, DistContext()))
            before = _readers(out, options, where == "local")
            compact_s, report = _timed(lambda: compact(out, options, int(args.target_mb * (1 << 20)),
                                                       scratch_dir=work))
            after = _readers(out, options, where == "local")
            results.append((where, job_s, before, after, compact_s, report))
        print(f"\n{args.items} rows written as parts of {args.rows_per_file} rows; compaction target "
              f"{args.target_mb:g} MB\n")
        print("| output | measure | before | after | speed-up |\n| --- | --- | --- | --- | --- |")
        for where, job_s, before, after, compact_s, report in results:
            for key in before:
                b, a = before[key], after[key]
                if key == "parts":
                    print(f"| {where} | part files | {b} | {a} | |")
                else:
                    print(f"| {where} | {key} | {b:.3f} | {a:.3f} | {b / a:.1f}x |")
            print(f"| {where} | compaction s | | {compact_s:.2f} | ({report.merged} parts, "
                  f"{report.bytes_written / 1e6:.1f} MB written) |")
        return 0
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
