"""Damaged media, fuzzed: real files of many containers and codecs, each copy damaged at random (cut short, a stretch
zeroed or overwritten, bits flipped, bytes lost or repeated, the header hit), through the whole job with the demo's
filters. Each item must get one row, typed; a success row must say only what can be true of its file.

The default run takes a small fixed sample; the soak (slow) takes ``MEDIASIEVE_FUZZ_ITEMS`` (default 600) with
``MEDIASIEVE_FUZZ_SEED`` and also prints, for each failure row, how much of the file the ffmpeg CLI decodes (a
failure the CLI decodes most of is worth a look; not asserted, as the CLI shows concealed garbage as frames):

    python -m pytest -m slow tests/integration/test_damaged_media.py -s

Found by it (and by setting header fields to extreme values), and mended: tags that are not UTF-8 (PyAV refused to
open the file in every decode but the probe's), a stream an FLV adds part way (PyAV's IndexError: the item failed as
a bug in a filter), a file whose first packets do not decode (the probe failed; the ffmpeg CLI decodes the rest),
MPEG-PS sound 2 s early after a stretch, and an MKV stating 10^9 s, for which decord threw std::bad_alloc and
aborted the job (the last test here).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.media import synthetic
from tests.conftest import ROOT, base_config, write_manifest

V = ("-f", "lavfi", "-i", "testsrc2=size=192x144:rate=25:duration=4")
SPEECH = "source.wav"  # the bases' sound: real speech (espeak-ng), 16 kHz
H264 = ("-c:v", "libx264", "-preset", "ultrafast", "-bf", "2", "-pix_fmt", "yuv420p")

# name -> the ffmpeg arguments after the speech input (the pictures' input first where there are pictures)
BASES = {
    "h264_aac.mp4": (*V, "-i", SPEECH, *H264, "-c:a", "aac", "-shortest"),
    "h264_aac_frag.mp4": (*V, "-i", SPEECH, *H264, "-c:a", "aac", "-movflags", "frag_keyframe+empty_moov",
                          "-shortest"),
    "vp9_opus.webm": (*V, "-i", SPEECH, "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-c:a",
                      "libopus", "-shortest"),
    "hevc_ac3.mkv": (*V, "-i", SPEECH, "-c:v", "libx265", "-preset", "ultrafast", "-x265-params", "log-level=error",
                     "-c:a", "ac3", "-shortest"),
    "mpeg4_mp3.avi": (*V, "-i", SPEECH, "-c:v", "mpeg4", "-q:v", "4", "-bf", "2", "-c:a", "libmp3lame", "-shortest"),
    "h264_pcm.avi": (*V, "-i", SPEECH, *H264, "-c:a", "pcm_s16le", "-shortest"),
    "h264_aac.ts": (*V, "-i", SPEECH, *H264, "-c:a", "aac", "-shortest"),
    "mpeg2_mp2.mpg": (*V, "-i", SPEECH, "-c:v", "mpeg2video", "-q:v", "4", "-c:a", "mp2", "-shortest"),
    "h264_aac.flv": (*V, "-i", SPEECH, *H264, "-c:a", "aac", "-shortest"),
    "wmv2_wma.wmv": (*V, "-i", SPEECH, "-c:v", "wmv2", "-q:v", "4", "-c:a", "wmav2", "-shortest"),
    "mjpeg_pcm.mov": (*V, "-i", SPEECH, "-c:v", "mjpeg", "-q:v", "3", "-c:a", "pcm_s16le", "-shortest"),
    "theora_vorbis.ogv": (*V, "-i", SPEECH, "-c:v", "libtheora", "-q:v", "5", "-c:a", "libvorbis", "-shortest"),
    "mpeg2.mxf": (*V, "-c:v", "mpeg2video", "-q:v", "4"),
    "speech.mp3": ("-i", SPEECH, "-c:a", "libmp3lame", "-q:a", "4"),
    "speech.m4a": ("-i", SPEECH, "-c:a", "aac"),
    "speech.flac": ("-i", SPEECH, "-c:a", "flac"),
    "speech.ogg": ("-i", SPEECH, "-c:a", "libvorbis"),
    "speech.opus": ("-i", SPEECH, "-c:a", "libopus"),
    "speech.aac": ("-i", SPEECH, "-c:a", "aac", "-f", "adts"),
    "speech.wav": ("-i", SPEECH, "-c:a", "pcm_s16le"),
    "anim.gif": ("-f", "lavfi", "-i", "testsrc2=size=96x72:rate=10:duration=2"),
}
KINDS = ("truncate", "zero", "flip", "garbage", "splice", "repeat", "header", "stretches")


def damage(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One of ``KINDS`` done to ``data`` at random places: what a bad sector, a damaged download or a broken copy
    does (the header: the first 2 KB; the others spare the first 4 KB or tenth, where the header would be, so that
    most copies still open)."""
    b, n = bytearray(data), len(data)
    kind = rng.choice(KINDS)
    lo = min(4096, n // 10)

    def stretch(most: int) -> tuple[int, int]:
        at = rng.randrange(lo, n)
        return at, min(n, at + rng.randrange(1, max(2, most)))

    if kind == "truncate":
        return kind, bytes(b[:rng.randrange(1, n)])
    if kind == "header":
        for _ in range(rng.randrange(1, 16)):
            b[rng.randrange(0, min(n, 2048))] = rng.randrange(256)
    elif kind == "zero":
        a, z = stretch(n // 10)
        b[a:z] = bytes(z - a)
    elif kind == "flip":
        for _ in range(rng.randrange(1, 200)):
            b[rng.randrange(lo, n)] ^= 1 << rng.randrange(8)
    elif kind == "garbage":
        a, z = stretch(n // 20)
        b[a:z] = rng.randbytes(z - a)
    elif kind == "splice":
        a, z = stretch(n // 10)
        del b[a:z]
    elif kind == "repeat":
        a, z = stretch(n // 10)
        b[a:a] = b[a:z]
    else:  # several small zeroed stretches
        for _ in range(rng.randrange(2, 5)):
            a, z = stretch(n // 40)
            b[a:z] = bytes(z - a)
    return kind, bytes(b)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    d = tmp_path_factory.mktemp("bases")
    synthetic.speech_wav(str(d / SPEECH), "The quick brown fox jumps over the lazy dog. We sieve media all day.")
    for name, args in BASES.items():
        synthetic._ffmpeg([*(str(d / a) if a == SPEECH else a for a in args), str(d / name)])
    return d


def _damaged_job(tmp_path, bases, count: int, seed: int) -> tuple[dict, dict, subprocess.CompletedProcess]:
    """``count`` damaged copies (bases in turn, ``seed``'s damage) and the clean bases, through the demo's filters in
    a job of its own process (a native crash would end the test's): the rows by id, and the job."""
    rng, rows, names = random.Random(seed), [], sorted(BASES)
    (tmp_path / "bad").mkdir()
    for i in range(count):
        name = names[i % len(names)]
        kind, data = damage((bases / name).read_bytes(), rng)
        path = tmp_path / "bad" / f"{i:04d}-{kind}-{name}"
        path.write_bytes(data)
        rows.append({"video_id": path.name, "video_path": str(path), "base": name})
    rows += [{"video_id": f"clean-{name}", "video_path": str(bases / name), "base": name} for name in names]
    job = _demo_job(tmp_path, rows, 3000, runtime={"item_timeout_s": 120, "stall_timeout_s": 300},
                    output={"rows_per_file": 100, "flush_interval_s": 30})
    return {r["video_id"]: r for r in rows}, _rows_by_id(tmp_path), job


def _demo_job(tmp_path, rows: list[dict], timeout_s: float, **sections) -> subprocess.CompletedProcess:
    """``rows`` (a manifest's) through the demo's filters in a job of its own process (a native crash would end the
    test's), its output under ``tmp_path``; ``sections`` merged into the config."""
    demo = yaml.safe_load(open(os.path.join(ROOT, "configs", "default.yaml")))
    raw = base_config(write_manifest(str(tmp_path / "m.parquet"), rows), str(tmp_path), str(tmp_path / "out"),
                      str(tmp_path / "cache"), filters=demo["filters"], video=demo["video"], **sections)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    return subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "run.py"), "--config", str(tmp_path / "job.yaml")],
                          capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)


def _rows_by_id(tmp_path) -> dict[str, dict]:
    """The rows ``_demo_job`` wrote, by id."""
    return {r["video_id"]: r for r in pq.read_table(str(tmp_path / "out" / "parts")).to_pylist()}


def _check(manifest: dict, got: dict) -> list[str]:
    """What a row says that cannot be true of its file (the oracle: the clean base's row of the same file, and the
    bounds any row must keep), as lines; empty when all is well."""
    wrong = []
    for vid, row in got.items():
        info, base = row["result_info"], got[f"clean-{manifest[vid]['base']}"]
        if not info["succeed"]:
            if info["error_type"] not in ("DecodeError", "DecodeTimeout"):  # FilterError: a bug; CrashError: a crash
                wrong.append(f"{vid}: {info['error_type']}: {info['error_message']}")
            continue
        end = max(base["probe"]["duration_s"], row["probe"]["duration_s"] or 0.0) + 1.0
        for span in info["corrupt_spans"] or []:
            if not 0.0 <= span["start_s"] <= span["end_s"] <= end:
                wrong.append(f"{vid}: corrupt span {span} outside [0, {end:.2f}]")
        speech = row["speech_cuts"]
        if speech is not None:
            last = 0.0
            for seg in speech["speech"]:
                if not last <= seg["start_s"] < seg["end_s"] <= speech["duration_s"] + 0.01:
                    wrong.append(f"{vid}: speech {seg} out of order or past the audio's {speech['duration_s']:.2f} s")
                last = seg["end_s"]
        if vid.startswith("clean-") and (info["corrupt_spans"] or info["video_frames_lost"]
                                          or info["audio_packets_lost"]):
            wrong.append(f"{vid}: a clean file reported damaged: {info['corrupt_spans']}")
    return wrong


def test_damaged_files_of_every_container_get_one_typed_row_each(tmp_path, bases):
    """Two damaged copies of each base (a fixed seed): the job ends well, every item has exactly one row, every
    failure is a decode failure with its message (not a bug in a filter, not a crash), and no success row places
    damage or speech outside its file; every clean base succeeds undamaged."""
    manifest, got, job = _damaged_job(tmp_path, bases, 2 * len(BASES), seed=7)
    assert job.returncode == 0, job.stderr[-3000:]
    assert set(got) == set(manifest)
    assert _check(manifest, got) == []
    assert all(got[f"clean-{name}"]["result_info"]["succeed"] for name in BASES)
    succeeded = sum(r["result_info"]["succeed"] for vid, r in got.items() if not vid.startswith("clean-"))
    assert succeeded >= len(BASES)  # most damage leaves most of a file: the rows say what decoded


def _cli_decodes(path: str) -> tuple[float, int, int]:
    """Seconds, video frames and kilobytes of sound (16-bit PCM at the source's rate) the ffmpeg CLI decodes of
    ``path``."""
    run = subprocess.run(["ffmpeg", "-hide_banner", "-nostats", "-progress", "pipe:1", "-i", path, "-f", "null", "-"],
                         capture_output=True, text=True, errors="replace", timeout=120)
    times = [int(t) for t in re.findall(r"out_time_us=(\d+)", run.stdout)]
    frames = [int(f) for f in re.findall(r"^frame=(\d+)", run.stdout, re.M)]
    sound = [int(k) for k in re.findall(r"audio:(\d+)[kK]i?B", run.stderr)]
    return (times[-1] / 1e6 if times else 0.0), (frames[-1] if frames else 0), (sound[-1] if sound else 0)


@pytest.mark.slow
def test_damaged_media_soak(tmp_path, bases):
    count = int(os.environ.get("MEDIASIEVE_FUZZ_ITEMS", "600"))
    seed = int(os.environ.get("MEDIASIEVE_FUZZ_SEED", "1"))
    manifest, got, job = _damaged_job(tmp_path, bases, count, seed)
    assert job.returncode == 0, job.stderr[-3000:]
    assert set(got) == set(manifest)
    failed = {vid: r for vid, r in got.items() if not r["result_info"]["succeed"]}
    print(f"\n{len(got)} items, {len(got) - len(failed)} succeeded; failures by type: "
          + json.dumps({t: sum(r["result_info"]["error_type"] == t for r in failed.values())
                        for t in sorted({r["result_info"]["error_type"] for r in failed.values()})}))
    for vid, row in sorted(failed.items()):
        seconds, frames, sound = _cli_decodes(manifest[vid]["video_path"])
        mark = "CLI decodes" if seconds > 1.0 else ""
        print(f"{mark:12s} {vid:36s} CLI {seconds:5.2f} s {frames:4d} frames {sound:4d} kB sound | "
              f"{row['result_info']['error_message'][:90]}")
    assert _check(manifest, got) == []


@pytest.mark.parametrize("stated", ["mkv 1e9 s", "mkv -5 s", "mp4 2**31 frames"])
def test_a_header_stating_an_impossible_duration_is_measured_and_crashes_no_decoder(tmp_path, bases, stated):
    """An MKV whose header states 10^9 s (or -5 s) for its 4, an MP4 whose ``stts`` states 2^31 frames for its 100:
    decord reserved memory for each frame (2.5 * 10^10) and threw std::bad_alloc through its C API, which aborts the
    process (the whole job, before any row; found by fuzzing header fields: 6 of 851 such files aborted, every one
    an ``stts`` count). A file too small to hold the frames its header states (8 bytes each at the least) is now
    left to torchcodec or PyAV, which count the frames it holds, and its probe says how long it lasts, measured
    where the header's duration cannot be true (before: 10^9 s, and -5 s, in the row)."""
    if stated.startswith("mkv"):
        path = synthetic.mkv_stating_duration(str(bases / "hevc_ac3.mkv"), str(tmp_path / "stated.mkv"),
                                              float(stated.split()[1]))
    else:
        path = synthetic.mp4_stating_frames(str(bases / "h264_aac.mp4"), str(tmp_path / "stated.mp4"), 2 ** 31)
    job = _demo_job(tmp_path, [{"video_id": "stated", "video_path": path}], 600)
    assert job.returncode == 0, job.stderr[-3000:]
    (row,) = _rows_by_id(tmp_path).values()
    assert row["result_info"]["succeed"], row["result_info"]["error_message"]
    assert row["probe"]["duration_s"] == pytest.approx(4.0, abs=0.1)
    assert row["result_info"]["decode_backend"] in ("torchcodec", "pyav")
    assert row["static"]["windows"][-1]["end_s"] == pytest.approx(4.0, abs=0.2)


def test_decord_alone_refuses_a_file_too_small_for_the_frames_its_header_states(bases):
    """Where decord is the only backend configured, such a file is a clear decode failure, not an abort."""
    from pipeline.errors import DecodeError
    from pipeline.video.decoders import available_backends, decode_video
    from pipeline.video.sampling import Uniform

    backends = available_backends(("decord",))
    if not backends:
        pytest.skip("decord is not installed (x86_64 Linux only)")
    path = str(bases / "h264_aac.mp4")
    size = os.path.getsize(path)
    with pytest.raises(DecodeError, match=r"states 2\.5e\+10 frames, more than its \d+ bytes can hold"):
        decode_video(path, [Uniform(4)], backends, stated_frames=2.5e10)
    assert decode_video(path, [Uniform(4)], backends, stated_frames=size / 8).backend == "decord"  # it can hold them


def test_an_audio_packet_timed_past_the_files_end_plays_in_its_place(tmp_path, bases):
    """A flipped bit in one FLV audio tag's time (its high byte: 12 days on): the decode filled the jump with
    silence up to the cap and failed the item ("audio starts or jumps 1073741.8s into the file"; a WMV with a
    flipped payload time did so in the soak, seed 23). A frame timed past the file's end plays after the one
    before: the sound is the clean file's, sample for sample."""
    from pipeline.audio.decode import decode_audio

    data = bytearray((bases / "h264_aac.flv").read_bytes())
    tags, pos = [], 13
    while pos + 11 <= len(data):
        if data[pos] == 8:  # an audio tag: type, size (3 bytes), time (3 bytes), its high byte, stream id
            tags.append(pos)
        pos += 11 + int.from_bytes(data[pos + 1:pos + 4], "big") + 4
    data[tags[len(tags) // 2] + 7] |= 0x40
    flipped = tmp_path / "flipped.flv"
    flipped.write_bytes(data)
    clean = decode_audio(str(bases / "h264_aac.flv"), max_seconds=14400)
    assert np.array_equal(decode_audio(str(flipped), max_seconds=14400), clean)


@pytest.mark.parametrize("base,tag,kind", [("h264_pcm.avi", b"H264", "video"), ("speech.m4a", b"mp4a", "audio")])
def test_a_stream_whose_codec_ffmpeg_does_not_know_is_a_decode_error(tmp_path, bases, base, tag, kind):
    """An AVI whose fourcc is damaged ('H264' read as 'H\\xeb64'), an M4A whose sample entry and object type are:
    PyAV opens them with no decoder for that stream, and the probe failed every filter with "AttributeError:
    'NoneType' object has no attribute 'sample_aspect_ratio'" (or "'codec'"), a bug's row (found by the soak, seed
    23). Now a DecodeError that says so, from the probe and from the audio decode."""
    from pipeline.audio.decode import decode_audio
    from pipeline.errors import DecodeError
    from pipeline.media.probe import probe_media

    data = (bases / base).read_bytes().replace(tag, tag[:3] + b"\xeb")
    if kind == "audio":  # FFmpeg names AAC by the esds's object type as well: that too (0x40, before streamType 0x15)
        at = data.find(b"\x40\x15", data.find(b"esds"))
        data = data[:at] + b"\xeb" + data[at + 1:]
    damaged = tmp_path / f"tag-{base}"
    damaged.write_bytes(data)
    message = f"no decoder for the {kind} stream of this"
    with pytest.raises(DecodeError, match=message):
        probe_media(str(damaged))
    if kind == "audio":
        with pytest.raises(DecodeError, match=message):
            decode_audio(str(damaged))
