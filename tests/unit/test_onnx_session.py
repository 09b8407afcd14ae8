"""The ONNX Runtime session factory: per-model settings, provider options, honest fallback, the once-per-model log."""

import json
import logging

import onnxruntime as ort
import pytest
import torch

from models.onnx_session import (
    OrtParams,
    ProviderError,
    diagnose_provider,
    graph_input,
    make_session,
    provider_options,
    shape_profile,
)
from pipeline.config import FilterSpec
from pipeline.errors import ConfigError
from pipeline.filters import build_filters


@pytest.fixture(scope="module")
def conv_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ort") / "conv.onnx")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1))
    torch.onnx.export(model, torch.zeros(2, 3, 16, 16), path, input_names=["frames"], output_names=["out"],
                      dynamic_axes={"frames": {0: "batch"}}, dynamo=False)
    return path


def test_profile_spans_the_buckets_and_the_options_carry_the_config():
    profile = shape_profile({"frames": [(4, 16, 3, 224, 224), (1, 16, 3, 224, 224), (8, 16, 3, 224, 224)]})
    assert profile == {"trt_profile_min_shapes": "frames:1x16x3x224x224",
                       "trt_profile_opt_shapes": "frames:8x16x3x224x224",
                       "trt_profile_max_shapes": "frames:8x16x3x224x224"}
    joint = shape_profile({"tokens": [(1, 64, 8), (8, 256, 8)], "valid": [(8, 256), (1, 64)]})
    assert joint["trt_profile_min_shapes"] == "tokens:1x64x8,valid:1x64"
    assert joint["trt_profile_max_shapes"] == "tokens:8x256x8,valid:8x256"
    assert shape_profile({"frames": []}) == {}
    params = OrtParams(trt_fp16=False, trt_workspace_gb=2.0, cudnn_conv_algo_search="HEURISTIC")
    trt = provider_options("TensorrtExecutionProvider", params, 3, profile, "/node/cache/trt-engines")
    assert trt["device_id"] == "3" and trt["trt_fp16_enable"] == "0"
    assert trt["trt_max_workspace_size"] == str(2 << 30)
    assert trt["trt_engine_cache_enable"] == "1" and trt["trt_engine_cache_path"] == "/node/cache/trt-engines"
    assert trt["trt_timing_cache_path"] == "/node/cache/trt-engines"
    assert trt["trt_profile_opt_shapes"] == "frames:8x16x3x224x224"
    own = provider_options("TensorrtExecutionProvider", OrtParams(trt_engine_cache_dir="/local/engines"), 0, None,
                           "/node/cache/trt-engines")
    assert own["trt_engine_cache_path"] == "/local/engines" and own["trt_fp16_enable"] == "1"
    assert "trt_engine_cache_enable" not in provider_options("TensorrtExecutionProvider", OrtParams(), 0)
    assert provider_options("CUDAExecutionProvider", params, 1) == {"device_id": "1",
                                                                     "cudnn_conv_algo_search": "HEURISTIC",
                                                                     "use_tf32": "1"}
    assert provider_options("CUDAExecutionProvider", OrtParams(tf32=False), 0)["use_tf32"] == "0"
    assert provider_options("CPUExecutionProvider", params, 0) == {}
    # a compute stream of the caller's (the separator's own CUDA stream) reaches both GPU providers, never the CPU
    for gpu in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        assert provider_options(gpu, params, 1, stream=94_000_000)["user_compute_stream"] == "94000000"
    assert provider_options("CPUExecutionProvider", params, 0, stream=94_000_000) == {}


def test_graph_input_reads_the_file(conv_model):
    assert graph_input(conv_model) == ("frames", [None, 3, 16, 16])


@pytest.mark.parametrize("level,want", [("disable", ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                                        ("basic", ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
                                        ("all", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)])
def test_graph_optimization_level_reaches_the_session(conv_model, level, want):
    s = make_session(conv_model, "cpu", params=OrtParams(graph_optimization_level=level, intra_op_threads=1))
    options = s.session.get_session_options()
    assert options.graph_optimization_level == want and options.intra_op_num_threads == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without a GPU")
def test_fallback_names_the_missing_library_and_strict_refuses(conv_model, tmp_path):
    why = diagnose_provider("TensorrtExecutionProvider")
    assert why is None or ".so" in why  # a library that cannot load is named
    s = make_session(conv_model, "tensorrt", params=OrtParams(trt_engine_cache_dir=str(tmp_path / "engines")),
                     profile=shape_profile({"frames": [(1, 3, 16, 16), (4, 3, 16, 16)]}))
    assert s.providers == ["CPUExecutionProvider"]
    assert s.fallback_reason.startswith("TensorrtExecutionProvider requested, CPUExecutionProvider in effect")
    if why is not None:
        assert why in s.fallback_reason
    with pytest.raises(ProviderError, match="TensorrtExecutionProvider requested") as err:
        make_session(conv_model, "tensorrt", strict=True)
    if why is not None:
        assert why in str(err.value)
    with pytest.raises(ProviderError, match="CUDAExecutionProvider requested"):
        make_session(conv_model, "cuda", strict=True)


def test_one_log_line_per_model_per_process(conv_model, caplog, tmp_path):
    import shutil

    path = shutil.copy(conv_model, tmp_path / "unique.onnx")  # a model no other test opened
    caplog.set_level(logging.INFO, logger="models.onnx_session")
    for _ in range(3):  # three pool instances of one model
        make_session(str(path), "cpu")
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "models.onnx_session"]
    mine = [r for r in lines if r["onnx_model"] == str(path)]
    assert len(mine) == 1
    assert mine[0]["providers"] == ["CPUExecutionProvider"] and mine[0]["fallback_reason"] is None


def test_ort_block_in_the_filter_config(tmp_path):
    (f,) = build_filters((FilterSpec("vfx", "clip_classifier", True, {
        "model_uri": str(tmp_path), "backend": "onnx",
        "ort": {"graph_optimization_level": "basic", "trt_fp16": False, "trt_workspace_gb": 1.5, "tf32": False}}),))
    assert f.params.ort == OrtParams(graph_optimization_level="basic", trt_fp16=False, trt_workspace_gb=1.5,
                                     tf32=False)
    with pytest.raises(ConfigError, match="trt_fp32"):
        build_filters((FilterSpec("vfx", "clip_classifier", True,
                                  {"model_uri": str(tmp_path), "ort": {"trt_fp32": True}}),))
    with pytest.raises(ConfigError, match="cudnn_conv_algo_search"):
        build_filters((FilterSpec("vfx", "clip_classifier", True,
                                  {"model_uri": str(tmp_path), "ort": {"cudnn_conv_algo_search": "FAST"}}),))


def test_engine_cache_is_node_local_and_per_device():
    from pipeline.filters.base import SetupContext

    assert SetupContext("cuda:1", None, None, cache_dir="/node/cache").engine_cache() == "/node/cache/trt-engines/cuda1"
    assert SetupContext("cpu", None, None).engine_cache() is None
