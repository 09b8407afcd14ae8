"""The generic clip classifier with tiny random models: loading from a URI, pooling, batching, windows."""

import os
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from models.video_classifier import VideoClassifier
from pipeline.config import FilterSpec, VideoConfig
from pipeline.filters import build_filters
from pipeline.filters.base import FilterContext, SetupContext
from pipeline.media import synthetic
from pipeline.media.item import MediaItem
from pipeline.model_pool import ModelPool, localize_model
from pipeline.video.decoders import available_backends
from pipeline.video.sampling import request_indices
from tests.video.tiny_models import LABELS, as_pt_head, tiny_videomae, tiny_vjepa2


@pytest.fixture(scope="module")
def clip4s(tmp_path_factory):
    d = tmp_path_factory.mktemp("cls")
    return synthetic.two_scene_clip(str(d / "four.mp4"), seconds_each=2.0)


def make_filter(tmp_path, uri, storage_options=None, **params):
    (f,) = build_filters((FilterSpec("vfx", "clip_classifier", True,
                                     {"model_uri": uri, "storage_options": storage_options or {}, **params}),))
    pool = ModelPool("cpu", instances=2)
    f.setup(SetupContext("cpu", pool, lambda u, o=None: localize_model(u, str(tmp_path / "mcache"), 0, lambda: None, o)))
    return f, pool


def make_filters(tmp_path, params: dict[str, dict]) -> list:
    """Classifier instances by name, set up on one model pool (as a rank sets up its filters)."""
    filters = build_filters(tuple(FilterSpec(name, "clip_classifier", True, p) for name, p in params.items()))
    pool = ModelPool("cpu", instances=1)
    for f in filters:
        f.setup(SetupContext("cpu", pool, lambda u, o=None: localize_model(u, str(tmp_path / "mc"), 0, lambda: None, o)))
    return filters


def item(path, f):
    return MediaItem("x", path, 0, f.frame_requests(), VideoConfig(), available_backends(("pyav",)))


def test_loads_from_s3_and_classifies(tmp_path, clip4s, s3, bucket):
    name, fs = bucket
    local = tiny_videomae(str(tmp_path / "m"))
    fs.put(local, f"{name}/models/vfx", recursive=True)
    f, _ = make_filter(tmp_path, f"s3://{name}/models/vfx", s3.options(), window_s=1.0, reversed_windows=True)
    out = f.apply(item(clip4s, f), FilterContext("cpu", None))
    assert out["label"] in LABELS and 0 < out["prob"] <= 1
    assert sum(v for _, v in out["scores"]) == pytest.approx(1.0, abs=1e-5)
    assert [w["start_s"] for w in out["windows"]] == pytest.approx([0.0, 1.0, 2.0, 3.0], abs=0.05)
    assert len(out["reversed_windows"]) == 4


def test_windows_and_reversed_windows_are_the_right_frames(tmp_path, clip4s):
    f, pool = make_filter(tmp_path, tiny_videomae(str(tmp_path / "m")), window_s=2.0, stride_s=1.0,
                          reversed_windows=True, whole_clip=False)
    it = item(clip4s, f)
    out = f.apply(it, FilterContext("cpu", None))
    video = it.video()
    req = f._windows()
    assert video.windows(req) == 3 and out["label"] is None
    for w in range(3):  # oracle: the model on the window's frames, forward and reversed
        frames = video.view(req, w)
        fwd = f.classify(frames[None])[0]
        rev = f.classify(frames.flip(0)[None])[0]
        assert out["windows"][w]["prob"] == pytest.approx(float(fwd.max()), abs=1e-5)
        assert out["reversed_windows"][w]["label"] == LABELS[int(rev.argmax())]
        assert out["reversed_windows"][w]["prob"] == pytest.approx(float(rev.max()), abs=1e-5)


