"""Decoder backends and fallback on real files made by ffmpeg."""

import logging
import os
import subprocess
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from pipeline.errors import DecodeError, DecodeTimeout, ItemTimeout
from pipeline.media import synthetic
from pipeline.video.decoders import (DecodeCancelled, available_backends, backend_order, decode_video,
                                     decodes_past_deadline, resize_frames)
from pipeline.video.sampling import (AtFps, EveryK, Frames, Uniform, Windows, make_plan, request_indices,
                                     variable_rate)

ALL = ("decord", "torchcodec", "pyav")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    out = {
        "h264": synthetic.lavfi_clip(str(d / "h264.mp4"), seconds=2.0),
        "av1": synthetic.lavfi_clip(str(d / "av1.mp4"), seconds=1.0,
                                    codec=("-c:v", "libaom-av1", "-cpu-used", "8", "-b:v", "200k")),
        "10bit": synthetic.lavfi_clip(str(d / "10bit.mp4"), seconds=1.0, pix_fmt="yuv420p10le",
                                      codec=("-c:v", "libx264", "-preset", "ultrafast", "-profile:v", "high10")),
        "fullrange": synthetic.lavfi_clip(str(d / "full.mp4"), seconds=1.0, pix_fmt="yuvj420p"),
        "vp9": synthetic.lavfi_clip(str(d / "vp9.webm"), seconds=1.0,
                                    codec=("-c:v", "libvpx-vp9", "-deadline", "realtime", "-b:v", "300k")),
    }
    # several video and audio streams in one container: the first video stream is decoded
    multi = str(d / "multi.mkv")
    synthetic._ffmpeg(["-f", "lavfi", "-i", "sine=frequency=300:duration=1", "-f", "lavfi", "-i",
                       "testsrc2=size=320x240:rate=25:duration=1", "-f", "lavfi", "-i",
                       "smptebars=size=160x120:rate=25:duration=1", "-f", "lavfi", "-i", "sine=duration=1",
                       "-map", "0", "-map", "1", "-map", "2", "-map", "3", "-c:v", "libx264", "-preset", "ultrafast",
                       "-c:a", "aac", multi])
    out["multi"] = multi
    # variable frame rate: 25 frames in the first second, then 25 frames at 10 fps
    out["vfr"] = synthetic.lavfi_clip(str(d / "vfr.mp4"), seconds=2.0,
                                      vf="setpts='if(lt(N,25),N/25,1+(N-25)/10)/TB'", extra=("-fps_mode", "vfr"))
    # faststart (index first) and then cut: a broken tail
    full = synthetic.lavfi_clip(str(d / "fs.mp4"), seconds=4.0, extra=("-movflags", "+faststart"))
    data = open(full, "rb").read()
    out["broken_tail"] = str(d / "broken_tail.mp4")
    open(out["broken_tail"], "wb").write(data[: len(data) // 5])
    out["edit_list"] = str(d / "edit_list.mp4")  # a stream copy cut between keyframes: the header lists hidden frames
    synthetic._ffmpeg(["-ss", "1.3", "-i", full, "-c", "copy", out["edit_list"]])
    return out


def test_backends_agree_on_frames(clips):
    results = {b.name: decode_video(clips["h264"], [Uniform(8), EveryK(7)], [b]) for b in available_backends(ALL)}
    ref = results["pyav"]
    assert ref.frames.shape == (len(ref.plan.indices), 240, 320, 3) and ref.frames.dtype == torch.uint8
    for name, v in results.items():
        assert v.backend == name and v.plan.indices == ref.plan.indices
        assert (v.frames.float() - ref.frames.float()).abs().mean() < 1.0, name


def test_decord_rejects_av1_and_torchcodec_takes_over(clips):
    backends = available_backends(ALL)
    if backends[0].name == "decord":
        with pytest.raises(DecodeError, match="decord"):
            decode_video(clips["av1"], [Uniform(4)], backends[:1])
    v = decode_video(clips["av1"], [Uniform(4)], backends)
    assert v.backend == "torchcodec" and v.frames.shape[0] == 4


@pytest.mark.parametrize("kind", ["10bit", "fullrange", "vp9", "multi"])
def test_modern_formats_decode_with_right_colours(clips, kind):
    v = decode_video(clips[kind], [Uniform(4)], available_backends(ALL))
    ref = decode_video(clips["h264"], [Uniform(4)], available_backends(("pyav",)))
    assert v.frames.shape[1:] == (240, 320, 3)
    # same source pattern: colours agree within coding error, whatever the bit depth or range
    assert (v.frames.float().mean() - ref.frames.float().mean()).abs() < 12


def test_variable_frame_rate(clips):
    from pipeline.media.probe import probe_media

    info = probe_media(clips["vfr"])
    assert info.duration_s == pytest.approx(3.5, abs=0.15)
    counts = {}
    for b in available_backends(ALL):
        v = decode_video(clips["vfr"], [Uniform(8)], [b])
        counts[b.name] = v.meta.num_frames
        assert v.frames.shape[0] == 8 and v.frames.float().std() > 10
    assert set(counts.values()) == {50}, counts  # frame indices are exact whatever the timing


def test_variable_frame_rate_windows_follow_the_timestamps(clips):
    # 25 frames at 25 fps in [0, 1), then 10 fps: one-second windows hold 25 frames, then about 10 (by index at
    # the average 14.5 fps, the first window would end at frame 14 and the second would start in the first second)
    win = Windows(1.0, 1.0, 5)
    for b in available_backends(ALL):
        v = decode_video(clips["vfr"], [win, Uniform(7)], [b])
        assert v.meta.timestamps is not None and len(v.meta.timestamps) == 50, b.name
        idx = [[v.plan.indices[p] for p in pos] for pos in v.plan.positions[win]]
        assert len(idx) == 3, (b.name, idx)  # 3.44 s of video
        assert all(i < 25 for i in idx[0]) and max(idx[0]) >= 20, (b.name, idx)
        assert all(i >= 25 for i in idx[1]), (b.name, idx)
        for w in range(3):
            t = v.times(win, w)
            assert ((t >= w - 1e-6) & (t < w + 1)).all(), (b.name, w, t)
        # uniform frames are uniform in time: the second half of the clip (10 fps) holds about half of them
        t = v.times(Uniform(7))
        assert np.sum(t >= 1.72) == 3 and np.all(np.diff(t) > 0.3), (b.name, t)


def test_broken_tail_decodes_its_prefix(clips):
    v = decode_video(clips["broken_tail"], [Uniform(8)], available_backends(ALL))
    assert 0 < v.meta.num_frames < 100 and max(v.plan.indices) < v.meta.num_frames
    assert v.frames.shape[0] == 8 and v.frames.float().std() > 10  # real pictures, not grey


@pytest.mark.parametrize("backend", ["pyav", "torchcodec"])
def test_a_broken_tails_lost_frames_and_span_are_in_the_items_tally(clips, backend):
    """The item's row says a broken tail cut the clip short: the frames its header lists past the packets that
    demux are lost (both backends decode the prefix without an error: decord refuses the file), and their span runs
    from the prefix's end to the end the header gives (4 s); the process's ``corrupt_media`` (frames held in
    stretches decoded past) does not count them. An edit list's hidden frames are not lost (below)."""
    import contextvars

    from pipeline.media import damage

    tally = damage.ItemDamage()
    before = damage.counts()

    def as_the_consumer(path=clips["broken_tail"]):
        damage.current_damage.set(tally)
        return decode_video(path, [Uniform(8)], available_backends((backend,)))

    v = contextvars.copy_context().run(as_the_consumer)
    n = v.meta.num_frames
    assert 0 < n < 100 and tally.video_frames_lost == 100 - n  # 4 s at 25 fps claimed
    assert tally.spans == [{"stream": "video", "start_s": pytest.approx(n / 25), "end_s": pytest.approx(4.0)}]
    assert damage.counts() == before
    tally = damage.ItemDamage()
    cut = contextvars.copy_context().run(as_the_consumer, clips["edit_list"])
    assert cut.meta.num_frames < 100 and tally.video_frames_lost == 0 and tally.spans == []


def _tally_of(path: str, backend: str):
    """``path`` decoded by ``backend`` as a rank's consumer does (its item's tally of damage set), and that tally."""
    import contextvars

    from pipeline.media import damage

    tally = damage.ItemDamage()

    def as_the_consumer():
        damage.current_damage.set(tally)
        return decode_video(path, [Uniform(8)], available_backends((backend,)))

    return contextvars.copy_context().run(as_the_consumer), tally


_X264_AAC = ("-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac")


@pytest.mark.parametrize("ext,codecs,backend", [
    *[(ext, codecs, backend) for backend in ("pyav", "decord")
      for ext, codecs in (("mkv", _X264_AAC), ("webm", ("-c:v", "libvpx-vp9", "-deadline", "realtime", "-c:a",
                                                       "libopus")), ("flv", _X264_AAC))],
    ("wmv", ("-c:v", "wmv2", "-c:a", "wmav2"), "pyav"), ("wmv", ("-c:v", "wmv2", "-c:a", "wmav2"), "torchcodec")])
def test_a_matroska_file_cut_short_is_told_by_its_stated_duration(tmp_path, ext, codecs, backend):
    """Matroska, WebM, FLV and WMV list no frame count, but their header states the duration (FLV's ``onMetaData``,
    ASF's file properties): a download cut at 40% of its bytes (every stream ends at about 1.6 of 4 s) is cut short,
    the frames that duration would hold at the stated rate lost, the span from where the pictures end to the stated
    end; the whole file is not, nor one whose pictures end at 2 s while its sound goes on to 4 s (the container's
    duration is its longest stream's). decord, the first backend, decodes the prefix without a word (torchcodec
    refuses a Matroska file cut short; decord a WMV)."""

    import av


    if backend == "decord":
        pytest.importorskip("decord")

    whole = str(tmp_path / f"whole.{ext}")
    synthetic._ffmpeg(["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25:duration=4", "-f", "lavfi", "-i",
                       "sine=duration=4", *codecs, whole])
    short_pictures = str(tmp_path / f"short_pictures.{ext}")
    synthetic._ffmpeg(["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25:duration=2", "-f", "lavfi", "-i",
                       "sine=duration=4", *codecs, short_pictures])
    data = open(whole, "rb").read()
    cut = str(tmp_path / f"cut.{ext}")
    open(cut, "wb").write(data[: len(data) * 2 // 5])
    with av.open(whole) as c:  # the duration the header states (FFmpeg gives a WMV cut short none)
        stated = c.duration / av.time_base

    v, tally = _tally_of(cut, backend)
    n = v.meta.num_frames
    assert v.backend == backend and 20 < n < 60 and tally.video_frames_lost == pytest.approx(100 - n, abs=2)
    (span,) = tally.spans
    assert span["start_s"] == pytest.approx(n / 25, abs=0.05) and span["end_s"] == pytest.approx(stated, abs=0.05)
    for clean in (whole, short_pictures):
        v, tally = _tally_of(clean, backend)
        assert v.meta.num_frames in (50, 100) and tally.video_frames_lost == 0 and tally.spans == []


def _stated_longer(path: str, dst: str, seconds: float) -> str:
    """A copy of ``path`` (4 s, as the muxer wrote it) whose header states ``seconds`` instead: an FLV's
    ``onMetaData`` duration, an ASF's play duration, a Matroska file's Duration (a muxer's or a tool's wrong
    figure, in a file that holds every byte its header says it has)."""
    import struct

    from pipeline.media.probe import ASF_FILE_PROPERTIES

    data = bytearray(open(path, "rb").read())
    if data[:3] == b"FLV":
        at = data.find(b"\x00\x08duration\x00") + 11
        data[at:at + 8] = struct.pack(">d", seconds)
    elif data[:4] == b"\x30\x26\xb2\x75":
        at = data.find(ASF_FILE_PROPERTIES) + 24 + 40
        play = struct.unpack("<Q", data[at:at + 8])[0]
        data[at:at + 8] = struct.pack("<Q", play + int((seconds - 4) * 1e7))
    else:  # Matroska's Duration (0x4489), a float of 8 or 4 bytes in the segment's time scale (ms)
        at = data.find(b"\x44\x89")
        if data[at + 2] == 0x88:
            data[at + 3:at + 11] = struct.pack(">d", seconds * 1000)
        else:
            data[at + 3:at + 7] = struct.pack(">f", seconds * 1000)
    open(dst, "wb").write(data)
    return dst


@pytest.mark.parametrize("ext,codecs", [("mkv", _X264_AAC), ("flv", _X264_AAC),
                                        ("webm", ("-c:v", "libvpx-vp9", "-deadline", "realtime", "-c:a", "libopus")),
                                        ("wmv", ("-c:v", "wmv2", "-c:a", "wmav2"))])
def test_a_whole_file_whose_header_states_a_longer_duration_is_not_cut_short(tmp_path, ext, codecs):
    """A file whose header states 8 s for 4 s of pictures and sound, but which holds every byte its header says it
    has (FLV's ``filesize``, ASF's file size, Matroska's Segment size): the stated duration is wrong, not the file,
    and neither its pictures nor its sound are called cut short (they were: 100 frames lost and a span to 8 s). The
    same file cut at 40% of its bytes still is."""
    from pipeline.audio.decode import decode_audio
    from pipeline.media import damage
    from pipeline.media.probe import holds_stated_size

    whole = str(tmp_path / f"whole.{ext}")
    synthetic._ffmpeg(["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25:duration=4", "-f", "lavfi", "-i",
                       "sine=duration=4", *codecs, whole])
    wrong = _stated_longer(whole, str(tmp_path / f"wrong.{ext}"), 8.0)
    import av

    with av.open(wrong) as c:
        assert c.duration / av.time_base == pytest.approx(8.0, abs=0.1)  # FFmpeg reads the wrong figure
    v, tally = _tally_of(wrong, "pyav")
    assert v.meta.num_frames == 100 and tally.video_frames_lost == 0 and tally.spans == [] and holds_stated_size(wrong)
    tally = damage.ItemDamage()
    token = damage.current_damage.set(tally)
    try:
        assert len(decode_audio(wrong)) == pytest.approx(4 * 16000, abs=0.1 * 16000)  # WMA pads a frame
    finally:
        damage.current_damage.reset(token)
    assert tally.spans == []
    data = open(wrong, "rb").read()
    cut = str(tmp_path / f"cut.{ext}")
    open(cut, "wb").write(data[: len(data) * 2 // 5])
    v, tally = _tally_of(cut, "pyav")
    assert not holds_stated_size(cut) and tally.video_frames_lost > 0 and tally.spans[-1]["end_s"] > 7


@pytest.mark.parametrize("backend", ["decord", "torchcodec", "pyav"])
def test_an_avis_dropped_frames_are_not_lost_and_its_cut_is(tmp_path, backend):
    """An AVI holds an empty chunk for each frame dropped at capture (shown as the one before; FFmpeg's muxer writes
    one for each gap in the timestamps), which its header's frame count lists and FFmpeg's demuxer passes over: the
    whole file, 100 chunks of which 3 are empty, loses nothing (it said 3 frames lost before), and a download cut at
    40% of its bytes loses the chunks past those its frames span, to the end the header's count gives at the frame
    rate (FFmpeg gives it the duration of what it holds; decord said nothing)."""


    if backend == "decord":
        pytest.importorskip("decord")
    whole = str(tmp_path / "dropped.avi")
    synthetic._ffmpeg(["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25:duration=4", "-vf",
                       "select='not(between(n,10,12))'", "-fps_mode", "passthrough", "-c:v", "mjpeg", "-q:v", "5",
                       whole])
    data = open(whole, "rb").read()
    cut = str(tmp_path / "cut.avi")
    open(cut, "wb").write(data[: len(data) * 2 // 5])

    v, tally = _tally_of(whole, backend)
    assert v.backend == backend and v.meta.num_frames == 97 and tally.video_frames_lost == 0 and tally.spans == []
    v, tally = _tally_of(cut, backend)
    n = v.meta.num_frames
    assert v.backend == backend and 20 < n < 60 and tally.video_frames_lost == 100 - (n + 3)
    assert tally.spans == [{"stream": "video", "start_s": pytest.approx((n + 3) / 25), "end_s": pytest.approx(4.0)}]


@pytest.mark.parametrize("ext,codecs", [("avi", ("-c:v", "libx264", "-preset", "ultrafast")),
                                        ("vob", ("-c:v", "mpeg2video", "-c:a", "ac3", "-f", "vob"))])
def test_frames_decord_gives_no_timestamp_go_to_the_next_backend(tmp_path, ext, codecs):
    """decord reads FFmpeg's "no timestamp" as a time of -1e17 s for every frame of an AVI with B-frames and for a
    VOB's first: it cannot place them (it was taken for an edit list); the next backend decodes the file."""
    pytest.importorskip("decord")
    path = str(tmp_path / f"clip.{ext}")
    synthetic._ffmpeg(["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25:duration=4", "-f", "lavfi", "-i",
                       "sine=duration=4", *codecs, path])
    with pytest.raises(DecodeError, match=r"decord gives \d+ of this file's 100 frames no timestamp"):
        decode_video(path, [Uniform(4)], available_backends(("decord",)))
    v = decode_video(path, [Uniform(4)], available_backends(("decord", "pyav")))
    assert v.backend == "pyav" and v.meta.num_frames == 100


def test_broken_tail_in_two_passes_keeps_both_inside_the_prefix(clips):
    """The reduced pass after a full pass that found the tail broken: both plans inside the decodable prefix."""
    reqs = [Uniform(8), AtFps(4.0, 240, max_side=64)]
    v = decode_video(clips["broken_tail"], reqs, available_backends(ALL), reduced_pass_bytes=1)
    assert v.reduced is not None and max(v.reduced.frames.shape[1:3]) == 64
    for part in (v, v.reduced):
        assert 0 < part.meta.num_frames < 100 and max(part.plan.indices) < part.meta.num_frames
        assert part.frames.float().std() > 10  # real pictures, not grey
    assert v.times(reqs[1])[-1] < v.meta.num_frames / v.meta.fps and v.frames_decoded == 8 + len(v.reduced.plan.indices)


@pytest.fixture(scope="module")
def corrupt_middle(tmp_path_factory):
    """20 s at 25 fps, a keyframe every 25 frames, and the same file with 2% of its bytes zeroed at its middle (a
    bad sector, a damaged download): the index (at the end) still lists all 500 frames."""
    d = tmp_path_factory.mktemp("corrupt")
    clean = synthetic.lavfi_clip(str(d / "clean.mp4"), "testsrc2=size=160x120:rate=25", 20.0,
                                 codec=("-c:v", "libx264", "-preset", "ultrafast", "-g", "25"))
    return clean, synthetic.zeroed_middle_copy(clean, str(d / "corrupt.mp4"))


def test_a_corrupt_stretch_in_the_middle_is_decoded_past(corrupt_middle, caplog):
    """The packets that do not decode are passed over, the frames after them placed by their timestamps: every
    frame before the stretch and from the next keyframe after it is the clean file's, the frames lost are held (the
    frame shown before them), and a warning says how many. Before, the clip ended at the stretch (a broken tail:
    half the film unseen, and nothing said so)."""
    from pipeline.media import damage

    clean, bad = corrupt_middle
    every = Frames(tuple(range(500)))
    want = decode_video(clean, [every], available_backends(("pyav",))).frames
    before = damage.counts()["video_frames_lost"]
    with caplog.at_level(logging.WARNING, logger="pipeline.video.decoders"):
        got = decode_video(bad, [every], available_backends(ALL))  # decord and torchcodec stop at it
    assert got.backend == "pyav" and got.meta.num_frames == 500 and got.frames.shape[0] == 500
    differ = [k for k in range(500) if not torch.equal(got.frames[k], want[k])]
    first, last = differ[0], differ[-1]
    assert 200 < first and last < 300 and (last + 1) % 25 == 0  # sound again from the next keyframe
    held = [k for k in differ if torch.equal(got.frames[k], got.frames[k - 1])]
    assert held, "the frames lost are the frame before them"
    (record,) = [r for r in caplog.records if "did not decode" in r.getMessage()]
    assert f"{len(held)} frames lost in the middle of the clip" in record.getMessage()
    assert "(item " not in record.getMessage()  # no item: the file alone
    assert damage.counts()["video_frames_lost"] == before + len(held)  # the metrics' corrupt_media


def test_a_seeking_decode_that_meets_a_corrupt_stretch_decodes_from_the_keyframe_before(corrupt_middle, monkeypatch):
    """Frames wanted across the stretch in the middle of a film (a stream's group): the decode in order starts at
    the keyframe before the first of them (225: one every 25 frames), not at the file's start, and gives the frames
    a whole decode gives."""
    from pipeline.video.decoders import PyAVBackend

    _, bad = corrupt_middle
    starts, real = [], PyAVBackend._decode_in_order

    def recorded(self, path, indices, size, stop=None, prepare=None, index_of=None, start=0, hw=None):
        starts.append(start)
        return real(self, path, indices, size, stop, prepare, index_of, start, hw)

    monkeypatch.setattr(PyAVBackend, "_decode_in_order", recorded)
    some = decode_video(bad, [Frames(tuple(range(240, 290)))], available_backends(("pyav",)))
    assert starts == [225]
    whole = decode_video(bad, [Frames(tuple(range(500)))], available_backends(("pyav",)))
    assert torch.equal(some.frames, whole.frames[240:290]) and starts == [225, 0]


def test_a_corrupt_stretchs_warning_names_the_item(corrupt_middle, caplog):
    """The rank's consumer sets the item it works on (``damage.current_item``); the decode thread runs in a copy of
    its context, so the warning names the manifest id, not only the node cache's file name."""
    import contextvars

    from pipeline.media import damage

    _, bad = corrupt_middle

    def as_the_consumer():
        damage.current_item.set("clip-0042")
        decode_video(bad, [Frames(tuple(range(240, 290)))], available_backends(("pyav",)))

    with caplog.at_level(logging.WARNING, logger="pipeline.video.decoders"):
        contextvars.copy_context().run(as_the_consumer)
    assert any(f"{bad} (item clip-0042)" in r.getMessage() for r in caplog.records)
    assert damage.current_item.get() is None  # set in the consumer's context only


def test_an_items_tally_counts_a_frame_two_decodes_lose_once(corrupt_middle):
    """The item's row says how many frames its decodes lost (``result_info.video_frames_lost``): two decodes of the
    same stretch (a first pass and a stream's group over it) lose the same frames, which the item counts once and the
    process's ``corrupt_media`` twice (it counts decoding work); a decode in another item's context does not touch
    this item's tally, and a decode outside any item touches none."""
    import contextvars

    from pipeline.media import damage

    _, bad = corrupt_middle
    mine, other = damage.ItemDamage(), damage.ItemDamage()
    before = damage.counts()["video_frames_lost"]

    def as_the_consumer(tally, requests):
        damage.current_damage.set(tally)
        for request in requests:
            decode_video(bad, [request], available_backends(("pyav",)))

    contextvars.copy_context().run(as_the_consumer, mine, [Frames(tuple(range(500))), Frames(tuple(range(240, 290)))])
    lost = mine.video_frames_lost
    assert lost > 0 and damage.counts()["video_frames_lost"] == before + 2 * lost
    clean, _ = corrupt_middle  # the span: from the first frame held to the keyframe where the pictures are sound
    every = Frames(tuple(range(500)))
    want = decode_video(clean, [every], available_backends(("pyav",))).frames
    got = decode_video(bad, [every], available_backends(("pyav",))).frames
    differ = [k for k in range(500) if not torch.equal(got[k], want[k])]
    held = [k for k in differ if torch.equal(got[k], got[k - 1])]
    (span,) = mine.spans  # the two decodes' spans of the one stretch, merged
    assert span["stream"] == "video" and span["start_s"] == pytest.approx(held[0] / 25, abs=1e-6)
    assert span["end_s"] == pytest.approx((differ[-1] + 1) / 25, abs=1e-6) and (differ[-1] + 1) % 25 == 0
    assert mine.audio_packets_lost is None  # no audio decoded: null in the row, not 0
    contextvars.copy_context().run(as_the_consumer, other, [Frames(tuple(range(200)))])  # before the stretch
    assert other.video_frames_lost == 0 and other.spans == [] and mine.video_frames_lost == lost
    decode_video(bad, [Frames(tuple(range(500)))], available_backends(("pyav",)))
    assert damage.current_damage.get() is None and mine.video_frames_lost == lost


def test_a_targeted_decode_that_its_backend_fails_falls_back_like_a_first_decode(corrupt_middle):
    """A scene cut's frames or a stream's group across a corrupt stretch: the backend that decoded the item (decord
    here, whose frames lay outside the stretch) fails on them, and the next backends are tried, as in a first
    decode; before, the item failed."""
    from pipeline.config import VideoConfig
    from pipeline.media.item import MediaItem

    _, bad = corrupt_middle
    item = MediaItem("x", bad, 0, [Uniform(2)], VideoConfig(), available_backends(ALL))
    first = item.video().backend
    more = item.more_frames(Frames(tuple(range(240, 290))))
    assert more.frames.shape[0] == 50 and more.backend == "pyav" != first


def test_a_film_with_a_corrupt_stretch_is_read_all_through_past_it(corrupt_middle):
    """The static filter and the scene cuts reading the clip all through (a long clip: over their caps): the group
    across the stretch is decoded by PyAV, and the windows go on to the end; before, the item failed (the group's
    backend alone was tried)."""
    from pipeline.config import FilterSpec, VideoConfig
    from pipeline.filters import build_filters, frame_requests_of
    from pipeline.filters.base import FilterContext
    from pipeline.media.item import MediaItem

    _, bad = corrupt_middle
    filters = build_filters((FilterSpec("static", "static", True, {"max_frames": 8}),
                             FilterSpec("scene_cuts", "scene_cuts", True, {"max_frames": 8}),
                             FilterSpec("sharpness", "sharpness")))
    item = MediaItem("x", bad, 0, frame_requests_of(filters), VideoConfig(), available_backends(ALL))
    static, cuts, _ = (f.apply(item, FilterContext("cpu", None)) for f in filters)
    assert item.video().plan.indices and item.video().backend != "pyav"  # the sharpness frames: outside the stretch
    assert static["windows"][-1]["end_s"] == pytest.approx(20.0, abs=0.3) and static["sample_fps"] > 3
    assert cuts["sample_fps"] > 3 and cuts["count"] <= 2  # one clip of a moving pattern (a held stretch at most)


@pytest.fixture(scope="module")
def corrupt_avi(tmp_path_factory):
    """20 s of MPEG-4 part 2 (DivX's and XviD's codec) with B-frames and PCM sound in AVI, a keyframe every 25
    frames, and the same file with 2% of its bytes zeroed at its middle: FFmpeg's AVI demuxer passes over the
    chunks there without an error (it resynchronises at the next chunk header)."""
    d = tmp_path_factory.mktemp("corrupt_avi")
    clean = str(d / "clean.avi")
    synthetic._ffmpeg(["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=20", "-f", "lavfi", "-i",
                       "sine=duration=20", "-c:v", "mpeg4", "-q:v", "4", "-bf", "2", "-g", "25", "-c:a", "pcm_s16le",
                       clean])
    return clean, synthetic.zeroed_middle_copy(clean, str(d / "corrupt.avi"))


def test_an_avis_chunks_passed_over_in_a_corrupt_stretch_keep_the_frames_after_them_in_place(corrupt_avi, caplog):
    """The demuxer times an AVI's packets by counting chunks, so after a stretch it passed over every frame came
    early by the time the stretch held (0.4 s here), and the file's last 0.4 s were reported lost as a broken tail.
    Timed by the file's index (``ChunkClock``), each frame keeps its time: every frame is the clean file's frame of
    that time, but for those from the stretch to the next keyframe (decoded from lost references); the frames lost
    are the chunks the index lists and nothing demuxed, their span in the middle, and none at the end. A B-frame
    the decoder drops for its lost reference is held (placed by count, every frame after it came a place early).
    A decode that seeks gives the frames a decode in order gives."""
    from pipeline.media import damage

    clean, bad = corrupt_avi
    pyav = available_backends(("pyav",))
    want = decode_video(clean, [Frames(tuple(range(500)))], pyav)
    by_time = {round(float(t), 4): k for k, t in enumerate(want.meta.timestamps)}
    tally, before = damage.ItemDamage(), damage.counts()["video_frames_lost"]
    token = damage.current_damage.set(tally)
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.video.decoders"):
            n = decode_video(bad, [Uniform(4)], pyav).meta.num_frames
            got = decode_video(bad, [Frames(tuple(range(n)))], pyav)
    finally:
        damage.current_damage.reset(token)
    chunks = sum(b - a for a, b in got.meta.lost_chunks)
    assert want.meta.num_frames == 500 and 0 < chunks and n == 500 - chunks and got.meta.lost_tail == 0
    times = [round(float(t), 4) for t in got.meta.timestamps]
    assert set(times) <= set(by_time) and times[-1] == round(float(want.meta.timestamps[-1]), 4)
    differ = [t for k, t in enumerate(times) if not torch.equal(got.frames[k], want.frames[by_time[t]])]
    assert differ and 7 < differ[0] and differ[-1] < 13 and differ[-1] - differ[0] < 2  # the stretch, to a keyframe
    assert tally.video_frames_lost >= chunks and damage.counts()["video_frames_lost"] > before
    (span,) = tally.spans  # one stretch, in the middle: no broken tail
    assert span["stream"] == "video" and span["start_s"] <= differ[0] and differ[-1] < span["end_s"] < 13
    assert any(f"{chunks} frames of {bad} were lost in the middle" in r.getMessage() for r in caplog.records)
    some = tuple(range(n // 2 - 40, n, 29))  # across the stretch and after it: the seeking decode
    assert torch.equal(decode_video(bad, [Frames(some)], pyav).frames, got.frames[list(some)])
    whole = decode_video(clean, [Frames(tuple(range(500)))], pyav)  # a clean AVI: the index agrees with the count
    assert whole.meta.lost_chunks == () and np.allclose(whole.meta.timestamps, np.arange(500) / 25)


@pytest.fixture(scope="module")
def h264_avi(tmp_path_factory):
    """40 s of H.264 with B-frames and PCM sound in AVI (a keyframe every 25 frames), whose frames come out of the
    decoder with their packets' timestamps in decode order: they cannot name their places."""
    d = tmp_path_factory.mktemp("h264_avi")
    path = str(d / "clean.avi")
    synthetic._ffmpeg(["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=40", "-f", "lavfi", "-i",
                       "sine=duration=40", "-c:v", "libx264", "-bf", "2", "-g", "25", "-c:a", "pcm_s16le", path])
    return path


def _garbled_packets(src: str, dst: str, first: int, count: int) -> str:
    """A copy of ``src`` with the data of its video packets ``first`` to ``first + count`` random (their chunks'
    headers whole): packets that demux and do not decode."""
    import random

    import av

    data = bytearray(open(src, "rb").read())
    with av.open(src) as c:
        packets = [(p.pos, p.size) for p in c.demux(c.streams.video[0]) if p.size]
    rng = random.Random(7)
    for pos, size in packets[first:first + count]:
        data[pos:pos + size] = rng.randbytes(size)
    open(dst, "wb").write(data)
    return dst


@pytest.mark.parametrize("damage_kind", ["zeroed", "garbled"])
def test_h264_in_avi_after_a_corrupt_stretch_is_in_place_again_from_the_next_keyframe(h264_avi, tmp_path,
                                                                                   damage_kind):
    """H.264 in AVI is placed by count (its frames' timestamps are the packets' decode order), so after chunks the
    demuxer passed over, a frame the decoder drops moved every frame after it a place early, and packets that do not
    decode ended the clip there (a false broken tail: half the clip unseen). The first keyframe after the stretch
    names its place (nothing shown before it decodes after it): from there every frame is the clean file's of the
    same time; the frames between are the frame shown before them, counted and spanned."""
    from pipeline.media import damage

    pyav = available_backends(("pyav",))
    want = decode_video(h264_avi, [Frames(tuple(range(1000)))], pyav)
    by_time = {round(float(t), 4): k for k, t in enumerate(want.meta.timestamps)}
    bad = str(tmp_path / "bad.avi")
    if damage_kind == "zeroed":
        synthetic.zeroed_middle_copy(h264_avi, bad)
    else:
        _garbled_packets(h264_avi, bad, 505, 6)
    tally = damage.ItemDamage()
    token = damage.current_damage.set(tally)
    try:
        n = decode_video(bad, [Uniform(8)], pyav).meta.num_frames
        got = decode_video(bad, [Frames(tuple(range(n)))], pyav)
    finally:
        damage.current_damage.reset(token)
    assert n == 1000 - sum(b - a for a, b in got.meta.lost_chunks) and n > 950 and got.meta.lost_tail == 0
    times = [round(float(t), 4) for t in got.meta.timestamps]
    differ = [t for k, t in enumerate(times) if not torch.equal(got.frames[k], want.frames[by_time[t]])]
    assert differ and 18 < differ[0] and differ[-1] < 23 and differ[-1] - differ[0] < 2  # to the next keyframe
    assert tally.video_frames_lost > 0 and all(s["end_s"] < 23 for s in tally.spans)  # none at the end
    assert tally.spans[0]["start_s"] <= differ[0] + 0.12 and differ[-1] < tally.spans[-1]["end_s"]


def test_h264_in_avi_without_a_keyframe_after_the_stretch_ends_there(tmp_path):
    """One keyframe, at the start: nothing after packets that do not decode can name its place, and the frames after
    them are passed over no longer than the longest stretch between two keyframes of the file (a film would else be
    decoded to its end for nothing): the clip ends at the error, a broken tail, as before."""
    from pipeline.media import damage

    clean = str(tmp_path / "clean.avi")
    synthetic._ffmpeg(["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=8", "-c:v", "libx264", "-bf",
                       "2", "-g", "1000", clean])
    bad = _garbled_packets(clean, str(tmp_path / "bad.avi"), 100, 3)
    tally = damage.ItemDamage()
    token = damage.current_damage.set(tally)
    try:
        v = decode_video(bad, [Uniform(8)], available_backends(("pyav",)))
    finally:
        damage.current_damage.reset(token)
    assert 90 <= v.meta.num_frames <= 102 and tally.video_frames_lost == 200 - v.meta.num_frames
    (span,) = tally.spans
    assert span["start_s"] == pytest.approx(v.meta.num_frames / 25) and span["end_s"] == pytest.approx(8.0)


def test_an_avis_sound_after_a_corrupt_stretch_keeps_its_place_and_a_clean_ones_ends_where_it_ends(corrupt_avi,
                                                                                                   tmp_path):
    """The AVI's PCM sound after the stretch is where the clean file's is (the chunks passed over are silence, the
    row's audio span), and the sound of a clean camera AVI that ends a second before its pictures is not called cut
    short: its header's length counts samples, which were compared with packets (a span from 3 s to 4 s before)."""
    from pipeline.audio.decode import decode_audio
    from pipeline.media import damage

    clean, bad = corrupt_avi
    ref = decode_audio(clean)
    tally = damage.ItemDamage()
    token = damage.current_damage.set(tally)
    try:
        got = decode_audio(bad)
    finally:
        damage.current_damage.reset(token)
    assert len(got) == len(ref) and tally.audio_packets_lost > 0
    (span,) = tally.spans
    a, b = round(span["start_s"] * 16000), round(span["end_s"] * 16000)
    assert 8 * 16000 < a < b < 12 * 16000 and not got[a + 1:b - 1].any()
    assert np.abs(got[b + 1600:] - ref[b + 1600:]).max() < 0.02  # a sample's phase at most: in step
    camera = str(tmp_path / "camera.avi")
    synthetic._ffmpeg(["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=4", "-f", "lavfi", "-i",
                       "sine=duration=3", "-c:v", "mjpeg", "-c:a", "pcm_s16le", camera])
    tally = damage.ItemDamage()
    token = damage.current_damage.set(tally)
    try:
        assert len(decode_audio(camera)) == 3 * 16000
    finally:
        damage.current_damage.reset(token)
    assert tally.audio_packets_lost == 0 and tally.spans == []


def test_every_backend_failing_is_one_decode_error(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(DecodeError, match="every video backend failed") as e:
        decode_video(str(bad), [Uniform(4)], available_backends(ALL))
    for name in [b.name for b in available_backends(ALL)]:
        assert name in str(e.value)


def test_caps_refuse_hostile_plans(clips):
    b = available_backends(("pyav",))
    with pytest.raises(DecodeError, match="max_frames"):
        decode_video(clips["h264"], [EveryK(1)], b, max_frames=10)
    with pytest.raises(DecodeError, match="max_pixels"):
        decode_video(clips["h264"], [Uniform(2)], b, max_pixels=320 * 239)
    with pytest.raises(DecodeError, match=r"10 frames of 320x240 would take 0.0 GiB, over video.max_decoded_bytes"):
        decode_video(clips["h264"], [Uniform(10)], b, max_bytes=10 * 320 * 240 * 3 - 1)
    small = decode_video(clips["h264"], [Uniform(10)], b, max_bytes=10 * 320 * 240 * 3 - 1, max_side=160)
    assert small.frames.shape == (10, 120, 160, 3)  # decoding smaller fits under the same cap


def test_an_item_over_max_pixels_fails_before_any_backend_opens_it(clips):
    """The probe's size decides: before, every backend opened the file in turn (decord decoding a full frame of it,
    768 MB for a 16K x 16K picture) to find the same."""
    from pipeline.config import VideoConfig
    from pipeline.media.item import MediaItem

    opened = []

    class Watched:
        name = "watched"

        def __init__(self):
            self.real = available_backends(("pyav",))[0]

        def meta(self, path, stop=None):
            opened.append(path)
            return self.real.meta(path, stop=stop)

        def decode(self, *args, stop=None):
            return self.real.decode(*args, stop=stop)

    item = MediaItem("x", clips["h264"], 0, [Uniform(2)], VideoConfig(max_pixels=320 * 239), [Watched()])
    for _ in range(2):  # every filter of the item sees the one error
        with pytest.raises(DecodeError, match=r"320x240 is over video.max_pixels=76480"):
            item.video()
    assert opened == []
    assert MediaItem("x", clips["h264"], 0, [Uniform(2)], VideoConfig(), [Watched()]).video().frames.shape[0] == 2
    assert opened == [clips["h264"]]


def test_decode_timeout(clips):
    class SlowBackend:  # the backend interface, with a decode that hangs
        name = "slow"

        def meta(self, path, stop=None):
            return available_backends(("pyav",))[0].meta(path)

        def decode(self, *args, stop=None):
            time.sleep(3)

    start = time.time()
    with pytest.raises(DecodeTimeout):
        decode_video(clips["h264"], [Uniform(2)], [SlowBackend()], timeout_s=0.5)
    assert time.time() - start < 2


class _StopAfter(threading.Event):
    """A stop event that reads set from its ``n``-th look on: where a backend looks, and how soon it stops."""

    def __init__(self, n: int):
        super().__init__()
        self.looks, self.n = 0, n

    def is_set(self) -> bool:
        self.looks += 1
        return self.looks >= self.n


@pytest.mark.parametrize("name", ALL)
def test_backends_stop_mid_decode(clips, name, monkeypatch):
    # Oracle: without a stop the decode returns all 50 frames; with one that turns set at the backend's second
    # look, it raises DecodeCancelled, so it looked between frames (PyAV) or slices (decord, torchcodec: 16 frames
    # of 320x240 a slice here) rather than decoding on for a caller that gave up.
    import pipeline.video.decoders as decoders

    monkeypatch.setattr(decoders, "DECODE_SLICE_BYTES", 16 * 320 * 240 * 3)
    b = available_backends((name,))[0]
    n = b.meta(clips["h264"]).num_frames
    assert n == 50
    whole = b.decode(clips["h264"], list(range(n)), (320, 240), "cpu", False, stop=threading.Event())
    assert whole.shape[0] == n
    stop = _StopAfter(2)
    with pytest.raises(DecodeCancelled):
        b.decode(clips["h264"], list(range(n)), (320, 240), "cpu", False, stop=stop)
    assert stop.looks == 2
    b.meta(clips["h264"])  # decord hands its reader from meta to decode
    with pytest.raises(DecodeCancelled):  # set before it starts: not a frame decoded, whatever the backend
        b.decode(clips["h264"], [0, 1], (320, 240), "cpu", False, stop=_StopAfter(1))


def test_a_decode_call_holds_about_as_many_bytes_whatever_the_size():
    """A CPU decode call (one native step a given-up decode cannot stop inside) holds ``DECODE_SLICE_BYTES`` of
    frames: as many frames of 1080p as the 32 a call before, more of smaller ones (a request of 61 frames of 720p is
    one call, not copied again into one tensor), fewer of 4K, and at most ``DECODE_SLICE_MAX``."""
    from pipeline.video.decoders import DECODE_SLICE_MAX, decode_slice

    assert decode_slice((1920, 1080)) == 32 and decode_slice((1280, 720)) == 72 and decode_slice((3840, 2160)) == 8
    assert decode_slice((426, 240)) == DECODE_SLICE_MAX == 512 and decode_slice((7680, 4320)) == 2


@pytest.fixture(scope="module")
def slow_clip(tmp_path_factory):
    # 250 frames of 720p: decoded whole, far longer than the 20 ms deadline below and the watchdog's poll
    # (``GIVEN_UP_POLL_S``, 0.25 s) on any machine (75 frames took about that here, and the test given up once
    # found the decode done)
    return synthetic.lavfi_clip(str(tmp_path_factory.mktemp("slow") / "slow.mp4"),
                                source="testsrc2=size=1280x720:rate=25", seconds=10.0)


@pytest.mark.parametrize("name", ALL)
def test_timed_out_decode_stops(slow_clip, name, caplog):
    # Before, a timed-out decode ran on to its end on a pool thread (measured: a 60 s 720p clip decoded on for
    # seconds after the item had failed, a core busy): now it unwinds at its next frame or slice.
    caplog.set_level(logging.DEBUG, logger="pipeline.video.decoders")
    with pytest.raises(DecodeTimeout, match="given up"):
        decode_video(slow_clip, [EveryK(1)], available_backends((name,)), timeout_s=0.02)
    deadline = time.monotonic() + 10
    while decodes_past_deadline() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert decodes_past_deadline() == 0
    assert "a decode given up at its deadline stopped" in caplog.text


def test_a_decode_stops_when_its_item_is_given_up(slow_clip):
    # The rank's watchdog gives an item up (runtime.item_timeout_s) on its own clock: the decode stops then, well
    # before its own deadline, instead of going on for a row nobody writes.
    given_up = threading.Event()
    threading.Timer(0.05, given_up.set).start()
    start = time.monotonic()
    with pytest.raises(ItemTimeout, match="given up"):
        decode_video(slow_clip, [EveryK(1)], available_backends(("pyav",)), timeout_s=60, given_up=given_up)
    assert time.monotonic() - start < 5
    while decodes_past_deadline() and time.monotonic() - start < 10:
        time.sleep(0.02)
    assert decodes_past_deadline() == 0


def test_stuck_decodes_do_not_starve_others(clips):
    # Before, decodes ran on a pool of 16 threads: 16 decodes stuck in native code (which no stop reaches) held
    # them all, and every later decode of the process waited for a free one until its own deadline and failed.
    release = threading.Event()

    class Stuck:
        name = "stuck"

        def meta(self, path, stop=None):
            release.wait()  # ignores ``stop``, as a native call that never returns would

    for _ in range(20):
        with pytest.raises(DecodeTimeout):
            decode_video(clips["h264"], [Uniform(2)], [Stuck()], timeout_s=0.01)
    try:
        assert decodes_past_deadline() == 20
        v = decode_video(clips["h264"], [Uniform(2)], available_backends(("pyav",)), timeout_s=5)
        assert v.frames.shape[0] == 2
    finally:
        release.set()
    deadline = time.monotonic() + 10
    while decodes_past_deadline() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert decodes_past_deadline() == 0


def test_downscaled_decode_reports_scale(clips):
    v = decode_video(clips["h264"], [Uniform(2)], available_backends(ALL), max_side=160)
    assert v.frames.shape[1:3] == (120, 160) and v.scale == (2.0, 2.0)


@pytest.fixture(scope="module")
def rotated(tmp_path_factory):
    d = tmp_path_factory.mktemp("rotated")
    upright = synthetic.lavfi_clip(str(d / "upright.mp4"), seconds=1.0)  # testsrc2: asymmetric, every turn differs
    return {deg: synthetic.rotated_copy(upright, str(d / f"rot{deg}.mp4"), deg) for deg in (90, 180, 270)}


def _ffmpeg_upright_frames(path: str, width: int, height: int) -> torch.Tensor:
    """The oracle: the ffmpeg CLI applies the display rotation by default (what players show)."""
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", path, "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, check=True).stdout
    return torch.from_numpy(np.frombuffer(raw, np.uint8).copy().reshape(-1, height, width, 3))


@pytest.mark.parametrize("degrees", [90, 180, 270])
@pytest.mark.parametrize("name", ALL)
def test_rotated_phone_video_decodes_upright_on_every_backend(rotated, degrees, name):
    backends = [b for b in available_backends(ALL) if b.name == name]
    if not backends:
        pytest.skip(f"{name} is not installed here")
    w, h = (240, 320) if degrees % 180 else (320, 240)
    ref = _ffmpeg_upright_frames(rotated[degrees], w, h)
    v = decode_video(rotated[degrees], [Uniform(6)], backends)
    assert v.backend == name and v.frames.shape[1:] == (h, w, 3) and (v.meta.width, v.meta.height) == (w, h)
    assert (v.frames.float() - ref[v.plan.indices].float()).abs().mean() < 1.0  # a wrong turn differs by ~200
    small = decode_video(rotated[degrees], [Uniform(6)], backends, max_side=160)
    assert small.frames.shape[1:] == (h // 2, w // 2, 3) and small.scale == (2.0, 2.0)
    expected = resize_frames(ref[small.plan.indices], (w // 2, h // 2))
    assert (small.frames.float() - expected.float()).abs().mean() < 8.0  # scalers differ by ~4 grey levels


def test_probe_reports_the_display_size_and_rotation(rotated):
    from pipeline.media.probe import probe_media

    assert probe_media(rotated[90]).video.rotation == 90
    v = probe_media(rotated[270]).video
    assert (v.width, v.height, v.rotation) == (240, 320, 270)
    v = probe_media(rotated[180]).video
    assert (v.width, v.height, v.rotation) == (320, 240, 180)


def test_missing_backend_package_falls_back(monkeypatch):
    import pipeline.video.decoders as dec

    class Missing:
        def __init__(self):
            raise ImportError("No module named 'decord'")

    monkeypatch.setitem(dec.BACKENDS, "decord", Missing)
    assert [b.name for b in dec.available_backends(ALL)] == ["torchcodec", "pyav"]
    monkeypatch.setitem(dec.BACKENDS, "pyav", Missing)
    monkeypatch.setitem(dec.BACKENDS, "torchcodec", Missing)
    from pipeline.errors import DependencyError

    with pytest.raises(DependencyError, match="pip install"):
        dec.available_backends(ALL)


requests = st.one_of(
    st.builds(Uniform, st.integers(1, 40)),
    st.builds(EveryK, st.integers(1, 30), st.integers(1, 50)),
    st.builds(AtFps, st.floats(0.5, 30), st.integers(1, 50)),
    st.builds(Windows, st.floats(0.2, 5), st.floats(0.1, 5), st.integers(1, 16)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(requests, min_size=1, max_size=5), st.integers(1, 2000), st.floats(1, 60))
def test_plan_is_the_union_and_views_map_back(reqs, num_frames, fps):
    # Oracle: plan.indices[positions[r][w]] equals the request's own indices, each index decoded once.
    plan = make_plan(reqs, num_frames, fps)
    assert plan.indices == sorted(set(plan.indices)) and all(0 <= i < num_frames for i in plan.indices)
    for r in reqs:
        own = request_indices(r, num_frames, fps)
        assert [[plan.indices[p] for p in pos] for pos in plan.positions[r]] == own


@settings(max_examples=200, deadline=None)
@given(st.lists(requests, min_size=1, max_size=5),
       st.lists(st.floats(0.005, 0.5), min_size=2, max_size=400), st.floats(1, 60))
def test_variable_rate_plan_is_the_union_and_times_hold(reqs, intervals, fps):
    # Oracle: with any frame timing, views map back to each request's own indices, and a window's frames lie
    # inside the window in time.
    from pipeline.video.sampling import clip_duration, window_bounds

    ts = np.concatenate([[0.0], np.cumsum(intervals[:-1])])
    n = len(ts)
    plan = make_plan(reqs, n, fps, ts)
    assert plan.indices == sorted(set(plan.indices)) and all(0 <= i < n for i in plan.indices)
    for r in reqs:
        own = request_indices(r, n, fps, ts)
        assert [[plan.indices[p] for p in pos] for pos in plan.positions[r]] == own
        if isinstance(r, Windows) and variable_rate(ts, fps):
            for (a, b), idx in zip(window_bounds(r, n, fps, ts), own):
                # the frame on screen at a time inside the window: it starts before the window ends, and it is
                # still on screen (the next frame, or the clip's end, comes later) after the window starts
                ends = np.append(ts[1:], clip_duration(n, fps, ts))[idx]
                assert (ts[idx] < b + 1e-9).all() and (ends > a - 1e-9).all()


@pytest.mark.parametrize("timed", [False, True])
def test_a_rate_request_over_its_cap_spreads_over_the_clip(timed):
    """``AtFps`` past ``max_count`` lowers its rate, evenly, to cover the whole clip; under it, it keeps its rate."""
    fps, n = 25.0, 1000  # 40 s
    ts = np.arange(n) / fps
    if timed:  # a variable rate: the second half at 12.5 frames a second, so frames are placed by time
        ts = np.concatenate([ts[:500], ts[499] + np.arange(1, 501) / 12.5])
    (idx,) = request_indices(AtFps(4.0, 40), n, fps, ts if timed else None)
    times = ts[idx]
    duration = ts[-1] + (1 / 12.5 if timed else 1 / fps)
    assert len(idx) == 40 and times[0] == 0 and times[-1] >= duration * 39 / 40 - 0.1
    assert np.ptp(np.diff(times)) <= 0.1  # evenly spaced (to a frame)
    (short,) = request_indices(AtFps(4.0, 400), n, fps, ts if timed else None)
    assert np.diff(ts[short]).max() <= 0.25 + 0.08 and len(short) >= 4 * 39
    # not spread: past the cap, none (its filter samples the rate itself); within it, as asked
    assert request_indices(AtFps(4.0, 40, spread=False), n, fps, ts if timed else None) == [[]]
    assert request_indices(AtFps(4.0, 400, spread=False), n, fps, ts if timed else None) == [short]


def test_windows_and_every_kth_over_their_cap_spread_over_the_clip():
    """``Windows`` past ``max_windows`` get the stride that puts the last at the end; ``EveryK`` past ``max_count``
    the k that reaches the end. Under the caps both are as asked."""
    from pipeline.video.sampling import window_bounds

    assert window_bounds(Windows(4.0, 2.0, 8, max_windows=5), 1000, 25.0) == [
        (0.0, 4.0), (9.0, 13.0), (18.0, 22.0), (27.0, 31.0), (36.0, 40.0)]
    assert len(window_bounds(Windows(4.0, 2.0, 8, max_windows=64), 1000, 25.0)) == 19  # 0..36 every 2 s
    assert window_bounds(Windows(4.0, 2.0, 8, start_s=10.0, end_s=30.0, max_windows=3), 1000, 25.0) == [
        (10.0, 14.0), (18.0, 22.0), (26.0, 30.0)]
    # not spread (a filter that reads them all through instead): none past the cap, as asked within it
    assert window_bounds(Windows(4.0, 2.0, 8, max_windows=5, spread=False), 1000, 25.0) == []
    assert request_indices(Windows(4.0, 2.0, 8, max_windows=5, spread=False), 1000, 25.0) == []
    assert len(window_bounds(Windows(4.0, 2.0, 8, max_windows=19, spread=False), 1000, 25.0)) == 19
    (idx,) = request_indices(EveryK(10, 8), 1000, 25.0)
    assert idx == list(range(0, 1000, 125))
    (idx,) = request_indices(EveryK(10, 512), 1000, 25.0)
    assert idx == list(range(0, 1000, 10))


def test_nvdec_puts_torchcodec_and_pyav_first_and_keeps_the_rest_as_fallbacks():
    assert backend_order(ALL, nvdec=True) == ("torchcodec", "pyav", "decord")
    assert backend_order(("pyav", "torchcodec"), nvdec=True) == ("torchcodec", "pyav")
    assert backend_order(("decord", "pyav", "pillow"), nvdec=True) == ("pyav", "decord", "pillow")
    assert backend_order(ALL, nvdec=False) == ALL  # CPU decode, or a CPU rank: the configured order


@pytest.mark.parametrize("pix_fmt,color_range", [("yuv420p", "tv"), ("yuvj420p", "pc")])
def test_nvdecs_semi_planar_frames_convert_as_the_cpu_decodes_frames(tmp_path, pix_fmt, color_range):
    """NVDEC hands over NV12 where a CPU decoder gives yuv420p (the same samples, chroma interleaved). Those frames,
    made here from a CPU decode's by FFmpeg (an exact repacking), give the CPU decode's RGB bytes at the source
    size and resized, limited and full range; converted as NV12 they would not (the gap seen on an H200)."""
    import av
    import numpy as np

    from pipeline.media import synthetic
    from pipeline.video.decoders import _upright_rgb

    path = synthetic.lavfi_clip(str(tmp_path / "c.mp4"), "testsrc2=size=320x240:rate=25", 0.2, pix_fmt=pix_fmt,
                                extra=("-color_range", color_range))
    with av.open(path) as c:
        frames = [f for f in c.decode(video=0)][:3]
    for f in frames:
        nv12 = f.reformat(format="nv12")
        assert nv12.format.name == "nv12" and nv12.color_range == f.color_range
        for size in ((320, 240), (160, 120)):
            assert np.array_equal(_upright_rgb(nv12, size), _upright_rgb(f, size))
        direct = nv12.to_ndarray(format="rgb24").astype(int)
        assert np.abs(direct - f.to_ndarray(format="rgb24")).max() > 50  # what the repacking avoids


def test_pyav_nvdec_where_there_is_no_gpu_decodes_on_the_cpu_and_says_why(clips, monkeypatch, caplog):
    """PyAV asked for NVDEC on a machine without a GPU (this one: FFmpeg cannot create the CUDA device): the frames
    are the CPU decode's, on the CPU, labelled ``pyav`` (not ``pyav-nvdec``), and the reason is logged once."""
    import logging

    import pipeline.video.decoders as dec

    monkeypatch.setattr(dec, "_NVDEC_FALLBACKS", set())
    (backend,) = available_backends(("pyav",))
    ref = decode_video(clips["h264"], [Uniform(8)], [backend], max_side=160)
    with caplog.at_level(logging.WARNING, logger="pipeline.video.decoders"):
        got = [decode_video(clips["h264"], [Uniform(8)], [backend], device="cuda:0", max_side=160) for _ in range(2)]
    for v in got:
        assert v.backend == "pyav" and v.frames.device.type == "cpu" and torch.equal(v.frames, ref.frames)
    why = [r.getMessage() for r in caplog.records if "instead of NVDEC" in r.getMessage()]
    assert len(why) == 1 and why[0].startswith("decoded on the CPU instead of NVDEC: pyav: "), why


def test_cpu_rank_ignores_nvdec_and_decodes_with_the_configured_order(tmp_path, clips):
    from pipeline.config import VideoConfig
    from pipeline.media.item import MediaItem

    names = [b.name for b in available_backends(ALL)]
    item = MediaItem("x", clips["h264"], 0, [Uniform(4)], VideoConfig(decode_device="cuda"),
                     available_backends(backend_order(ALL, nvdec=False)))
    v = item.video()
    assert v.frames.device.type == "cpu" and item.decode_backend == names[0]  # no "-nvdec" label off the GPU


def test_device_resize_matches_ffmpegs_scaler(clips):
    """The resize behind NVDEC decode (on the GPU there), run here on CPU frames: within a grey level or two of
    the FFmpeg scaler that the CPU decode path uses, on a downscale and an odd-sized upscale."""
    src = decode_video(clips["h264"], [Uniform(6)], available_backends(("torchcodec",)))
    # bounds measured at 1.55 and 0.02; a nearest-neighbour resize gives 2.3 and 4.1, one without antialiasing 0.8
    for max_side, size, bound in ((160, (160, 120), 1.8), (250, (250, 188), 0.3)):
        ffmpeg = decode_video(clips["h264"], [Uniform(6)], available_backends(("torchcodec",)), max_side=max_side)
        ours = resize_frames(src.frames, size)
        assert ours.shape == ffmpeg.frames.shape and ours.dtype == torch.uint8
        assert (ours.float() - ffmpeg.frames.float()).abs().mean() < bound, max_side


def test_nvdec_path_slices_resizes_and_owns_up_to_a_cpu_fallback(clips, monkeypatch, caplog):
    """torchcodec's NVDEC branch with the decoder forced onto the CPU (no GPU here) and reporting what torchcodec
    reports when NVDEC cannot take a stream: frames decoded in slices and resized like the CPU path, returned on the
    CPU, labelled ``torchcodec`` rather than ``torchcodec-nvdec``, and the reason logged once per process."""
    import logging

    import torchcodec.decoders

    import pipeline.video.decoders as dec
    import pipeline.video.preprocess as pre

    real = torchcodec.decoders.VideoDecoder

    class NoNvdec(real):
        def __init__(self, path, **kw):
            device = kw.pop("device", None)  # None: the metadata read, on the CPU
            assert device is None or (device.startswith("cuda") and "transforms" not in kw)  # resized after decode
            super().__init__(path, **kw)

        @property
        def cpu_fallback(self):
            return "CPU fallback: video not supported by NVDEC"

    monkeypatch.setattr(torchcodec.decoders, "VideoDecoder", NoNvdec)
    monkeypatch.setattr(dec, "NVDEC_SLICE", 3)  # 8 frames in 3 slices ...
    monkeypatch.setattr(pre, "GROUP_BYTES", 320 * 240 * 3 * 4 * 2)  # ... each resized two frames at a time
    monkeypatch.setattr(dec, "_NVDEC_FALLBACKS", set())
    (backend,) = available_backends(("torchcodec",))
    with caplog.at_level(logging.WARNING, logger="pipeline.video.decoders"):
        got = [decode_video(clips["h264"], [Uniform(8)], [backend], device="cuda:0", max_side=160) for _ in range(2)]
    monkeypatch.setattr(torchcodec.decoders, "VideoDecoder", real)
    ref = decode_video(clips["h264"], [Uniform(8)], [backend])
    for v in got:
        assert v.backend == "torchcodec" and v.frames.device.type == "cpu" and v.frames.shape == (8, 120, 160, 3)
        assert torch.equal(v.frames, resize_frames(ref.frames, (160, 120)))
    assert [r.getMessage() for r in caplog.records].count(
        "decoded on the CPU instead of NVDEC: torchcodec: CPU fallback: video not supported by NVDEC") == 1


@pytest.mark.parametrize("ext,codec", [("mp3", "libmp3lame"), ("m4a", "aac")])
def test_an_audio_file_with_cover_art_is_audio(tmp_path, ext, codec):
    """The cover of an MP3 or M4A is a one-frame video stream marked ``attached_pic``: not video to sieve."""
    from pipeline.config import VideoConfig
    from pipeline.media.item import MediaItem
    from pipeline.media.probe import probe_media

    wav = synthetic.speech_wav(str(tmp_path / "s.wav"), "An audio book chapter with a cover.")
    cover = synthetic.lavfi_clip(str(tmp_path / "cover.png"), "testsrc=size=300x300:rate=1", 1.0,
                                 codec=("-frames:v", "1"), pix_fmt="rgb24")
    path = str(tmp_path / f"book.{ext}")
    synthetic._ffmpeg(["-i", wav, "-i", cover, "-map", "0:a", "-map", "1:v", "-c:a", codec, "-c:v", "mjpeg",
                       "-disposition:v", "attached_pic", path])
    info = probe_media(path)
    assert info.video is None and info.video_streams == 0 and info.audio is not None
    item = MediaItem("x", path, 0, [Uniform(4)], VideoConfig(), available_backends(ALL))
    assert item.video() is None  # the video filters give null, as for any audio file


@pytest.fixture(scope="module")
def webp(tmp_path_factory):
    """An animated WebP of two scenes (a bar moving over red, then over green) of 10 frames each, the first shown
    40 ms a frame and the second 100 ms; and its first half."""
    d = tmp_path_factory.mktemp("webp")
    frames = []
    for k in range(20):
        f = np.zeros((60, 80, 3), np.uint8)
        f[..., 0 if k < 10 else 1] = 200
        f[10:30, 4 * k:4 * k + 10] = 255
        frames.append(f)
    path = synthetic.animated_webp(str(d / "anim.webp"), frames, [40] * 10 + [100] * 10)
    half = str(d / "half.webp")
    data = open(path, "rb").read()
    open(half, "wb").write(data[: len(data) // 2])
    return {"path": path, "half": half, "frames": frames}


def test_an_animated_webp_decodes_through_pillow(webp):
    """FFmpeg (PyAV's 8.1 too) reads an animated WebP as a 0x0 stream whose frames do not decode: the probe and the
    frames come from Pillow, each frame exact (lossless) and timed by the file's durations (a variable rate)."""
    from pipeline.config import VideoConfig
    from pipeline.media.item import MediaItem
    from pipeline.media.probe import probe_media

    info = probe_media(webp["path"])
    assert (info.video.codec, info.video.width, info.video.height, info.video.frames) == ("webp", 80, 60, 20)
    assert info.duration_s == pytest.approx(1.4) and info.audio is None
    rate = AtFps(5.0, 64)
    item = MediaItem("w", webp["path"], 0, [rate], VideoConfig(), available_backends(VideoConfig().backends))
    v = item.video()
    assert v.backend == "pillow" and v.meta.num_frames == 20
    assert v.indices(rate).tolist() == [0, 5, 10, 12, 14, 16, 18]  # 0.2 s apart: 5 frames, then 2
    for i, frame in zip(v.indices(rate).tolist(), v.view(rate)):
        assert np.array_equal(frame.numpy(), webp["frames"][i])
    with pytest.raises(DecodeError, match="every video backend failed"):
        decode_video(webp["path"], [rate], available_backends(ALL), random_access=False)


def test_a_cut_in_an_animated_webp_is_placed_at_its_frame(webp):
    from pipeline.config import FilterSpec, VideoConfig
    from pipeline.filters import build_filters
    from pipeline.filters.base import FilterContext
    from pipeline.media.item import MediaItem

    (f,) = build_filters((FilterSpec("scene_cuts", "scene_cuts", True, {}),))
    item = MediaItem("w", webp["path"], 0, f.frame_requests(), VideoConfig(),
                     available_backends(VideoConfig().backends))
    out = f.apply(item, FilterContext("cpu", None))
    assert [(t["frame"], t["frame_exact"]) for t in out["transitions"]] == [(10, True)]
    assert out["times_s"] == [pytest.approx(0.4)]


def test_a_broken_animated_webp_is_a_decode_error(webp, tmp_path):
    from pipeline.media.probe import probe_media

    size = os.path.getsize(webp["half"])
    with pytest.raises(DecodeError, match=f"WebP cut short: {size} of its {2 * size} bytes"):
        probe_media(webp["half"])
    with pytest.raises(DecodeError, match="pillow: DecodeError: WebP cut short"):
        decode_video(webp["half"], [Uniform(4)], available_backends(ALL + ("pillow",)), random_access=False)
    other = tmp_path / "notes.mp4"
    other.write_text("not media\n" * 10)
    with pytest.raises(DecodeError, match="pillow: DecodeError: not a WebP file"):  # what it says of other files
        decode_video(str(other), [Uniform(4)], available_backends(("pillow",)))


def corrupt_webp_frame(src: str, dst: str, k: int) -> str:
    """``src`` with the bitstream of its ``k``-th frame overwritten (the chunk sizes kept)."""
    data = bytearray(open(src, "rb").read())
    pos, frames = 12, []
    while pos + 8 <= len(data):
        n = int.from_bytes(data[pos + 4:pos + 8], "little")
        if data[pos:pos + 4] == b"ANMF":
            frames.append((pos, n))
        pos += 8 + n + (n & 1)
    at, n = frames[k]
    data[at + 8 + 16 + 8 + 5:at + 8 + n] = b"\xab" * (n - 16 - 8 - 5)  # past the frame, VP8L chunk and VP8L headers
    open(dst, "wb").write(bytes(data))
    return dst


def test_an_animated_webp_broken_part_way_decodes_up_to_where_it_breaks(webp, tmp_path):
    """Frame 12 broken: the clip is its first 12 frames, as a broken tail of a video; frame 0 broken: nothing."""
    backends = available_backends(("pillow",))
    broken = corrupt_webp_frame(webp["path"], str(tmp_path / "12.webp"), 12)
    v = decode_video(broken, [Uniform(4)], backends)
    assert v.meta.num_frames == 12 and v.plan.indices == [1, 5, 8, 10]  # by time: 0.07, 0.20, 0.34, 0.47 s
    for i, frame in zip(v.plan.indices, v.frames):
        assert np.array_equal(frame.numpy(), webp["frames"][i])
    with pytest.raises(DecodeError, match="pillow: DecodeError: frame 0 does not decode"):
        decode_video(corrupt_webp_frame(webp["path"], str(tmp_path / "0.webp"), 0), [Uniform(4)], backends)

