"""ONNX Runtime on a GPU: CUDA with and without IOBinding against CPU, TensorRT FP16 with its engine cache, and the
ONNX VAD and bucketed head on CUDA.

Skipped without CUDA, and without an onnxruntime-gpu whose CUDA (or TensorRT) provider loads here; run on a GPU
machine with ``python -m pytest -m gpu tests/gpu``.
"""

import os

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from models.onnx_session import OrtParams, diagnose_provider  # noqa: E402


def _needs(provider: str) -> None:
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        pytest.skip(f"{provider} is not in this onnxruntime build")
    why = diagnose_provider(provider)
    if why is not None:
        pytest.skip(why)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    import importlib.util

    from tests.conftest import ROOT
    from tests.video.tiny_models import tiny_videomae

    spec = importlib.util.spec_from_file_location("export_onnx", f"{ROOT}/jobs/export_onnx.py")
    export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export)
    path = tiny_videomae(str(tmp_path_factory.mktemp("ortgpu") / "m"))
    export.export_classifier(path)
    with open(os.path.join(path, "head.json")) as f:
        import json

        head = json.load(f)
    return os.path.join(path, "model.onnx"), head["num_frames"], head["image_size"]


def test_cuda_with_and_without_io_binding_equals_cpu(classifier):
    _needs("CUDAExecutionProvider")
    from models.onnx_classifier import OnnxClassifier

    path, t, s = classifier
    x = torch.randn(3, t, 3, s, s)
    ref = OnnxClassifier(path, t, s, "cpu", "cpu", (1, 4), io_binding=False)(x)
    # TF32 (ORT's default on Ampere and later) 1.5e-3 from the CPU on an H200; FP32 proper within 1e-4
    for binding, tf32, tol in ((False, False, 1e-4), (True, False, 1e-4), (True, True, 1e-2)):
        run = OnnxClassifier(path, t, s, "cuda", "cuda:0", (1, 4), io_binding=binding, strict=True,
                             params=OrtParams(tf32=tf32))
        assert run.ort.execution_provider == "CUDAExecutionProvider" and run.ort.fallback_reason is None
        got = run(x.cuda())
        assert got.shape == ref.shape and (got.cpu() - ref).abs().max() < tol, (binding, tf32)
        if binding:
            assert got.is_cuda  # bound to a device buffer: no trip through host memory


def test_tensorrt_fp16_builds_into_the_engine_cache(classifier, tmp_path):
    _needs("TensorrtExecutionProvider")
    from models.onnx_classifier import OnnxClassifier

    path, t, s = classifier
    cache = tmp_path / "engines"
    run = OnnxClassifier(path, t, s, "tensorrt", "cuda:0", (1, 2), strict=True,
                         params=OrtParams(trt_fp16=True, trt_engine_cache_dir=str(cache)))
    assert run.ort.execution_provider == "TensorrtExecutionProvider"
    assert any(cache.iterdir())  # the engine built at start-up (every bucket warmed) is cached on the node
    ref = OnnxClassifier(path, t, s, "cpu", "cpu", (1, 2), io_binding=False)
    x = torch.randn(2, t, 3, s, s)
    assert (run(x.cuda()).cpu() - ref(x)).abs().max() < 5e-2  # FP16 engine


def test_onnx_vad_on_cuda_equals_torchscript():
    _needs("CUDAExecutionProvider")
    from pipeline.audio.vad import OnnxSileroVAD, SileroVAD

    onnx = OnnxSileroVAD(16000, "cuda", strict=True, batch_buckets=(4,))
    assert onnx.ort.execution_provider == "CUDAExecutionProvider"
    x = torch.randn(3, 512 * 40) * 0.1
    assert (onnx.probs(x) - SileroVAD().probs(x)).abs().max() < 1e-3


