"""CUDA paths: signal filters, FP16 classifier and YOLO on the GPU, and the job on a GPU rank.

Skipped without CUDA (CI never has one); run on a lent GPU machine with ``python -m pytest -m gpu tests/gpu``.
Media come from MEDIASIEVE_GPU_MEDIA (a folder of clips made elsewhere) when the machine has no ffmpeg CLI.
"""

import shutil

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from pipeline.config import FilterSpec, VideoConfig  # noqa: E402
from pipeline.filters import build_filters, frame_requests_of  # noqa: E402
from pipeline.filters.base import FilterContext, SetupContext  # noqa: E402
from pipeline.media.item import MediaItem  # noqa: E402
from pipeline.model_pool import ModelPool, localize_model  # noqa: E402
from pipeline.video.decoders import available_backends  # noqa: E402

SIGNAL = ("black_borders", "static", "exposure", "sharpness", "scene_cuts")


def _item(path, filters):
    reqs = frame_requests_of(filters)
    return MediaItem("x", path, 0, reqs, VideoConfig(), available_backends(("decord", "torchcodec", "pyav")))


def test_signal_filters_on_cuda_match_cpu(clips):
    filters = build_filters(tuple(FilterSpec(n, n) for n in SIGNAL))
    for clip in (clips["letterbox"], clips["cut"], clips["blurfill"]):  # bars with text, a cut, a blurred fill
        item = _item(clip, filters)
        for f in filters:
            cpu = f.apply(item, FilterContext("cpu", None))
            gpu = f.apply(item, FilterContext("cuda:0", None))
            for key, value in cpu.items():
                _same(gpu[key], value, (f.name, key))


def test_a_long_clip_streamed_on_cuda_matches_cpu(clips):
    """Scene cuts and the static filter reading a clip over ``max_frames`` all through, in one pass, a group at a
    time, on the device (the item keeps each device's pass apart)."""
    filters = build_filters((FilterSpec("scene_cuts", "scene_cuts", True, {"max_frames": 4}),
                             FilterSpec("static", "static", True, {"max_frames": 4})))
    item = _item(clips["cut"], filters)
    cpu = [f.apply(item, FilterContext("cpu", None)) for f in filters]
    assert item.video().plan.indices == [] and cpu[0]["count"] == 1 and cpu[1]["sample_fps"] > 3
    decoded = item.frames_decoded
    for f, row in zip(filters, cpu, strict=True):
        _same(f.apply(item, FilterContext("cuda:0", None)), row, (f.name,))
    assert item.frames_decoded > decoded  # read again, on the device


def _same(gpu, cpu, where):
    """Equal, floats within FP tolerance, lists and dicts (windows, overlays, transitions) element by element."""
    if isinstance(cpu, float):
        assert gpu == pytest.approx(cpu, rel=1e-3, abs=1e-4), where
    elif isinstance(cpu, list):
        assert isinstance(gpu, list) and len(gpu) == len(cpu), where
        for i, (g, c) in enumerate(zip(gpu, cpu, strict=True)):
            _same(g, c, (*where, i))
    elif isinstance(cpu, dict):
        assert isinstance(gpu, dict) and gpu.keys() == cpu.keys(), where
        for k in cpu:
            _same(gpu[k], cpu[k], (*where, k))
    else:
        assert gpu == cpu, where


def test_classifier_fp16_on_cuda_agrees_with_fp32_cpu(tmp_path, clips):
    from tests.video.tiny_models import tiny_videomae

    path = tiny_videomae(str(tmp_path / "m"))
    out = {}
    for device in ("cpu", "cuda:0"):
        (f,) = build_filters((FilterSpec("vfx", "clip_classifier", True, {"model_uri": path, "window_s": 1.0}),))
        pool = ModelPool(device, instances=2)
        f.setup(SetupContext(device, pool, lambda u, o=None: localize_model(u, str(tmp_path), 0, lambda: None, o)))
        item = _item(clips["cut"], [f])
        clipped = torch.stack([item.video().view(f._whole())])
        out[device] = (f.classify(clipped), f.apply(item, FilterContext(device, pool)), f._dtype)
    assert out["cuda:0"][2] == torch.float16 and out["cpu"][2] == torch.float32
    assert torch.allclose(out["cpu"][0], out["cuda:0"][0], atol=2e-2)
    assert out["cpu"][1]["label"] == out["cuda:0"][1]["label"]


