#!/usr/bin/env python
"""What a part's page checksums catch and what they cost, measured in one run.

1. Damage: every single-byte flip (bit 0x10) in the pages of one column chunk of a zstd part of ``--flip-rows``
   random probabilities, read by pyarrow without checksums (the last version's parts), by pyarrow verifying them
   (this version's), and by DuckDB and Polars (which do not check): how many flips fail the read, read as other
   values without error, or change nothing.
2. Cost: ``--rows`` result-like rows (ids, paths, a ``result_info`` struct, four classifier structs with scores and
   windows) written as one zstd part with and without checksums: write time, size, pyarrow's read with and without
   verification, DuckDB's read of each.
3. ``jobs/verify.py``'s pace (``verify_parts``) over ``--parts`` such parts on the local disk and on a local S3 server
   (moto, through s3fs), and the resume scan's (``read_committed``), which now verifies the two columns it reads.

Usage: python tests/benchmarks/bench_page_checksums.py [--rows 200000] [--parts 16] [--flip-rows 200]
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


def _best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def flips(rows: int) -> None:
    import duckdb
    import polars as pl

    rng = np.random.default_rng(0)
    table = pa.table({"video_id": [f"v{i:06d}" for i in range(rows)], "prob": rng.random(rows)})
    counts = {}
    for checked in (False, True):
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd", write_page_checksum=checked)
        data = buf.getvalue()
        chunk = pq.ParquetFile(pa.BufferReader(data)).metadata.row_group(0).column(1)
        start = chunk.dictionary_page_offset or chunk.data_page_offset
        tally = {"pyarrow fails": 0, "pyarrow other values": 0, "unchanged": 0, "verified: caught": 0,
                 "verified: other values": 0, "duckdb other values": 0, "polars other values": 0}
        path = os.path.join(tempfile.gettempdir(), f"bench_flip_{os.getpid()}.parquet")
        for at in range(start, start + chunk.total_compressed_size):
            flipped = bytearray(data)
            flipped[at] ^= 0x10
            flipped = bytes(flipped)
            try:
                got = pq.read_table(pa.BufferReader(flipped))
            except (pa.ArrowException, OSError, ValueError):
                tally["pyarrow fails"] += 1
                continue
            if got.equals(table):
                tally["unchanged"] += 1
                continue
            tally["pyarrow other values"] += 1
            try:
                pq.read_table(pa.BufferReader(flipped), page_checksum_verification=True)
                tally["verified: other values"] += 1
            except (pa.ArrowException, OSError, ValueError):
                tally["verified: caught"] += 1
            with open(path, "wb") as f:
                f.write(flipped)
            try:
                if duckdb.connect().execute(f"SELECT prob FROM '{path}'").fetchnumpy()["prob"].tolist() \
                        != table["prob"].to_pylist():
                    tally["duckdb other values"] += 1
            except duckdb.Error:
                pass
            try:
                if pl.read_parquet(path)["prob"].to_list() != table["prob"].to_pylist():
                    tally["polars other values"] += 1
            except Exception:  # noqa: BLE001 - a reader that fails is not counted as reading other values
                pass
        os.remove(path)
        counts["with checksums" if checked else "without (the last version)"] = (chunk.total_compressed_size, tally)
    print(f"\n1. single-byte flips in the pages of a column of {rows} random probabilities (zstd)")
    for name, (size, tally) in counts.items():
        print(f"  {name:28s} {size} bytes flipped one at a time: " + ", ".join(f"{k} {v}" for k, v in tally.items()))


def _result_table(rows: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    now = np.datetime64("2026-12-05T12:00:00", "us")
    labels = np.array(["none", "vfx", "simcam", "rov", "low_quality"])

    def classifier() -> pa.Array:
        probs = rng.dirichlet(np.ones(5), rows).astype(np.float32)
        windows = [[{"start_s": float(w * 4), "end_s": float(w * 4 + 8), "label": str(labels[int(rng.integers(5))]),
                     "prob": float(rng.random())} for w in range(int(rng.integers(0, 6)))] for _ in range(rows)]
        return pa.StructArray.from_arrays(
            [pa.array(labels[probs.argmax(1)]), pa.array(probs.max(1)),
             pa.array(list(probs), pa.list_(pa.float32())), pa.array(windows)],
            ["label", "prob", "scores", "windows"])

    start = now + rng.integers(0, 10**9, rows).astype("timedelta64[us]")
    info = pa.StructArray.from_arrays(
        [pa.array(rng.random(rows) > 0.02), pa.array(np.where(rng.random(rows) > 0.02, None, "DecodeError")),
         pa.array(start), pa.array(start + rng.integers(0, 10**7, rows).astype("timedelta64[us]")),
         pa.array(rng.gamma(2.0, 1.5, rows)), pa.array(rng.integers(0, 10**9, rows)),
         pa.array(rng.integers(0, 400, rows).astype(np.int32)), pa.array(["decord"] * rows),
         pa.array(rng.integers(0, 64, rows).astype(np.int32)), pa.array(["20261205T120000-abcdef01"] * rows)],
        ["succeed", "error_type", "start_time", "end_time", "cost_s", "bytes", "frames_decoded", "decode_backend",
         "rank", "run_id"])
    return pa.table({"video_id": [f"clip-{seed:03d}-{i:08d}" for i in range(rows)],
                     "video_path": [f"corpus/shard-{i % 997:04d}/clip-{i:08d}.mp4" for i in range(rows)],
                     "result_info": info, "vfx": classifier(), "simcam": classifier(), "rov": classifier(),
                     "low_quality": classifier()})


def cost(rows: int) -> None:
    import duckdb

    from pipeline import part_format

    table = _result_table(rows)
    folder = tempfile.mkdtemp(prefix="bench_crc_")
    plain, checked = os.path.join(folder, "plain.parquet"), os.path.join(folder, "checked.parquet")
    write_plain = _best(lambda: pq.write_table(table, plain, compression="zstd"))
    write_checked = _best(lambda: part_format.write_table(table, checked))
    read_plain = _best(lambda: pq.read_table(plain))
    read_checked = _best(lambda: part_format.read_table(checked))
    query = "SELECT count(*), avg(vfx.prob), sum(len(rov.windows)) FROM read_parquet('{}') WHERE result_info.succeed"
    duck_plain = _best(lambda: duckdb.connect().execute(query.format(plain)).fetchall())
    duck_checked = _best(lambda: duckdb.connect().execute(query.format(checked)).fetchall())
    print(f"\n2. one part of {rows} result-like rows (zstd), best of 3")
    print(f"  {'':34s}{'no checksums':>14s}{'checksums':>12s}{'ratio':>8s}")
    for name, a, b in (("write s", write_plain, write_checked), ("pyarrow read s (verified: right)", read_plain,
                                                                 read_checked),
                       ("DuckDB query s", duck_plain, duck_checked)):
        print(f"  {name:34s}{a:14.3f}{b:12.3f}{b / a:8.2f}")
    size_plain, size_checked = os.path.getsize(plain), os.path.getsize(checked)
    print(f"  {'size MB':34s}{size_plain / 1e6:14.2f}{size_checked / 1e6:12.2f}{size_checked / size_plain:8.3f}")


def verify_pace(parts: int, rows: int) -> None:
    import fsspec

    from pipeline import part_format
    from pipeline.quarantine import verify_parts
    from pipeline.resume import read_committed
    from tests.s3server import MotoS3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the S3 server's request lines
    per = max(1, rows // parts)
    tables = [_result_table(per, seed) for seed in range(parts)]
    server = MotoS3()
    try:
        s3 = fsspec.filesystem("s3", **server.options(), skip_instance_cache=True)
        s3.mkdir("bench")
        local_root = tempfile.mkdtemp(prefix="bench_verify_")
        outputs = {"local disk": (fsspec.filesystem("file"), local_root, local_root, {}),
                   "local S3 server": (s3, "bench/out", "s3://bench/out", server.options())}
        print(f"\n3. {parts} parts of {per} rows: verify (every column, every page) and the resume scan (2 columns)")
        print(f"  {'':18s}{'MB':>8s}{'verify s':>10s}{'MB/s':>8s}{'resume scan s':>15s}")
        for name, (fs, root, url, options) in outputs.items():
            if name == "local disk":
                os.makedirs(f"{root}/parts", exist_ok=True)
            files = []
            for seed, table in enumerate(tables):
                buf = io.BytesIO()
                part_format.write_table(table, buf)
                path = f"{root}/parts/part-20261205T120000-abcdef01-r{seed:05d}-000000.parquet"
                fs.pipe_file(path, buf.getvalue())
                files.append(path)
            spent = statistics.median(verify_parts(fs, files).seconds for _ in range(3))
            size = sum(fs.size(p) for p in files) / 1e6
            scan = _best(lambda: read_committed(url, options, "video_id"))
            print(f"  {name:18s}{size:8.1f}{spent:10.2f}{size / spent:8.1f}{scan:15.2f}")
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--parts", type=int, default=16)
    parser.add_argument("--flip-rows", type=int, default=200)
    args = parser.parse_args()
    import pyarrow

    print(f"pyarrow {pyarrow.__version__}, {os.cpu_count()} CPUs")
    flips(args.flip_rows)
    cost(args.rows)
    verify_pace(args.parts, args.rows)


if __name__ == "__main__":
    main()
