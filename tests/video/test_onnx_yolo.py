"""Exported YOLO through mediasieve's ONNX Runtime session factory (``yolo_regions`` with an ``.onnx`` model):
the same detections as ultralytics on the same file, letterboxing, buckets, IOBinding, configuration errors,
strict GPU mode and the circuit breaker."""

import shutil

import numpy as np
import pytest
import torch
from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

import models.circuit_breaker as cb
from models.onnx_session import ProviderError
from models.yolo import OnnxYoloDetector, OnnxYoloModel, YoloDetector, input_hw, letterbox
from pipeline.config import VideoConfig
from pipeline.errors import ConfigError, GpuFailure
from pipeline.filters.base import FilterContext
from pipeline.media.item import MediaItem
from pipeline.video.decoders import available_backends
from tests.video.test_circuit_breaker import Faulty
from tests.video.test_clip_classifier import clip4s  # noqa: F401 - fixture reused
from tests.video.test_yolo_regions import _setup, export_yolo_onnx
from tests.video.tiny_models import YOLO_NAMES, lively_yolo

SIZES = [(120, 160), (100, 90), (240, 320)]  # padding only, upscaled, downscaled


@pytest.fixture(scope="module")
def yolo_onnx(tmp_path_factory):
    d = tmp_path_factory.mktemp("yolo_onnx")
    return export_yolo_onnx(lively_yolo(str(d / "lively.pt")), 160)


@pytest.fixture(autouse=True)
def fresh_breaker():
    cb._reset_for_tests()
    yield
    cb._reset_for_tests()


def frames_of(shape, n=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape, 3), dtype=np.uint8)


def reference(path, frames, conf=0.25, imgsz=160):
    """ultralytics' own predictor on the same file, letterboxing to the same square (``rect=False``)."""
    from ultralytics import YOLO

    model = YOLO(path, task="detect")
    res = model.predict([np.ascontiguousarray(f[..., ::-1]) for f in frames], imgsz=imgsz, conf=conf, iou=0.7,
                        rect=False, verbose=False, batch=len(frames))
    return [(r.boxes.xyxy.numpy(), r.boxes.cls.numpy().astype(int), r.boxes.conf.numpy()) for r in res]


def assert_same(ours, ref):
    assert sum(len(r[0]) for r in ref) >= 10  # the model does detect here
    for d, (xyxy, cls, conf) in zip(ours, ref, strict=True):
        assert len(d.xyxy) == len(xyxy) and np.array_equal(d.cls, cls)
        if len(xyxy):
            assert np.abs(d.xyxy - xyxy).max() < 0.05 and np.abs(d.conf - conf).max() < 1e-4


@pytest.mark.parametrize("imgsz", [160, (96, 160)])
@pytest.mark.parametrize("shape", SIZES)
def test_detections_equal_ultralytics_on_the_same_onnx(yolo_onnx, shape, imgsz):
    """The same detections: model, NMS, class ids and the mapping of boxes back to frame pixels through padding
    and scale (on CPU our letterbox gives ultralytics' own pixels)."""
    frames = frames_of(shape)
    det = OnnxYoloDetector(yolo_onnx, imgsz=imgsz)
    assert det.names == YOLO_NAMES
    assert_same(det.detect(frames), reference(yolo_onnx, frames, imgsz=list(input_hw(imgsz))))


def test_detections_equal_the_pt_model(yolo_onnx):
    """The exported file against the torch weights it came from (ultralytics eager on the .pt, same letterbox)."""
    from ultralytics import YOLO

    frames = frames_of((120, 160))
    pt = yolo_onnx[: -len(".onnx")] + ".pt"
    res = YOLO(pt, task="detect").predict([np.ascontiguousarray(f[..., ::-1]) for f in frames], imgsz=160,
                                          conf=0.25, iou=0.7, rect=False, verbose=False, batch=3)
    ref = [(r.boxes.xyxy.numpy(), r.boxes.cls.numpy().astype(int), r.boxes.conf.numpy()) for r in res]
    assert_same(OnnxYoloDetector(yolo_onnx, imgsz=160).detect(frames), ref)


@pytest.mark.parametrize("imgsz", [160, (96, 160)])
@pytest.mark.parametrize("shape", SIZES)
def test_letterbox_matches_ultralytics(shape, imgsz):
    """On CPU, ultralytics' own pixels (cv2), from numpy frames and from torch frames."""
    from ultralytics.data.augment import LetterBox

    frames = frames_of(shape, n=2)
    for given in (list(frames), [torch.from_numpy(f) for f in frames]):
        x, shapes = letterbox(given, imgsz)
        assert x.shape == (2, 3, *input_hw(imgsz)) and x.dtype == torch.float32 and shapes == [shape, shape]
        for f, got in zip(frames, x):
            want = LetterBox(input_hw(imgsz), auto=False)(image=f)  # HWC, same channel order in and out
            assert torch.equal(got, torch.from_numpy(want).permute(2, 0, 1).float() / 255)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("shape", SIZES)
