"""Signal filters on generated clips whose truth is known by construction."""

import os

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


def filter_item(path, name, max_side=None, **params):
    """The filter ``name`` with ``params``, and an item of ``path`` that decodes what it asks for."""
    from pipeline.config import VideoConfig

    (f,) = build_filters((FilterSpec(name, name, True, params),))
    item = MediaItem("x", path, 0, f.frame_requests(), VideoConfig(decode_max_side=max_side),
                     available_backends(("decord", "torchcodec", "pyav")))
    return f, item


def run(path, name, max_side=None, **params):
    f, item = filter_item(path, name, max_side, **params)
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


SUBTITLE = "I never said she stole my money"


@pytest.fixture(scope="module")
def overlaid(tmp_path_factory):
    """Clips with text on their bars, as film and television hold it, and a picture with a dark band near its edge.
    The truth is known by construction: the picture is the padded area, the text lies in the bar."""
    d = tmp_path_factory.mktemp("overlays")

    def clip(name, source_size, vf):
        return synthetic.lavfi_clip(str(d / f"{name}.mp4"), SRC.format(size=source_size), 2.0, vf)

    text = synthetic.text_overlay
    still = synthetic.still_clip(str(d / "still_source.mp4"), seconds=2.0, size="640x272")
    subtitled_still = str(d / "subtitled_still.mp4")  # a still picture, letterboxed, with subtitles coming and going
    synthetic._ffmpeg(["-i", still, "-vf", "pad=640:360:0:44:black," + text("First line", "(w-tw)/2", "330", 18, 0.4,
                                                                              0.9) + "," + text("A second line",
                                                                              "(w-tw)/2", "330", 18, 1.2, 1.7),
                       "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", subtitled_still])
    return {
        "subtitled_still": subtitled_still,
        # 2.35:1 in 720p: 88-pixel bars; a subtitle line in the bottom bar for half the clip
        "subtitled": clip("subtitled", "1280x544", "pad=1280:720:0:88:black," + text(SUBTITLE, "(w-tw)/2", "658", 36,
                                                                                    0.5, 1.5)),
        # a 4:3 picture pillarboxed in 16:9 with a channel logo on the left bar all the time
        "logo": clip("logo", "480x360", "pad=640:360:80:0:black," + text("TV5", "20", "24", 22)),
        # a picture whose lowest 40 rows lie below a band dark in every frame: picture, not an overlay
        "banded": clip("banded", "640x272", "drawbox=x=0:y=202:w=640:h=30:color=black:t=fill,pad=640:360:0:44:black"),
        # a blurred picture, letterboxed, with the subtitle on its bar
        "blurred": clip("blurred", "640x272", "gblur=sigma=6,pad=640:360:0:44:black," + text(SUBTITLE, "(w-tw)/2",
                                                                                             "330", 18, 0.5, 1.5)),
        # the same subtitle on the picture itself: no bar holds it
        "on_picture": clip("on_picture", "640x272", text(SUBTITLE, "(w-tw)/2", "230", 18) + ",pad=640:360:0:44:black"),
    }


def test_burnt_in_text_refuses_what_it_cannot_escape_and_names_a_missing_font(monkeypatch):
    with pytest.raises(ValueError, match="filtergraph escapes"):
        synthetic.text_overlay("it's 10:30", "0", "0", 12)
    monkeypatch.setattr(synthetic.shutil, "which", lambda tool: None)
    monkeypatch.setattr(synthetic.os.path, "exists", lambda path: False)
    with pytest.raises(RuntimeError, match="fonts-dejavu-core"):
        synthetic.text_overlay("no font here", "0", "0", 12)


def _inside(box, x0, y0, x1, y1):
    return box["x"] >= x0 and box["y"] >= y0 and box["x"] + box["w"] <= x1 and box["y"] + box["h"] <= y1


def test_subtitles_on_a_letterbox_bar_stay_outside_the_crop(overlaid):
    got = run(overlaid["subtitled"], "black_borders")
    assert got["crop"]["x"] == 0 and got["crop"]["w"] == 1280
    assert abs(got["crop"]["y"] - 88) <= 2 and abs(got["crop"]["h"] - 544) <= 4 and abs(got["bottom"] - 88) <= 2
    (sub,) = got["bar_overlays"]
    assert _inside(sub, 0, 632, 1280, 720) and sub["h"] >= 24  # the text line: 36-pixel type, in the bar
    assert 280 < sub["x"] < 400 and 500 < sub["w"] < 700  # centred, as drawn
    # decoded downscaled: the same in source pixels, to the scale's precision
    small = run(overlaid["subtitled"], "black_borders", max_side=320)
    assert abs(small["crop"]["y"] - 88) <= 6 and abs(small["crop"]["h"] - 544) <= 10
    assert len(small["bar_overlays"]) == 1 and _inside(small["bar_overlays"][0], 0, 620, 1280, 720)
    # what the crop was before overlays were told apart (and is with max_overlay_fill=0): over the bar to the text
    kept = run(overlaid["subtitled"], "black_borders", max_overlay_fill=0)
    assert kept["bar_overlays"] == [] and kept["crop"]["y"] + kept["crop"]["h"] > 680


def test_a_logo_on_a_pillarbox_bar_stays_outside_the_crop(overlaid):
    got = run(overlaid["logo"], "black_borders")
    assert got["pillarbox"] and not got["letterbox"]
    assert abs(got["crop"]["x"] - 80) <= 2 and abs(got["crop"]["w"] - 480) <= 4 and got["crop"]["h"] == 360
    (logo,) = got["bar_overlays"]
    assert _inside(logo, 0, 0, 80, 360) and logo["x"] >= 16 and logo["w"] >= 30 and 20 <= logo["y"] <= 30


def test_a_picture_strip_below_a_dark_band_is_picture(overlaid):
    """Lit rows apart from the rest by dark rows are only an overlay when sparse: a full strip of picture stays."""
    got = run(overlaid["banded"], "black_borders")
    assert got["bar_overlays"] == [] and abs(got["crop"]["y"] - 44) <= 2 and abs(got["crop"]["h"] - 272) <= 3


def test_subtitles_on_the_picture_are_left_to_the_detector(overlaid):
    got = run(overlaid["on_picture"], "black_borders")
    assert got["bar_overlays"] == [] and abs(got["crop"]["y"] - 44) <= 2 and abs(got["crop"]["h"] - 272) <= 3


def test_exposure_is_measured_without_the_bars_and_their_text(overlaid, clips):
    """The exposure filter measures inside the same content box: bars with subtitles do not darken it."""
    sub = run(overlaid["subtitled"], "exposure")["mean_luma"]
    plain = synthetic.lavfi_clip(str(os.path.dirname(overlaid["subtitled"]) + "/plain_hd.mp4"),
                                 SRC.format(size="1280x544"), 2.0)
    assert sub == pytest.approx(run(plain, "exposure")["mean_luma"], abs=0.02)


