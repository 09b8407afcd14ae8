"""Every frame a filter gets is the frame the ffmpeg CLI decodes at that index, across containers and codecs.

The seeking backends (decord, torchcodec) return other frames than asked, without an error, in MPEG-PS, MPEG-TS,
AVI with B-frames and MPEG-4 part 2 (measured; see ``video.random_access_containers``): those files must reach
PyAV, which names every frame by its timestamp or decodes from the start. The oracle is ``ffmpeg -fps_mode
passthrough`` to raw RGB, every frame in order.
"""

import os
import subprocess

import numpy as np
import pytest
import torch

from pipeline.config import VideoConfig
from pipeline.errors import DecodeError
from pipeline.media import synthetic
from pipeline.media.item import MediaItem
from pipeline.video.decoders import PyAVBackend, available_backends
from pipeline.video.sampling import EveryK, Uniform

ALL = ("decord", "torchcodec", "pyav")
SRC = ("-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25:duration=3")
H264_BF = ("-c:v", "libx264", "-preset", "medium", "-bf", "3", "-pix_fmt", "yuv420p")
MPEG2 = ("-c:v", "mpeg2video", "-q:v", "4")
MPEG4_BF = ("-c:v", "mpeg4", "-q:v", "4", "-bf", "2")

# name -> (encoder arguments, the backend that must decode it with the default config)
FILES = {
    "h264_bframes.mp4": (H264_BF, "decord"),
    "h264_fragmented.mp4": (H264_BF + ("-movflags", "frag_keyframe+empty_moov"), "decord"),
    "h264_bframes.flv": (H264_BF, "decord"),
    "hevc_bframes.mkv": (("-c:v", "libx265", "-preset", "ultrafast", "-x265-params", "log-level=error:bframes=4"),
                         "decord"),
    "mpeg2.mov": (MPEG2, "decord"),
    "h264_live.mkv": (H264_BF + ("-f", "matroska", "-live", "1"), "torchcodec"),  # no index: decord cannot open it
    "mpeg2.mpg": (MPEG2, "pyav"),
    "mpeg2.ts": (MPEG2, "pyav"),
    "h264_bframes.ts": (H264_BF, "pyav"),
    "h264_bframes.avi": (H264_BF, "pyav"),
    "mpeg4_bframes.avi": (MPEG4_BF, "pyav"),
    "mpeg4_bframes.mp4": (MPEG4_BF, "pyav"),
    "h264_raw.h264": (H264_BF + ("-f", "h264"), "pyav"),  # an elementary stream: no count, no timestamps
    # broadcast and legacy formats that archives hold: MPEG-2 in MXF (IMX, XDCAM), Windows Media in ASF, MJPEG AVI
    "mpeg2.mxf": (MPEG2, "pyav"),
    "wmv2.wmv": (("-c:v", "wmv2", "-q:v", "4"), "pyav"),
    "mjpeg.avi": (("-c:v", "mjpeg", "-q:v", "3"), "pyav"),
}


def encode_all(directory, source: tuple[str, ...], table: dict) -> dict[str, str]:
    """Every file of ``table`` (name -> (encoder arguments, expectation)) encoded from ``source``."""
    out = {}
    for name, (args, _) in table.items():
        out[name] = str(directory / name)
        synthetic._ffmpeg([*source, *args, out[name]])
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return encode_all(tmp_path_factory.mktemp("conformance"), SRC, FILES)


def ffmpeg_frames(path: str) -> torch.Tensor:
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", path, "-fps_mode", "passthrough", "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
    return torch.from_numpy(np.frombuffer(raw, np.uint8).copy().reshape(-1, 240, 320, 3))


def decode(path: str, cfg: VideoConfig = VideoConfig(), names: tuple[str, ...] = ALL):
    item = MediaItem("x", path, os.path.getsize(path), [Uniform(8), EveryK(10)], cfg, available_backends(names))
    return item.video()


@pytest.mark.parametrize("name", sorted(FILES))
def test_every_decoded_frame_is_the_frame_at_its_index(files, name):
    v = decode(files[name])
    ref = ffmpeg_frames(files[name])
    assert v.meta.num_frames == len(ref) == 75
    expected = FILES[name][1]
    if expected == "decord" and "decord" not in [b.name for b in available_backends(ALL)]:
        expected = "torchcodec"  # decord has no wheel off x86_64 Linux
    assert v.backend == expected
    per_frame = (v.frames.float() - ref[v.plan.indices].float()).abs().mean(dim=(1, 2, 3))
    assert per_frame.max() < 1.0, (v.backend, per_frame.tolist())  # a neighbouring frame differs by over 10


