"""``speech_cuts``: speech segments and cut points at natural pauses, for speech and TTS training data.

Runs the chunked audio pipeline (``pipeline/audio``) on the item's audio stream (an audio file or a video's
track); the chunks of concurrent items share Silero VAD batches.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
from dataclasses import dataclass, field
from typing import Literal

import pyarrow as pa

from models.circuit_breaker import CircuitBreaker, CudaCircuitOpen, runtime_after_trip
from models.onnx_session import OrtParams, ProviderError, device_index
from pipeline.audio.decode import decode_audio, resample
from pipeline.audio.pipeline import AudioParams, run_audio
from pipeline.audio.schedule import chunk_schedule
from pipeline.audio.separator import Separator, SeparatorParams, load_sidecar
from pipeline.audio.vad import OnnxSileroVAD, SequenceSileroVAD, SileroVAD
from pipeline.batching import DynamicBatcher
from pipeline.errors import ConfigError, GpuFailure
from pipeline.filters.base import RUNTIME, Filter, FilterContext, SetupContext, loading_model
from pipeline.media.item import MediaItem
from pipeline.weights import ModelSource

SPAN = pa.struct([("start_s", pa.float64()), ("end_s", pa.float64())])


@dataclass(frozen=True)
class SpeechCutsParams(AudioParams):
    separator: SeparatorParams | None = None
    """Optional vocal separator (ONNX) run first; off when not configured (the pipeline runs on the mixture)."""
    max_wait_ms: float = 20.0
    """How long a VAD batch waits for chunks of other items before it runs partly full."""
    vad_instances: int = 1
    """VAD instances per rank. One batch at a time is fastest: a VAD step is many tiny ops, and two loops at once
    only contend for the cores; the chunks of all concurrent items share that one batch instead."""
    vad_backend: Literal["torchscript", "onnx", "onnx_sequence"] = "torchscript"
    """``onnx``: the ONNX Silero VAD that the package ships, through the session factory (provider chain, ``vad_ort``
    settings, batch buckets), frame by frame like TorchScript. ``onnx_sequence``: the package's sequence ONNX model
    (16 kHz only), which runs a chunk's frames in one call instead of one call per frame; chunks run one after
    another. TorchScript, batched across chunks, measured fastest on CPU (bench_vad.py)."""
    vad_provider: Literal["tensorrt", "cuda", "cpu"] = "cuda"
    """ONNX VAD provider on a GPU rank (CPU ranks use ``cpu``)."""
    vad_ort: OrtParams = field(default_factory=OrtParams)
    """ONNX Runtime settings of the ONNX VAD."""
    vad_batch_buckets: tuple[int, ...] = (4, 8, 16, 32, 64, 96, 128)
    """Batch sizes the ONNX VAD is warmed up on; a batch of chunks is padded to the next one."""


class SpeechCutsFilter(Filter):
    params_type = SpeechCutsParams
    output_type = pa.struct([
        ("duration_s", pa.float64()), ("sample_rate", pa.int32()), ("speech_ratio", pa.float64()),
        ("speech", pa.list_(SPAN)),
        ("cuts", pa.list_(pa.float64())),
        ("cut_details", pa.list_(pa.struct([("time_s", pa.float64()), ("kind", pa.string()), ("rank", pa.float64()),
                                            ("guard_shift_s", pa.float64())]))),
        ("pieces", pa.list_(pa.struct([("start_s", pa.float64()), ("end_s", pa.float64()),
                                       ("duration_s", pa.float64())]))),
        ("separator_runtime", RUNTIME),
        ("vad_runtime", RUNTIME),
        ("chunking", pa.struct([("enabled", pa.bool_()), ("chunk_s", pa.float64()), ("overlap_s", pa.float64()),
                                ("halo_s", pa.float64()), ("align_hop", pa.int32()), ("chunks", pa.int32())])),
    ])

    def __init__(self, name, params):
        super().__init__(name, params)
        self._batcher: DynamicBatcher | None = None
        if params.sample_rate not in (8000, 16000):
            raise ConfigError(f"filters.{name}.sample_rate must be 16000 or 8000 (Silero VAD)")
        g = params.gpu_pipeline
        if g.align_hop % 512 or g.align_hop % params.stft_hop:
            raise ConfigError(f"filters.{name}.gpu_pipeline.align_hop must be a multiple of 512 and of stft_hop")
        if not 0 <= g.overlap_seconds < g.chunk_seconds:
            raise ConfigError(f"filters.{name}.gpu_pipeline: overlap_seconds must be in [0, chunk_seconds)")
        if params.vad_backend == "onnx_sequence" and params.sample_rate != 16000:
            raise ConfigError(f"filters.{name}: vad_backend onnx_sequence takes 16000 Hz audio (sample_rate is "
                              f"{params.sample_rate}); use torchscript or onnx for 8000")
        if params.separator is not None and not params.separator.model_uri:
            raise ConfigError(f"filters.{name}.separator.model_uri is required when a separator is configured")
        if params.separator is not None and params.separator.provider not in ("cpu", "cuda", "tensorrt"):
            raise ConfigError(f"filters.{name}.separator.provider must be cpu, cuda or tensorrt")

    def model_sources(self) -> dict[str, ModelSource | str]:
        out: dict[str, ModelSource | str] = {"vad": f"silero-vad=={importlib.metadata.version('silero-vad')}"}
        sep = self.params.separator
        if sep is not None:
            out["separator.model_uri"] = ModelSource(sep.model_uri, sep.storage_options)
            if sep.sidecar_uri:
                out["separator.sidecar_uri"] = ModelSource(sep.sidecar_uri, sep.storage_options)
            elif "://" not in sep.model_uri and os.path.exists(sep.model_uri + ".json"):  # load_sidecar's default
                out["separator.sidecar_uri"] = ModelSource(sep.model_uri + ".json")
        return out

    def setup(self, ctx: SetupContext) -> None:
        p = self.params
        key = self._vad_key = f"silero_vad:{p.vad_backend}:{p.sample_rate}"
        device_id = device_index(ctx.device)
        trt_cache = ctx.engine_cache()
        if p.vad_backend in ("onnx", "onnx_sequence"):
            provider = p.vad_provider if ctx.device.startswith("cuda") else "cpu"
            if p.vad_backend == "onnx":
                make = functools.partial(OnnxSileroVAD, batch_buckets=p.vad_batch_buckets)
            else:
                make = SequenceSileroVAD

            def build_vad(device):
                try:
                    vad = make(p.sample_rate, provider, device_id, ctx.strict_gpu, p.vad_ort, cache_dir=trt_cache)
                except ProviderError as e:
                    raise ConfigError(f"filters.{self.name}: strict_gpu: {e}") from e
                cpu = functools.partial(make, p.sample_rate, "cpu", 0, False, p.vad_ort)
                breaker = CircuitBreaker(vad, cpu, ctx.strict_gpu)
                breaker.ort = vad.ort
                return breaker

            ctx.pool.add(key, build_vad, instances=p.vad_instances)
            with ctx.pool.acquire(key) as built:
                self._vad_runtime = built.ort.runtime(io_binding=False)
        else:
            ctx.pool.add(key, lambda device: SileroVAD(p.sample_rate, device), instances=p.vad_instances)
            self._vad_runtime = {"backend": "torchscript", "execution_provider": ctx.device, "io_binding": None,
                                 "fallback_reason": None}
        pool = ctx.pool
        self._device = ctx.device

        def run_batch(x):
            with pool.acquire(key) as vad:
                return vad(x)

        self._separator_key = None
        sep = self.params.separator
        if sep is not None:
            model = ctx.localize(sep.model_uri, sep.storage_options)
            sidecar_local = ctx.localize(sep.sidecar_uri, sep.storage_options) if sep.sidecar_uri else None
            self._separator_key = f"separator:{sep.model_uri}"
            with loading_model(f"{self.name}.separator", sep.model_uri):
                sidecar = load_sidecar(model, sidecar_local)
                ctx.pool.add(self._separator_key, lambda device: Separator(model, sidecar, sep, device, ctx.strict_gpu,
                                                                           trt_cache),
                             instances=self.params.vad_instances)
                with ctx.pool.acquire(self._separator_key) as built:  # built and warmed up now, not on the first item
                    self.runtime = built.ort.runtime(io_binding=False)
        self._pool = pool
        self._direct = run_batch  # whole-file chunks differ in length per file: no cross-item batching
        self._batcher = DynamicBatcher(run_batch, self.params.gpu_pipeline.batch_chunks,
                                       self.params.max_wait_ms / 1000.0, runners=self.params.vad_instances)

    def batchers(self) -> dict:
        return {f"{self.name}/vad": self._batcher} if self._batcher is not None else {}

    def runtimes(self) -> dict[str, dict]:
        out = {f"{self.name}/vad": runtime_after_trip(self._vad_runtime)}
        if self.runtime is not None:
            out[f"{self.name}/separator"] = runtime_after_trip(self.runtime)
        return out

    def apply(self, media: MediaItem, ctx: FilterContext) -> dict | None:
        try:
            return self._apply(media)
        except CudaCircuitOpen as e:
            raise GpuFailure(str(e)) from e  # a system failure: the rank stops, the item is redone on a rerun

    def rehearse(self, media: MediaItem, ctx: FilterContext) -> None:
        """The audio decode (FFmpeg's demuxers, decoders and resampler), as ``apply`` asks for it."""
        if media.info.audio is not None:
            decode_audio(media.local_path, self.params.sample_rate, self.params.max_seconds)

    def _apply(self, media: MediaItem) -> dict | None:
        if media.info.audio is None:
            return None
        p = self.params
        g = p.gpu_pipeline
        if self._separator_key is None:
            audio = decode_audio(media.local_path, p.sample_rate, p.max_seconds, given_up=media.given_up)
        else:
            with self._pool.acquire(self._separator_key) as sep:
                rate = sep.spec.sample_rate
                stereo = decode_audio(media.local_path, rate, p.max_seconds, channels=2, given_up=media.given_up)
                plans = chunk_schedule(stereo.shape[1] / rate, g.chunk_seconds, g.overlap_seconds, g.halo_seconds,
                                       1024, rate) if g.enable else chunk_schedule(stereo.shape[1] / rate, 1e9, 0, 0,
                                                                                   1024, rate)
                audio = resample(sep.separate(stereo, plans).mean(axis=0), rate, p.sample_rate)
        chunked = g.enable
        if chunked and g.use_cuda_streams and self._device.startswith("cuda") and p.vad_backend == "torchscript":
            with self._pool.acquire(self._vad_key) as vad:  # stages on CUDA streams, this item's chunks batched
                result = run_audio([audio], p, vad.probs, chunked, self._device, vad=vad)[0]
        else:
            result = run_audio([audio], p, self._batcher if chunked else self._direct, chunked, self._device)[0]
        return {
            "duration_s": result.duration_s, "sample_rate": p.sample_rate, "speech_ratio": result.speech_ratio,
            "speech": [{"start_s": s, "end_s": e} for s, e in result.speech],
            "cuts": [c.time_s for c in result.cuts],
            "cut_details": [{"time_s": c.time_s, "kind": c.kind, "rank": c.rank, "guard_shift_s": c.guard_shift_s}
                            for c in result.cuts],
            "pieces": [{"start_s": a, "end_s": b, "duration_s": b - a} for a, b in result.pieces()],
            "separator_runtime": runtime_after_trip(self.runtime),
            "vad_runtime": runtime_after_trip(self._vad_runtime),
            "chunking": {"enabled": chunked, "chunk_s": g.chunk_seconds, "overlap_s": g.overlap_seconds,
                         "halo_s": g.halo_seconds, "align_hop": g.align_hop, "chunks": len(result.plans)},
        }