def test_bars_and_their_text_are_neither_sharpness_nor_motion(overlaid, clips):
    """Sharpness and stillness are measured inside the content box, off its edge: a picture's edge against a black
    bar, and text on the bar, are the sharpest lines in the frame (a blurred letterboxed clip with a subtitle on its
    bar measured sharper than a sharp clip), and a subtitle coming and going is no motion of a still picture."""
    blurred = run(overlaid["blurred"], "sharpness")
    assert blurred["blurry"] and blurred["laplacian_var"] < 3 * run(clips["blur"], "sharpness")["laplacian_var"] + 5
    assert not run(overlaid["subtitled"], "sharpness")["blurry"]  # a sharp letterboxed picture stays sharp
    still = run(overlaid["subtitled_still"], "static")
    assert still["static"] and still["static_ratio"] == 1.0
    assert still["motion"] < 0.1 * 0.004  # a tenth of the threshold (0.00088 with the bars' subtitles counted)
    assert not run(overlaid["subtitled"], "static")["static"]  # the moving picture inside the same bars moves


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    d = tmp_path_factory.mktemp("blur_fill")
    return {"upright": synthetic.blur_filled_clip(str(d / "upright.mp4")),
            "landscape": synthetic.blur_filled_clip(str(d / "landscape.mp4"), inner="640x360", outer="640x1136"),
            "tilted": synthetic.blur_filled_clip(str(d / "tilted.mp4"), tilt=0.25),
            # the upright picture on black bars instead
            "padded": synthetic.lavfi_clip(str(d / "padded.mp4"), SRC.format(size="360x640"), 2.0,
                                           "noise=alls=25:allf=t,pad=1136:640:388:0:black"),
            # flat colour bars with straight, still edges at both sides, and no copy of the picture in them
            "bars": synthetic.lavfi_clip(str(d / "bars.mp4"), SRC.format(size="1280x720"), 2.0)}


def test_a_blurred_copy_filling_the_sides_is_cropped_off(filled):
    """An upright phone video centred on a landscape frame over a blurred, enlarged copy of itself (and a landscape
    one on an upright frame): the crop is the picture, as with black bars."""
    up = run(filled["upright"], "black_borders")
    assert up["blur_fill"] and up["pillarbox"] and not up["letterbox"]
    assert abs(up["crop"]["x"] - 388) <= 2 and abs(up["crop"]["w"] - 360) <= 3 and up["crop"]["h"] == 640
    down = run(filled["landscape"], "black_borders")
    assert down["blur_fill"] and down["letterbox"] and not down["pillarbox"]
    assert abs(down["crop"]["y"] - 388) <= 2 and abs(down["crop"]["h"] - 360) <= 3 and down["crop"]["w"] == 640
    off = run(filled["upright"], "black_borders", blur_fill=False)
    assert not off["blur_fill"] and off["crop"] == {"x": 0, "y": 0, "w": 1136, "h": 640}
    # sharpness is the picture's, as on black bars, not lowered by the blurred fill (0.46 of it before)
    ratio = run(filled["upright"], "sharpness")["laplacian_var"] / run(filled["padded"], "sharpness")["laplacian_var"]
    assert 0.8 < ratio < 1.25


@pytest.mark.parametrize("name", ["tilted", "bars"])
def test_smooth_sides_alone_are_not_a_blur_fill(filled, name):
    """The picture turned on the blurred copy has no straight, still edge (a portrait against a defocused background
    has none either); flat bars at both sides of a pattern have straight edges but hold no copy of the picture."""
    got = run(filled[name], "black_borders")
    assert not got["blur_fill"] and got["crop"]["x"] == 0 and got["crop"]["w"] in (1136, 1280)


@pytest.mark.parametrize("case", ["both_ends", "too_far_in", "dense", "gap_too_small", "alone", "black"])
def test_overlay_rule_on_measured_fills(case):
    """``_extent`` on fills made by hand: what is set apart as an overlay and what stays content."""
    import torch

    from pipeline.filters.signal import _extent

    fill = torch.zeros(3, 200)
    fill[:, 40:160] = 0.9  # the picture, rows 40..160
    fill[1, 10:20] = 0.2  # text on the top bar in one frame
    fill[2, 175:185] = 0.3  # text on the bottom bar in another, in two lines
    fill[0, 189:195] = 0.1
    if case == "too_far_in":
        fill[:, 40:60] = 0  # the picture starts at 60: with the gap, more than a quarter of the side
    if case == "dense":
        fill[2, 175:185] = 0.8  # picture, and the second line apart from it is the overlay
    if case == "gap_too_small":
        fill[:, 160:174] = 0.9  # the picture reaches row 174: one dark row before the text, under the joining gap
    if case == "alone":
        fill[:, 40:160] = 0  # nothing but text (a title card): no picture to set it apart from
    if case == "black":
        fill.zero_()
    start, end, overlays = _extent(fill, 0.02, 0.5, 0.25)
    expected = {"both_ends": (40, 160, [(10, 20), (175, 195)]), "too_far_in": (10, 160, [(175, 195)]),
                "dense": (40, 185, [(10, 20), (189, 195)]), "gap_too_small": (40, 185, [(10, 20), (189, 195)]),
                "alone": (10, 195, []), "black": (0, 200, [])}[case]
    assert (start, end, sorted(overlays)) == expected


def test_static_still_and_frozen_tail(clips):
    assert run(clips["still"], "static")["static"] is True
    moving = run(clips["plain"], "static")
    assert moving["static"] is False and moving["motion"] > 5 * 0.004
    frozen = run(clips["freeze"], "static", window_s=2.0)
    flags = [w["static"] for w in frozen["windows"]]
    assert flags[0] is False and all(flags[1:]) and len(flags) == 3  # 2 s of motion, then 4 s held
    assert frozen["static_ratio"] == pytest.approx(2 / 3)


def test_a_grainy_still_is_static_and_grainy_motion_is_not(tmp_path):
    """Film grain or sensor noise on a still picture: every sampled frame differs from the last, enough to pass the
    threshold (0.0054 for 0.004 with this grain), but only as noise, which halves when the averaging area grows
    fourfold; what is left of a picture that moves does not."""
    vf = "noise=alls=30:allf=t+u"
    src = "testsrc=size=640x360:rate=1:duration=1"
    still = synthetic.lavfi_clip(str(tmp_path / "still.mp4"), src, 1.0, "fps=25,loop=-1:1:0," + vf,
                                 extra=("-t", "3"))
    grain = run(still, "static")
    assert grain["motion"] > 0.004 and grain["structured_motion"] < 0.001 and grain["static"]
    assert grain["static_ratio"] == 1.0
    moving = run(synthetic.lavfi_clip(str(tmp_path / "moving.mp4"), SRC.format(size="640x360"), 3.0, vf), "static")
    assert not moving["static"] and moving["structured_motion"] > 0.005 and moving["static_ratio"] == 0.0


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
    assert cut["count"] == 1 and cut["times_s"][0] == pytest.approx(2.0, abs=1e-6)  # frame 50 of 25 fps
    assert run(clips["plain"], "scene_cuts")["count"] == 0