def test_spread_windows_cover_all_of_a_long_clip_from_a_reduced_pass(tmp_path, clip4s):
    """Past ``max_windows`` (``stream_windows`` off) the windows spread over the whole clip. Over ``video.reduced_pass_bytes`` their frames
    come from a pass at the size the model resizes them to (``image_size`` on the short side, the same geometry), so
    the model's input is the source scaled by the decoder instead of by torch: within a few levels of it."""
    from pipeline.video.preprocess import clips_to_input

    f, _ = make_filter(tmp_path, tiny_videomae(str(tmp_path / "m")), window_s=1.0, stride_s=0.5, max_windows=3,
                       whole_clip=True, stream_windows=False)
    full = item(clip4s, f)
    one = f.apply(full, FilterContext("cpu", None))
    assert [(w["start_s"], w["end_s"]) for w in one["windows"]] == [(0.0, 1.0), (1.5, 2.5), (3.0, 4.0)]
    it = MediaItem("x", clip4s, 0, f.frame_requests(), VideoConfig(reduced_pass_bytes=1),
                   available_backends(("pyav",)))
    two = f.apply(it, FilterContext("cpu", None))
    video, req = it.video(), f._windows()
    # every request of this item is the model's: one pass, at the tiny model's 32 pixels (the source is 320x240)
    assert video.reduced is None and tuple(video.frames.shape[1:3]) == (32, 43) and full.video().frames.shape[1] == 240
    assert [(w["start_s"], w["end_s"]) for w in two["windows"]] == [(w["start_s"], w["end_s"]) for w in one["windows"]]
    for w in range(3):
        a, b = (clips_to_input(v.view(req, w)[None], 32, [0.0] * 3, [1.0] * 3, "cpu") for v in (full.video(), video))
        assert float((a - b).abs().mean()) * 255 < 3.0  # levels; measured 2.4 (PyAV), 1.0 (decord), 0.3 (torchcodec)
        assert two["windows"][w]["prob"] == pytest.approx(float(f.classify(video.view(req, w)[None])[0].max()),
                                                          abs=1e-5)


@pytest.fixture(scope="module")
def broken_tail(tmp_path_factory):
    """4 s at 25 fps whose last 28% of bytes are zeros (the index at the front still lists 100 frames: a broken
    tail); 74 frames decode (PyAV), which holds the frames of the window 2-3 s (the last one is frame 71) but not
    all of the window."""
    d = tmp_path_factory.mktemp("tail")
    full = synthetic.lavfi_clip(str(d / "full.mp4"), "testsrc2=size=320x240:rate=25", 4.0,
                                extra=("-movflags", "+faststart"))
    data = open(full, "rb").read()
    path = str(d / "broken_tail.mp4")
    cut = len(data) * 72 // 100
    open(path, "wb").write(data[:cut] + bytes(len(data) - cut))
    return path


WINDOWS = {"window_s": 1.0, "stride_s": 0.5, "reversed_windows": True, "whole_clip": False}
"""7 windows of 4 frames in 4 s (at 25 fps: frames 3, 9, 15, 21 from each half second on)."""


def rows_within_the_cap(tmp_path, path, model, **params):
    """The windows' rows from the item's own decode (at the model's input size, as a stream decodes them)."""
    f, _ = make_filter(tmp_path, model, **WINDOWS, **params)
    it = MediaItem("x", path, 0, f.frame_requests(), VideoConfig(reduced_pass_bytes=1), available_backends(("pyav",)))
    out = f.apply(it, FilterContext("cpu", None))
    assert it.video().windows(f._windows()) == len(out["windows"])  # no stream: the windows within the cap
    return out