def test_classifier_windows_read_all_through_on_cuda_agree_with_cpu(tmp_path, clips):
    """Windows past ``max_windows`` read a group at a time and classified in FP16 on the GPU, forward and reversed:
    the windows of the CPU run, probabilities within FP16 tolerance."""
    from tests.video.tiny_models import tiny_videomae

    path = tiny_videomae(str(tmp_path / "m"))
    params = {"model_uri": path, "window_s": 0.5, "stride_s": 0.25, "max_windows": 2, "reversed_windows": True,
              "whole_clip": False}
    out = {}
    for device in ("cpu", "cuda:0"):
        (f,) = build_filters((FilterSpec("vfx", "clip_classifier", True, params),))
        pool = ModelPool(device, instances=1)
        f.setup(SetupContext(device, pool, lambda u, o=None: localize_model(u, str(tmp_path), 0, lambda: None, o)))
        item = _item(clips["cut"], [f])
        out[device] = f.apply(item, FilterContext(device, pool))
        assert item.video().plan.indices == []  # every window read all through
    assert len(out["cpu"]["windows"]) > 2
    for key in ("windows", "reversed_windows"):
        cpu, gpu = out["cpu"][key], out["cuda:0"][key]
        assert [(w["start_s"], w["end_s"]) for w in gpu] == [(w["start_s"], w["end_s"]) for w in cpu]
        assert [w["prob"] for w in gpu] == pytest.approx([w["prob"] for w in cpu], abs=2e-2)


def test_yolo_fp16_on_cuda(tmp_path, clips):
    from tests.video.tiny_models import tiny_yolo

    pt = tiny_yolo(str(tmp_path / "y.pt"))
    (f,) = build_filters((FilterSpec("regions", "yolo_regions", True,
                                     {"model_uri": pt, "imgsz": 320, "conf": 0.001, "min_persistence": 0.0}),))
    pool = ModelPool("cuda:0", instances=1)
    f.setup(SetupContext("cuda:0", pool, lambda u, o=None: u))
    with pool.acquire(f._pool_key) as det:  # warmed up: the predictor holds the device copy
        backend = det.model.predictor.model
        assert det.half and backend.fp16 and str(backend.device).startswith("cuda")
    out = f.apply(_item(clips["letterbox"], [f]), FilterContext("cuda:0", pool))
    assert out["frames"] > 0 and 0.0 <= out["crop_area_ratio"] <= 1.0
    assert {r["label"] for r in out["regions"]} <= {"watermark", "subtitle", "logo"}


def test_job_on_a_gpu_rank(tmp_path, clips):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.config import build_config, validate_config
    from pipeline.distributed import DistContext
    from pipeline.runner import run_rank
    from tests.conftest import base_config
    from tests.video.tiny_models import tiny_videomae

    corpus = tmp_path / "c"
    corpus.mkdir()
    rows = []
    for i, name in enumerate(sorted(clips)):
        shutil.copy(clips[name], corpus / f"{i}.mp4")
        rows.append({"video_id": name, "video_path": f"{i}.mp4"})
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "m.parquet"))
    filters = {n: {} for n in SIGNAL}
    filters["vfx"] = {"type": "clip_classifier", "model_uri": tiny_videomae(str(tmp_path / "m")), "window_s": 1.0}
    raw = base_config(str(tmp_path / "m.parquet"), str(corpus), str(tmp_path / "out"), str(tmp_path / "cache"),
                      runtime={"device": "cuda", "empty_cache_every": 1}, filters=filters)
    cfg = build_config(raw)
    validate_config(cfg)
    outcome = run_rank(cfg, DistContext(), "cuda:0")
    assert outcome.summary["this_run"]["succeeded"] == len(rows)
    table = pq.read_table(str(tmp_path / "out" / "parts"))
    assert {r["result_info"]["device"] for r in table.to_pylist()} == {"cuda:0"}


def test_torchcodec_nvdec_decode_matches_cpu(clips):
    pytest.importorskip("torchcodec")
    from pipeline.video.decoders import decode_video
    from pipeline.video.sampling import Uniform

    backends = available_backends(("torchcodec",))
    try:
        gpu = decode_video(clips["cut"], [Uniform(8)], backends, device="cuda:0")
    except Exception as e:  # noqa: BLE001 - a torchcodec build without NVDEC, or no FFmpeg libraries here
        pytest.skip(f"NVDEC decode unavailable: {e}")
    cpu = decode_video(clips["cut"], [Uniform(8)], backends)
    if gpu.frames.device.type == "cpu":  # torchcodec could not use NVDEC here and decoded on the CPU
        assert gpu.backend == "torchcodec"
        pytest.skip("NVDEC unavailable: torchcodec fell back to CPU decoding")
    assert gpu.backend == "torchcodec-nvdec"
    assert (gpu.frames.float().cpu() - cpu.frames.float()).abs().mean() < 3.0
    small = decode_video(clips["cut"], [Uniform(8)], backends, device="cuda:0", max_side=160)  # resized on the GPU
    small_cpu = decode_video(clips["cut"], [Uniform(8)], backends, max_side=160)
    assert small.frames.is_cuda and small.frames.shape == small_cpu.frames.shape
    assert (small.frames.float().cpu() - small_cpu.frames.float()).abs().mean() < 4.0