@pytest.fixture(scope="module")
def short_shot(tmp_path_factory):
    """Three shots: 2 s of a moving pattern, 3 frames of colour bars, 2 s of SMPTE bars: cuts at frames 50 and 53."""
    path = str(tmp_path_factory.mktemp("shots") / "short_shot.mp4")
    return synthetic.shots_clip(path, (("testsrc2", 2.0), ("rgbtestsrc", 0.12), ("smptebars", 2.0)))


@pytest.fixture(scope="module")
def short_shot_vfr(short_shot, tmp_path_factory):
    """The same frames at a variable rate: 25 a second for the first second, then 10."""
    path = str(tmp_path_factory.mktemp("shots") / "short_shot_vfr.mp4")
    synthetic._ffmpeg(["-i", short_shot, "-vf", "setpts='if(lt(N,25),N/25,1+(N-25)/10)/TB'", "-fps_mode", "vfr",
                       "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", path])
    return path


def _backend(name: str) -> tuple[str]:
    from pipeline.video.decoders import BACKENDS

    try:
        BACKENDS[name]()
    except ImportError:
        pytest.skip(f"{name} is not installed here")
    return (name,)


@pytest.mark.parametrize("rate", ["constant", "variable"])
@pytest.mark.parametrize("backend", ["decord", "torchcodec", "pyav"])
def test_cuts_are_placed_at_the_frame_where_the_picture_changes(short_shot, short_shot_vfr, backend, rate):
    """At 4 samples a second a cut was reported at the first sample after it, up to 6 frames late (2.16 s for a cut
    at 2.0), and a shot shorter than a sample interval hid one of its two cuts. The frames between the two samples
    are decoded again, by the backend that decoded the item, and compared step by step; the times are the frames'
    own (at a variable rate, their timestamps, read here by PyAV decoding every frame)."""
    import av

    from pipeline.config import VideoConfig

    path = short_shot if rate == "constant" else short_shot_vfr
    with av.open(path) as c:
        at = [float(frame.time) for frame in c.decode(video=0)]
    (f,) = build_filters((FilterSpec("scene_cuts", "scene_cuts", True, {}),))
    item = MediaItem("x", path, 0, f.frame_requests(), VideoConfig(), available_backends(_backend(backend)))
    got = f.apply(item, FilterContext("cpu", None))
    assert got["count"] == 2 and got["times_s"] == pytest.approx([at[50], at[53]], abs=1e-6)
    assert [(t["frame"], t["frame_exact"], t["kind"]) for t in got["transitions"]] == [(50, True, "cut"),
                                                                                       (53, True, "cut")]
    assert [t["start_s"] for t in got["transitions"]] == pytest.approx([at[49], at[52]], abs=1e-6)  # frame before
    if rate == "constant":
        assert at[50] == pytest.approx(2.0) and item.frames_decoded == 18 + 7  # the samples, then frames 48 to 54
        coarse = run(path, "scene_cuts", frame_accurate=False)
        assert coarse["count"] == 1 and coarse["times_s"] == pytest.approx([2.16], abs=1e-6)
        assert [(t["frame"], t["frame_exact"]) for t in coarse["transitions"]] == [(54, False)]


def test_a_cut_between_shots_of_similar_colours_is_confirmed_by_its_frames(tmp_path):
    """A moving pattern cut to PAL colour bars steps 0.39 between samples, under the cut threshold (0.45), which
    motion between samples 0.25 s apart can pass: sampled alone the cut was not found. Between consecutive frames
    it is one step standing out of steps near 0, which is what confirms it; motion and dissolves are none."""
    path = synthetic.shots_clip(str(tmp_path / "similar.mp4"), (("testsrc2", 2.0), ("pal75bars", 2.0)))
    got = run(path, "scene_cuts")
    assert got["count"] == 1 and got["times_s"] == pytest.approx([2.0], abs=1e-6)
    assert [(t["frame"], t["frame_exact"]) for t in got["transitions"]] == [(50, True)]
    assert run(path, "scene_cuts", frame_accurate=False)["count"] == 0


@pytest.mark.parametrize("second", ["hflip,vflip", "crop=160:120:100:60,scale=320:240"])
def test_a_cut_that_keeps_the_colours_is_found_by_the_pictures_structure(tmp_path, second):
    """A cut to another view of the same scene (here the moving pattern mirrored, or zoomed in) keeps its colours:
    the histograms moved 0.01 (0.12 zoomed), and no cut was found. Its 32x32 luma thumbnails change by 0.41 (0.29)
    at once, against 0.03 a sample of motion: a candidate, and the frames confirm it. Motion alone is none."""
    path = str(tmp_path / "same_colours.mp4")
    synthetic._ffmpeg(["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25:duration=2", "-f", "lavfi", "-i",
                       "testsrc2=size=320x240:rate=25:duration=2", "-filter_complex",
                       f"[1:v]{second}[b];[0:v][b]concat=n=2:v=1[v]", "-map", "[v]", "-c:v", "libx264", "-preset",
                       "ultrafast", "-pix_fmt", "yuv420p", path])
    got = run(path, "scene_cuts")
    assert [(t["kind"], t["frame"], t["frame_exact"]) for t in got["transitions"]] == [("cut", 50, True)]
    assert run(path, "scene_cuts", frame_accurate=False)["count"] == 0
    for moving in (synthetic.motion_clip(str(tmp_path / "motion.mp4"), seconds=3.0, audio=False),
                   synthetic.moving_box_clip(str(tmp_path / "box.mp4"), fps=25, seconds=3.0)):
        assert run(moving, "scene_cuts")["count"] == 0


def test_a_shot_holding_one_sample_is_two_cuts_not_a_gradual_transition(tmp_path):
    """5 frames of colour bars between two scenes, one of the samples (every 6th frame) among them: two large steps
    side by side read as a gradual transition. Its frames show the two cuts."""
    path = synthetic.shots_clip(str(tmp_path / "five.mp4"), (("testsrc2", 2.0), ("rgbtestsrc", 0.2),
                                                             ("smptebars", 2.0)))
    coarse = run(path, "scene_cuts", frame_accurate=False)
    assert [t["kind"] for t in coarse["transitions"]] == ["gradual"]
    got = run(path, "scene_cuts")
    assert [(t["kind"], t["frame"], t["frame_exact"]) for t in got["transitions"]] == [("cut", 50, True),
                                                                                       ("cut", 55, True)]


