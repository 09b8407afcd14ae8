"""Out-of-memory batches are split, not failed (``pipeline.batching``).

The allocation failures are real where this machine can make them: torch's host allocator and ONNX Runtime's
arena under an address-space limit (``RLIMIT_AS``, in a child process), which refuse exactly as they do when a
GPU is full. CUDA's own out-of-memory error is raised by fault injection here (the real one is in
``tests/gpu/test_cuda_paths.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import weakref

import pytest
import torch

import models.circuit_breaker as cb
from pipeline.batching import DynamicBatcher
from pipeline.errors import FilterError, OutOfMemory, is_retryable
from tests.conftest import ROOT


class MemoryBudget:
    """A row-independent model (``x * 2``) that fails like a full GPU above ``fits`` rows, or on any row worth more
    than ``fits`` alone (rows carry their cost in column 0)."""

    def __init__(self, fits: int, error=lambda n: torch.cuda.OutOfMemoryError(
            f"CUDA out of memory. Tried to allocate {n} GiB. GPU 0 has a total capacity of 79.11 GiB")):
        self.fits, self.error, self.calls = fits, error, []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(x))
        cost = int(x[:, 0].sum())
        if cost > self.fits:
            raise self.error(cost)
        return x * 2


def _concurrently(batcher, requests):
    """Run each request from its own thread (as consumer threads do); returns results or errors in order."""
    out = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def call(i):
        barrier.wait()
        try:
            out[i] = batcher(requests[i])
        except Exception as e:  # noqa: BLE001 - the test inspects it
            out[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_an_out_of_memory_batch_is_split_and_every_row_comes_back():
    model = MemoryBudget(fits=3)
    batcher = DynamicBatcher(model, max_batch=8, max_wait_s=1.0)
    requests = [torch.ones(n, 2) * torch.tensor([1.0, i]) for i, n in enumerate([2, 3, 1, 2])]  # 8 rows in all
    results = _concurrently(batcher, requests)
    for req, got in zip(requests, results):
        assert isinstance(got, torch.Tensor), got
        assert torch.equal(got, req * 2)  # each caller gets its own rows back, in order
    assert batcher.oom_splits >= 1 and batcher.oom_rows_failed == 0
    assert batcher.batch_limit <= 3  # it keeps to the size that fitted
    assert model.calls == [8, 4, 2, 2, 2, 2]  # the second half of 4 is not tried whole once 4 has failed


def test_a_request_longer_than_the_lowered_limit_runs_in_pieces():
    model = MemoryBudget(fits=2)
    batcher = DynamicBatcher(model, max_batch=8, max_wait_s=0.0)
    x = torch.ones(8, 2) * torch.arange(8.0)[:, None]
    x[:, 0] = 1
    assert torch.equal(batcher(x), x * 2)
    assert batcher.batch_limit == 2
    model.calls.clear()
    assert torch.equal(batcher(x), x * 2)  # one item's eight windows, two rows at a time, no failed call first
    assert model.calls == [2, 2, 2, 2]


def test_the_limit_grows_back_after_clean_batches():
    model = MemoryBudget(fits=4)
    batcher = DynamicBatcher(model, max_batch=8, max_wait_s=0.0, regrow_after=3)
    assert torch.equal(batcher(torch.ones(8, 2)), torch.ones(8, 2) * 2)
    assert batcher.batch_limit == 4
    model.fits = 100  # the other tenant left the GPU
    for _ in range(4):  # two pieces of 4 per call: the limit doubles after 3 clean batches
        batcher(torch.ones(8, 2))
    assert batcher.batch_limit == 8
    model.calls.clear()
    batcher(torch.ones(8, 2))
    assert model.calls == [8]


def test_a_regrown_size_that_fails_again_waits_longer_before_the_next_try():
    model = MemoryBudget(fits=4)  # the memory stays short: 8 rows never fit
    batcher = DynamicBatcher(model, max_batch=8, max_wait_s=0.0, regrow_after=2)
    failed_at = []
    for call in range(40):
        before = len(model.calls)
        batcher(torch.ones(8, 2))
        if 8 in model.calls[before:]:
            failed_at.append(call)
    gaps = [b - a for a, b in zip(failed_at, failed_at[1:])]
    assert len(failed_at) >= 3 and gaps == sorted(gaps) and gaps[-1] > gaps[0]  # 8 is tried ever more rarely
    assert batcher.batch_limit == 4


def test_a_row_that_does_not_fit_alone_fails_only_its_item():
    model = MemoryBudget(fits=3)
    batcher = DynamicBatcher(model, max_batch=8, max_wait_s=0.2)
    huge = torch.tensor([[50.0, 7.0]])  # worth 50: more than the whole budget, even alone
    requests = [torch.ones(2, 2), huge, torch.ones(3, 2)]
    results = _concurrently(batcher, requests)
    assert isinstance(results[1], OutOfMemory), results[1]
    assert is_retryable(results[1])  # a rerun, with other work on the GPU, may fit it
    assert "alone" in str(results[1]) and "CUDA out of memory" in str(results[1])
    assert isinstance(results[1].__cause__, torch.cuda.OutOfMemoryError)
    assert torch.equal(results[0], requests[0] * 2) and torch.equal(results[2], requests[2] * 2)
    assert batcher.oom_rows_failed == 1


def test_the_failed_call_s_tensors_are_gone_before_the_retry():
    """The traceback of an out-of-memory error holds the frames of the call that failed, and with them its
    activations: retrying while they live would need the memory twice."""
    made, alive_at_call = [], []

    def model(x):
        alive_at_call.append(sum(ref() is not None for ref in made))
        activations = torch.empty(len(x), 1024)
        made.append(weakref.ref(activations))
        if len(x) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return x * 2

    batcher = DynamicBatcher(model, max_batch=8, max_wait_s=0.0)
    assert torch.equal(batcher(torch.ones(8, 2)), torch.ones(8, 2) * 2)
    assert len(alive_at_call) == 6 and alive_at_call == [0] * 6


def test_other_errors_are_not_split():
    def broken(x):
        broken.calls += 1
        raise ValueError("bad input shape")

    broken.calls = 0
    batcher = DynamicBatcher(broken, max_batch=8, max_wait_s=0.2)
    results = _concurrently(batcher, [torch.ones(2, 2), torch.ones(3, 2)])
    assert all(isinstance(r, ValueError) for r in results)
    assert broken.calls <= 2 and batcher.oom_splits == 0  # one call per batch, no retries


def test_lists_of_frames_are_split_too():
    def frames(batch: list) -> list:
        if len(batch) > 2:
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Conv "
                               "node. Status Message: bfc_arena.cc:360 void* onnxruntime::BFCArena::AllocateRawInternal"
                               "(size_t, bool, onnxruntime::Stream*) Failed to allocate memory for requested buffer of "
                               "size 4294967296")
        return [f.sum() for f in batch]

    batcher = DynamicBatcher(frames, max_batch=6, max_wait_s=0.0)
    got = batcher([torch.full((2, 3), float(i)) for i in range(5)])
    assert [float(g) for g in got] == [6.0 * i for i in range(5)]


@pytest.mark.parametrize("error,oom", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDA failure 2: out of memory ; GPU=0"), True),
    (RuntimeError("Failed to allocate memory for requested buffer of size 939524096"), True),
    (RuntimeError("[ONNXRuntimeError] : 1 : FAIL : CUDNN_STATUS_ALLOC_FAILED"), True),
    # ORT 1.31's CUDA arena at its gpu_mem_limit, as an H200 raised it (the run of tests/gpu)
    (RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Expand node. Name:'' "
                  "Status Message: /onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:360 void* "
                  "onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, onnxruntime::Stream*) Available memory of "
                  "1072693248 is smaller than requested bytes of 4294967296"), True),
    (MemoryError(), True),
    (RuntimeError("[ONNXRuntimeError] : 6 : CUDA failure 700: an illegal memory access was encountered"), False),
    (RuntimeError("CUDNN_STATUS_EXECUTION_FAILED"), False),
    (ValueError("bad input shape"), False),
])
def test_what_counts_as_out_of_memory(error, oom):
    assert cb.is_out_of_memory(error) is oom
    assert cb.is_cuda_failure(error) is (not oom and "CUD" in str(error))  # running out does not trip the breaker
    wrapped = FilterError("yolo: wrapped")
    wrapped.__cause__ = error
    assert cb.is_out_of_memory(wrapped) is oom  # seen through the chain of causes


def test_the_breaker_lets_out_of_memory_through_to_the_batcher():
    cb._reset_for_tests()
    model = MemoryBudget(fits=2, error=lambda n: RuntimeError("CUDA failure 2: out of memory ; GPU=0"))
    breaker = cb.CircuitBreaker(model, cpu_factory=None)
    batcher = DynamicBatcher(breaker, max_batch=8, max_wait_s=0.0)
    assert torch.equal(batcher(torch.ones(6, 2)), torch.ones(6, 2) * 2)
    assert cb.tripped() is None and batcher.oom_splits >= 1  # still on the GPU, in smaller batches


# ---- real allocation failures, in a child process under an address-space limit --------------------------------
_CHILD = r"""
import json, resource, sys, threading
sys.path.insert(0, {root!r})
import torch
from pipeline.batching import DynamicBatcher