def test_decord_seeks_to_other_frames_in_mpeg_ps(files):
    """Why MPEG-PS is not in the random-access list: decord's answer is off by several frames, with no error. If
    this starts failing, a new decord seeks these right and the list can grow."""
    if not [b for b in available_backends(ALL) if b.name == "decord"]:
        pytest.skip("decord is not installed here")
    cfg = VideoConfig(random_access_containers=("mpeg",), random_access_codecs=("mpeg2video",))
    v = decode(files["mpeg2.mpg"], cfg, ("decord",))
    ref = ffmpeg_frames(files["mpeg2.mpg"])
    assert v.backend == "decord"
    assert (v.frames.float() - ref[v.plan.indices].float()).abs().mean() > 5.0


def test_only_seeking_backends_for_a_file_they_get_wrong_is_a_clear_error(files):
    with pytest.raises(DecodeError, match="add pyav to video.backends"):
        decode(files["mpeg2.ts"], names=("torchcodec",))


def test_the_lists_are_the_users_to_extend(files):
    cfg = VideoConfig(random_access_codecs=VideoConfig().random_access_codecs + ("mpeg4",))
    assert decode(files["mpeg4_bframes.mp4"], cfg, ("torchcodec", "pyav")).backend == "torchcodec"


def test_pyav_counts_frames_where_the_header_has_no_count(files):
    for name in ("h264_live.mkv", "h264_bframes.flv", "h264_raw.h264", "h264_bframes.ts"):
        assert PyAVBackend().meta(files[name]).num_frames == 75, name


# Short keyframe intervals, open GOPs and B-frames: what broadcast captures and DVDs hold. name -> (encoder
# arguments, whether PyAV's seeking decode can vouch for its frames there)
GOP_SRC = ("-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25:duration=8")
GOP_FILES = {
    "h264_open_gop.ts": (("-c:v", "libx264", "-preset", "medium", "-bf", "3", "-g", "24", "-x264-params",
                          "open-gop=1", "-pix_fmt", "yuv420p"), True),
    "mpeg2_open_gop.mpg": (("-c:v", "mpeg2video", "-q:v", "4", "-g", "12", "-bf", "2"), True),  # first frame after
    "mpeg2.vob": (("-c:v", "mpeg2video", "-q:v", "4", "-g", "15", "-bf", "2", "-f", "vob"), True),  # a seek mislabelled
    "hevc_open_gop.ts": (("-c:v", "libx265", "-preset", "ultrafast", "-x265-params",
                          "log-level=error:keyint=20:bframes=4:open-gop=1"), True),
    "mpeg4_bframes.avi": (("-c:v", "mpeg4", "-q:v", "4", "-bf", "2", "-g", "12"), True),
    "h264_bframes.avi": (("-c:v", "libx264", "-preset", "medium", "-bf", "3", "-g", "24", "-pix_fmt", "yuv420p"),
                         False),  # AVI's timestamps are not the frames' presentation times: decoded in order
}


@pytest.fixture(scope="module")
def gop_files(tmp_path_factory):
    return encode_all(tmp_path_factory.mktemp("gops"), GOP_SRC, GOP_FILES)


@pytest.mark.parametrize("name", sorted(GOP_FILES))
def test_pyav_seeking_decode_equals_decoding_from_the_start(gop_files, name):
    """Oracle: every frame decoded in order. 30 random sets of indices, from one frame to dense runs."""
    import random

    from pipeline.video.decoders import _SeekMiss

    b = PyAVBackend()
    path = gop_files[name]
    n = b.meta(path).num_frames
    every = b._decode_in_order(path, list(range(n)), (320, 240))
    assert torch.equal(every, ffmpeg_frames(path))
    rng = random.Random(0)
    seeked = 0
    for _ in range(30):
        idx = sorted(rng.sample(range(n), rng.choice([1, 3, 12, 40])))
        assert torch.equal(b.decode(path, idx, (320, 240), "cpu", False), every[idx])
        try:
            b._decode_seeking(path, idx, (320, 240))
            seeked += 1
        except _SeekMiss:
            pass
    assert seeked == (30 if GOP_FILES[name][1] else 0)


def test_pyav_seeks_past_the_frames_between(gop_files, monkeypatch):
    """Two frames 150 apart with a keyframe every 12: the decode starts at the keyframe before each, instead of
    decoding the 150 frames between (an hour-long MPEG-TS would otherwise pass its decode timeout)."""
    import pipeline.video.decoders as dec

    decoded = []
    real = dec._from_keyframe

    def counting(frames, index_of):
        for i, frame in real(frames, index_of):
            decoded.append(i)
            yield i, frame

    monkeypatch.setattr(dec, "_from_keyframe", counting)
    PyAVBackend().decode(gop_files["mpeg2_open_gop.mpg"], [5, 155], (320, 240), "cpu", False)
    assert len(decoded) <= 2 * 13 and 155 in decoded and not any(30 < i < 140 for i in decoded)