def test_cuts_keep_the_samples_times_when_the_frames_between_cannot_be_decoded(short_shot, tmp_path, caplog):
    """The file went away after the first decode (a node cache evicted): the row keeps the cut found, at the sample
    after it, with ``frame_exact`` false, and a warning says why. Over ``max_placing_frames`` the same, silently."""
    import shutil

    from pipeline.config import VideoConfig

    path = str(tmp_path / "copy.mp4")
    shutil.copy(short_shot, path)
    (f,) = build_filters((FilterSpec("scene_cuts", "scene_cuts", True, {}),))
    item = MediaItem("gone", path, 0, f.frame_requests(), VideoConfig(), available_backends(("decord", "pyav")))
    item.video()
    os.remove(path)
    got = f.apply(item, FilterContext("cpu", None))
    assert got["times_s"] == pytest.approx([2.16], abs=1e-6)
    assert [(t["frame"], t["frame_exact"]) for t in got["transitions"]] == [(54, False)]
    assert "gone: 1 transition(s) not placed at their frames" in caplog.text
    assert "every video backend failed" in caplog.text
    capped = run(short_shot, "scene_cuts", max_placing_frames=6)  # the cut's frames 48 to 54 are 7
    assert [(t["frame"], t["frame_exact"]) for t in capped["transitions"]] == [(54, False)]


def test_the_placing_budget_grows_with_a_clip_past_five_minutes():
    """Past 5 minutes the samples spread and each cut's frames grow (a 1-hour film's about 75): a fixed budget
    placed 64 of its cuts. It is ``max_placing_frames`` per 5 minutes now, and no less for a shorter clip."""
    from pipeline.filters.signal import SceneCutParams, placing_budget

    p = SceneCutParams()
    assert [placing_budget(p, s) for s in (10.0, 300.0, 600.0, 3600.0)] == [4800, 4800, 9600, 57600]


def test_cut_steps_of_measured_frames():
    """Frames as points on a line: a cut is a step over ``gradual_change`` standing out of its neighbours, in the
    histograms or (over ``structure_change``) in the thumbnails."""
    from pipeline.filters.signal import SceneCutParams, cut_steps

    def steps(*pos: float, thumbs: tuple[float, ...] = ()) -> list[int]:
        d = [abs(b - a) for a, b in zip(pos, pos[1:])]
        return cut_steps(d, [abs(b - a) for a, b in zip(thumbs, thumbs[1:])] or [0.0] * len(d), SceneCutParams())

    # the colours kept, the picture changed (a reverse angle): 0.4 in the thumbnails, 0.01 in the histograms
    assert steps(0, 0, 0, 0.01, 0.01, thumbs=(0, 0.02, 0.04, 0.44, 0.46)) == [2]
    assert steps(0, 0, 0, 0.01, 0.01, thumbs=(0, 0.05, 0.1, 0.15, 0.2)) == []  # a pan: steady change
    assert steps(0, 0, 0, 0.01, 0.01, thumbs=(0, 0.02, 0.3, 0.02, 0.04)) == []  # a frame's flash

    assert steps(0, 0, 0, 0.9, 0.9) == [2]
    assert steps(0, 0, 0.43, 0.43, 0.43, 0.85, 0.85) == [1, 4]  # a shot of 3 frames
    assert steps(0, 0.05, 0.12, 0.5, 0.55, 0.6) == [2]  # a cut amid motion
    assert steps(0, 0.1, 0.24, 0.36, 0.46, 0.46) == []  # a quick dissolve
    assert steps(0, 0.6, 0.0, 0.1) == []  # a one-frame flash
    assert steps(0, 0.08, 0.16, 0.24, 0.32, 0.4, 0.48) == []  # motion


def test_a_second_decode_of_the_item_is_cropped_alike(clips):
    """``more_frames`` decodes with the backend that decoded the item and crops as a safe crop set on it."""
    from pipeline.config import VideoConfig
    from pipeline.video.sampling import Frames, Uniform

    item = MediaItem("x", clips["plain"], 0, [Uniform(4)], VideoConfig(), available_backends(("pyav", "decord")))
    first = item.video()
    first.set_crop_source((40, 20, 280, 200))
    more = item.more_frames(Frames((3, 4, 5, 999), max_side=160))
    assert more.backend == first.backend == "pyav" and more.indices(Frames((3, 4, 5, 999), max_side=160)).tolist() \
        == [3, 4, 5]  # past the end: dropped
    assert more.view(Frames((3, 4, 5, 999), max_side=160)).shape == (3, 90, 120, 3)  # 240x180 at half size
    assert item.frames_decoded == 4 + 3
    sound = MediaItem("s", clips["speech"], 0, [Uniform(4)], VideoConfig(), available_backends(("pyav",)))
    with pytest.raises(ValueError, match="s has no video stream"):
        sound.more_frames(Frames((0,)))


def test_a_clip_longer_than_the_frame_cap_is_sampled_over_all_of_it(clips):
    """Over ``max_frames / fps`` seconds the rate drops so the frames cover the whole clip (they covered its start:
    8 frames at 4 a second saw the freeze clip's first 2 s of motion and called it moving, and no cut after 1.5 s)."""
    frozen = run(clips["freeze"], "static", max_frames=8, window_s=2.0, stream_long_clips=False)  # 2 s moving, 4 held
    assert [w["static"] for w in frozen["windows"]] == [False, True, True]
    assert frozen["sample_fps"] == pytest.approx(8 / 6, rel=0.1) and frozen["windows"][-1]["end_s"] > 5
    cut = run(clips["cut"], "scene_cuts", max_frames=6, stream_long_clips=False)  # two 2 s scenes
    assert cut["count"] == 1 and cut["times_s"][0] == pytest.approx(2.0, abs=0.7)
    assert cut["sample_fps"] == pytest.approx(25 / 17, rel=0.01)
    assert run(clips["cut"], "scene_cuts")["sample_fps"] == pytest.approx(25 / 6, rel=0.01)  # 4 a second


@pytest.fixture(scope="module")
def transition_clips(tmp_path_factory):
    """Two 3-second scenes (a moving pattern, then colour bars) joined by a gradual transition, and one scene that
    fades in from black and out to black."""
    d = tmp_path_factory.mktemp("transitions")
    joins = {"fade": "[0:v]fade=t=out:st=2:d=1[a];[1:v]fade=t=in:st=0:d=1[b];[a][b]concat=n=2:v=1[v]",  # black at 3 s
             "dissolve": "[0:v][1:v]xfade=transition=fade:duration=1:offset=2[v]",  # 2 to 3 s
             "ends": "[0:v]fade=t=in:st=0:d=1,fade=t=out:st=2:d=1[v]",
             "slow_dissolve": "[0:v][1:v]xfade=transition=fade:duration=2.5:offset=2[v]",  # 2 to 4.5 s
             "brightening": "[0:v]eq=brightness='t/25-0.1':eval=frame[v]"}  # one scene, 50 levels brighter in 5 s
    out = {}
    for name, graph in joins.items():
        seconds = 5 if name in ("slow_dissolve", "brightening") else 3
        a, b = (f"{src}=size=320x240:rate=25:duration={seconds}" for src in ("testsrc2", "smptebars"))
        out[name] = str(d / f"{name}.mp4")
        synthetic._ffmpeg(["-f", "lavfi", "-i", a, "-f", "lavfi", "-i", b, "-filter_complex", graph, "-map", "[v]",
                           "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", out[name]])
    return out


