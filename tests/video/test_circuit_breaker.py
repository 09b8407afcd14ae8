"""The CUDA circuit breaker by fault injection on CPU: the real ORT error types, a CPU subprocess, strict mode."""

import pytest
import torch
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, RuntimeException

import models.circuit_breaker as cb
from pipeline.errors import GpuFailure
from tests.video.test_clip_classifier import clip4s, item, make_filter  # noqa: F401 - fixture reused
from tests.video.tiny_models import tiny_videomae


@pytest.fixture(autouse=True)
def fresh_breaker():
    cb._reset_for_tests()
    yield
    cb._reset_for_tests()


def _exported(tmp_path):
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("export_onnx", f"{ROOT}/jobs/export_onnx.py")
    export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export)
    path = tiny_videomae(str(tmp_path / "m"))
    export.export_classifier(path)
    return path


class Faulty:
    """Wraps a runner and raises a real ORT CUDA error on its first call(s)."""

    def __init__(self, runner, error, times=1):
        self.runner, self.error, self.left = runner, error, times

    def __call__(self, x):
        if self.left:
            self.left -= 1
            raise self.error
        return self.runner(x)


class RoomFor:
    """Wraps a runner as a GPU with room for ``rows`` rows at a time: a bigger batch fails with ``error``."""

    def __init__(self, runner, rows, error):
        self.runner, self.rows, self.error = runner, rows, error

    def __call__(self, x):
        if len(x) > self.rows:
            raise self.error
        return self.runner(x)


@pytest.mark.parametrize("error", [
    RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDA failure 700: an illegal memory access was "
                     "encountered"),
    Fail("[ONNXRuntimeError] : 1 : FAIL : CUDNN_STATUS_EXECUTION_FAILED"),
    RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDA failure 719: unspecified launch failure"),
])
def test_cuda_failure_moves_work_to_a_cpu_subprocess(tmp_path, clip4s, error):  # noqa: F811
    from pipeline.filters.base import FilterContext

    path = _exported(tmp_path)
    f, pool = make_filter(tmp_path, path, backend="onnx", window_s=1.0)
    want = f.apply(item(clip4s, f), FilterContext("cpu", None))
    for _ in range(2):  # every instance of the pool fails on its next call
        with pool.acquire(f._pool_key) as breaker:
            breaker.primary = Faulty(breaker.primary, error)
    got = f.apply(item(clip4s, f), FilterContext("cpu", None))
    assert got["label"] == want["label"] and got["prob"] == pytest.approx(want["prob"], abs=1e-5)
    assert got["runtime"]["execution_provider"] == "CPUExecutionProvider (subprocess)"
    assert got["runtime"]["fallback_reason"].startswith("circuit breaker: ")
    assert cb.tripped() is not None
    with pool.acquire(f._pool_key) as breaker:  # no more CUDA in this process: the primary is not called again
        breaker.primary = Faulty(breaker.primary, AssertionError("primary used after the breaker opened"), times=99)
    assert f.apply(item(clip4s, f), FilterContext("cpu", None))["label"] == want["label"]


def test_out_of_memory_does_not_trip_but_runs_smaller_batches(tmp_path, clip4s):  # noqa: F811
    from pipeline.filters.base import FilterContext

    path = _exported(tmp_path)
    f, pool = make_filter(tmp_path, path, backend="onnx", window_s=1.0)
    want = f.apply(item(clip4s, f), FilterContext("cpu", None))
    oom = RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running "
                           "MatMul node. Status Message: bfc_arena.cc:376 onnxruntime::BFCArena::AllocateRawInternal "
                           "Failed to allocate memory for requested buffer of size 2147483648")
    for _ in range(2):  # a GPU with room for two clips at a time
        with pool.acquire(f._pool_key) as breaker:
            breaker.primary = RoomFor(breaker.primary, 2, oom)
    got = f.apply(item(clip4s, f), FilterContext("cpu", None))
    assert cb.tripped() is None and got["runtime"]["fallback_reason"] is None  # still where it was
    assert got["label"] == want["label"] and got["prob"] == pytest.approx(want["prob"], abs=1e-5)
    assert [w["label"] for w in got["windows"]] == [w["label"] for w in want["windows"]]
    assert f._batcher.oom_splits >= 1 and f._batcher.batch_limit < f.params.batch_size


def test_other_errors_do_not_trip(tmp_path):
    path = _exported(tmp_path)
    f, pool = make_filter(tmp_path, path, backend="onnx")
    for _ in range(2):
        with pool.acquire(f._pool_key) as breaker:
            breaker.primary = Faulty(breaker.primary, ValueError("bad input shape"))
    with pytest.raises(ValueError):
        f.classify(torch.randint(0, 255, (1, 4, 32, 32, 3), dtype=torch.uint8))
    assert cb.tripped() is None


def test_strict_gpu_makes_a_cuda_failure_fatal(tmp_path):
    path = _exported(tmp_path)
    f, pool = make_filter(tmp_path, path, backend="onnx", strict_gpu=True)
    for _ in range(2):
        with pool.acquire(f._pool_key) as breaker:
            breaker.primary = Faulty(breaker.primary, RuntimeException("CUDNN_STATUS_INTERNAL_ERROR"))
    with pytest.raises(GpuFailure, match="strict GPU mode"):
        f.classify(torch.randint(0, 255, (1, 4, 32, 32, 3), dtype=torch.uint8))