def test_pyav_nvdec_decode_matches_cpu(clips):
    """NVDEC through the FFmpeg in PyAV's wheels: the bytes of the CPU decode (H.264 decodes bit-exactly; NVDEC's
    NV12 repacked as yuv420p, FFmpeg converts and resizes both on the CPU), phone rotation applied, on the GPU and
    labelled ``pyav-nvdec``."""
    from pipeline.video.decoders import decode_video
    from pipeline.video.sampling import Uniform

    backends = available_backends(("pyav",))
    for name in ("cut", "motion720", "rotated"):
        for max_side in (None, 160):
            gpu = decode_video(clips[name], [Uniform(8)], backends, device="cuda:0", max_side=max_side)
            cpu = decode_video(clips[name], [Uniform(8)], backends, max_side=max_side)
            assert gpu.backend == "pyav-nvdec" and gpu.frames.is_cuda, (name, gpu.backend)
            assert gpu.frames.shape == cpu.frames.shape and gpu.plan.indices == cpu.plan.indices
            diff = (gpu.frames.cpu().float() - cpu.frames.float()).abs()  # NV12 converted as such: 2.2 / 189
            assert torch.equal(gpu.frames.cpu(), cpu.frames), (name, max_side, float(diff.mean()), float(diff.max()))


def test_job_decoding_with_nvdec_on_a_gpu_rank(tmp_path, clips):
    """``video.decode_device: cuda`` with PyAV: every clip decoded by NVDEC, the rows saying so, and the signal
    filters' results those of PyAV's CPU decode (the same FFmpeg converts and resizes both)."""
    import pyarrow.parquet as pq

    from pipeline.config import build_config, validate_config
    from pipeline.distributed import DistContext
    from pipeline.runner import run_rank
    from tests.conftest import base_config, write_manifest

    corpus = tmp_path / "c"
    corpus.mkdir()
    names = ("cut", "letterbox", "rotated")
    for name in names:
        shutil.copy(clips[name], corpus / f"{name}.mp4")
    manifest = write_manifest(str(tmp_path / "m.parquet"),
                              [{"video_id": n, "video_path": f"{n}.mp4"} for n in names])
    rows = {}
    for decode in ("cpu", "cuda"):
        raw = base_config(manifest, str(corpus), str(tmp_path / decode), str(tmp_path / "cache"),
                          runtime={"device": "cuda"}, video={"decode_device": decode, "backends": ["pyav"]},
                          filters={n: {} for n in ("black_borders", "scene_cuts")})
        cfg = build_config(raw)
        validate_config(cfg)
        assert run_rank(cfg, DistContext(), "cuda:0").summary["this_run"]["succeeded"] == len(names)
        rows[decode] = {r["video_id"]: r for r in pq.read_table(str(tmp_path / decode / "parts")).to_pylist()}
    for name in names:
        assert rows["cuda"][name]["result_info"]["decode_backend"] == "pyav-nvdec", rows["cuda"][name]
        assert rows["cpu"][name]["result_info"]["decode_backend"] == "pyav"
        for f in ("black_borders", "scene_cuts"):
            _same(rows["cuda"][name][f], rows["cpu"][name][f], (name, f))


def test_silero_vad_and_audio_pipeline_on_cuda(clips):
    import numpy as np

    from pipeline.audio.decode import decode_audio
    from pipeline.audio.pipeline import AudioParams, run_audio
    from pipeline.audio.vad import SileroVAD

    if "long" not in clips:
        pytest.skip("needs the long speech recording (MEDIASIEVE_GPU_MEDIA/long.wav)")
    audio = decode_audio(clips["long"])
    cpu_vad, gpu_vad = SileroVAD(), SileroVAD(device="cuda:0")
    x = torch.from_numpy(audio[: 16000 * 20].copy()).reshape(4, -1)[:, : 512 * 150]
    assert (cpu_vad.probs(x) - gpu_vad.probs(x)).abs().max() < 5e-3  # cuDNN LSTM vs CPU kernels
    cpu = run_audio([audio], AudioParams(), cpu_vad.probs)[0]
    gpu = run_audio([audio], AudioParams(), gpu_vad.probs, device="cuda:0")[0]
    assert np.abs(cpu.features.mag - gpu.features.mag).mean() < 1e-4
    assert [round(c.time_s, 3) for c in cpu.cuts] == [round(c.time_s, 3) for c in gpu.cuts]


