"""A model file that does not load (empty, cut short, corrupt, a model of another kind) stops the job before any item
with one ConfigError that names the filter and the model (exit code 2), not a library's bare exception."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from pipeline.config import build_config, validate_config
from pipeline.distributed import DistContext
from pipeline.errors import ConfigError
from pipeline.runner import run_rank
from tests.audio.test_separator import SIDE, export
from tests.conftest import ROOT, base_config, make_corpus, write_manifest
from tests.video.tiny_models import tiny_videomae, tiny_yolo


def _job(tmp_path, media_dir, filters) -> dict:
    rows = make_corpus(str(tmp_path / "c"), media_dir, 2, kinds=("motion.mp4", "speech.wav"))
    return base_config(write_manifest(str(tmp_path / "m.parquet"), rows), str(tmp_path / "c"), str(tmp_path / "out"),
                       str(tmp_path / "cache"), filters=filters)


def _garbage(path, n=5000) -> str:
    """``n`` bytes that are no model, the same each run (random ones fail in other ways from one run to the next:
    a pickle's invalid load key, or a ValueError from a byte that happens to read as an opcode)."""
    with open(path, "wb") as f:
        f.write((b"\xe9" + bytes(range(256)) * (n // 256 + 1))[:n])
    return str(path)


def _cut_short(src, dst) -> str:
    data = open(src, "rb").read()
    with open(dst, "wb") as f:
        f.write(data[: len(data) // 2])
    return str(dst)


def _yolo_onnx(tmp_path) -> str:
    from tests.video.test_yolo_regions import export_yolo_onnx

    return export_yolo_onnx(tiny_yolo(str(tmp_path / "y.pt")), 160)


CASES = {
    "yolo .pt of random bytes": lambda t: ("yolo_regions", {"model_uri": _garbage(t / "w.pt")}, "TypeError.*UnpicklingError"),
    "yolo .pt cut short": lambda t: ("yolo_regions", {"model_uri": _cut_short(tiny_yolo(str(t / "y.pt")),
                                                                            t / "short.pt")}, ""),
    "yolo .onnx empty": lambda t: ("yolo_regions", {"model_uri": _garbage(t / "w.onnx", 0)}, "StopIteration"),
    "yolo .onnx cut short": lambda t: ("yolo_regions", {"model_uri": _cut_short(_yolo_onnx(t), t / "short.onnx")},
                                       "DecodeError"),
    "classifier whose head.json is not JSON": lambda t: ("clip_classifier", {"model_uri": _bad_head(t)},
                                                          "JSONDecodeError"),
    "classifier whose weights are cut short": lambda t: ("clip_classifier", {"model_uri": _short_weights(t)}, ""),
}


def _bad_head(tmp_path) -> str:
    d = tiny_videomae(str(tmp_path / "clf"), image_size=32)
    with open(os.path.join(d, "head.json"), "w") as f:
        f.write("{not json")
    return d


def _short_weights(tmp_path) -> str:
    d = tiny_videomae(str(tmp_path / "clf"), image_size=32)
    weights = os.path.join(d, "head.safetensors")
    _cut_short(weights, weights + ".tmp")
    os.replace(weights + ".tmp", weights)
    return d


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_model_that_does_not_load_is_a_config_error_naming_it(tmp_path, media_dir, case):
    kind, params, cause = CASES[case](tmp_path)
    raw = _job(tmp_path, media_dir, {"m": {"type": kind, **params}})
    cfg = build_config(raw)
    validate_config(cfg)
    with pytest.raises(ConfigError, match=rf"filters\.m: {params['model_uri']} does not load as this filter's model "
                                          rf"\({cause}.*no item was started") as info:
        run_rank(cfg, DistContext())
    assert info.value.__cause__ is not None  # the library's own error, kept as the cause
    assert not (tmp_path / "out" / "parts").exists() or not os.listdir(tmp_path / "out" / "parts")


def test_a_separator_or_sidecar_that_does_not_load_is_a_config_error(tmp_path, media_dir):
    model = export(str(tmp_path / "vocals.onnx"))
    sidecar = tmp_path / "side.json"
    sidecar.write_text("{not json")
    raw = _job(tmp_path, media_dir, {"speech_cuts": {"separator": {"model_uri": model,
                                                                   "sidecar_uri": str(sidecar)}}})
    with pytest.raises(ConfigError, match=rf"filters\.speech_cuts\.separator: {model} does not load .*JSONDecodeError"):
        run_rank(build_config(raw), DistContext())
    sidecar.write_text(json.dumps(SIDE))
    shutil.copy(_garbage(tmp_path / "g.onnx"), model)
    with pytest.raises(ConfigError, match=rf"filters\.speech_cuts\.separator: {model} does not load"):
        run_rank(build_config(raw), DistContext())


def test_the_job_exits_2_naming_the_model(tmp_path, media_dir):
    raw = _job(tmp_path, media_dir, {"m": {"type": "yolo_regions", "model_uri": _garbage(tmp_path / "w.pt")}})
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "run.py"), "--config", str(config)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{tmp_path / 'w.pt'} does not load as this filter's model" in proc.stderr
    assert "Traceback" not in proc.stderr
