"""ONNX Runtime sessions with an honest account of where they run.

The providers in effect are read from the session (``get_providers()``), never assumed from what the package
lists; when the requested provider is not the first in effect, the reason is recorded (or, strict, raised).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger(__name__)

PROVIDER_CHAINS = {
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "cpu": ["CPUExecutionProvider"],
}

_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "all": "ORT_ENABLE_ALL"}


@dataclass(frozen=True)
class OrtParams:
    """Per-model ONNX Runtime settings (the ``ort:`` block of a filter or separator config)."""

    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = "all"
    """ORT graph optimisations."""
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = "EXHAUSTIVE"
    """CUDA provider: how cuDNN picks convolution algorithms (EXHAUSTIVE benchmarks once per shape)."""
    tf32: bool = True
    """CUDA provider: FP32 matrix products and convolutions in TF32 on Ampere and later (ORT's ``use_tf32``, on by
    default there; off, an FP32 model gives the CPU's results to about 1e-6, and runs slower). Measured on an H200:
    a tiny VideoMAE's logits 1.5e-3 from the CPU's with it on."""
    trt_fp16: bool = True
    """TensorRT: build FP16 engines."""
    trt_engine_cache_dir: str | None = None
    """TensorRT: node-local engine and timing cache (default ``<storage.cache_dir>/trt-engines/<device>``)."""
    trt_workspace_gb: float = 4.0
    """TensorRT: builder workspace."""
    intra_op_threads: int | None = None
    """ORT intra-op threads (None: ORT's default)."""


def device_index(device: str) -> int:
    """GPU index of a torch device string (``cuda:3`` -> 3; ``cuda`` and ``cpu`` -> 0), as ORT's ``device_id``."""
    return int(device.split(":")[1]) if device.startswith("cuda:") else 0


def graph_input(path: str) -> tuple[str, list[int | None]]:
    """Name and shape (None for a symbolic dimension) of the model's first input, read from the file without a
    session: TensorRT takes its profile shapes when the session is built."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    first = next(i for i in graph.input if i.name not in inits)
    dims = first.type.tensor_type.shape.dim
    return first.name, [d.dim_value if d.HasField("dim_value") else None for d in dims]


def shape_profile(shapes: dict[str, list[tuple[int, ...]]]) -> dict[str, str]:
    """TensorRT optimisation profile (min, opt, max) covering the bucket shapes of each named input.

    Per input, the smallest and largest bucket bound the profile and the largest is the optimum, so one engine
    serves every bucket and none is rebuilt at run time. Several inputs are joined as TensorRT takes them
    (``a:1x4,b:2x1x128``).
    """
    out: dict[str, list[str]] = {}
    for name, dims in shapes.items():
        if not dims:
            continue
        lo = min(dims, key=lambda s: tuple(s))
        hi = max(dims, key=lambda s: tuple(s))
        for key, s in (("trt_profile_min_shapes", lo), ("trt_profile_opt_shapes", hi), ("trt_profile_max_shapes", hi)):
            out.setdefault(key, []).append(f"{name}:" + "x".join(str(int(d)) for d in s))
    return {k: ",".join(v) for k, v in out.items()}


def provider_options(provider: str, params: OrtParams, device_id: int, profile: dict[str, str] | None = None,
                     cache_dir: str | None = None, stream: int | None = None) -> dict[str, str]:
    """The ORT provider options of one execution provider (strings, as ORT takes them); ``stream``: a CUDA stream
    handle (``torch.cuda.Stream().cuda_stream``, never the default stream's 0) for the GPU providers to run on."""
    if stream is not None and provider in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
        return {**provider_options(provider, params, device_id, profile, cache_dir), "user_compute_stream": str(stream)}
    if provider == "TensorrtExecutionProvider":
        opts = {"device_id": str(device_id), "trt_fp16_enable": str(int(params.trt_fp16)),
                "trt_max_workspace_size": str(int(params.trt_workspace_gb * (1 << 30)))}
        cache = params.trt_engine_cache_dir or cache_dir
        if cache:
            opts.update({"trt_engine_cache_enable": "1", "trt_engine_cache_path": cache,
                         "trt_timing_cache_enable": "1", "trt_timing_cache_path": cache})
        opts.update(profile or {})
        return opts
    if provider == "CUDAExecutionProvider":
        return {"device_id": str(device_id), "cudnn_conv_algo_search": params.cudnn_conv_algo_search,
                "use_tf32": str(int(params.tf32))}
    return {}


def run_bound(session, input_name: str, x, output_name: str, out=None, same_stream: bool = False):
    """One run with IOBinding on torch buffers: the input ``x`` (contiguous float32, on the CPU or a GPU) and the
    output ``out`` (preallocated with the output's shape, or None to let ORT allocate it) are bound by pointer, so
    nothing is copied through host memory. Returns the output as a torch tensor on ``x``'s device.

    On a GPU, torch's current stream is synchronised first: ORT runs on its own stream, and the preprocessing
    kernels that wrote ``x`` must be done before it reads. ``same_stream``: the session was made with torch's
    current stream as its compute stream (``make_session(stream=...)``), so stream order alone puts the
    preprocessing first and the host does not wait.
    """
    import numpy as np
    import torch

    on_gpu = x.is_cuda
    kind, index = ("cuda", x.device.index or 0) if on_gpu else ("cpu", 0)
    if on_gpu and not same_stream:
        torch.cuda.current_stream(x.device).synchronize()
    binding = session.io_binding()
    binding.bind_input(input_name, kind, index, np.float32, list(x.shape), x.data_ptr())
    if out is not None:
        binding.bind_output(output_name, kind, index, np.float32, list(out.shape), out.data_ptr())
    else:
        binding.bind_output(output_name, kind, index)
    session.run_with_iobinding(binding)
    binding.synchronize_outputs()
    if out is None:
        out = torch.from_numpy(binding.copy_outputs_to_cpu()[0]).to(x.device)
    return out


_LOGGED: set[tuple] = set()

_PROVIDER_LIBS = {"TensorrtExecutionProvider": "libonnxruntime_providers_tensorrt.so",
                  "CUDAExecutionProvider": "libonnxruntime_providers_cuda.so"}


def diagnose_provider(provider: str) -> str | None:
    """Why a GPU provider cannot load here, naming the missing library (None when its library loads)."""
    import ctypes

    import onnxruntime as ort

    lib = _PROVIDER_LIBS.get(provider)
    if lib is None:
        return None
    capi = os.path.join(os.path.dirname(ort.__file__), "capi")
    if not os.path.exists(os.path.join(capi, lib)):
        return f"{lib} is not in this onnxruntime build (install onnxruntime-gpu, not onnxruntime)"
    try:
        ctypes.CDLL(os.path.join(capi, "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(os.path.join(capi, lib))
    except OSError as e:
        return f"{lib} cannot load: {e}"
    return None


class ProviderError(RuntimeError):
    """The requested execution provider is not in effect and the session is strict."""


@dataclass
class OrtSession:
    session: object
    requested: str
    providers: list[str]
    fallback_reason: str | None

    @property
    def execution_provider(self) -> str:
        return self.providers[0]

    def runtime(self, io_binding: bool) -> dict:
        """The ``runtime`` struct of a row (``pipeline.filters.base.RUNTIME``) for a model on this session."""
        return {"backend": "onnx", "execution_provider": self.execution_provider, "io_binding": io_binding,
                "fallback_reason": self.fallback_reason}


def make_session(path: str, provider: str = "cpu", device_id: int = 0, strict: bool = False,
                 params: OrtParams | None = None, profile: dict[str, str] | None = None,
                 cache_dir: str | None = None, stream: int | None = None) -> OrtSession:
    """Open ``path`` on the first provider of the requested chain that works.

    Args:
        path: local ONNX file.
        provider: ``tensorrt``, ``cuda`` or ``cpu``; each falls back along the chain TensorRT -> CUDA -> CPU.
        device_id: GPU index for CUDA and TensorRT.
        strict: raise ProviderError instead of falling back.
        params: graph optimisation, cuDNN algorithm search, TensorRT FP16, engine cache, workspace, threads.
        profile: TensorRT profile shapes (``shape_profile`` of the padding buckets).
        cache_dir: default TensorRT engine cache directory (node-local).
        stream: a CUDA stream handle for the GPU providers to compute on (``user_compute_stream``).

    Returns:
        The session with the providers in effect and the fallback reason, if any.
    """
    import onnxruntime as ort

    params = params or OrtParams()
    chain = PROVIDER_CHAINS[provider]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[params.graph_optimization_level])
    if params.intra_op_threads:
        opts.intra_op_num_threads = params.intra_op_threads
    available = set(ort.get_available_providers())
    trt_cache = params.trt_engine_cache_dir or cache_dir
    if "TensorrtExecutionProvider" in chain and "TensorrtExecutionProvider" in available and trt_cache:
        os.makedirs(trt_cache, exist_ok=True)
    reasons = []
    for i in range(len(chain)):
        wanted = [p for p in chain[i:] if p in available] or ["CPUExecutionProvider"]
        providers = [p if p == "CPUExecutionProvider"
                     else (p, provider_options(p, params, device_id, profile, cache_dir, stream)) for p in wanted]
        try:
            sess = ort.InferenceSession(path, sess_options=opts, providers=providers)
        except Exception as e:  # noqa: BLE001 - a provider that cannot build this model: next in the chain
            reasons.append(f"{chain[i]}: {type(e).__name__}: {str(e)[:300]}")
            if strict:
                raise ProviderError(f"{path}: {reasons[-1]}") from e
            continue
        in_effect = sess.get_providers()
        reason = "; ".join(reasons) or None
        if in_effect[0] != chain[0]:
            missing = [p for p in chain if p not in available]
            why = [d for d in (diagnose_provider(p) for p in chain[:chain.index(in_effect[0])] if p in available) if d]
            reason = reason or (f"{chain[0]} requested, {in_effect[0]} in effect"
                                + (f" ({', '.join(missing)} not available in this onnxruntime build)" if missing else "")
                                + (f": {'; '.join(why)}" if why else ""))
            if strict:
                raise ProviderError(f"{path}: {reason}")
        key = (path, provider, tuple(in_effect), reason)
        if key not in _LOGGED:  # once per model per process, not per pool instance
            _LOGGED.add(key)
            log.info("%s", json.dumps({"onnx_model": path, "requested": provider, "providers": in_effect,
                                       "fallback_reason": reason,
                                       "provider_options": {p: o for p, o in sess.get_provider_options().items()
                                                            if p != "CPUExecutionProvider"}}))
        return OrtSession(sess, provider, in_effect, reason)
    raise ProviderError(f"{path}: no execution provider could open the model: {'; '.join(reasons)}")


class OnnxForward:
    """A one-input, one-output ONNX model as a torch call. Built from picklable arguments, so the circuit breaker's
    CPU subprocess can build the same model with ``provider="cpu"``.

    With ``io_binding`` the input and a fresh output (its shape learnt on the first call of each input shape) are
    bound by pointer on ``device`` (the rank's GPU when the session runs there, else the CPU), and the result stays
    there; without, arrays go through ``session.run`` and the result is on the CPU. ``stream``: a CUDA stream
    handle the GPU providers compute on; the caller then launches its preprocessing on that stream too, and the
    host does not wait before the run.

    Args: as ``make_session``, plus ``device``, ``io_binding`` and ``stream``.
    """

    def __init__(self, path: str, provider: str = "cpu", device_id: int = 0, strict: bool = False,
                 params: OrtParams | None = None, profile: dict[str, str] | None = None,
                 cache_dir: str | None = None, device: str = "cpu", io_binding: bool = False,
                 stream: int | None = None):
        self.ort = make_session(path, provider, device_id, strict=strict, params=params, profile=profile,
                                cache_dir=cache_dir, stream=stream)
        self.input_name = self.ort.session.get_inputs()[0].name
        self.output_name = self.ort.session.get_outputs()[0].name
        self.on_gpu = self.ort.execution_provider != "CPUExecutionProvider" and device.startswith("cuda")
        self.device = device if self.on_gpu else "cpu"
        self.io_binding = io_binding
        self.same_stream = self.on_gpu and stream is not None
        self._out_shapes: dict[tuple, tuple] = {}

    def __call__(self, x):
        import numpy as np
        import torch

        if not self.io_binding:
            y = self.ort.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x.cpu().numpy())})[0]
            return torch.from_numpy(y)
        x = x.to(self.device, torch.float32).contiguous()
        shape = self._out_shapes.get(tuple(x.shape))
        out = torch.empty(shape, device=self.device) if shape is not None else None
        y = run_bound(self.ort.session, self.input_name, x, self.output_name, out, self.same_stream)
        self._out_shapes[tuple(x.shape)] = tuple(y.shape)
        return y