def test_the_gpu_letterbox_is_within_a_level_of_cv2(shape, device):
    """The torch resize that GPU ranks use (run on the CPU too, so that every test run checks it)."""
    frames = frames_of(shape, n=2)
    cpu, _ = letterbox(list(frames), (96, 160))
    got, _ = letterbox([torch.from_numpy(f) for f in frames], (96, 160), device, resize="torch")
    assert got.device.type == device and got.shape == cpu.shape
    diff = (got.cpu() - cpu).abs() * 255
    assert diff.max() <= 1 + 1e-3 and diff.mean() < 0.15


def test_the_gpu_letterbox_in_memory_bounded_groups_changes_nothing(monkeypatch):
    import pipeline.video.preprocess as pre

    frames = [torch.from_numpy(f) for f in frames_of((120, 160), n=5)] + [torch.from_numpy(frames_of((90, 100))[0])]
    whole, shapes = letterbox(frames, (96, 160), resize="torch")
    monkeypatch.setattr(pre, "GROUP_BYTES", 120 * 160 * 3 * 4 * 2)  # two source frames at a time
    grouped, shapes2 = letterbox(frames, (96, 160), resize="torch")
    assert torch.equal(grouped, whole) and shapes2 == shapes


@pytest.mark.parametrize("arch,nms", [("26/yolo26.yaml", False), ("v8/yolov8.yaml", True)])
def test_post_nms_exports_nms_free_and_embedded(tmp_path, arch, nms):
    """Exports whose output is already detections ``[B, max_det, 6]``: YOLO26's NMS-free head (``nms=False``) and
    NMS embedded in the graph (``nms=True``, right only at its export batch: more frames run in parts of it)."""
    path = export_yolo_onnx(lively_yolo(str(tmp_path / "m.pt"), arch=arch), 160, nms=nms)
    frames = frames_of((120, 160), n=5)
    buckets = (1,) if nms else (1, 4)
    det = OnnxYoloDetector(path, imgsz=160, conf=0.3, buckets=buckets)
    assert det.model.end2end
    assert_same(det.detect(frames), reference(path, frames, conf=0.3))
    if nms:
        with pytest.raises(ValueError, match="NMS embedded, which runs only at its export batch of 1"):
            OnnxYoloModel(path, 160, buckets=(1, 4))


def test_mixed_sizes_batched_equal_one_at_a_time_with_and_without_io_binding(yolo_onnx):
    frames = [f for shape in SIZES for f in frames_of(shape, n=1, seed=len(shape) + shape[0])]
    bound = OnnxYoloDetector(yolo_onnx, imgsz=160, buckets=(1, 4), io_binding=True)
    plain = OnnxYoloDetector(yolo_onnx, imgsz=160, buckets=(1, 4), io_binding=False)
    batched = bound.detect(frames)  # 3 frames of 3 sizes, padded to the bucket of 4
    assert bound.model._out.keys() == {1, 4}
    for i, f in enumerate(frames):
        for one in (bound.detect([f])[0], plain.detect([f])[0]):
            assert np.allclose(one.xyxy, batched[i].xyxy, atol=1e-3) and np.array_equal(one.cls, batched[i].cls)
    tensors = bound.detect([torch.from_numpy(f) for f in frames])  # frames already in torch (the device path)
    assert all(np.array_equal(a.xyxy, b.xyxy) for a, b in zip(tensors, batched))


@pytest.mark.parametrize("backend", ["onnx", "ultralytics"])
def test_max_det_caps_the_detections_per_frame(tmp_path, yolo_onnx, backend):
    f = _setup(tmp_path, yolo_onnx, backend=backend, conf=0.05, max_det=3)
    with f._pool.acquire(f._pool_key) as det:
        got = det.detect(frames_of((120, 160)))
    assert [len(d.xyxy) for d in got] == [3, 3, 3]
    with pytest.raises(ConfigError, match="max_det must be >= 1"):
        _setup(tmp_path, yolo_onnx, max_det=0)


def test_classes_filter_the_detections(yolo_onnx):
    frames = frames_of((120, 160))
    det = OnnxYoloDetector(yolo_onnx, imgsz=160, conf=0.25)
    only = det.detect(frames, classes=[1])
    assert all(set(d.cls.tolist()) <= {1} for d in only) and sum(len(d.cls) for d in only) > 0


