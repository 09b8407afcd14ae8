"""Disks that fill up, on a real filesystem that runs out of space (a 1 MiB tmpfs, so the kernel raises ENOSPC).
A node's cache makes room where it can, and a rank that cannot fetch anything any more stops loudly instead of
writing a failure row for every item left in its share; an output disk that cannot hold a part keeps the rows and
leaves no partial file."""

import os
import subprocess

import pyarrow.parquet as pq
import pytest

from pipeline.config import StorageConfig, TierConfig, build_config, validate_config
from pipeline.distributed import DistContext
from pipeline.errors import CacheFullError
from pipeline.runner import run_rank
from pipeline.storage import TieredFetcher
from tests.conftest import base_config, make_corpus, write_manifest


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _files(root, sizes: dict[str, int]) -> None:
    os.makedirs(root, exist_ok=True)
    for name, size in sizes.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(os.urandom(size))


def test_a_full_disk_is_made_room_on_by_evicting_entries_not_in_use(tmp_path, small_disk):
    _files(str(tmp_path / "t"), {f"f{i}.bin": 300_000 for i in range(4)})
    # a limit the disk cannot hold (the commonest way to get here: the default 180 GB on a small local disk)
    cfg = StorageConfig(cache_dir=small_disk, cache_max_bytes=10**11, tiers=(TierConfig("t", str(tmp_path / "t")),))
    fetcher = TieredFetcher(cfg)
    for i in range(3):
        fetcher.fetch(f"f{i}.bin").release()
    item = fetcher.fetch("f3.bin")  # 900 kB are cached: the fourth does not fit until the cache evicts
    assert item.tier == "t" and item.bytes == 300_000 and fetcher.cache.evictions >= 1
    assert open(item.local_path, "rb").read() == open(tmp_path / "t" / "f3.bin", "rb").read()
    assert os.listdir(os.path.join(small_disk, ".tmp")) == []


def test_a_disk_full_of_items_in_use_stops_the_fetch_with_the_reason(tmp_path, small_disk):
    _files(str(tmp_path / "t"), {f"f{i}.bin": 300_000 for i in range(4)})
    cfg = StorageConfig(cache_dir=small_disk, cache_max_bytes=10**11, tiers=(TierConfig("t", str(tmp_path / "t")),))
    fetcher = TieredFetcher(cfg)
    held = [fetcher.fetch(f"f{i}.bin") for i in range(3)]  # all in use (queued items hold their files)
    with pytest.raises(CacheFullError, match=r"storage.cache_dir=.* is full .*free.*cache_max_bytes"):
        fetcher.fetch("f3.bin")
    assert all(os.path.exists(h.local_path) for h in held)  # nothing in use was removed
    assert os.listdir(os.path.join(small_disk, ".tmp")) == []  # nor a partial file left behind


def test_a_rank_whose_cache_disk_is_full_stops_and_the_rerun_finishes(tmp_path, media_dir, small_disk):
    rows = make_corpus(str(tmp_path / "c"), media_dir, 6)
    _files(str(tmp_path / "c"), {"huge.bin": 2_000_000})  # bigger than the whole disk
    rows.insert(3, {"video_id": "huge", "video_path": "huge.bin", "batch": 0})
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    out = str(tmp_path / "out")
    raw = base_config(manifest, str(tmp_path / "c"), out, small_disk)
    cfg = build_config(raw)
    validate_config(cfg)
    with pytest.raises(CacheFullError):
        run_rank(cfg, DistContext())
    parts = os.path.join(out, "parts")
    first = pq.read_table(parts).to_pylist() if os.path.isdir(parts) and os.listdir(parts) else []
    # what finished before the stop is committed, and nothing was turned into a failure row by the full disk
    assert all(r["result_info"]["succeed"] for r in first)
    assert "huge" not in {r["video_id"] for r in first}

    raw["storage"] = {**raw["storage"], "cache_dir": str(tmp_path / "bigger")}  # the user frees space
    cfg = build_config(raw)
    validate_config(cfg)
    summary = run_rank(cfg, DistContext()).summary
    table = pq.read_table(parts).to_pylist()
    ok = sorted(r["video_id"] for r in table if r["result_info"]["succeed"])
    assert ok == sorted(r["video_id"] for r in rows if r["video_id"] != "huge")  # each clip once
    assert [r["result_info"]["error_type"] for r in table if r["video_id"] == "huge"] == ["DecodeError"]
    assert summary["total"]["succeeded"] == 6


def test_a_part_that_does_not_fit_the_output_disk_leaves_no_partial_file(small_disk):
    import pyarrow as pa

    from pipeline.writer import ResultWriter, result_schema

    schema = result_schema(pa.schema([("video_id", pa.string()), ("video_path", pa.string())]), [])
    w = ResultWriter(small_disk, {}, schema, "run1", 0, rows_per_file=10**6, commit_retries=0)
    for i in range(3000):  # about 2 MB of Parquet: twice the disk
        w.add({"video_id": f"id{i}", "video_path": os.urandom(600).hex(),
               "result_info": {"succeed": True, "rank": 0, "run_id": "run1"}})
    with pytest.raises(OSError, match="No space left"):
        w.flush()
    assert w.buffered == 3000  # the rows are kept for the next commit
    assert os.listdir(os.path.join(small_disk, "_tmp")) == [] and os.listdir(os.path.join(small_disk, "parts")) == []