def test_a_gradual_transition_is_one_scene_change(transition_clips, clips):
    """Each sampled step of a fade or a dissolve differs as much as a cut does: a 1-second fade through black gave 8
    cuts and a 1-second dissolve 5. Now each is one transition, placed in it, with its span and kind."""
    fade = run(transition_clips["fade"], "scene_cuts")
    assert fade["count"] == 1 and fade["times_s"][0] == pytest.approx(3.0, abs=0.26)
    (t,) = fade["transitions"]
    assert t["kind"] == "fade" and 1.7 <= t["start_s"] <= 2.25 and 3.75 <= t["end_s"] <= 4.3
    dissolve = run(transition_clips["dissolve"], "scene_cuts")
    assert dissolve["count"] == 1 and 2.0 <= dissolve["times_s"][0] <= 3.0
    (t,) = dissolve["transitions"]
    assert t["kind"] == "gradual" and 1.7 <= t["start_s"] <= 2.25 and 2.75 <= t["end_s"] <= 3.3
    # a fade in from black and out to black has one scene: no transition
    assert run(transition_clips["ends"], "scene_cuts")["count"] == 0
    (t,) = run(clips["cut"], "scene_cuts")["transitions"]  # a hard cut: placed at its two frames
    assert t["kind"] == "cut" and t["end_s"] - t["start_s"] == pytest.approx(0.04, abs=1e-6) and t["frame_exact"]
    assert not any(t["frame_exact"] for t in fade["transitions"] + dissolve["transitions"])  # spans, of samples


def test_soft_histograms_share_each_level_between_two_bins():
    import torch

    from pipeline.filters.signal import soft_histograms

    torch.manual_seed(0)
    frames = torch.randint(0, 256, (3, 24, 32, 3), dtype=torch.uint8)
    hist = soft_histograms(frames, 16)
    assert hist.shape == (3, 48) and torch.allclose(hist.sum(dim=1), torch.ones(3))
    # the definition, pixel by pixel: level v sits at (v + 0.5) * 16 / 256 - 0.5 bins, shared by its two neighbours
    x = (frames.reshape(3, -1, 3).double() + 0.5) / 16 - 0.5
    want = torch.zeros(3, 3, 16, dtype=torch.float64)
    for lo in range(16):
        w = (1 - (x - lo).abs()).clamp(min=0)  # the triangle around bin centre lo
        if lo == 0:
            w = torch.where(x < 0, 1.0, w)
        if lo == 15:
            w = torch.where(x > 15, 1.0, w)
        want[:, :, lo] = w.sum(dim=1)
    assert torch.allclose(hist, (want / want.sum(dim=(1, 2), keepdim=True)).reshape(3, 48).float(), atol=1e-6)
    from pipeline.filters.signal import level_counts

    strided = frames[:, ::2, 1::3]  # a filter's strided view of its frames, counted in place
    assert torch.equal(level_counts(strided, per_frame=True), level_counts(strided, per_frame=False))  # CPU, GPU
    flat = torch.stack([torch.full((8, 8, 3), v, dtype=torch.uint8) for v in (15, 16)])  # across a hard bin edge
    step = soft_histograms(flat, 16)
    assert 0.5 * float((step[0] - step[1]).abs().sum()) == pytest.approx(1 / 16, abs=1e-5)  # hard bins: 1.0


def test_a_slow_dissolve_is_one_scene_change_and_a_slow_brightening_none(transition_clips):
    """A 2.5-second dissolve's steps straddle the cut threshold (about 0.3-0.5 at 4 samples a second): it gave 3 cuts
    (a 2-second one 4). Now the stretch of steps above the gradual threshold whose ends are of two scenes is one
    transition. A picture brightening by 50 levels over 5 s is one scene: with hard histogram bins each of its flat
    colours jumps a bin at once, and the new rule made that 1 transition; shared between bins, its steps stay
    small."""
    slow = run(transition_clips["slow_dissolve"], "scene_cuts")
    assert slow["count"] == 1, slow["transitions"]
    (t,) = slow["transitions"]
    assert t["kind"] == "gradual" and 1.7 <= t["start_s"] <= 2.3 and 4.2 <= t["end_s"] <= 4.8
    assert t["start_s"] < slow["times_s"][0] < t["end_s"]
    bright = run(transition_clips["brightening"], "scene_cuts")
    assert bright["count"] == 0, bright["transitions"]


def _steps(*moves: tuple[int, float], n: int = 12) -> list[float]:
    """Frames as points on a line (a stand-in for their histograms): ``moves`` are (step, distance) pairs."""
    pos = [0.0]
    for k in range(n - 1):
        pos.append(pos[-1] + dict(moves).get(k, 0.0))
    return pos


@pytest.mark.parametrize("case", ["cut", "two_cuts", "dissolve", "fade", "fade_at_ends", "cut_from_black",
                                  "slow_dissolve", "flash", "jolt", "cut_amid_motion", "long_motion"])
def test_transitions_from_measured_steps(case):
    from pipeline.filters.signal import SceneCutParams, transitions

    n = 40 if case == "long_motion" else 12
    moves = {"cut": [(3, 0.9)], "two_cuts": [(3, 0.9), (5, -0.9)], "dissolve": [(k, 0.5) for k in range(4, 8)],
             "fade": [(3, 0.5), (4, 0.5), (7, 0.5), (8, 0.5)], "fade_at_ends": [(2, 0.6), (9, 0.6)],
             "cut_from_black": [(2, 0.9)],
             "slow_dissolve": [(k, 0.15) for k in range(2, 10)],  # every step under the cut threshold: 2 s
             "flash": [(4, 0.6), (5, -0.6)],  # out and back: no scene change
             "jolt": [(4, 0.3)],  # one step, less than a cut
             "cut_amid_motion": [(k, 0.7 if k == 5 else 0.15) for k in range(2, 9)],
             "long_motion": [(k, 0.7 if k == 20 else 0.15) for k in range(n - 1)]}[case]  # 10 s of motion
    pos = _steps(*moves, n=n)
    diff = [abs(b - a) for a, b in zip(pos, pos[1:])]
    black = [False] * n
    if case == "fade":
        black[5:7] = [True, True]
    if case == "fade_at_ends":
        black[0:2], black[10:12] = [True, True], [True, True]
    if case == "cut_from_black":
        black[0:3] = [True] * 3  # opens on black, then a hard cut to the picture: from black
    expected = {"cut": [(3, 4, 4, "cut")], "two_cuts": [(3, 4, 4, "cut"), (5, 6, 6, "cut")],
                "dissolve": [(4, 8, 6, "gradual")], "fade": [(3, 9, 6, "fade")], "fade_at_ends": [],
                "cut_from_black": [], "slow_dissolve": [(2, 10, 6, "gradual")], "flash": [], "jolt": [],
                "cut_amid_motion": [(5, 6, 6, "cut")], "long_motion": [(20, 21, 21, "cut")]}[case]
    times = [0.25 * k for k in range(n)]
    assert transitions(diff, black, times, lambda i, j: min(1.0, abs(pos[j] - pos[i])), SceneCutParams()) == expected


SIGNAL_FILTERS = ("black_borders", "static", "exposure", "sharpness", "scene_cuts")


