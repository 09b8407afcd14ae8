"""The CUDA circuit breaker on the audio models (the ONNX separator and the ONNX Silero VAD), by fault injection on
CPU with ORT's own exception types: the work moves to a CPU subprocess with the same results, the row says so, and
strict GPU mode makes it fatal."""

import numpy as np
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, RuntimeException

import models.circuit_breaker as cb
from pipeline.audio.decode import decode_audio
from pipeline.audio.schedule import chunk_schedule
from pipeline.audio.separator import Separator, SeparatorParams
from pipeline.config import FilterSpec, VideoConfig
from pipeline.errors import GpuFailure
from pipeline.filters import build_filters
from pipeline.filters.base import FilterContext, SetupContext
from pipeline.media import synthetic
from pipeline.media.item import MediaItem
from pipeline.model_pool import ModelPool, localize_model
from pipeline.video.decoders import available_backends
from tests.audio.test_separator import SIDE, export
from tests.video.test_circuit_breaker import Faulty

ILLEGAL = RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDA failure 700: an illegal memory access "
                           "was encountered")


@pytest.fixture(autouse=True)
def fresh_breaker():
    cb._reset_for_tests()
    yield
    cb._reset_for_tests()


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    return synthetic.speech_wav(str(tmp_path_factory.mktemp("brk") / "s.wav"),
                                "A fault in the graphics card must not lose this sentence.", rate_hz=16000)


def test_separator_batch_is_retried_in_a_cpu_subprocess(tmp_path, speech):
    stereo = decode_audio(speech, 16000, channels=2)
    sep = Separator(export(str(tmp_path / "g.onnx"), gain=0.5), SIDE, SeparatorParams())
    plans = chunk_schedule(stereo.shape[1] / 16000, 1.0, 0.25, 0.0, 1024, 16000)
    want = sep.separate(stereo, plans)
    sep.forward.primary = Faulty(sep.forward.primary, ILLEGAL)
    got = sep.separate(stereo, plans)
    assert cb.tripped().startswith("RuntimeException: ")
    assert np.abs(got - want).max() < 1e-6 and np.abs(want).max() > 0.01
    sep.forward.primary = Faulty(sep.forward.primary, AssertionError("CUDA used after the breaker opened"), times=99)
    assert np.abs(sep.separate(stereo, plans) - want).max() < 1e-6


def test_separator_strict_gpu_makes_it_fatal(tmp_path, speech):
    stereo = decode_audio(speech, 16000, channels=2)
    sep = Separator(export(str(tmp_path / "g.onnx")), SIDE, SeparatorParams(), strict=True)
    sep.forward.primary = Faulty(sep.forward.primary, Fail("[ONNXRuntimeError] : 1 : FAIL : CUDNN_STATUS_BAD_PARAM"))
    with pytest.raises(cb.CudaCircuitOpen, match="strict GPU mode"):
        sep.separate(stereo, chunk_schedule(stereo.shape[1] / 16000, 1.0, 0.25, 0.0, 1024, 16000))


def _speech_filter(tmp_path, strict=False, **params):
    (f,) = build_filters((FilterSpec("speech", "speech_cuts", True, params),))
    f.setup(SetupContext("cpu", ModelPool("cpu", instances=1),
                         lambda u, o=None: localize_model(u, str(tmp_path / "mc"), 0, lambda: None, o),
                         strict_gpu=strict))
    return f


def _item(path, f):
    return MediaItem("x", path, 0, f.frame_requests(), VideoConfig(), available_backends(("pyav",)))


@pytest.mark.parametrize("backend", ["onnx", "onnx_sequence"])
def test_onnx_vad_and_separator_in_the_filter_move_to_cpu_and_say_so(tmp_path, speech, backend):
    model = export(str(tmp_path / "vocals.onnx"))
    f = _speech_filter(tmp_path, vad_backend=backend, separator={"model_uri": model, **SIDE})
    want = f.apply(_item(speech, f), FilterContext("cpu", None))
    assert want["vad_runtime"]["execution_provider"] == "CPUExecutionProvider" and want["speech"]
    with f._pool.acquire(f._vad_key) as vad:
        vad.primary = Faulty(vad.primary, ILLEGAL)
    got = f.apply(_item(speech, f), FilterContext("cpu", None))
    assert got["speech"] == want["speech"] and got["cuts"] == want["cuts"]
    for key in ("vad_runtime", "separator_runtime"):  # one breaker per process: the separator moved too
        assert got[key]["execution_provider"] == "CPUExecutionProvider (subprocess)"
        assert got[key]["fallback_reason"].startswith("circuit breaker: RuntimeException")
    assert set(f.runtimes()) == {"speech/vad", "speech/separator"}
    assert all(r["execution_provider"].endswith("(subprocess)") for r in f.runtimes().values())


def test_torchscript_vad_rows_do_not_claim_the_subprocess(tmp_path, speech):
    f = _speech_filter(tmp_path)
    cb._TRIPPED.set()
    cb._REASON.append("RuntimeException: elsewhere")
    row = f.apply(_item(speech, f), FilterContext("cpu", None))
    assert row["vad_runtime"]["backend"] == "torchscript" and row["vad_runtime"]["fallback_reason"] is None


def test_onnx_vad_strict_gpu_failure_stops_the_rank(tmp_path, speech):
    f = _speech_filter(tmp_path, strict=True, vad_backend="onnx")
    with f._pool.acquire(f._vad_key) as vad:
        vad.primary = Faulty(vad.primary, RuntimeException("CUDA error: an illegal memory access was encountered"))
    with pytest.raises(GpuFailure, match="strict GPU mode"):
        f.apply(_item(speech, f), FilterContext("cpu", None))