def test_audio_stages_on_cuda_streams_equal_the_plain_gpu_path(clips):
    import numpy as np

    from pipeline.audio.decode import decode_audio
    from pipeline.audio.pipeline import AudioParams, GpuPipelineParams, run_audio
    from pipeline.audio.vad import SileroVAD

    if "long" not in clips:
        pytest.skip("needs the long speech recording (MEDIASIEVE_GPU_MEDIA/long.wav)")
    audio = decode_audio(clips["long"])
    vad = SileroVAD(device="cuda:0")
    plain = run_audio([audio, audio[: 16000 * 30]], AudioParams(), vad.probs, device="cuda:0")
    for limit, pinned in ((1, True), (2, True), (3, False)):
        params = AudioParams(gpu_pipeline=GpuPipelineParams(inflight_chunks_limit=limit, prefetch_pinned_buffers=pinned,
                                                            batch_chunks=4))
        streams = run_audio([audio, audio[: 16000 * 30]], params, vad.probs, device="cuda:0", vad=vad)
        for a, b in zip(plain, streams):
            assert np.abs(a.probs - b.probs).max() < 1e-4
            assert np.abs(a.features.mag - b.features.mag).mean() < 1e-4
            assert [round(c.time_s, 4) for c in a.cuts] == [round(c.time_s, 4) for c in b.cuts]


def test_a_real_cuda_out_of_memory_splits_the_batch():
    """torch's caching allocator refusing for real (the process held to 8 GiB of the GPU): the batch is split, every
    row comes back, and the CUDA context goes on working; a row that cannot fit alone fails only its request."""
    from pipeline.batching import DynamicBatcher
    from pipeline.errors import OutOfMemory
    from tests.unit.test_oom_batching import _concurrently

    def model(x):  # 1 GiB of activations per row of cost
        scratch = torch.empty(int(x[:, 0].sum()) << 30, dtype=torch.uint8, device="cuda")
        del scratch
        return x[:, 1] * 2

    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((8 << 30) / total)
    try:
        batcher = DynamicBatcher(model, max_batch=16, max_wait_s=0.5)
        requests = [torch.tensor([[1.0, 10 * i + j] for j in range(4)], device="cuda") for i in range(3)]
        requests.append(torch.tensor([[100.0, 7.0]], device="cuda"))  # 100 GiB: never fits
        out = _concurrently(batcher, requests)
        for i in range(3):
            assert torch.equal(out[i], requests[i][:, 1] * 2), out[i]
        assert isinstance(out[3], OutOfMemory) and isinstance(out[3].__cause__, torch.cuda.OutOfMemoryError)
        assert batcher.oom_splits >= 1 and batcher.batch_limit < 16
        assert float(torch.ones(4, device="cuda").sum()) == 4.0  # the context still works
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


@pytest.mark.parametrize("transfer", ["smpte2084", "arib-std-b67"])
def test_tone_mapping_on_cuda_equals_cpu(transfer):
    # NVDEC frames stay on the GPU, so the look-up table is built and read there: the same bytes as on the CPU
    from pipeline.video.tonemap import tone_map_

    frames = torch.randint(0, 256, (4, 270, 480, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    on_gpu = tone_map_(frames.cuda(), transfer).cpu()
    assert torch.equal(on_gpu, tone_map_(frames.clone(), transfer))


def test_deinterlacing_on_cuda_equals_cpu():
    # NVDEC frames are deinterlaced on the GPU (at the source size, then resized there): integer work, the same bytes
    from pipeline.video.deinterlace import deinterlace

    g = torch.Generator().manual_seed(4)
    frames = torch.randint(0, 256, (4, 288, 360, 3), dtype=torch.uint8, generator=g)
    frames[:, 1::2, 100:200] = 250  # combing over a band, beside noise
    for first in (0, 1):
        assert torch.equal(deinterlace(frames.cuda(), first, (360, 288)).cpu(), deinterlace(frames, first, (360, 288)))
