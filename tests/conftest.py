"""Shared fixtures: generated real media, a real S3 server on loopback, job configs."""

from __future__ import annotations

import os
import shutil
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline.media import synthetic  # noqa: E402
from tests.s3server import MotoS3  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests skip cleanly without CUDA (their own skipif says so too)."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)

# A gloo/torchrun run on a 2-core machine must not oversubscribe
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> str:
    """A small corpus of real media: clips, speech, and broken files (generated once per session)."""
    root = str(tmp_path_factory.mktemp("media"))
    synthetic.motion_clip(os.path.join(root, "motion.mp4"), seconds=1.0)
    synthetic.still_clip(os.path.join(root, "still.mp4"), seconds=1.0)
    synthetic.speech_wav(os.path.join(root, "speech.wav"), "Hello from the test corpus.")
    synthetic.broken_files(os.path.join(root, "broken"))
    return root


@pytest.fixture(scope="session")
def s3():
    server = MotoS3()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3):
    """A fresh bucket on the S3 server, with its s3fs filesystem."""
    import uuid

    import s3fs

    name = f"b-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(**s3.options(), skip_instance_cache=True)
    fs.mkdir(name)
    return name, fs


def make_corpus(directory: str, media_dir: str, n: int, kinds=("motion.mp4",)) -> list[dict]:
    """Copy ``n`` real clips into ``directory`` as item_<i>.<ext> and return manifest rows (relative paths)."""
    os.makedirs(directory, exist_ok=True)
    rows = []
    for i in range(n):
        src = kinds[i % len(kinds)]
        ext = os.path.splitext(src)[1]
        name = f"item_{i:04d}{ext}"
        shutil.copy(os.path.join(media_dir, src), os.path.join(directory, name))
        rows.append({"video_id": f"id-{i:04d}", "video_path": name, "batch": i % 3})
    return rows


def write_manifest(path: str, rows: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def base_config(manifest: str, corpus: str, out: str, cache: str, **sections) -> dict:
    """A raw job config over a local tier; keyword sections are merged in."""
    raw = {
        "input": {"manifest": manifest},
        "storage": {"cache_dir": cache, "tiers": [{"name": "shared", "root": corpus}], "backoff_base_s": 0.05,
                    "fetch_silence_s": 30},
        "runtime": {"producers": 2, "consumers": 2, "queue_depth": 4, "unit_size": 2, "progress": False,
                    "stall_timeout_s": 60, "item_timeout_s": 45},
        "output": {"dir": out, "rows_per_file": 5, "flush_interval_s": 5, "lease_timeout_s": 30},
        "filters": {"probe": {}},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict) and key != "filters":
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw

import logging  # noqa: E402

logging.getLogger("werkzeug").setLevel(logging.WARNING)


def probe_type_of_previous_version():
    """The probe's output struct as a previous version wrote it, before the video stream's ``rotation``, ``index``,
    ``sample_aspect_ratio``, ``interlaced`` and colour description and the audio stream's ``index`` (schema-change
    tests)."""
    from pipeline.filters.probe import ProbeFilter

    new_fields = {"video": {"rotation", "index", "sample_aspect_ratio", "interlaced", "color_range", "color_primaries",
                            "color_transfer", "color_space", "hdr"}, "audio": {"index"}}
    current = ProbeFilter.output_type
    return pa.struct([pa.field(f.name, pa.struct([g for g in f.type if g.name not in new_fields[f.name]]))
                      if f.name in new_fields else f for f in current])