def test_sequence_vad_on_cuda_equals_torchscript():
    _needs("CUDAExecutionProvider")
    from pipeline.audio.vad import SequenceSileroVAD, SileroVAD

    seq = SequenceSileroVAD(16000, "cuda", strict=True, max_frames=16)
    assert seq.ort.execution_provider == "CUDAExecutionProvider"
    x = torch.randn(3, 512 * 40) * 0.1
    assert (seq.probs(x) - SileroVAD().probs(x)).abs().max() < 1e-3


def test_bucketed_head_on_cuda_padded_equals_native(tmp_path):
    _needs("CUDAExecutionProvider")
    from models.onnx_classifier import OnnxHead, export_head
    from models.video_classifier import ClassifierHead, HeadConfig

    torch.manual_seed(0)
    head = ClassifierHead(64, HeadConfig(labels=["a", "b"], pooling="attentive", num_heads=4)).eval()
    path = export_head(head, 64, str(tmp_path / "head.onnx"))
    run = OnnxHead(path, 64, (1, 4), (16, 64), provider="cuda", strict=True, params=OrtParams(tf32=False))
    seqs = [torch.randn(n, 64) for n in (3, 16, 40)]
    with torch.no_grad():
        ref = torch.cat([head(q[None]) for q in seqs])
    assert (run(seqs) - ref).abs().max() < 1e-4


def test_yolo_on_cuda_with_io_binding_equals_cpu(tmp_path):
    """The yolo_regions ONNX path on CUDA: GPU letterbox and bound buffers, the same detections as on CPU (within
    the one-level difference of the two resizes, so compared on frames that need none)."""
    _needs("CUDAExecutionProvider")
    import numpy as np

    from models.yolo import OnnxYoloDetector
    from tests.video.test_yolo_regions import export_yolo_onnx
    from tests.video.tiny_models import lively_yolo

    path = export_yolo_onnx(lively_yolo(str(tmp_path / "y.pt")), 160)
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 96, 160, 3), dtype=np.uint8))
    ref = OnnxYoloDetector(path, "cpu", (96, 160), io_binding=False).detect(frames)
    run = OnnxYoloDetector(path, "cuda:0", (96, 160), provider="cuda", strict=True,
                           params=OrtParams(tf32=False))  # with TF32, two boxes of near-equal score swapped places
    assert run.ort.execution_provider == "CUDAExecutionProvider" and run.model.on_gpu
    got = run.detect(frames.cuda())
    assert sum(len(d.xyxy) for d in ref) > 0
    for a, b in zip(got, ref):
        assert len(a.xyxy) == len(b.xyxy) and np.array_equal(a.cls, b.cls) and np.abs(a.xyxy - b.xyxy).max() < 0.5


def test_separator_on_its_own_cuda_stream_equals_cpu(tmp_path):
    """STFT, model (IOBinding, ORT computing on the separator's stream) and inverse STFT on the GPU: the same
    separation as on the CPU, with torch's default stream left free."""
    _needs("CUDAExecutionProvider")
    import numpy as np

    from pipeline.audio.schedule import chunk_schedule
    from pipeline.audio.separator import Separator, SeparatorParams
    from tests.audio.test_separator import SIDE, export

    path = export(str(tmp_path / "g.onnx"), gain=0.5)
    rng = np.random.default_rng(0)
    stereo = (rng.standard_normal((2, 16000 * 4)) * 0.1).astype(np.float32)
    plans = chunk_schedule(4.0, 1.0, 0.25, 0.0, 1024, 16000)
    cpu = Separator(path, SIDE, SeparatorParams()).separate(stereo, plans)
    sep = Separator(path, SIDE, SeparatorParams(provider="cuda"), "cuda:0", strict=True)
    assert sep.on_gpu and sep.stream is not None and sep.ort.execution_provider == "CUDAExecutionProvider"
    opts = sep.ort.session.get_provider_options()["CUDAExecutionProvider"]
    assert opts.get("user_compute_stream") == str(sep.stream.cuda_stream)
    assert np.abs(sep.separate(stereo, plans) - cpu).max() < 1e-4


