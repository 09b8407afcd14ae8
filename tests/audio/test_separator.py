"""The optional ONNX separator: layout from the session, sidecar values, overlap-add, chunk independence."""

import json

import numpy as np
import pytest
import torch

from models.onnx_session import ProviderError, make_session
from pipeline.audio.decode import decode_audio, resample
from pipeline.audio.schedule import chunk_schedule
from pipeline.audio.separator import Separator, SeparatorParams, load_sidecar, resolve_spec
from pipeline.errors import ConfigError
from pipeline.media import synthetic

SIDE = {"n_fft": 512, "hop": 128, "compensation": 1.0, "sample_rate": 16000}


class Gain(torch.nn.Module):
    def __init__(self, g):
        super().__init__()
        self.g = g

    def forward(self, x):
        return x * self.g


def export(path, gain=1.0, dim_f=256, dim_t=64, fixed_batch=False):
    axes = None if fixed_batch else {"input": {0: "batch"}, "output": {0: "batch"}}
    torch.onnx.export(Gain(gain), (torch.zeros(1, 4, dim_f, dim_t),), path, input_names=["input"],
                      output_names=["output"], dynamic_axes=axes, dynamo=False)
    return path


@pytest.fixture(scope="module")
def stereo(tmp_path_factory):
    path = synthetic.speech_wav(str(tmp_path_factory.mktemp("sep") / "s.wav"),
                                "Separating voices from music starts with a good spectrogram.", rate_hz=16000)
    return decode_audio(path, 16000, channels=2)


def test_layout_comes_from_the_session_and_the_rest_from_the_sidecar(tmp_path):
    spec = resolve_spec(["batch", 4, 256, 64], SIDE, SeparatorParams())
    assert (spec.dim_f, spec.dim_t, spec.n_fft, spec.batch_fixed) == (256, 64, 512, None)
    assert resolve_spec([1, 4, 256, 64], SIDE, SeparatorParams(n_fft=1024)).n_fft == 1024  # config wins
    with pytest.raises(ConfigError, match="disagrees"):
        resolve_spec(["b", 4, 256, 64], {**SIDE, "dim_f": 128}, SeparatorParams())
    with pytest.raises(ConfigError, match="n_fft"):
        resolve_spec(["b", 4, 256, 64], {"hop": 128, "compensation": 1.0, "sample_rate": 16000}, SeparatorParams())
    with pytest.raises(ConfigError, match="4 \\(real/imag"):
        resolve_spec(["b", 2, 256, 64], SIDE, SeparatorParams())
    with pytest.raises(ConfigError, match="does not exist"):
        load_sidecar(str(tmp_path / "m.onnx"), str(tmp_path / "missing.json"))


def test_identity_model_reconstructs_and_chunking_does_not_matter(tmp_path, stereo):
    sep = Separator(export(str(tmp_path / "id.onnx")), SIDE, SeparatorParams())
    n = stereo.shape[1]
    chunked = sep.separate(stereo, chunk_schedule(n / 16000, 1.0, 0.25, 0.0, 1024, 16000))
    whole = sep.separate(stereo, chunk_schedule(n / 16000, 1e9, 0.0, 0.0, 1024, 16000))
    assert len(chunk_schedule(n / 16000, 1.0, 0.25, 0.0, 1024, 16000)) > 3
    assert np.abs(chunked - whole).max() < 1e-5  # segments on a global grid: chunk-independent
    err = np.sqrt(((chunked - stereo) ** 2).mean()) / np.sqrt((stereo ** 2).mean())
    assert err < 0.02  # only the dropped Nyquist bin is missing


def test_io_binding_on_cpu_buffers_changes_nothing(tmp_path, stereo):
    path = export(str(tmp_path / "g.onnx"), gain=0.7)
    bound = Separator(path, SIDE, SeparatorParams(io_binding=True))
    plain = Separator(path, SIDE, SeparatorParams(io_binding=False))
    assert bound.forward.primary.io_binding and not plain.forward.primary.io_binding
    assert bound.ort.execution_provider == "CPUExecutionProvider" and bound.stream is None
    plans = chunk_schedule(stereo.shape[1] / 16000, 1.0, 0.25, 0.0, 1024, 16000)
    a, b = bound.separate(stereo, plans), plain.separate(stereo, plans)
    assert np.abs(a).max() > 0.01 and np.array_equal(a, b)
    assert bound.forward.primary._out_shapes == {(4, 4, 256, 64): (4, 4, 256, 64)}  # output shape learnt once