def test_windows_past_the_cap_are_read_all_through_as_within_it(tmp_path, clip4s, monkeypatch):
    """More windows than ``max_windows`` at the stride: the item's decode holds none of their frames, and they are
    decoded a group at a time (groups of at most 9 frames here: two windows) and classified as they
    come; the rows (forward and reversed) equal the rows from the windows held at once. Spread (before), 3
    windows 1.5 s apart."""
    import pipeline.video.stream as stream

    model = tiny_videomae(str(tmp_path / "m"))
    within = rows_within_the_cap(tmp_path, clip4s, model)
    monkeypatch.setattr(stream, "group_size", lambda w, h: 9)
    f, _ = make_filter(tmp_path, model, max_windows=3, **WINDOWS)
    it = item(clip4s, f)
    out = f.apply(it, FilterContext("cpu", None))
    assert it.video().plan.indices == [] and it.video().windows(f._windows()) == 0
    assert [(w["start_s"], w["end_s"]) for w in out["windows"]] == [(t / 2, t / 2 + 1) for t in range(7)]
    for key in ("windows", "reversed_windows"):
        assert [w["label"] for w in out[key]] == [w["label"] for w in within[key]]
        assert [w["prob"] for w in out[key]] == pytest.approx([w["prob"] for w in within[key]], abs=1e-6)
    meta = it.video().meta
    windows = request_indices(f._window_stream().request, meta.num_frames, meta.fps)
    distinct = len({i for w in windows for i in w})
    assert len(windows) == 7 and distinct <= it.frames_decoded < 7 * 4  # a frame two windows of a group share: once
    assert len({w["prob"] for w in out["windows"]}) > 1  # the windows differ, so do their rows
    spread, _ = make_filter(tmp_path, model, max_windows=3, stream_windows=False, **WINDOWS)
    assert [w["start_s"] for w in spread.apply(item(clip4s, spread), FilterContext("cpu", None))["windows"]] == \
        [0.0, 1.5, 3.0]


def rows_together_and_alone(path, filters):
    """Each filter's row from one item that all of them read (the item returned too), and from an item of its own,
    with the frames that item decoded."""
    from pipeline.filters import frame_requests_of

    together = MediaItem("x", path, 0, frame_requests_of(filters), VideoConfig(), available_backends(("pyav",)))
    rows = [f.apply(together, FilterContext("cpu", None)) for f in filters]
    alone = []
    for f in filters:
        it = item(path, f)
        alone.append((f.apply(it, FilterContext("cpu", None)), it.frames_decoded))
    return together, rows, alone


def test_classifiers_with_the_same_windows_read_them_in_one_pass(tmp_path, clip4s):
    """Two classifiers (different weights, one input size): the windows' frames decoded once for both, each row
    the row it gets alone; the whole clip from the item's decode."""

    filters = make_filters(tmp_path, {name: {"model_uri": tiny_videomae(str(tmp_path / name), seed=i), **WINDOWS,
                                             "max_windows": 3, "whole_clip": True}
                                      for i, name in enumerate(("vfx", "rov"))})
    both, rows, alone = rows_together_and_alone(clip4s, filters)
    assert rows == [row for row, _ in alone] and both.frames_decoded == alone[0][1] == alone[1][1]
    assert len(rows[0]["windows"]) == 7 and rows[0]["windows"] != rows[1]["windows"]


def test_classifiers_with_other_windows_at_one_size_read_them_in_one_pass(tmp_path, clip4s):
    """Three classifiers at one input size whose windows differ (1 s every 0.5 s, every 1 s, and 2 s every 1 s):
    one pass decodes the frames of all their windows, a frame that two share once (the second's windows are among
    the first's: nothing more to decode for it), and each row is the row it gets alone, through its own pass."""
    from pipeline.filters import frame_requests_of

    laid = {"vfx": WINDOWS, "rov": {**WINDOWS, "stride_s": 1.0},
            "simcam": {**WINDOWS, "window_s": 2.0, "stride_s": 1.0}}
    filters = make_filters(tmp_path, {name: {"model_uri": tiny_videomae(str(tmp_path / name), seed=i), **laid[name],
                                             "max_windows": 2}
                                      for i, name in enumerate(laid)})
    together, rows, alone = rows_together_and_alone(clip4s, filters)
    assert rows == [row for row, _ in alone]
    assert [len(row["windows"]) for row in rows] == [7, 4, 3]
    assert alone[1][1] < alone[0][1] < together.frames_decoded < sum(n for _, n in alone)
    two = MediaItem("y", clip4s, 0, frame_requests_of(filters[:2]), VideoConfig(), available_backends(("pyav",)))
    assert [f.apply(two, FilterContext("cpu", None)) for f in filters[:2]] == rows[:2]
    assert two.frames_decoded == alone[0][1]  # every 1 s among every 0.5 s: not a frame more


