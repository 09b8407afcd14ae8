"""Signal filters on generated clips whose truth is known by construction."""

import pytest

from pipeline.config import FilterSpec
from pipeline.filters import build_filters, frame_requests_of
from pipeline.filters.base import FilterContext
from pipeline.media import synthetic
from pipeline.media.item import MediaItem
from pipeline.video.decoders import available_backends

SRC = "testsrc2=size={size}:rate=25"


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("signal")

    def clip(name, vf=None, size="320x240", seconds=2.0):
        return synthetic.lavfi_clip(str(d / f"{name}.mp4"), SRC.format(size=size), seconds, vf)

    return {
        "plain": clip("plain"),
        "letterbox": clip("letterbox", "pad=320:240:0:30:black", size="320x180"),
        "pillarbox": clip("pillarbox", "pad=320:240:40:0:black", size="240x240"),
        "hd_letterbox": clip("hd", "pad=1280:720:0:88:black", size="1280x544"),
        "still": synthetic.still_clip(str(d / "still.mp4"), seconds=3.0),
        "freeze": clip("freeze", "tpad=stop_mode=clone:stop_duration=4", seconds=2.0),
        "dark": clip("dark", "colorlevels=romax=0.2:gomax=0.2:bomax=0.2"),  # underexposed: levels scaled down
        "bright": clip("bright", "colorlevels=romin=0.8:gomin=0.8:bomin=0.8"),  # overexposed
        "blur": clip("blur", "gblur=sigma=6"),
        "cut": synthetic.two_scene_clip(str(d / "cut.mp4"), seconds_each=2.0),
        "speech": synthetic.speech_wav(str(d / "speech.wav"), "no video here"),
    }


def run(path, name, max_side=None, **params):
    from pipeline.config import VideoConfig

    (f,) = build_filters((FilterSpec(name, name, True, params),))
    item = MediaItem("x", path, 0, f.frame_requests(), VideoConfig(decode_max_side=max_side),
                     available_backends(("decord", "torchcodec", "pyav")))
    return f.apply(item, FilterContext("cpu", None))


def test_black_borders_give_the_crop_box(clips):
    lb = run(clips["letterbox"], "black_borders")
    assert lb["letterbox"] and not lb["pillarbox"]
    assert lb["crop"]["x"] == 0 and abs(lb["crop"]["y"] - 30) <= 2 and abs(lb["crop"]["h"] - 180) <= 3
    pb = run(clips["pillarbox"], "black_borders")
    assert pb["pillarbox"] and not pb["letterbox"]
    assert abs(pb["crop"]["x"] - 40) <= 2 and abs(pb["crop"]["w"] - 240) <= 3 and pb["crop"]["h"] == 240
    plain = run(clips["plain"], "black_borders")
    assert plain["crop"] == {"x": 0, "y": 0, "w": 320, "h": 240} and not plain["letterbox"]


def test_black_borders_in_source_pixels_when_decoding_downscaled(clips):
    full = run(clips["hd_letterbox"], "black_borders")
    small = run(clips["hd_letterbox"], "black_borders", max_side=320)
    assert abs(full["crop"]["y"] - 88) <= 2 and abs(full["crop"]["h"] - 544) <= 4
    assert abs(small["crop"]["y"] - 88) <= 6 and abs(small["crop"]["h"] - 544) <= 10


def test_static_still_and_frozen_tail(clips):
    assert run(clips["still"], "static")["static"] is True
    moving = run(clips["plain"], "static")
    assert moving["static"] is False and moving["motion"] > 5 * 0.004
    frozen = run(clips["freeze"], "static", window_s=2.0)
    flags = [w["static"] for w in frozen["windows"]]
    assert flags[0] is False and all(flags[1:]) and len(flags) == 3  # 2 s of motion, then 4 s held
    assert frozen["static_ratio"] == pytest.approx(2 / 3)


def test_exposure(clips):
    assert run(clips["dark"], "exposure")["label"] == "dark"
    assert run(clips["bright"], "exposure")["label"] == "bright"
    ok = run(clips["plain"], "exposure")
    assert ok["label"] == "ok"
    # bars are not darkness: the letterboxed clip measures like the plain one
    assert run(clips["letterbox"], "exposure")["mean_luma"] == pytest.approx(ok["mean_luma"], abs=0.05)