def test_gain_and_compensation_and_fixed_batch(tmp_path, stereo):
    sep = Separator(export(str(tmp_path / "g.onnx"), gain=0.5, fixed_batch=True), {**SIDE, "compensation": 1.5},
                    SeparatorParams())
    assert sep.batch_size == 1
    n = stereo.shape[1]
    out = sep.separate(stereo, chunk_schedule(n / 16000, 2.0, 0.5, 0.0, 1024, 16000))
    ratio = np.sqrt((out ** 2).mean() / (stereo ** 2).mean())
    assert ratio == pytest.approx(0.75, rel=0.03)


def test_session_providers_are_read_not_assumed(tmp_path):
    path = export(str(tmp_path / "p.onnx"))
    cpu = make_session(path, "cpu")
    assert cpu.providers == ["CPUExecutionProvider"] and cpu.fallback_reason is None
    if not torch.cuda.is_available():
        asked = make_session(path, "cuda")
        assert asked.execution_provider == "CPUExecutionProvider" and "CUDAExecutionProvider" in asked.fallback_reason
        with pytest.raises(ProviderError):
            make_session(path, "tensorrt", strict=True)


def test_resample_keeps_duration_and_tone():
    t = np.arange(44100) / 44100
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    out = resample(tone, 44100, 16000)
    assert len(out) == pytest.approx(16000, abs=64)
    spectrum = np.abs(np.fft.rfft(out[:16000]))
    assert abs(int(np.argmax(spectrum)) - 440) <= 1


def test_speech_cuts_with_a_separator_in_the_job(tmp_path, media_dir):
    import pyarrow.parquet as pq

    from pipeline.config import build_config, validate_config
    from pipeline.distributed import DistContext
    from pipeline.runner import run_rank
    from tests.conftest import base_config, make_corpus, write_manifest

    model = export(str(tmp_path / "vocals.onnx"))
    json.dump({**SIDE, "sample_rate": 22050}, open(str(tmp_path / "vocals.onnx.json"), "w"))  # the model's own rate
    rows = make_corpus(str(tmp_path / "c"), media_dir, 2, kinds=("speech.wav",))
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    out = {}
    for name, filt in (("plain", {"speech_cuts": {}}), ("sep", {"speech_cuts": {"separator": {"model_uri": model}}})):
        raw = base_config(manifest, str(tmp_path / "c"), str(tmp_path / name), str(tmp_path / "cache"), filters=filt)
        cfg = build_config(raw)
        validate_config(cfg)
        assert run_rank(cfg, DistContext()).summary["this_run"]["succeeded"] == 2
        out[name] = pq.read_table(str(tmp_path / name / "parts")).to_pylist()[0]["speech_cuts"]
    assert out["sep"]["separator_runtime"]["execution_provider"] == "CPUExecutionProvider"
    assert out["plain"]["separator_runtime"] is None
    models = json.load(open(tmp_path / "sep" / "_config.json"))["identity"]["models"]
    assert sorted(models) == ["speech_cuts.separator.model_uri", "speech_cuts.separator.sidecar_uri",
                              "speech_cuts.vad"]
    json.dump({**SIDE, "sample_rate": 16000}, open(str(tmp_path / "vocals.onnx.json"), "w"))  # the sidecar alone
    with pytest.raises(ConfigError, match=r"speech_cuts\.separator\.sidecar_uri differs"):
        run_rank(cfg, DistContext())
    # an identity separator (at another rate, resampled back) leaves the speech where it was
    assert len(out["sep"]["speech"]) == len(out["plain"]["speech"])
    for a, b in zip(out["sep"]["speech"], out["plain"]["speech"]):
        assert a["start_s"] == pytest.approx(b["start_s"], abs=0.07) and a["end_s"] == pytest.approx(b["end_s"], abs=0.07)