def test_a_classifier_failing_in_a_shared_pass_fails_only_itself(tmp_path, clip4s, monkeypatch):
    """Three classifiers read one windows pass; the last one's model fails there (a CUDA fault): the pass goes on
    for the other two, whose rows are their rows alone, and the failure is raised in the failing classifier's own
    filter, named for it (before, it was raised in the first filter, which had started the pass, under its name).
    A failure that stops the rank (a GPU gone) still stops the pass at once, in whichever filter it meets."""
    import pipeline.video.stream as stream
    from pipeline.errors import FilterError, GpuFailure
    from pipeline.filters import frame_requests_of

    monkeypatch.setattr(stream, "group_size", lambda w, h: 9)  # two windows a group: a pass of several groups

    def build():
        return make_filters(tmp_path, {name: {"model_uri": tiny_videomae(str(tmp_path / name), seed=i), **WINDOWS,
                                              "max_windows": 2}
                                       for i, name in enumerate(("vfx", "simcam", "rov"))})

    filters = build()
    alone = []
    for f in filters[:2]:
        alone.append(f.apply(item(clip4s, f), FilterContext("cpu", None)))
    calls = []

    def fault(x):
        calls.append(len(x))
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(filters[2], "_batcher", fault)
    together = MediaItem("x", clip4s, 0, frame_requests_of(filters), VideoConfig(), available_backends(("pyav",)))
    assert [f.run(together, FilterContext("cpu", None))[0] for f in filters[:2]] == alone
    assert len(calls) == 1  # read no further after its failure
    with pytest.raises(FilterError, match="^rov: RuntimeError: CUDA error: an illegal memory access"):
        filters[2].run(together, FilterContext("cpu", None))
    frames = together.frames_decoded
    assert frames == item_frames(clip4s, filters[0])  # one pass for the three

    filters = build()

    def gone(x):
        raise GpuFailure("cuda:0 failed: the circuit breaker tripped")

    monkeypatch.setattr(filters[2], "_batcher", gone)
    together = MediaItem("y", clip4s, 0, frame_requests_of(filters), VideoConfig(), available_backends(("pyav",)))
    with pytest.raises(GpuFailure):
        filters[0].run(together, FilterContext("cpu", None))
    assert together.frames_decoded < frames  # the pass stopped at the first group


def item_frames(path, f) -> int:
    it = item(path, f)
    f.apply(it, FilterContext("cpu", None))
    return it.frames_decoded


def test_windows_read_all_through_end_where_a_broken_tail_breaks(tmp_path, broken_tail):
    model = tiny_videomae(str(tmp_path / "m"))
    within = rows_within_the_cap(tmp_path, broken_tail, model)
    f, _ = make_filter(tmp_path, model, max_windows=2, **WINDOWS)
    out = f.apply(item(broken_tail, f), FilterContext("cpu", None))
    assert 2 < len(out["windows"]) < 7 and out["windows"] == within["windows"]
    assert out["reversed_windows"] == within["reversed_windows"]


def test_windows_read_all_through_stop_at_max_stream_windows(tmp_path, clip4s):
    f, _ = make_filter(tmp_path, tiny_videomae(str(tmp_path / "m")), max_windows=2, max_stream_windows=4, **WINDOWS)
    out = f.apply(item(clip4s, f), FilterContext("cpu", None))
    assert [(w["start_s"], w["end_s"]) for w in out["windows"]] == [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0), (3.0, 4.0)]


def test_a_group_of_windows_that_fails_to_decode_is_a_decode_error_for_every_reader(tmp_path, clip4s):
    """The file gone after the item's first decode: the group's frames and windows named, the error typed; the
    second classifier reading the same pass gets the same error without a second try."""
    from pipeline.errors import DecodeError
    from pipeline.filters import frame_requests_of

    path = str(tmp_path / "four.mp4")
    open(path, "wb").write(open(clip4s, "rb").read())
    model = tiny_videomae(str(tmp_path / "m"))
    filters = make_filters(tmp_path, {name: {"model_uri": model, **WINDOWS, "max_windows": 3} for name in ("vfx", "rov")})
    it = MediaItem("x", path, 0, frame_requests_of(filters), VideoConfig(), available_backends(("pyav",)))
    it.video()
    os.remove(path)
    with pytest.raises(DecodeError, match=r"decoding frames 3-96 of the clip's 100 for windows 1-7 of 7 \(1 s every "
                                          r"0.5 s\), read all through for the vfx classifier and the rov classifier "
                                          r"\(stream_windows\), failed: .*every video backend failed") as first:
        filters[0].apply(it, FilterContext("cpu", None))
    with pytest.raises(DecodeError) as second:
        filters[1].apply(it, FilterContext("cpu", None))
    assert second.value is first.value and it.frames_decoded == 0