def test_a_real_cuda_arena_out_of_memory_splits_the_batch_and_keeps_the_gpu():
    """ONNX Runtime's CUDA arena refusing for real (held to 1 GiB): the breaker lets it through, the batcher splits,
    and the process stays on CUDA."""
    _needs("CUDAExecutionProvider")
    import onnxruntime as ort

    import models.circuit_breaker as cb
    from pipeline.batching import DynamicBatcher
    from tests.unit.test_oom_batching import big_expand_model

    session = ort.InferenceSession(big_expand_model(1 << 26),  # 256 MiB a row
                                   providers=[("CUDAExecutionProvider", {"gpu_mem_limit": 1 << 30})])
    cb._reset_for_tests()
    breaker = cb.CircuitBreaker(lambda x: torch.from_numpy(session.run(None, {"x": x.numpy()})[0]), cpu_factory=None)
    batcher = DynamicBatcher(breaker, max_batch=16, max_wait_s=0.0)
    x = torch.stack([torch.ones(16), torch.arange(16.0)], dim=1)
    assert torch.equal(batcher(x), torch.arange(16.0) * 2)
    assert batcher.oom_splits >= 1 and batcher.batch_limit < 16
    assert cb.tripped() is None and session.get_providers()[0] == "CUDAExecutionProvider"


def test_a_job_asking_for_tensorrt_records_the_provider_in_effect_and_why(tmp_path, classifier, clips):
    """The ONNX classifier asked for on TensorRT in a job on a GPU rank: where TensorRT's libraries are missing (the
    lent H200 has no libnvinfer), the rows and the summary say CUDA ran it and name the library; with strict_gpu
    the rank refuses to start. Where TensorRT loads, they say TensorRT."""
    _needs("CUDAExecutionProvider")
    import shutil

    import pyarrow.parquet as pq

    from pipeline.config import build_config, validate_config
    from pipeline.distributed import DistContext
    from pipeline.runner import run_rank
    from tests.conftest import base_config, write_manifest

    model = os.path.dirname(classifier[0])
    corpus = tmp_path / "c"
    corpus.mkdir()
    for name in ("cut", "motion"):
        shutil.copy(clips[name], corpus / f"{name}.mp4")
    manifest = write_manifest(str(tmp_path / "m.parquet"),
                              [{"video_id": n, "video_path": f"{n}.mp4"} for n in ("cut", "motion")])
    why = diagnose_provider("TensorrtExecutionProvider")
    for strict in (False, True):
        vfx = {"type": "clip_classifier", "model_uri": model, "backend": "onnx", "provider": "tensorrt",
               "window_s": 1.0, "strict_gpu": strict}
        raw = base_config(manifest, str(corpus), str(tmp_path / f"out{strict}"), str(tmp_path / "cache"),
                          runtime={"device": "cuda"}, filters={"probe": {}, "vfx": vfx})
        cfg = build_config(raw)
        validate_config(cfg)
        if strict and why is not None:
            with pytest.raises(Exception, match="libnvinfer|TensorRT|Tensorrt"):
                run_rank(cfg, DistContext(), "cuda:0")
            continue
        outcome = run_rank(cfg, DistContext(), "cuda:0")
        assert outcome.summary["this_run"]["succeeded"] == 2
        (model_row,) = outcome.summary["models"]["vfx"]
        rows = pq.read_table(str(tmp_path / f"out{strict}" / "parts")).to_pylist()
        runtimes = [r["vfx"]["runtime"] for r in rows]
        if why is None:
            assert model_row["execution_provider"] == "TensorrtExecutionProvider"
            assert all(rt["execution_provider"] == "TensorrtExecutionProvider" for rt in runtimes)
        else:
            assert model_row["execution_provider"] == "CUDAExecutionProvider" and model_row["io_binding"] is True
            assert "libnvinfer" in model_row["fallback_reason"], model_row
            assert all(rt == {k: model_row[k] for k in rt} for rt in runtimes)