def test_the_filter_runs_an_onnx_uri_through_the_session_factory(tmp_path, media_dir, yolo_onnx):
    f = _setup(tmp_path, yolo_onnx, conf=0.01, step=5, min_persistence=0.0, batch_size=4, batch_buckets=[1, 4])
    assert f.onnx and f._batcher.group_key is None
    item = MediaItem("x", f"{media_dir}/motion.mp4", 0, f.frame_requests(), VideoConfig(),
                     available_backends(("pyav",)))
    out = f.apply(item, FilterContext("cpu", None))
    assert out["runtime"] == {"backend": "onnx", "execution_provider": "CPUExecutionProvider", "io_binding": True,
                              "fallback_reason": None}
    assert out["frames"] > 1 and out["regions"] and {r["label"] for r in out["regions"]} <= set(YOLO_NAMES.values())
    c = out["crop"]  # (random boxes may leave no crop at all; it stays inside the frame)
    assert 0 <= c["x"] and 0 <= c["y"] and c["x"] + c["w"] <= 320 and c["y"] + c["h"] <= 240
    assert f.runtimes() == {"regions": out["runtime"]}


def test_configuration_errors_are_clear(tmp_path, yolo_onnx):
    with pytest.raises(ConfigError, match="exceeds the largest batch bucket"):
        _setup(tmp_path, yolo_onnx, batch_size=32, batch_buckets=[1, 8])
    with pytest.raises(ConfigError, match="not a multiple of the model's stride"):
        _setup(tmp_path, yolo_onnx, imgsz=150)
    with pytest.raises(ConfigError, match=r"an integer or \[height, width\]"):
        _setup(tmp_path, yolo_onnx, imgsz=[96, 160, 3])
    fixed = export_yolo_onnx(shutil.copy(yolo_onnx[: -len(".onnx")] + ".pt", tmp_path / "fixed.pt"), 160,
                             dynamic=False)
    with pytest.raises(ConfigError, match=r"exported for 160x160 \(h x w\) inputs, imgsz is 320x320"):
        _setup(tmp_path, fixed, imgsz=320)
    with pytest.raises(ConfigError, match=r"fixed batch of 1"):
        _setup(tmp_path, fixed, batch_size=4, batch_buckets=[1, 4])
    assert _setup(tmp_path, fixed, batch_size=1, batch_buckets=[1]).runtime["backend"] == "onnx"
    bare = tmp_path / "bare.onnx"  # a detector-shaped ONNX file without ultralytics' metadata
    torch.onnx.export(torch.nn.Conv2d(3, 7, 1), (torch.zeros(1, 3, 160, 160),), str(bare), input_names=["images"],
                      dynamic_axes={"images": {0: "b"}}, dynamo=False)
    with pytest.raises(ConfigError, match="no class names in the ONNX metadata"):
        _setup(tmp_path, str(bare))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without a GPU")
def test_strict_gpu_refuses_the_fallback(yolo_onnx):
    with pytest.raises(ProviderError, match="CUDAExecutionProvider requested"):
        OnnxYoloModel(yolo_onnx, 160, "cuda", "cuda:0", strict=True)
    loose = OnnxYoloModel(yolo_onnx, 160, "cuda", "cuda:0")
    assert loose.ort.providers == ["CPUExecutionProvider"] and loose.ort.fallback_reason
    assert loose.device == "cpu"  # no GPU buffers are bound for a session that runs on CPU


def test_cuda_failure_moves_yolo_to_a_cpu_subprocess(tmp_path, yolo_onnx, media_dir):
    f = _setup(tmp_path, yolo_onnx, conf=0.01, step=5, min_persistence=0.0)
    item = lambda: MediaItem("x", f"{media_dir}/motion.mp4", 0, f.frame_requests(), VideoConfig(),  # noqa: E731
                             available_backends(("pyav",)))
    want = f.apply(item(), FilterContext("cpu", None))
    with f._pool.acquire(f._pool_key) as det:
        det.forward.primary = Faulty(det.forward.primary, RuntimeException(
            "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDA failure 700: an illegal memory access"))
    got = f.apply(item(), FilterContext("cpu", None))
    assert got["regions"] == want["regions"] and got["crop"] == want["crop"]
    assert got["runtime"]["execution_provider"] == "CPUExecutionProvider (subprocess)"
    assert got["runtime"]["fallback_reason"].startswith("circuit breaker: RuntimeException")


def test_strict_gpu_makes_a_yolo_cuda_failure_fatal(tmp_path, yolo_onnx):
    f = _setup(tmp_path, yolo_onnx, strict_gpu=True)
    with f._pool.acquire(f._pool_key) as det:
        det.forward.primary = Faulty(det.forward.primary, RuntimeException("CUDNN_STATUS_EXECUTION_FAILED"))
    frames = frames_of((120, 160), n=1)

    class Video:  # the one method apply_video needs before the failure
        def view(self, request):
            return torch.from_numpy(frames)

    with pytest.raises(GpuFailure, match="strict GPU mode"):
        f.apply_video(Video(), None, FilterContext("cpu", None))