def vm_size():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize"):
            return int(line.split()[1]) * 1024

{model}
limit = vm_size() + {headroom}
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
batcher = DynamicBatcher(model, max_batch=8, max_wait_s=0.3)
rows = {rows}
out = [None] * len(rows)
def call(i):
    try:
        out[i] = ["ok", [float(v) for v in batcher(torch.tensor(rows[i], dtype=torch.float32))]]
    except Exception as e:
        out[i] = [type(e).__name__, str(e)[:400], type(e.__cause__).__name__]
threads = [threading.Thread(target=call, args=(i,)) for i in range(len(rows))]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps({{"out": out, "splits": batcher.oom_splits, "limit": batcher.batch_limit}}))
"""

_TORCH_MODEL = """
GIB = 1 << 30
def model(x):  # a batch reserves (untouched) host memory in proportion to its rows' cost, as activations would
    scratch = torch.empty(int(x[:, 0].sum()) * GIB, dtype=torch.uint8)
    del scratch
    return x[:, 1] * 2
"""


def _child(model: str, rows: list, headroom: int) -> dict:
    code = _CHILD.format(root=ROOT, model=model, headroom=headroom, rows=rows)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_real_host_allocator_failures_are_split():
    # each row reserves 1 GiB; 3 GiB of address space fit: a batch of 8 rows fails in torch's allocator
    rows = [[[1, 10 * i + j] for j in range(n)] for i, n in enumerate([3, 2, 3])]
    got = _child(_TORCH_MODEL, rows, headroom=3 << 30)
    for i, n in enumerate([3, 2, 3]):
        assert got["out"][i] == ["ok", [2.0 * (10 * i + j) for j in range(n)]], got
    assert got["splits"] >= 1 and got["limit"] <= 3


def test_real_host_allocator_failure_of_one_row_fails_only_its_item():
    rows = [[[1, 1], [1, 2]], [[64, 3]], [[1, 4]]]  # the middle item needs 64 GiB alone
    got = _child(_TORCH_MODEL, rows, headroom=3 << 30)
    assert got["out"][0] == ["ok", [2.0, 4.0]] and got["out"][2] == ["ok", [8.0]], got
    name, message, cause = got["out"][1]
    assert name == "OutOfMemory" and "can't allocate memory" in message and cause == "RuntimeError"


def big_expand_model(floats_per_row: int) -> bytes:
    """An ONNX model of ``[b, 2] -> [b]`` (twice column 1) that expands each row to ``floats_per_row`` floats inside
    the graph: its memory grows with the batch, as a real model's activations do."""
    from onnx import TensorProto, helper

    def const(name, v):
        return helper.make_tensor(name, TensorProto.INT64, [len(v)], v)

    graph = helper.make_graph([
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Slice", ["s", "zero", "one"], ["b"]),
        helper.make_node("Concat", ["b", "n"], ["shape"], axis=0),
        helper.make_node("Slice", ["x", "one", "two", "one"], ["v"]),
        helper.make_node("Expand", ["v", "shape"], ["big"]),
        helper.make_node("ReduceMax", ["big", "one"], ["m"], keepdims=0),
        helper.make_node("Add", ["m", "m"], ["y"]),
    ], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b"])],
        initializer=[const("zero", [0]), const("one", [1]), const("two", [2]), const("n", [floats_per_row])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 8
    return proto.SerializeToString()


_ORT_MODEL = """
import onnxruntime as ort
from tests.unit.test_oom_batching import big_expand_model
session = ort.InferenceSession(big_expand_model(1 << 26), providers=["CPUExecutionProvider"])  # 256 MiB a row
def model(x):
    return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
"""


def test_real_onnx_runtime_arena_failures_are_split():
    rows = [[[1, 10 * i + j] for j in range(n)] for i, n in enumerate([2, 3, 3])]
    got = _child(_ORT_MODEL, rows, headroom=1 << 30)  # 8 rows want 2 GiB from ORT's arena: refused
    for i, n in enumerate([2, 3, 3]):
        assert got["out"][i] == ["ok", [2.0 * (10 * i + j) for j in range(n)]], got
    assert got["splits"] >= 1 and got["limit"] < 8


def test_a_filter_that_runs_out_of_memory_outside_a_batch_fails_its_item_retryably():
    from pipeline.filters.base import Filter, FilterContext
    from pipeline.media.item import MediaItem

    class WholeClipOnDevice(Filter):  # a signal filter's tensors of a whole clip, too large for the free memory
        def apply(self, media, ctx):
            return {"energy": float(torch.empty(1 << 50, dtype=torch.uint8).sum())}  # a real allocator refusal

    class Buggy(Filter):
        def apply(self, media, ctx):
            raise RuntimeError("index 7 is out of bounds")

    item = MediaItem("x", "unread.mp4", 0)  # the filters here read nothing of it
    with pytest.raises(OutOfMemory, match="big: RuntimeError: .*can't allocate memory") as e:
        WholeClipOnDevice("big", None).run(item, FilterContext("cpu", None))
    assert is_retryable(e.value) and "\n" not in str(e.value)

    class HostRefused(Filter):  # MemoryError() carries no message at all
        def apply(self, media, ctx):
            raise MemoryError()

    with pytest.raises(OutOfMemory, match="^host: MemoryError: $"):
        HostRefused("host", None).run(item, FilterContext("cpu", None))
    with pytest.raises(FilterError) as e:  # a bug stays a bug: not retried
        Buggy("buggy", None).run(item, FilterContext("cpu", None))
    assert not is_retryable(e.value)