def test_windows_read_all_through_stop_when_the_item_is_given_up(tmp_path, clip4s, monkeypatch):
    """The rank's watchdog lets the item go while its windows are read (here, as the first group is classified):
    the pass stops before the next group's decode, with ``ItemTimeout``, instead of classifying the film for
    nobody."""
    import pipeline.video.stream as stream
    from pipeline.errors import ItemTimeout

    monkeypatch.setattr(stream, "group_size", lambda w, h: 9)
    f, _ = make_filter(tmp_path, tiny_videomae(str(tmp_path / "m")), max_windows=3, **WINDOWS)
    it = item(clip4s, f)
    batcher = f._batcher
    calls = []

    def give_up(x):
        calls.append(len(x))
        it.given_up.set()
        return batcher(x)

    monkeypatch.setattr(f, "_batcher", give_up)
    with pytest.raises(ItemTimeout, match="while it was read all through"):
        f.apply(it, FilterContext("cpu", None))
    assert len(calls) == 1 and it.frames_decoded <= 8  # the first group's two windows, and no more


def test_window_groups_hold_at_most_the_group_size():
    from pipeline.video.stream import window_groups

    windows = [[0, 1, 2], [2, 3, 4], [4, 5, 6], [10, 11, 12, 13, 14, 15, 16], [17]]
    assert window_groups(windows, 5) == [(0, 2), (2, 3), (3, 4), (4, 5)]  # a window over the size alone
    assert window_groups(windows, 100) == [(0, 5)] and window_groups([], 5) == []


def test_model_input_is_made_a_batch_at_a_time(tmp_path, clip4s, monkeypatch):
    """Windows become model input ``batch_size`` clips at a time with their reversed copies (half as many forward
    clips with ``reversed_windows``), not all at once: 128 clips of 48 frames at 256 pixels were 4.8 GB of input."""
    import pipeline.filters.clip_classifier as cc

    made, real = [], cc.clips_to_input
    monkeypatch.setattr(cc, "clips_to_input", lambda frames, *a, **k: made.append(len(frames)) or real(frames, *a, **k))
    f, _ = make_filter(tmp_path, tiny_videomae(str(tmp_path / "m")), batch_size=4, **WINDOWS)
    runs = f._batcher.batches_run
    out = f.apply(item(clip4s, f), FilterContext("cpu", None))
    assert made == [2, 2, 2, 1] and len(out["reversed_windows"]) == 7
    assert f._batcher.batches_run - runs == 4  # 4 + 4 + 4 + 2 rows


@pytest.mark.parametrize("pooling,depth", [("linear", 1), ("attentive", 1), ("attentive", 3)])
def test_batched_equals_one_at_a_time(tmp_path, pooling, depth):
    path = tiny_videomae(str(tmp_path / "m"), pooling=pooling, depth=depth)
    f, _ = make_filter(tmp_path, path, batch_size=8)
    clips = torch.randint(0, 256, (6, 4, 40, 48, 3), dtype=torch.uint8)
    batched = f.classify(clips)
    single = torch.cat([f.classify(c[None]) for c in clips])
    assert torch.allclose(batched, single, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)  # inputs differ, so do outputs


def test_clips_become_model_input_in_memory_bounded_groups(tmp_path, monkeypatch):
    import pipeline.video.preprocess as pre

    f, _ = make_filter(tmp_path, tiny_videomae(str(tmp_path / "m")), batch_size=8)
    clips = torch.randint(0, 256, (5, 4, 40, 48, 3), dtype=torch.uint8)
    whole = f.classify(clips)
    monkeypatch.setattr(pre, "GROUP_BYTES", 2 * 4 * 40 * 48 * 3)  # two clips stacked at a time
    assert torch.allclose(f.classify(list(clips)), whole, atol=1e-6)  # a list of views, as apply_video passes