class _Frame:
    def __init__(self, pts, key=False):
        self.pts, self.key_frame = pts, key


def test_from_keyframe_trusts_only_timestamps_that_follow_each_other():
    from pipeline.video.decoders import _from_keyframe, _SeekMiss

    index_of = {p: p // 10 for p in range(0, 200, 10)}  # frame i has pts 10 i

    def run(frames):
        return [i for i, _ in _from_keyframe(iter(frames), index_of)]

    # leading pictures before the keyframe are skipped; the keyframe is confirmed by its successor
    assert run([_Frame(30), _Frame(40), _Frame(50, True), _Frame(60), _Frame(70)]) == [5, 6, 7]
    # MPEG-PS after a seek: the keyframe (really frame 5) says 8; its successor 6 contradicts it: dropped
    assert run([_Frame(80, True), _Frame(60), _Frame(70), _Frame(80)]) == [6, 7, 8]
    with pytest.raises(_SeekMiss, match="came after"):
        run([_Frame(50, True), _Frame(60), _Frame(80)])  # a frame missing: nothing after it can be named
    with pytest.raises(_SeekMiss, match="not a packet's"):
        run([_Frame(55, True)])
    with pytest.raises(_SeekMiss, match="confirm"):
        run([_Frame(30), _Frame(50, True)])  # a keyframe nothing follows cannot be confirmed


@pytest.fixture(scope="module")
def edit_listed(files, tmp_path_factory):
    """A stream copy cut at 1.3 s into an MP4: the frames from the keyframe before stay in the file, hidden by an
    edit list (what trimming without re-encoding, in ffmpeg or an editing app, writes)."""
    path = str(tmp_path_factory.mktemp("edit") / "trimmed.mp4")
    synthetic._ffmpeg(["-ss", "1.3", "-i", files["h264_bframes.mp4"], "-c", "copy", path])
    return path


def test_frames_an_edit_list_hides_are_not_frames(edit_listed):
    ref = ffmpeg_frames(edit_listed)
    assert 40 < len(ref) < 75  # the oracle shows fewer frames than the file holds
    v = decode(edit_listed)
    assert v.meta.num_frames == len(ref) and v.backend in ("torchcodec", "pyav")  # decord steps aside
    assert torch.equal(v.frames, ref[v.plan.indices])
    p = decode(edit_listed, names=("pyav",))
    assert p.meta.num_frames == len(ref) and torch.equal(p.frames, ref[p.plan.indices])
    if [b for b in available_backends(ALL) if b.name == "decord"]:
        with pytest.raises(DecodeError, match="edit list"):
            decode(edit_listed, names=("decord",))  # it would count the hidden frames and shift every index


def test_pyav_seeking_decode_with_a_hidden_first_keyframe(edit_listed):
    """The first frame shown is not a keyframe (the keyframe is hidden): frames before the first shown keyframe
    are decoded from the start."""
    b = PyAVBackend()
    n = b.meta(edit_listed).num_frames
    every = b._decode_in_order(edit_listed, list(range(n)), (320, 240))
    for idx in ([0], [1, 5], [3, n - 1], list(range(0, n, 7))):
        assert torch.equal(torch.from_numpy(np.stack(list(b._decode_seeking(edit_listed, idx, (320, 240)).values()))),
                           every[idx])


@pytest.mark.parametrize("offset_s", [0, 3600])
def test_spliced_mpeg_ts_recordings_are_sampled_by_frame(tmp_path, offset_s):
    """Two TS recordings back to back: the second one's clock restarts (offset 0) or runs an hour ahead. Times
    read from such timestamps put all eight uniform samples on one frame; they are sampled by frame instead."""
    parts = []
    for i, src in enumerate(("testsrc2", "smptebars")):
        parts.append(str(tmp_path / f"{i}.ts"))
        synthetic._ffmpeg(["-f", "lavfi", "-i", f"{src}=size=320x240:rate=25:duration=2", "-c:v", "libx264",
                           "-preset", "ultrafast", "-g", "12", "-pix_fmt", "yuv420p",
                           "-output_ts_offset", str(offset_s * i), "-f", "mpegts", parts[-1]])
    path = str(tmp_path / "spliced.ts")
    with open(path, "wb") as out:
        for part in parts:
            out.write(open(part, "rb").read())
    ref = ffmpeg_frames(path)
    item = MediaItem("x", path, 0, [Uniform(8)], VideoConfig(), available_backends(ALL))
    v = item.video()
    assert v.meta.num_frames == len(ref) == 100
    assert len(set(v.plan.indices)) == 8 and min(v.plan.indices) < 50 < max(v.plan.indices)
    assert torch.equal(v.frames, ref[v.plan.indices])
    assert np.allclose(v.times(Uniform(8)), np.asarray(v.plan.indices) / 25.0)
