"""A long clip read all through by the signal filters (samples at 4 a second) and the classifiers (windows) in one
decode pass (``pipeline.video.stream.passes``), not one pass each.

Oracle: each filter's row from the shared pass equals its row from an item of its own (which reads its own pass),
and the pass decodes the union of the samples' and the windows' frames once."""


import pytest

from pipeline.config import FilterSpec, VideoConfig
from pipeline.filters import build_filters, frame_requests_of
from pipeline.filters.base import FilterContext
from pipeline.media import synthetic
from pipeline.media.item import MediaItem
from pipeline.video.decoders import available_backends
from pipeline.video.sampling import AtFps, request_indices
from tests.benchmarks.bench_classifier_windows import same_windows
from tests.video.test_clip_classifier import make_filters
from tests.video.test_signal_filters import item_whose_file_went
from tests.video.tiny_models import tiny_videomae

CPU = FilterContext("cpu", None)
LAID = {"vfx": {"window_s": 1.0, "stride_s": 0.5}, "rov": {"window_s": 1.0, "reversed_windows": True}}
"""Two classifiers whose windows differ (as ``vfx`` and ``rov`` in ``configs/sieve.yaml``), both past their cap."""


@pytest.fixture(scope="module")
def films(tmp_path_factory):
    """Six shots at 160x120 (cuts at frames 38, 53, 56, 86 and 111), the same at 320x240, 4 s of a pattern whose
    tail is cut off, and 12 s whose frame rate falls from 25 to 10 at 2 s (its cut at frame 75, 4.5 s)."""
    d = tmp_path_factory.mktemp("joint")
    small = synthetic.shots_clip(str(d / "shots.mp4"), synthetic.SIX_SHOTS, size="160x120")
    large = synthetic.shots_clip(str(d / "shots320.mp4"), synthetic.SIX_SHOTS, size="320x240")
    full = synthetic.lavfi_clip(str(d / "fs.mp4"), "testsrc2=size=160x120:rate=25", 4.0,
                                extra=("-movflags", "+faststart"))
    data = open(full, "rb").read()
    tail = str(d / "broken_tail.mp4")
    open(tail, "wb").write(data[: len(data) * 2 // 3])
    vfr = synthetic.rate_drop_clip(str(d / "vfr.mp4"))  # the cut at frame 75, 4.5 s
    return {"shots": small, "shots320": large, "broken_tail": tail, "vfr": vfr}


def signal_filters():
    return build_filters((FilterSpec("scene_cuts", "scene_cuts", True, {"max_frames": 3}),
                          FilterSpec("static", "static", True, {"max_frames": 3})))


def classifiers(tmp_path, image_size: int) -> list:
    return make_filters(tmp_path, {name: {"model_uri": tiny_videomae(str(tmp_path / f"{name}{image_size}"), seed=i,
                                                                     image_size=image_size),
                                          **laid, "max_windows": 2, "whole_clip": False}
                                   for i, (name, laid) in enumerate(LAID.items())})


def read(path: str, filters: list) -> tuple[list[dict], MediaItem]:
    """Each filter's row from one item that all of them read, in order, with the item."""
    item = MediaItem("x", path, 0, frame_requests_of(filters), VideoConfig(),
                     available_backends(("decord", "torchcodec", "pyav")))
    return [f.run(item, CPU)[0] for f in filters], item


@pytest.fixture
def decodes(monkeypatch):
    """The decodes of each item after its first (``MediaItem.more_frames``: a pass's groups, the cuts' frames):
    each one walks the film from a keyframe, whatever frames of it are kept."""
    calls = []
    more = MediaItem.more_frames

    def counted(self, request):
        calls.append(self)
        return more(self, request)

    monkeypatch.setattr(MediaItem, "more_frames", counted)
    return lambda item: sum(c is item for c in calls)


@pytest.mark.parametrize("name", ["shots", "broken_tail", "vfr"])
def test_signal_filters_and_classifiers_read_a_long_clip_in_one_pass(tmp_path, films, name, monkeypatch, decodes):
    """The scene cuts, the static filter and two classifiers, all past their caps on a 160x120 clip (the
    classifiers' 128 pixels on the short side take it at its size, as the signal filters do): one pass decodes the
    samples and the windows (before, a pass for the samples and one for the windows), a frame they share once;
    each row is the row the filter gets alone, in one group or in groups of 9 frames; a broken tail ends the
    samples and the windows where it breaks, as alone; at a variable rate both are placed by time, as alone."""
    import pipeline.video.stream as stream

    signal, models = signal_filters(), classifiers(tmp_path, 128)
    rows, together = read(films[name], signal + models)
    alone = [read(films[name], [f]) for f in signal + models]
    assert rows == [r[0] for r, _ in alone]
    _, windows = read(films[name], models)  # the classifiers' own pass
    _, samples = read(films[name], signal)  # the signal filters' own, and the decodes that place the cuts
    assert decodes(windows) == 1 and decodes(together) == decodes(samples)
    meta = together.video().meta
    sampled = request_indices(AtFps(4.0, meta.num_frames), meta.num_frames, meta.fps)[0]
    union = {i for f in models for w in request_indices(f._window_stream().request, meta.num_frames, meta.fps)
             for i in w} | set(sampled)
    if name == "shots":  # the whole clip in one group: each frame of the union once, and the cuts' frames placed
        assert [t["frame"] for t in rows[0]["transitions"]] == [38, 53, 56, 86, 111]
        assert together.frames_decoded == len(union) + samples.frames_decoded - len(sampled)
        assert len(rows[2]["windows"]) == 11 and len(rows[3]["windows"]) == 6
    elif name == "vfr":
        assert [(t["frame"], t["frame_exact"]) for t in rows[0]["transitions"]] == [(75, True)]
        assert rows[2]["windows"][-1]["end_s"] == pytest.approx(12.0, abs=0.1)  # 50 frames at 25, 100 at 10
    else:
        assert 50 < meta.num_frames < 100 and 2 < len(rows[2]["windows"]) < 7  # 4 s would be 7
    monkeypatch.setattr(stream, "group_size", lambda w, h: 9)
    grouped, _ = read(films[name], signal + models)
    assert grouped[:2] == rows[:2]  # windows batched another way: their sums in another order
    assert all(same_windows(a, b, tol=1e-5) for a, b in zip(grouped[2:], rows[2:], strict=True))


def read_frames(path: str, filters: list) -> int:
    return read(path, filters)[1].frames_decoded


def test_signal_samples_among_larger_windows_find_the_same(tmp_path, films, decodes):
    """Classifiers taking 224 pixels on the short side of a 320x240 clip: the pass decodes at 299x224 and the
    signal filters read those frames (at the long side of at least 256 they asked for) instead of their own pass's
    256x192: the same cuts, the same static windows; the classifiers' rows are their rows alone."""
    signal, models = signal_filters(), classifiers(tmp_path, 224)
    rows, together = read(films["shots320"], signal + models)
    cuts, still = (read(films["shots320"], [f])[0][0] for f in signal)
    assert rows[2:] == [read(films["shots320"], [f])[0][0] for f in models]
    assert [t["frame"] for t in rows[0]["transitions"]] == [t["frame"] for t in cuts["transitions"]] == \
        [38, 53, 56, 86, 111]
    assert [w["static"] for w in rows[1]["windows"]] == [w["static"] for w in still["windows"]]
    assert rows[1]["motion"] == pytest.approx(still["motion"], rel=0.05)
    assert decodes(together) == decodes(read(films["shots320"], signal)[1])  # the cuts' decodes, and one pass


def test_windows_smaller_than_the_samples_leave_them_a_pass_of_their_own(tmp_path, films, decodes):
    """Classifiers taking 32 pixels: their frames are too small for the signal filters (256 asked, the clip's 160
    given), which read a pass of their own, as before."""
    signal, models = signal_filters(), classifiers(tmp_path, 32)
    rows, together = read(films["shots"], signal + models)
    assert rows == [read(films["shots"], [f])[0][0] for f in signal + models]
    assert together.frames_decoded == read_frames(films["shots"], signal) + read_frames(films["shots"], models)
    assert decodes(together) == decodes(read(films["shots"], signal)[1]) + 1


def test_a_crop_set_between_the_readers_has_the_later_ones_read_again_cropped(tmp_path, films):
    """The safe crop (``yolo_regions``' ``crop_output``) set after the signal filters read the shared pass and
    before the classifiers ask for theirs: the classifiers' windows are read again, cropped (their rows those of an
    item cropped before any read), the static filter's row stays its uncropped one, and a second classifier does
    not read a third time."""
    signal, models = signal_filters(), classifiers(tmp_path, 128)
    box = (0, 0, 80, 120)  # the left half, in source pixels
    item = MediaItem("x", films["shots"], 0, frame_requests_of(signal + models), VideoConfig(),
                     available_backends(("decord", "torchcodec", "pyav")))
    rows = [f.run(item, CPU)[0] for f in signal]
    shared = item.frames_decoded
    item.video().set_crop_source(box)
    rows += [f.run(item, CPU)[0] for f in models]
    assert rows[:2] == [read(films["shots"], [f])[0][0] for f in signal]
    cropped = MediaItem("y", films["shots"], 0, frame_requests_of(models), VideoConfig(),
                        available_backends(("decord", "torchcodec", "pyav")))
    cropped.video().set_crop_source(box)
    assert rows[2:] == [f.run(cropped, CPU)[0] for f in models]
    assert rows[2:] != [read(films["shots"], [f])[0][0] for f in models]  # the crop changed what they saw
    assert item.frames_decoded == shared + cropped.frames_decoded  # the windows once more, for both classifiers


def test_each_reader_s_seconds_count_in_its_own_filter(tmp_path, films, monkeypatch):
    """The static filter's run reads the pass that the classifiers read too: their model's seconds (made 0.2 s a
    group here) count in their own ``filter_s``, not in the static filter's, which keeps the pass's decoding."""
    import time

    import pipeline.video.stream as stream
    from pipeline.filters import clip_classifier

    monkeypatch.setattr(stream, "group_size", lambda w, h: 9)
    feed = clip_classifier._WindowsReading.feed
    calls = []

    def slow(self, clips, spans):
        calls.append(self.f.name)
        time.sleep(0.2)
        return feed(self, clips, spans)

    monkeypatch.setattr(clip_classifier._WindowsReading, "feed", slow)
    signal, models = signal_filters(), classifiers(tmp_path, 128)
    item = MediaItem("x", films["shots"], 0, frame_requests_of(signal + models), VideoConfig(),
                     available_backends(("decord", "torchcodec", "pyav")))
    static, *mine = [f.run(item, CPU)[1] for f in signal[1:] + models]  # the static filter first: it reads the pass
    slept = [0.2 * calls.count(f.name) for f in models]
    assert min(slept) >= 0.6 and static < min(slept)
    assert all(s >= t for s, t in zip(mine, slept, strict=True))


def test_a_group_of_the_shared_pass_that_fails_to_decode_names_samples_and_windows(tmp_path, films):
    """The file gone after the item's first decode: the group's frames, the rate, the windows and every reader
    named; the classifiers, reading the same pass, get the same error without a second try."""
    from pipeline.errors import DecodeError

    filters = signal_filters()[1:] + classifiers(tmp_path, 128)
    item = item_whose_file_went(films["shots"], tmp_path, filters)
    with pytest.raises(DecodeError, match=r"decoding frames 0-146 of the clip's 150, sampled at 4 a second and for "
                                          r"windows 1-11 of 11 \(1 s every 0.5 s\) and windows 1-6 of 6 \(1 s every "
                                          r"1 s\), read all through for the static filter, the vfx classifier and "
                                          r"the rov classifier \(stream_long_clips, stream_windows\), failed: "
                                          r".*every video backend failed") as first:
        filters[0].apply(item, CPU)
    for f in filters[1:]:
        with pytest.raises(DecodeError) as again:
            f.apply(item, CPU)
        assert again.value is first.value
    assert item.frames_decoded == 0


def test_passes_join_the_rates_with_windows_large_enough_for_them():
    from pipeline.filters.signal import StaticReader
    from pipeline.video.sampling import Windows
    from pipeline.video.stream import Stream, WindowStream, passes

    four, five = Stream(4.0, 256, StaticReader()), Stream(5.0, 192, StaticReader())

    def windows(short_side):
        return WindowStream(Windows(1.0, 0.5, 4, short_side=short_side), reader=short_side)

    w224, w112, w64 = windows(224), windows(112), windows(64)
    assert passes([four, five], (640, 360)) == [[four, five]]  # every rate in one pass
    assert passes([four, w224], (640, 360)) == [[four, w224]]  # 398x224 frames: at least 256 long
    assert passes([four, w112], (640, 360)) == [[w112], [four]]  # 199x112: too small for the samples
    assert passes([four, w112], (200, 150)) == [[w112], [four]]  # 149x112 against the clip's 200x150
    w128 = windows(128)
    assert passes([four, w128], (160, 120)) == [[four, w128]]  # the clip's 160x120: what both get
    assert passes([w64, four, w224, five], (640, 360)) == [[w64], [four, five, w224]]
    assert passes([], (640, 360)) == []