def _all_five(path, backends=("decord", "torchcodec", "pyav"), **video):
    """The five signal filters on one item decoded with ``VideoConfig(**video)``: (results by name, the item)."""
    from pipeline.config import VideoConfig

    filters = build_filters(tuple(FilterSpec(n, n) for n in SIGNAL_FILTERS))
    item = MediaItem("x", path, 0, frame_requests_of(filters), VideoConfig(**video), available_backends(backends))
    return {f.name: f.apply(item, FilterContext("cpu", None)) for f in filters}, item


def test_video_filters_on_audio_only_items_are_null(clips):
    for name in SIGNAL_FILTERS:
        assert run(clips["speech"], name) is None


def test_filters_share_one_decode(clips):
    _, item = _all_five(clips["plain"], backends=("pyav",))
    video = item.video()
    assert item.frames_decoded == len(video.plan.indices) == len(set(video.plan.indices)) <= 16 + 8 + 8 + 16


@pytest.mark.parametrize("name", ["cut", "freeze", "still", "hd_letterbox"])
def test_a_reduced_second_pass_finds_the_same(clips, name):
    """Over ``video.reduced_pass_bytes``, the static and scene-cut filters' frames come from a second pass at a long
    side of 256: far fewer bytes, the same findings (the other filters' frames are the same frames)."""
    one, item1 = _all_five(clips[name], reduced_pass_bytes=None)
    two, item2 = _all_five(clips[name], reduced_pass_bytes=1)
    v1, v2 = item1.video(), item2.video()
    assert v1.reduced is None and v2.reduced is not None
    assert max(v2.reduced.frames.shape[1:3]) == 256 and v2.frames.shape == (len(v2.plan.indices),) + v1.frames.shape[1:]
    placing = 7 if name == "cut" else 0  # the cut's frames 48 to 54, decoded again to place it
    assert item2.frames_decoded == len(v2.plan.indices) + len(v2.reduced.plan.indices) + placing
    assert v2.frames.numel() + v2.reduced.frames.numel() < v1.frames.numel()  # far less on long clips
    assert {type(r).__name__ for r in v2.plan.positions} == {"Uniform"}
    assert {type(r).__name__ for r in v2.reduced.plan.positions} == {"AtFps"}
    for f in ("black_borders", "exposure", "sharpness"):
        assert two[f] == one[f], f
    assert (two["scene_cuts"]["count"], two["scene_cuts"]["times_s"]) == (one["scene_cuts"]["count"],
                                                                          one["scene_cuts"]["times_s"])
    assert [w["static"] for w in two["static"]["windows"]] == [w["static"] for w in one["static"]["windows"]]
    assert two["static"]["static"] == one["static"]["static"]
    assert two["static"]["motion"] == pytest.approx(one["static"]["motion"], rel=0.25, abs=5e-4)


def test_the_decode_cap_counts_both_passes(clips):
    """An item over ``video.max_decoded_bytes`` even in two passes fails before decoding, naming both."""
    from pipeline.errors import DecodeError

    with pytest.raises(DecodeError, match=r"frames of 1280x720 and \d+ frames of 256x144 would take .* over "
                                          r"video.max_decoded_bytes"):
        _all_five(clips["hd_letterbox"], reduced_pass_bytes=1, max_decoded_bytes=1 << 20)
    results, item = _all_five(clips["hd_letterbox"], reduced_pass_bytes=1, max_decoded_bytes=120 << 20)
    assert item.video().reduced is not None and results["black_borders"]["letterbox"]  # 184 MB in one pass


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