def test_concurrent_items_share_batches(tmp_path):
    f, _ = make_filter(tmp_path, tiny_videomae(str(tmp_path / "m")), batch_size=8, max_wait_ms=50)
    clips = torch.randint(0, 256, (8, 4, 32, 32, 3), dtype=torch.uint8)
    expected = torch.cat([f.classify(c[None]) for c in clips])
    runs_before = f._batcher.batches_run
    results = [None] * 8

    def go(i):
        results[i] = f.classify(clips[i:i + 1])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.allclose(torch.cat(results), expected, atol=1e-5)
    assert f._batcher.batches_run - runs_before < 8  # clips of different callers ran together


def test_vjepa2_backbone_and_torch_checkpoint_head(tmp_path):
    model = VideoClassifier.load(tiny_vjepa2(str(tmp_path / "vj")))
    assert model._input_name == "pixel_values_videos"
    assert model(torch.randn(2, 4, 3, 32, 32)).shape == (2, 3)
    pt = as_pt_head(tiny_videomae(str(tmp_path / "pt")))
    ref = tiny_videomae(str(tmp_path / "st"))
    x = torch.randn(1, 4, 3, 32, 32)
    assert torch.allclose(VideoClassifier.load(pt)(x), VideoClassifier.load(ref)(x), atol=1e-6)


def test_config_errors(tmp_path):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="model_uri is required"):
        build_filters((FilterSpec("vfx", "clip_classifier", True, {}),))
    with pytest.raises(ConfigError, match="does not exist"):
        make_filter(tmp_path, str(tmp_path / "nope"))
    for key in ("max_windows", "max_stream_windows"):
        with pytest.raises(ConfigError, match="max_windows and max_stream_windows must be at least 1"):
            build_filters((FilterSpec("vfx", "clip_classifier", True, {"model_uri": "x", key: 0}),))


def test_four_instances_in_the_job(tmp_path, media_dir):
    from pipeline.config import build_config, validate_config
    from pipeline.distributed import DistContext
    from pipeline.runner import run_rank
    from tests.conftest import base_config, make_corpus, write_manifest

    rows = make_corpus(str(tmp_path / "c"), media_dir, 4, kinds=("motion.mp4", "still.mp4", "speech.wav"))
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    filters = {"probe": {}}
    for i, name in enumerate(["vfx", "simcam", "rov", "low_quality"]):
        filters[name] = {"type": "clip_classifier", "model_uri": tiny_videomae(str(tmp_path / name), seed=i),
                         "window_s": 0.5, "reversed_windows": name == "rov"}
    filters["vfx"]["max_windows"] = filters["simcam"]["max_windows"] = 1  # their windows read all through
    raw = base_config(manifest, str(tmp_path / "c"), str(tmp_path / "out"), str(tmp_path / "cache"), filters=filters)
    cfg = build_config(raw)
    validate_config(cfg)
    outcome = run_rank(cfg, DistContext())
    assert outcome.summary["this_run"]["succeeded"] == 4
    assert outcome.summary["models"]["vfx"] == [{"backend": "torch", "execution_provider": "cpu", "io_binding": None,
                                                 "fallback_reason": None, "ranks": [0]}]
    assert set(outcome.summary["models"]) == {"vfx", "simcam", "rov", "low_quality"}
    table = pq.read_table(str(tmp_path / "out" / "parts"))
    assert pa.types.is_list(table.schema.field("vfx").type.field("windows").type)
    by_id = {r["video_id"]: r for r in table.to_pylist()}
    assert by_id["id-0000"]["rov"]["reversed_windows"] and not by_id["id-0000"]["vfx"]["reversed_windows"]
    assert by_id["id-0002"]["vfx"] is None  # audio only
    assert all(by_id["id-0000"][n]["label"] in LABELS for n in ["vfx", "simcam", "rov", "low_quality"])
    spans = {n: [(w["start_s"], w["end_s"]) for w in by_id["id-0000"][n]["windows"]] for n in ["vfx", "rov"]}
    assert len(spans["vfx"]) > 1 and spans["vfx"] == spans["rov"]  # all through, as the clip within the cap