def test_ultralytics_backend_stays_available_for_onnx(tmp_path, yolo_onnx):
    f = _setup(tmp_path, yolo_onnx, backend="ultralytics")
    assert not f.onnx and f.runtime["backend"] == "ultralytics-onnx"
    with f._pool.acquire(f._pool_key) as det:
        assert isinstance(det, YoloDetector)


def test_job_runs_the_onnx_model_from_s3_and_the_summary_says_where(tmp_path, media_dir, yolo_onnx, s3, bucket):
    import pyarrow.parquet as pq

    from pipeline.config import build_config, validate_config
    from pipeline.distributed import DistContext
    from pipeline.runner import run_rank
    from tests.conftest import base_config, make_corpus, write_manifest

    name, fs = bucket
    fs.put(yolo_onnx, f"{name}/models/regions.onnx")
    rows = make_corpus(str(tmp_path / "c"), media_dir, 3, kinds=("motion.mp4", "speech.wav"))
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    filters = {"regions": {"type": "yolo_regions", "model_uri": f"s3://{name}/models/regions.onnx",
                           "storage_options": s3.options(), "imgsz": [128, 160], "conf": 0.05, "step": 5,
                           "min_persistence": 0.0, "batch_size": 4, "batch_buckets": [1, 4]}}
    raw = base_config(manifest, str(tmp_path / "c"), str(tmp_path / "out"), str(tmp_path / "cache"), filters=filters)
    cfg = build_config(raw)
    validate_config(cfg)
    outcome = run_rank(cfg, DistContext())
    assert outcome.summary["this_run"]["succeeded"] == 3, outcome.summary
    runtime = {"backend": "onnx", "execution_provider": "CPUExecutionProvider", "io_binding": True,
               "fallback_reason": None}
    by_id = {r["video_id"]: r for r in pq.read_table(str(tmp_path / "out" / "parts")).to_pylist()}
    assert by_id["id-0000"]["regions"]["runtime"] == runtime and by_id["id-0000"]["regions"]["frames"] > 1
    assert by_id["id-0001"]["regions"] is None  # audio only
    assert outcome.summary["models"]["regions"] == [{**runtime, "ranks": [0]}]


def test_export_publishes_next_to_remote_models_for_every_node(tmp_path, media_dir, clip4s, s3, bucket):  # noqa: F811
    """jobs/export_onnx.py on models in S3: the exports land next to them, so a node whose cache holds the model
    from before the export, and a fresh node, both run them in ONNX Runtime."""
    import yaml

    from tests.conftest import base_config, write_manifest
    from tests.video.test_clip_classifier import item as clip_item
    from tests.video.test_clip_classifier import make_filter
    from tests.video.tiny_models import tiny_videomae

    name, fs = bucket
    fs.put(tiny_videomae(str(tmp_path / "vfx")), f"{name}/models/vfx", recursive=True)
    fs.put(lively_yolo(str(tmp_path / "regions.pt")), f"{name}/models/regions.pt")
    vfx, regions = f"s3://{name}/models/vfx", f"s3://{name}/models/regions.pt"
    node_b = tmp_path / "b"
    node_b.mkdir()
    make_filter(node_b, vfx, s3.options())  # node b caches the model directory before the export
    raw = base_config(write_manifest(str(tmp_path / "m.parquet"), [{"video_id": "a", "video_path": "a.mp4"}]),
                      str(tmp_path), str(tmp_path / "out"), str(tmp_path / "export-cache"),
                      filters={"vfx": {"type": "clip_classifier", "model_uri": vfx, "storage_options": s3.options()},
                               "regions": {"type": "yolo_regions", "model_uri": regions, "imgsz": 160,
                                           "storage_options": s3.options()}})
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert export_main(["--config", str(config)]) == 0
    assert fs.exists(f"{name}/models/vfx/model.onnx") and fs.exists(f"{name}/models/regions.onnx")
    node_c = tmp_path / "c"
    node_c.mkdir()
    for node in (node_b, node_c):
        f, _ = make_filter(node, vfx, s3.options(), backend="onnx")
        assert f.apply(clip_item(clip4s, f), FilterContext("cpu", None))["runtime"]["backend"] == "onnx"
    y = _setup(node_c, f"s3://{name}/models/regions.onnx", s3.options())
    assert y.onnx and y.runtime["backend"] == "onnx" and y.names == YOLO_NAMES


def export_main(argv):
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("export_onnx", f"{ROOT}/jobs/export_onnx.py")
    export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export)
    return export.main(argv)
