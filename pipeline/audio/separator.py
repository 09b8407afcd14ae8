"""Optional vocal separator (an MDX-style ONNX model) run before the VAD.

The input layout is read from the session (``get_inputs()``), never guessed: the model takes
``[B, 4, dim_f, dim_t]`` (real and imaginary parts of two channels' spectrograms). What the shape cannot say
(``n_fft``, ``hop``, the compensation factor, the sample rate) comes from a sidecar JSON next to the model or from
the config; a value missing from both is a ConfigError. Segments sit on a grid fixed to the file's start and are
overlap-added with a symmetric window, each chunk writing only its valid region, so the result does not depend on
the chunking.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from models.masking import pad_to_bucket
from models.onnx_session import OrtParams
from pipeline.audio.schedule import ChunkPlan
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class SeparatorParams:
    model_uri: str = ""
    """The ONNX model: a local path or any fsspec URL."""
    storage_options: dict = field(default_factory=dict)
    sidecar_uri: str | None = None
    """JSON with n_fft, hop, compensation, sample_rate (and dim_f, dim_t); default: ``<model_uri>.json``."""
    n_fft: int | None = None
    hop: int | None = None
    dim_f: int | None = None
    dim_t: int | None = None
    compensation: float | None = None
    sample_rate: int | None = None
    provider: str = "cuda"
    """On a GPU rank: ``cuda``, ``tensorrt`` or ``cpu`` (falls back along that chain; see models/onnx_session.py).
    CPU ranks use ``cpu``."""
    io_binding: bool = True
    """On a GPU rank the STFT, the model (bound to torch buffers, computing on the separator's own CUDA stream)
    and the inverse STFT stay on the device; on CPU, the model reads and writes torch's buffers in place."""
    batch_size: int = 4
    """Segments per model call; a short last batch is padded to it, so the model sees one shape."""
    ort: OrtParams = field(default_factory=OrtParams)
    """ONNX Runtime settings: graph optimisation, cuDNN search, TensorRT FP16, engine cache, workspace."""


@dataclass(frozen=True)
class SeparatorSpec:
    n_fft: int
    hop: int
    dim_f: int
    dim_t: int
    compensation: float
    sample_rate: int
    batch_fixed: int | None

    @property
    def segment(self) -> int:
        """Samples per model segment: ``dim_t`` STFT frames, centred."""
        return self.hop * (self.dim_t - 1)


def resolve_spec(input_shape: list, sidecar: dict, params: SeparatorParams) -> SeparatorSpec:
    """Combine the session's input shape, the sidecar and the config; disagreements and gaps are ConfigErrors."""
    if len(input_shape) != 4:
        raise ConfigError(f"separator input has shape {input_shape}; an MDX-style model takes [B, 4, dim_f, dim_t]")
    batch, channels, shape_f, shape_t = input_shape
    if channels != 4:
        raise ConfigError(f"separator input has {channels} channels; expected 4 (real/imag of two channels)")
    values = {}
    for name in ("n_fft", "hop", "dim_f", "dim_t", "compensation", "sample_rate"):
        v = getattr(params, name)
        values[name] = v if v is not None else sidecar.get(name)
    for name, from_shape in (("dim_f", shape_f), ("dim_t", shape_t)):
        if isinstance(from_shape, int):
            if values[name] is not None and values[name] != from_shape:
                raise ConfigError(f"separator {name}={values[name]} disagrees with the model's input shape {input_shape}")
            values[name] = from_shape
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise ConfigError(f"separator: {missing} are not in the model's shape, the sidecar or the config")
    if values["dim_f"] > values["n_fft"] // 2 + 1:
        raise ConfigError(f"separator dim_f={values['dim_f']} exceeds n_fft/2+1")
    return SeparatorSpec(int(values["n_fft"]), int(values["hop"]), int(values["dim_f"]), int(values["dim_t"]),
                         float(values["compensation"]), int(values["sample_rate"]),
                         batch if isinstance(batch, int) else None)


class Separator:
    """An MDX-style ONNX separator; ``separate`` returns the model's source (e.g. vocals) for a stereo signal."""

    def __init__(self, model_path: str, sidecar: dict, params: SeparatorParams, device: str = "cpu",
                 strict: bool = False, cache_dir: str | None = None):
        import functools

        from models.circuit_breaker import CircuitBreaker
        from models.onnx_session import OnnxForward, device_index, graph_input, shape_profile

        # The layout is read from the file before the session exists (TensorRT needs the profile at build time),
        # then again from the session, which is the authority.
        name, shape = graph_input(model_path)
        spec = resolve_spec(shape, sidecar, params)
        batch = spec.batch_fixed or params.batch_size
        profile = shape_profile({name: [(b, 4, spec.dim_f, spec.dim_t) for b in sorted({1, batch})]})
        provider = params.provider if device.startswith("cuda") else "cpu"
        # On a GPU the separator computes on a stream of its own, ORT included (its user compute stream), so its
        # work is ordered by the stream and neither waits for nor blocks the VAD and feature streams.
        self.stream = torch.cuda.Stream(device) if provider != "cpu" else None
        core = OnnxForward(model_path, provider, device_index(device), strict, params.ort, profile, cache_dir,
                           device, params.io_binding, self.stream.cuda_stream if self.stream is not None else None)
        self.ort = core.ort
        self.on_gpu = core.on_gpu
        self.device = core.device
        if not self.on_gpu:
            self.stream = None
        # a CUDA failure at run time: no more CUDA in this process, the batch is retried in a CPU subprocess
        self.forward = CircuitBreaker(core, functools.partial(OnnxForward, model_path, "cpu", params=params.ort),
                                      strict)
        inp = self.ort.session.get_inputs()[0]
        self.input_name = inp.name
        self.spec = resolve_spec(list(inp.shape), sidecar, params)
        self.batch_size = self.spec.batch_fixed or params.batch_size
        self.window = torch.hann_window(self.spec.n_fft)
        s = self.spec
        with self._on_stream():  # start-up self-check on the one batch shape
            core(torch.zeros(self.batch_size, 4, s.dim_f, s.dim_t, device=self.device))
        self.window_dev = self.window.to(self.device)

    def _on_stream(self):
        import contextlib

        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def _run_segments(self, segs: torch.Tensor) -> torch.Tensor:
        """``[B, 2, segment]`` -> the model's source ``[B, 2, segment]`` (on the CPU).

        On a GPU everything runs on the separator's stream and the host waits once, for the result; after a CUDA
        failure (the circuit breaker has tripped) everything runs on the CPU.
        """
        from models.circuit_breaker import tripped

        if not self.on_gpu or tripped():
            return self._segments_on(segs, "cpu", self.window)
        with torch.cuda.stream(self.stream):
            wav = self._segments_on(segs.to(self.device, non_blocking=True), self.device, self.window_dev)
            done = torch.cuda.Event()
            done.record(self.stream)
        done.synchronize()
        return wav.cpu()

    def _segments_on(self, segs: torch.Tensor, device: str, window: torch.Tensor) -> torch.Tensor:
        s = self.spec
        spec = torch.stft(segs.reshape(-1, s.segment), s.n_fft, s.hop, window=window, center=True,
                          return_complex=True)[:, : s.dim_f]  # [B*2, dim_f, dim_t]
        x = torch.view_as_real(spec).reshape(-1, 2, s.dim_f, s.dim_t, 2).permute(0, 1, 4, 2, 3)
        x = x.reshape(-1, 4, s.dim_f, s.dim_t).contiguous()
        outs = []
        for i in range(0, len(x), self.batch_size):
            # a short last batch is padded: one shape for the model (rows are independent, padding changes nothing)
            part, n = pad_to_bucket(x[i:i + self.batch_size], (self.batch_size,), dim=0)
            outs.append(self.forward(part)[:n].to(device))  # (the CPU subprocess answers on the CPU)
        y = torch.cat(outs).reshape(-1, 2, 2, s.dim_f, s.dim_t).permute(0, 1, 3, 4, 2)
        full = torch.zeros(y.shape[0], 2, s.n_fft // 2 + 1, s.dim_t, dtype=torch.complex64, device=device)
        full[:, :, : s.dim_f] = torch.view_as_complex(y.contiguous())
        wav = torch.istft(full.reshape(-1, s.n_fft // 2 + 1, s.dim_t), s.n_fft, s.hop, window=window,
                          center=True, length=s.segment)
        return wav.reshape(-1, 2, s.segment) * s.compensation

    def separate(self, audio: np.ndarray, plans: list[ChunkPlan]) -> np.ndarray:
        """Stereo ``[2, N]`` at the model's rate -> the separated source ``[2, N]``, chunk by chunk.

        Segments of ``spec.segment`` samples start every half segment from ``-segment/2`` (so every sample lies in
        two), are weighted by a symmetric Hann window and normalised by the summed window; each chunk computes the
        segments touching its valid region and writes only that region.
        """
        seg = self.spec.segment
        step = seg // 2
        window = torch.hann_window(seg, periodic=False)
        n = audio.shape[1]
        out = np.zeros_like(audio, dtype=np.float32)
        src = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
        for plan in plans:
            a, b = plan.valid_start, plan.valid_end
            k0 = math.floor((a + step) / step) - 1  # first segment (start k*step - step) ending after a
            starts = [k * step - step for k in range(max(0, k0 - 1), math.ceil((b + step) / step) + 1)]
            starts = [s for s in starts if s < b and s + seg > a]
            segs = torch.zeros(len(starts), 2, seg)
            for i, s in enumerate(starts):
                lo, hi = max(0, s), min(n, s + seg)
                segs[i, :, lo - s:hi - s] = src[:, lo:hi]
            res = self._run_segments(segs) if starts else segs
            acc = torch.zeros(2, b - a)
            wsum = torch.zeros(b - a)
            for i, s in enumerate(starts):
                lo, hi = max(a, s), min(b, s + seg)
                acc[:, lo - a:hi - a] += res[i, :, lo - s:hi - s] * window[lo - s:hi - s]
                wsum[lo - a:hi - a] += window[lo - s:hi - s]
            out[:, a:b] = (acc / wsum.clamp_min(1e-6)).numpy()
        return out


def load_sidecar(model_local: str, sidecar_local: str | None) -> dict:
    """The sidecar JSON: the configured one, else ``<model>.json`` beside the model, else empty."""
    path = sidecar_local or model_local + ".json"
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    if sidecar_local:
        raise ConfigError(f"separator sidecar {sidecar_local} does not exist")
    return {}