def test_views_and_luma_are_read_from_the_decoded_frames_strided_and_cropped():
    """``view(step=)`` and ``luma(step=)`` equal the request's full frames gathered, then cropped, strided and
    converted (what the filters did before reading in place), with and without a crop; ``size`` is the view's."""
    import torch

    from pipeline.video.sampling import AtFps, Uniform

    frames = torch.randint(0, 256, (20, 30, 41, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    reqs = [Uniform(6), AtFps(4.0, 240)]
    video = _decoded(frames, reqs)
    bt601 = torch.tensor([0.299, 0.587, 0.114])
    for crop in (None, (5, 3, 30, 25)):  # x1, y1, x2, y2 in source pixels (scale 1)
        if crop is not None:
            video.set_crop_source(crop)
        x1, y1, x2, y2 = crop or (0, 0, 41, 30)
        for req in reqs:
            full = frames[video.plan.indices][torch.from_numpy(video.plan.positions[req][0])][:, y1:y2, x1:x2]
            assert torch.equal(video.view(req), full)
            assert video.size(req) == tuple(full.shape[1:3])
            assert torch.equal(video.view(req, step=3), full[:, ::3, ::3])
            for step in ((1, 1), (1, 4), (4, 1), (3, 3)):
                want = full[:, ::step[0], ::step[1]].float() @ bt601
                got = video.luma(req, "cpu", step=step)
                assert got.shape == want.shape and torch.allclose(got, want, atol=1e-3), (crop, req, step)


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


def _decoded(frames, requests, fps=25.0):
    """``frames`` (uint8 ``[N, H, W, 3]``, every frame of a clip at ``fps``) as the decoder hands them to filters."""
    from pipeline.video.decoders import DecodedVideo, VideoMeta
    from pipeline.video.sampling import make_plan

    n, h, w = frames.shape[:3]
    plan = make_plan(list(requests), n, fps)
    return DecodedVideo(frames[plan.indices], plan, VideoMeta(n, fps, w, h), "test", (1.0, 1.0))


def test_sharpness_of_a_sliver_of_content_keeps_pixels_to_measure():
    """A content box thinner than the inset off its edge (4 lit rows of a 64x64 frame, 6% of it) is measured whole,
    where the inset left nothing (the item failed with ZeroDivisionError)."""
    import torch

    from pipeline.filters.signal import SharpnessFilter, SharpnessParams

    frames = torch.zeros(8, 64, 64, 3, dtype=torch.uint8)
    texture = torch.randint(30, 255, (8, 4, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    frames[:, 30:34] = texture
    f = SharpnessFilter("sharpness", SharpnessParams())
    got = f.apply_video(_decoded(frames, f.frame_requests()), None, FilterContext("cpu", None))
    assert got["laplacian_var"] > 60 and not got["blurry"]  # random texture: sharp


@pytest.fixture(scope="module")
def anamorphic(tmp_path_factory):
    """A white 80x80 square on grey, letterboxed by 30-pixel bars in a 320x240 picture, stored as DVD and HDV store
    a wide picture: squeezed to 240x240 pixels that are 4:3 wide (a sample aspect ratio of 4:3)."""
    return synthetic.lavfi_clip(str(tmp_path_factory.mktemp("anamorphic") / "sq.mp4"), "color=gray:size=320x180:rate=25",
                                1.0, "drawbox=x=120:y=50:w=80:h=80:color=white:t=fill,pad=320:240:0:30:black,"
                                     "scale=240:240,setsar=4/3")


def _square_size(frame):
    """(width, height) of the white square in an RGB frame."""
    ys, xs = (frame.float().mean(-1) > 220).nonzero(as_tuple=True)
    return int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


@pytest.mark.parametrize("backend", ["decord", "torchcodec", "pyav"])
def test_anamorphic_video_is_decoded_with_square_pixels(anamorphic, backend):
    """The filters and models see the square square, as a player shows it (before: 60x80 pixels, a quarter
    squeezed); the bars' crop box stays in stored pixels, where ``ffmpeg -vf crop`` takes it."""
    square, item = _all_five(anamorphic, backends=(backend,))
    stored, item_stored = _all_five(anamorphic, backends=(backend,), square_pixels=False)
    frames = item.video().frames
    assert frames.shape[1:3] == (180, 240) and item.video().scale == pytest.approx((1.0, 4 / 3))
    w, h = _square_size(frames[0])
    assert (w, h) == (pytest.approx(60, abs=2), pytest.approx(60, abs=2))
    assert item_stored.video().frames.shape[1:3] == (240, 240)
    assert _square_size(item_stored.video().frames[0]) == (pytest.approx(60, abs=2), pytest.approx(80, abs=2))
    crop = square["black_borders"]["crop"]
    assert all(abs(crop[k] - stored["black_borders"]["crop"][k]) <= 2 for k in "xywh")
    assert (crop["x"], crop["w"]) == (0, 240) and abs(crop["y"] - 30) <= 2 and abs(crop["h"] - 180) <= 2
    assert square["black_borders"]["letterbox"] and not square["black_borders"]["pillarbox"]


@pytest.fixture(scope="module")
def long_shots(tmp_path_factory):
    """Six shots at 160x120 (the samples' size: the item's decode and the filter's own give the same pixels), cuts
    at frames 38, 53, 56, 86 and 111; and a copy whose tail is cut off."""
    d = tmp_path_factory.mktemp("long")
    path = synthetic.shots_clip(str(d / "shots.mp4"), synthetic.SIX_SHOTS, size="160x120")
    full = synthetic.lavfi_clip(str(d / "fs.mp4"), "testsrc2=size=160x120:rate=25", 4.0,
                                extra=("-movflags", "+faststart"))
    data = open(full, "rb").read()
    tail = str(d / "broken_tail.mp4")
    open(tail, "wb").write(data[: len(data) // 3])
    vfr = synthetic.rate_drop_clip(str(d / "vfr.mp4"))  # the cut at frame 75, 4.5 s
    frozen = str(d / "frozen.mp4")  # frames 100-174 (4.0-7.0 s) hold frame 100, letterboxed
    synthetic._ffmpeg(["-f", "lavfi", "-i", "testsrc2=size=160x90:rate=25:duration=12", "-filter_complex",
                       "[0:v]split[a][b];[a][b]freezeframes=first=100:last=174:replace=100,pad=160:120:0:15:black[v]",
                       "-map", "[v]", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", frozen])
    return {"shots": path, "broken_tail": tail, "vfr": vfr, "frozen": frozen}


def test_a_long_clip_is_sampled_all_through_by_the_scene_cut_filter(long_shots, monkeypatch):
    """Past ``max_frames`` samples the filter decodes the rate all through itself, a group at a time, keeping
    features, not frames: the same transitions as a clip within the cap, where the samples spread over it (one
    every 2 s here, as a 1-hour film's are 3 s apart) miss cuts. Groups of 4 samples: the thumbnail steps
    across a group's edge count as within one."""
    import pipeline.video.stream as stream

    f, item = filter_item(long_shots["shots"], "scene_cuts")  # 6 s: 25 samples, within the cap
    whole = f.apply(item, FilterContext("cpu", None))
    assert [t["frame"] for t in whole["transitions"]] == [38, 53, 56, 86, 111]
    assert len(item.video().plan.indices) == 25
    monkeypatch.setattr(stream, "STREAM_GROUP", 4)
    f, streaming = filter_item(long_shots["shots"], "scene_cuts", max_frames=3)  # a 0.75-s cap: a long clip
    streamed = f.apply(streaming, FilterContext("cpu", None))
    assert streaming.video().plan.indices == []  # the item's decode held none of its frames
    assert streamed == whole and streaming.frames_decoded == item.frames_decoded  # the samples, then the cuts'
    spread = run(long_shots["shots"], "scene_cuts", max_frames=3, stream_long_clips=False)
    assert spread["sample_fps"] == 0.5 and spread["transitions"] == []  # 3 samples: one shot each


def test_a_freeze_in_a_long_clip_is_found_by_the_static_filter_reading_it_all_through(long_shots, monkeypatch):
    """A 3-s freeze (4.0-7.0 s) in 12 s of motion, letterboxed: past ``max_frames`` the static filter reads the
    samples at 4 a second all through, groups of 8 (each group's content box found with the sample before it),
    and its row is the row of the clip within the cap: the window 4-6 s static. Spread instead, the 5 samples are
    2.4 s apart and no two of them lie in the freeze: every window reads moving."""
    import pipeline.video.stream as stream

    whole = run(long_shots["frozen"], "static")
    assert [w["static"] for w in whole["windows"]] == [False, False, True, False, False, False]
    monkeypatch.setattr(stream, "STREAM_GROUP", 8)
    f, item = filter_item(long_shots["frozen"], "static", max_frames=5)
    streamed = f.apply(item, FilterContext("cpu", None))
    assert item.video().plan.indices == [] and item.frames_decoded == 50  # every 6th of 300 frames, once
    assert streamed["windows"] == pytest.approx(whole["windows"], abs=1e-6)
    assert {k: streamed[k] for k in ("static", "static_ratio", "sample_fps")} == \
        {k: whole[k] for k in ("static", "static_ratio", "sample_fps")}
    spread = run(long_shots["frozen"], "static", max_frames=5, stream_long_clips=False)
    assert not any(w["static"] for w in spread["windows"]) and spread["sample_fps"] == pytest.approx(25 / 60)


def test_a_stream_decodes_fewer_samples_at_a_time_from_larger_sources():
    """Each group is one decode under ``video.decode_timeout_s``: 512 samples walk 3,072 frames of 25 fps."""
    from pipeline.video.stream import group_size

    assert [group_size(w, h) for w, h in ((320, 180), (1920, 1080), (3840, 2160), (7680, 4320), (0, 0))] == \
        [512, 512, 128, 32, 512]


def test_the_scene_cuts_and_the_static_filter_read_a_long_clip_in_one_pass(long_shots):
    """Both filters at one rate: the samples decoded once for the two (plus the frames that place the cuts), each
    row the row it has alone; at two rates, one pass too, the frames the two rates share decoded once."""
    from pipeline.config import VideoConfig

    def rows(**static):
        filters = build_filters((FilterSpec("scene_cuts", "scene_cuts", True, {"max_frames": 3}),
                                 FilterSpec("static", "static", True, {"max_frames": 3, **static})))
        item = MediaItem("x", long_shots["shots"], 0, frame_requests_of(filters), VideoConfig(),
                         available_backends(("decord", "torchcodec", "pyav")))
        return [f.apply(item, FilterContext("cpu", None)) for f in filters], item.frames_decoded

    (cuts, still), decoded = rows()
    f, alone = filter_item(long_shots["shots"], "scene_cuts", max_frames=3)
    assert cuts == f.apply(alone, FilterContext("cpu", None)) and decoded == alone.frames_decoded
    assert still == run(long_shots["shots"], "static", max_frames=3) and still["sample_fps"] == pytest.approx(25 / 6)
    assert [t["frame"] for t in cuts["transitions"]] == [38, 53, 56, 86, 111]
    (cuts5, still5), decoded_both = rows(fps=5.0)  # every 5th frame: 30 samples, 5 of them every 6th's too
    assert decoded_both == decoded + 25  # before, a pass each: 30 more
    assert cuts5 == cuts and still5 == run(long_shots["shots"], "static", max_frames=3, fps=5.0)


def test_a_long_clip_at_a_variable_rate_is_sampled_by_time_as_within_the_cap(long_shots):
    f, item = filter_item(long_shots["vfr"], "scene_cuts", max_frames=5)
    streamed = f.apply(item, FilterContext("cpu", None))
    assert item.video().plan.indices == [] and streamed == run(long_shots["vfr"], "scene_cuts")
    assert [(t["frame"], t["frame_exact"]) for t in streamed["transitions"]] == [(75, True)]
    assert streamed["times_s"] == [pytest.approx(4.5, abs=0.03)] and streamed["sample_fps"] == pytest.approx(4, rel=0.01)


def test_a_long_clip_with_a_broken_tail_is_sampled_up_to_where_it_breaks(long_shots):
    """The same samples as the item's own decode gives a clip whose tail is cut off: its decodable prefix."""
    f, item = filter_item(long_shots["broken_tail"], "scene_cuts", max_frames=2)
    streamed = f.apply(item, FilterContext("cpu", None))
    whole = run(long_shots["broken_tail"], "scene_cuts")
    assert streamed == whole and streamed["sample_fps"] == pytest.approx(25 / 6, rel=0.01)
    assert 4 < item.frames_decoded < 17  # 4 s had 17 samples


def item_whose_file_went(path: str, tmp_path, filters: list) -> MediaItem:
    """An item of a copy of ``path`` for ``filters``, decoded once (probed, its index read), then the copy removed:
    what a file gone or broken after the item's first decode gives a later decode."""
    from pipeline.config import VideoConfig

    copy = str(tmp_path / os.path.basename(path))
    open(copy, "wb").write(open(path, "rb").read())
    item = MediaItem("x", copy, 0, frame_requests_of(filters), VideoConfig(),
                     available_backends(("decord", "torchcodec", "pyav")))
    item.video()
    os.remove(copy)
    return item


def test_a_long_clip_whose_group_fails_to_decode_is_a_decode_error(long_shots, tmp_path):
    """A file gone (or broken) after the item's decode: the group's frames named, the error typed; the static
    filter, reading the same pass, gets the same error without a second try."""
    from pipeline.errors import DecodeError

    filters = build_filters((FilterSpec("scene_cuts", "scene_cuts", True, {"max_frames": 6}),
                             FilterSpec("static", "static", True, {"max_frames": 6})))
    item = item_whose_file_went(long_shots["shots"], tmp_path, filters)
    with pytest.raises(DecodeError, match=r"decoding frames 0-144 of the clip's 150, sampled at 4 a second all through "
                                          r"for the scene cuts and the static filter \(stream_long_clips\), failed: "
                                          r".*every video backend failed") as first:
        filters[0].apply(item, FilterContext("cpu", None))
    with pytest.raises(DecodeError) as second:
        filters[1].apply(item, FilterContext("cpu", None))
    assert second.value is first.value and item.frames_decoded == 0


def test_a_reader_failing_in_a_shared_stream_fails_only_its_filter(long_shots, monkeypatch, caplog):
    """The static filter's reader fails on the pass's first group (a bug in it): the scene cuts, which started the
    pass, read on to their row as alone, and the static filter's error is raised in its own filter, under its name
    (before, in the scene cuts, under theirs), with where it was raised; its stack goes to the log (before, a bug
    met by one item in a million left its type and message only: an IndexError found by fuzzing took a rerun under
    a debugger to place)."""
    import logging
    import traceback

    from pipeline.config import VideoConfig
    from pipeline.errors import FilterError
    from pipeline.filters import signal

    def broken(self, *args):
        raise ValueError("a bug in the static reader")

    monkeypatch.setattr(signal._StaticReading, "feed", broken)
    filters = build_filters((FilterSpec("scene_cuts", "scene_cuts", True, {"max_frames": 6}),
                             FilterSpec("static", "static", True, {"max_frames": 6})))
    item = MediaItem("x", long_shots["shots"], 0, frame_requests_of(filters), VideoConfig(),
                     available_backends(("decord", "torchcodec", "pyav")))
    assert filters[0].run(item, FilterContext("cpu", None))[0] == run(long_shots["shots"], "scene_cuts",
                                                                      max_frames=6)
    with caplog.at_level(logging.WARNING, logger="pipeline.filters.base"):
        with pytest.raises(FilterError, match=r"^static: ValueError: a bug in the static reader "
                                              r"\(at pipeline/video/stream\.py:\d+ in \S+\)$"):
            filters[1].run(item, FilterContext("cpu", None))
    # the row says where mediasieve's code met it; the log keeps the whole stack, down to the test's function
    (record,) = [r for r in caplog.records if "filter static raised ValueError on item x" in r.getMessage()]
    assert record.exc_info and record.exc_info[2].tb_next is not None
    assert "in broken" in "".join(traceback.format_exception(*record.exc_info))


def test_a_long_clip_sampled_all_through_falls_back_like_a_first_decode(long_shots):
    """Where the item's decode held no frame (scene cuts alone on a long clip), the backend that read the clip's
    index has not decoded a picture: one that then fails to is followed by the next, as in a first decode."""
    from pipeline.config import VideoConfig
    from pipeline.video.decoders import TorchcodecBackend

    class Refusing(TorchcodecBackend):  # reads the index, refuses every picture
        def decode(self, *args, **kwargs):
            raise RuntimeError("refused")

    (f,) = build_filters((FilterSpec("scene_cuts", "scene_cuts", True, {"max_frames": 3}),))
    pyav = available_backends(("pyav",))
    item = MediaItem("x", long_shots["shots"], 0, f.frame_requests(), VideoConfig(), [Refusing(), *pyav])
    out = f.apply(item, FilterContext("cpu", None))
    assert item.video().backend == "torchcodec" and item.video().plan.indices == []
    alone = MediaItem("x", long_shots["shots"], 0, f.frame_requests(), VideoConfig(), pyav)
    assert out == f.apply(alone, FilterContext("cpu", None))
    assert [t["frame"] for t in out["transitions"]] == [38, 53, 56, 86, 111]

