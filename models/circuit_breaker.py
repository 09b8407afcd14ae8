"""A circuit breaker for GPU inference: after a CUDA failure, no more CUDA in this process.

An ONNX Runtime CUDA error at run time (CUDNN_STATUS_*, an illegal memory access, invalid PTX) leaves the CUDA
context unusable. Running out of memory does not: it passes through unchanged, and the caller's batcher runs
smaller batches (``pipeline.batching``) instead of moving the process to the CPU for the rest of the job. The
breaker trips process-wide, moves the work to a fresh subprocess that runs the same model on CPU, and retries the
failing batch there once; in strict mode it raises ``CudaCircuitOpen``, a system failure that stops the rank.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
from typing import Callable

import numpy as np
import torch

log = logging.getLogger(__name__)

CUDA_FAILURES = ("CUDNN_STATUS_", "CUBLAS_STATUS_", "illegal memory access", "invalid PTX", "PTX JIT",
                 "CUDA failure", "cudaError", "CUDA error", "no kernel image")

# What the allocators say when they cannot allocate: torch's CUDA caching allocator (torch.cuda.OutOfMemoryError,
# "CUDA out of memory"), the CUDA runtime through ONNX Runtime ("CUDA failure 2: out of memory"), ONNX Runtime's
# BFC arena on either device ("Failed to allocate memory for requested buffer of size N"), cuDNN and cuBLAS work
# spaces (*_STATUS_ALLOC_FAILED), torch's host allocator ("DefaultCPUAllocator: can't allocate memory"). None of
# them leaves the CUDA context broken, unlike an illegal memory access, so the process goes on using the GPU.
# the last: ONNX Runtime's CUDA arena at its gpu_mem_limit ("BFCArena::AllocateRawInternal ... Available memory of
# 1072693248 is smaller than requested bytes of 4294967296", an onnxruntime Fail seen on an H200)
_OOM_TEXT = ("out of memory", "failed to allocate memory", "_alloc_failed", "can't allocate memory",
             "cannot allocate memory", "is smaller than requested bytes")

_TRIPPED = threading.Event()
_REASON: list[str] = []


class CudaCircuitOpen(RuntimeError):
    """CUDA failed in this process and strict GPU mode forbids the CPU fallback."""


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) is an allocation failure on the device or the host.

    Args:
        error: an exception raised by a model call or a tensor operation.

    Returns:
        True for the allocation failures in ``_OOM_TEXT`` and for ``MemoryError``.
    """
    for _ in range(8):  # the chain of causes, bounded
        if error is None:
            return False
        if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):
            return True
        if any(p in str(error).lower() for p in _OOM_TEXT):
            return True
        error = error.__cause__ or error.__context__
    return False


def is_cuda_failure(error: BaseException) -> bool:
    """Whether ``error`` is a CUDA failure that breaks the process's CUDA context (not running out of memory)."""
    if is_out_of_memory(error):
        return False
    text = f"{type(error).__name__}: {error}"
    return any(p.lower() in text.lower() for p in CUDA_FAILURES)


def tripped() -> str | None:
    """The reason the breaker tripped in this process, or None."""
    return _REASON[0] if _TRIPPED.is_set() and _REASON else None


def runtime_after_trip(runtime: dict | None) -> dict | None:
    """A row's ``runtime`` struct as it stands now, for an ONNX model behind a ``CircuitBreaker``: once the breaker
    has tripped in this process the model runs in the CPU subprocess, and the row says so and why."""
    if runtime and runtime.get("backend") == "onnx" and tripped():
        return {**runtime, "execution_provider": "CPUExecutionProvider (subprocess)",
                "fallback_reason": f"circuit breaker: {tripped()}"}
    return runtime


def _reset_for_tests() -> None:
    _TRIPPED.clear()
    _REASON.clear()


def _serve(conn, factory: Callable[[], Callable[[torch.Tensor], torch.Tensor]]) -> None:
    """Subprocess loop: build the CPU model, then answer arrays with arrays until the pipe closes."""
    model = factory()
    while True:
        try:
            x = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", model(torch.from_numpy(x)).numpy()))
        except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the item
            conn.send(("error", f"{type(e).__name__}: {e}"))


class CpuSubprocess:
    """A model served on CPU by a fresh (spawned) process, so no CUDA state is inherited."""

    def __init__(self, factory: Callable[[], Callable[[torch.Tensor], torch.Tensor]]):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, factory), daemon=True)
        self.proc.start()
        self.lock = threading.Lock()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.conn.send(np.ascontiguousarray(x.detach().cpu().float().numpy()))
            status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"CPU fallback subprocess failed: {value}")
        return torch.from_numpy(value)

    def close(self) -> None:
        self.conn.close()
        self.proc.join(timeout=5)


class CircuitBreaker:
    """Wraps a GPU model call; see the module docstring.

    Args:
        primary: the model call on the GPU.
        cpu_factory: a picklable callable building the same model on CPU (run in the subprocess).
        strict: raise ``CudaCircuitOpen`` instead of falling back.
    """

    def __init__(self, primary: Callable[[torch.Tensor], torch.Tensor], cpu_factory: Callable, strict: bool = False):
        self.primary = primary
        self.cpu_factory = cpu_factory
        self.strict = strict
        self._fallback: CpuSubprocess | None = None
        self._lock = threading.Lock()

    def _cpu(self) -> CpuSubprocess:
        with self._lock:
            if self._fallback is None:
                self._fallback = CpuSubprocess(self.cpu_factory)
            return self._fallback

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not _TRIPPED.is_set():
            try:
                return self.primary(x)
            except Exception as e:  # noqa: BLE001 - only CUDA failures trip; others propagate unchanged
                if not is_cuda_failure(e):
                    raise
                if not _TRIPPED.is_set():
                    _REASON.append(f"{type(e).__name__}: {str(e)[:300]}")
                    _TRIPPED.set()
                    log.error("CUDA failure, circuit breaker open for this process: %s", e)
        if self.strict:
            raise CudaCircuitOpen(f"strict GPU mode: CUDA failed ({tripped()}); no CPU fallback")
        return self._cpu()(x)  # the failing batch is retried once here, and every later one runs here