def test_onnx_backend_matches_torch_with_buckets_and_io_binding(tmp_path, clip4s):
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_onnx", f"{__import__('tests.conftest').conftest.ROOT}/jobs/export_onnx.py")
    export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export)
    path = tiny_videomae(str(tmp_path / "m"))
    report = export.export_classifier(path)
    assert report["max_abs_diff"] < 1e-4 and report["argmax_equal"]
    ref, _ = make_filter(tmp_path, path, window_s=1.0, reversed_windows=True)
    outs = {}
    for binding in (True, False):
        f, _ = make_filter(tmp_path, path, window_s=1.0, reversed_windows=True, backend="onnx", io_binding=binding,
                           batch_buckets=[1, 4, 8], batch_size=8)
        outs[binding] = f.apply(item(clip4s, f), FilterContext("cpu", None))
        assert outs[binding]["runtime"] == {"backend": "onnx", "execution_provider": "CPUExecutionProvider",
                                            "io_binding": binding, "fallback_reason": None}
    want = ref.apply(item(clip4s, ref), FilterContext("cpu", None))
    for got in outs.values():
        assert got["label"] == want["label"] and got["prob"] == pytest.approx(want["prob"], abs=1e-5)
        assert [w["prob"] for w in got["windows"]] == pytest.approx([w["prob"] for w in want["windows"]], abs=1e-5)
    # padding to a bucket never changes a row: 3 clips (padded to 4) equal each clip alone (bucket 1)
    f, _ = make_filter(tmp_path, path, backend="onnx", batch_buckets=[1, 4], batch_size=4)
    clips = torch.randint(0, 256, (3, 4, 32, 32, 3), dtype=torch.uint8)
    assert torch.allclose(f.classify(clips), torch.cat([f.classify(c[None]) for c in clips]), atol=1e-6)


def test_onnx_backend_errors(tmp_path):
    from pipeline.errors import ConfigError

    path = tiny_videomae(str(tmp_path / "m"))
    with pytest.raises(ConfigError, match="export_onnx"):
        make_filter(tmp_path, path, backend="onnx")
    with pytest.raises(ConfigError, match="largest batch bucket"):
        build_filters((FilterSpec("vfx", "clip_classifier", True,
                                  {"model_uri": path, "backend": "onnx", "batch_size": 16}),))


def test_window_bounds_in_config_are_on_the_files_timeline(tmp_path, clip4s):
    """Pictures that start 0.5 s after the audio (an MPEG-TS capture): ``start_s``/``end_s`` are seconds on the
    file's timeline, as the rows' times are, so the windows asked for are the windows reported, and they hold the
    frames shown then (the first frame is at 0.5 s, so a window from 1.5 s starts at the clip's 25th frame)."""
    path = str(tmp_path / "late.ts")
    synthetic._ffmpeg(["-itsoffset", "0.5", "-i", clip4s, "-f", "lavfi", "-i", "sine=duration=5",
                       "-map", "0:v", "-map", "1:a", "-c:v", "copy", "-c:a", "aac", path])
    f, _ = make_filter(tmp_path, tiny_videomae(str(tmp_path / "m")), window_s=1.0, start_s=1.5, end_s=3.5,
                       whole_clip=False)
    it = item(path, f)
    out = f.apply(it, FilterContext("cpu", None))
    assert [(w["start_s"], w["end_s"]) for w in out["windows"]] == pytest.approx([(1.5, 2.5), (2.5, 3.5)], abs=1e-3)
    video = it.video()
    offset, fps = video.start_s, video.meta.fps
    assert offset == pytest.approx(0.5, abs=0.05)  # what the file says (the AAC priming moves its start a little)
    for w, (start, end) in enumerate(((1.5, 2.5), (2.5, 3.5))):
        got = [int(video.plan.indices[p]) for p in video.plan.positions[f._windows()][w]]
        assert (start - offset) * fps - 1 <= got[0] and got[-1] < (end - offset) * fps, (w, got, offset)