def test_sharpness(clips):
    sharp, blur = run(clips["plain"], "sharpness"), run(clips["blur"], "sharpness")
    assert not sharp["blurry"] and blur["blurry"] and sharp["laplacian_var"] > 5 * blur["laplacian_var"]


def test_scene_cuts(clips):
    cut = run(clips["cut"], "scene_cuts")
    assert cut["count"] == 1 and cut["times_s"][0] == pytest.approx(2.0, abs=0.26)
    assert run(clips["plain"], "scene_cuts")["count"] == 0


def test_video_filters_on_audio_only_items_are_null(clips):
    for name in ("black_borders", "static", "exposure", "sharpness", "scene_cuts"):
        assert run(clips["speech"], name) is None


def test_filters_share_one_decode(clips):
    from pipeline.config import VideoConfig

    specs = tuple(FilterSpec(n, n) for n in ("black_borders", "static", "exposure", "sharpness", "scene_cuts"))
    filters = build_filters(specs)
    reqs = frame_requests_of(filters)
    item = MediaItem("x", clips["plain"], 0, reqs, VideoConfig(), available_backends(("pyav",)))
    for f in filters:
        f.apply(item, FilterContext("cpu", None))
    video = item.video()
    assert item.frames_decoded == len(video.plan.indices) == len(set(video.plan.indices)) <= 16 + 8 + 8 + 16


def test_luma_in_memory_bounded_groups_is_the_same_and_bt601(monkeypatch):
    import torch

    import pipeline.filters.signal as sig
    import pipeline.video.preprocess as pre

    frames = torch.randint(0, 256, (7, 30, 40, 3), dtype=torch.uint8)
    whole = sig.luma(frames[:, :, ::4], "cpu")  # a strided view, as the content box takes it
    ref = frames[:, :, ::4].float() @ torch.tensor([0.299, 0.587, 0.114])
    assert whole.shape == (7, 30, 10) and torch.allclose(whole, ref, atol=1e-3)
    monkeypatch.setattr(pre, "GROUP_BYTES", 30 * 10 * 3 * 4 * 3)  # three frames at a time
    assert torch.equal(sig.luma(frames[:, :, ::4], "cpu"), whole)


def _cut_on_the_timeline(path):
    """The oracle: every frame decoded in order with its presentation time minus the container's start (the origin
    the audio's samples count from, what ffprobe's start_time gives); the cut is the frame that differs most from
    the one before it."""
    import av
    import numpy as np

    with av.open(path) as c:
        s = c.streams.video[0]
        frames = [(float(f.pts * s.time_base) - c.start_time / av.time_base, f.to_ndarray(format="gray").astype(float))
                  for f in c.decode(s)]
    diffs = [np.abs(b[1] - a[1]).mean() for a, b in zip(frames, frames[1:])]
    return frames[int(np.argmax(diffs)) + 1][0]


@pytest.mark.parametrize("container", ["mp4", "ts"])
def test_times_are_on_the_files_timeline_when_the_video_starts_late(clips, tmp_path, container):
    """Pictures that start 0.5 s after the audio: the scene cut 2 s into the pictures is reported on the file's
    timeline, where the speech times are, not 2 s from the first frame."""
    path = str(tmp_path / f"late.{container}")
    synthetic._ffmpeg(["-itsoffset", "0.5", "-i", clips["cut"], "-f", "lavfi", "-i", "sine=duration=5",
                       "-map", "0:v", "-map", "1:a", "-c:v", "copy", "-c:a", "aac", path])
    truth = _cut_on_the_timeline(path)
    assert truth == pytest.approx(2.5, abs=0.06)
    (t,) = run(path, "scene_cuts", fps=25)["times_s"]
    assert t == pytest.approx(truth, abs=1e-3)
    windows = run(path, "static", window_s=1.0)["windows"]
    assert windows[0]["start_s"] == pytest.approx(truth - 2.0, abs=1e-3)
