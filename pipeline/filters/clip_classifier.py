"""``clip_classifier``: a VideoMAE / V-JEPA 2 style classifier on the whole clip, sliding windows and reversed
windows. The users run four instances of it (``vfx``, ``simcam``, ``rov``, ``low_quality``), each a config entry
with its own ``model_uri``."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field, replace
from typing import Literal

import pyarrow as pa
import torch

from models.circuit_breaker import CircuitBreaker, CudaCircuitOpen, runtime_after_trip
from models.onnx_session import OrtParams
from pipeline.batching import DynamicBatcher
from pipeline.errors import ConfigError, GpuFailure
from pipeline.filters.base import RUNTIME, FilterContext, SetupContext, VideoFilter, loading_model
from pipeline.media.item import MediaItem
from pipeline.video.preprocess import ClipViews, clips_to_input, per_group
from pipeline.video.sampling import Uniform, Windows, window_bounds
from pipeline.video.stream import WindowStream, read_all_through
from pipeline.weights import ModelSource

WINDOW = pa.struct([("start_s", pa.float64()), ("end_s", pa.float64()), ("label", pa.string()), ("prob", pa.float32())])


@dataclass(frozen=True)
class ClipClassifierParams:
    model_uri: str = ""
    """Classifier directory (backbone/, head.safetensors, head.json): a local path or any fsspec URL."""
    storage_options: dict = field(default_factory=dict)
    """fsspec options for ``model_uri``."""
    whole_clip: bool = True
    """Classify the whole clip (frames uniformly over it)."""
    window_s: float | None = None
    """Sliding windows of this length (None: no windows)."""
    stride_s: float | None = None
    """Window stride (default: the window length)."""
    start_s: float = 0.0
    """Windows start here, in seconds on the file's timeline (from the container's start, where ``ffmpeg -ss``,
    the audio and the rows' times count from; the first video frame is later where the video starts after the
    audio) ..."""
    end_s: float | None = None
    """... and end here (None: the clip's end)."""
    max_windows: int = 64
    """At most this many windows are decoded with the item's other frames. Where more would fit, a clip is read
    all through (``stream_windows``), or else the stride grows so that this many cover the whole span."""
    stream_windows: bool = True
    """A clip with more than ``max_windows`` windows at ``stride_s`` (over about 2 minutes at a 2-s stride) has its
    windows read all through at ``stride_s``, a group of consecutive windows decoded at a time and classified before
    the next (``pipeline.video.stream.WindowStream``; every classifier with the same windows and input size reads
    the same pass); up to ``max_stream_windows``, past which the stride grows. False: ``max_windows`` spread over
    the clip (before: a 2-hour film got 64 windows, 2 minutes apart)."""
    max_stream_windows: int = 7200
    """At most this many windows read all through (an hour at a 0.5-s stride, 4 hours at 2 s): a file cannot make
    the filter classify without end."""
    reversed_windows: bool = False
    """Also classify each window with its frames in reverse order."""
    batch_size: int = 8
    """Clips per model call, across windows and items."""
    fp16: bool = True
    """FP16 on GPU (FP32 on CPU always)."""
    max_wait_ms: float = 10.0
    """How long a batch waits for clips of other items before it runs partly full."""
    backend: Literal["torch", "onnx"] = "torch"
    """``onnx``: run ``model.onnx`` from the model directory (``jobs/export_onnx.py`` writes it) in ONNX Runtime."""
    provider: Literal["tensorrt", "cuda", "cpu"] = "cuda"
    """ONNX Runtime provider on a GPU rank (CPU ranks use ``cpu``); falls back TensorRT -> CUDA -> CPU."""
    io_binding: bool = True
    """Bind torch buffers to the ONNX session (no copy through host memory on GPU)."""
    strict_gpu: bool = False
    """Any fallback from the requested provider is fatal."""
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8)
    """Batch sizes the ONNX model is warmed up on; batches are padded to the next bucket."""
    ort: OrtParams = field(default_factory=OrtParams)
    """ONNX Runtime settings: graph optimisation, cuDNN search, TensorRT FP16, engine cache, workspace."""


class ClipClassifierFilter(VideoFilter):
    """Softmax label and probability per clip, window and reversed window."""

    params_type = ClipClassifierParams
    output_type = pa.struct([
        ("label", pa.string()), ("prob", pa.float32()), ("scores", pa.map_(pa.string(), pa.float32())),
        ("windows", pa.list_(WINDOW)), ("reversed_windows", pa.list_(WINDOW)),
        ("runtime", RUNTIME),
    ])

    def __init__(self, name, params):
        super().__init__(name, params)
        if not params.model_uri:
            raise ConfigError(f"filters.{name}.model_uri is required")
        if not params.whole_clip and params.window_s is None:
            raise ConfigError(f"filters.{name}: enable whole_clip or set window_s")
        if params.max_windows < 1 or params.max_stream_windows < 1:
            raise ConfigError(f"filters.{name}: max_windows and max_stream_windows must be at least 1")
        if params.backend == "onnx" and params.batch_size > max(params.batch_buckets, default=0):
            raise ConfigError(f"filters.{name}: batch_size {params.batch_size} exceeds the largest batch bucket")
        self.head: dict | None = None
        self._batcher: DynamicBatcher | None = None
        self._device = "cpu"

    @property
    def _pool_key(self) -> str:
        return f"clip_classifier:{self.params.model_uri}"

    def model_sources(self) -> dict[str, ModelSource]:
        # model.onnx is made from the weights by jobs/export_onnx.py: read by the onnx backend only
        derived = () if self.params.backend == "onnx" else ("model.onnx",)
        return {"model_uri": ModelSource(self.params.model_uri, self.params.storage_options, derived)}

    def setup(self, ctx: SetupContext) -> None:
        local = ctx.localize(self.params.model_uri, self.params.storage_options)
        with loading_model(self.name, self.params.model_uri):
            self._load(ctx, local)

    def _load(self, ctx: SetupContext, local: str) -> None:
        from models.video_classifier import VideoClassifier

        with open(os.path.join(local, "head.json")) as f:
            self.head = json.load(f)
        fp16 = self.params.fp16 and ctx.device.startswith("cuda")
        self._dtype = torch.float16 if fp16 else torch.float32
        self._device = ctx.device
        size, t = self.head["image_size"], self.head["num_frames"]

        def warmup(model):
            with torch.inference_mode():
                model(torch.zeros(1, t, 3, size, size, device=ctx.device, dtype=self._dtype))

        p = self.params
        strict = p.strict_gpu or ctx.strict_gpu
        if p.backend == "onnx":
            from models.onnx_classifier import OnnxClassifier
            from models.onnx_session import ProviderError

            onnx_path = os.path.join(local, "model.onnx")
            if not os.path.exists(onnx_path):  # a node-local copy made before the export: fetch the file itself
                onnx_uri = self.params.model_uri.rstrip("/") + "/model.onnx"
                try:
                    onnx_path = ctx.localize(onnx_uri, self.params.storage_options)
                except ConfigError as e:
                    raise ConfigError(f"filters.{self.name}: {onnx_uri} missing; run jobs/export_onnx.py first") from e
            provider = p.provider if ctx.device.startswith("cuda") else "cpu"
            trt_cache = ctx.engine_cache()
            self._dtype = torch.float32

            def build(device):
                try:
                    runner = OnnxClassifier(onnx_path, t, size, provider, device, p.batch_buckets, p.io_binding,
                                            strict, p.ort, trt_cache)
                except ProviderError as e:
                    raise ConfigError(f"filters.{self.name}: strict_gpu: {e}") from e
                cpu = functools.partial(OnnxClassifier, onnx_path, t, size, "cpu", "cpu", p.batch_buckets, False,
                                        params=p.ort)
                breaker = CircuitBreaker(runner, cpu, strict)
                breaker.ort = runner.ort
                return breaker

            ctx.pool.add(self._pool_key, build)
            with ctx.pool.acquire(self._pool_key) as runner:
                self.runtime = runner.ort.runtime(p.io_binding)
        else:
            ctx.pool.add(self._pool_key, lambda device: VideoClassifier.load(local, device, fp16), warmup)
            self.runtime = {"backend": "torch", "execution_provider": ctx.device, "io_binding": None,
                            "fallback_reason": None}
        pool = ctx.pool

        def run_batch(x: torch.Tensor) -> torch.Tensor:
            with pool.acquire(self._pool_key) as model, torch.inference_mode():
                return torch.softmax(model(x).float(), dim=-1).cpu()

        self._batcher = DynamicBatcher(run_batch, self.params.batch_size, self.params.max_wait_ms / 1000.0,
                                       runners=pool.instances)

    def batchers(self) -> dict:
        return {self.name: self._batcher} if self._batcher is not None else {}

    def runtime_now(self) -> dict | None:
        return runtime_after_trip(self.runtime)

    def _whole(self) -> Uniform:
        return Uniform(self.head["num_frames"], short_side=self.head["image_size"])

    def _windows(self) -> Windows:  # the model resizes the short side to its image_size: no more pixels are needed
        p = self.params
        return Windows(p.window_s, p.stride_s or p.window_s, self.head["num_frames"], p.start_s, p.end_s,
                       p.max_windows, short_side=self.head["image_size"], spread=not p.stream_windows)

    def _window_stream(self) -> WindowStream:  # the same windows, all through up to their own cap
        request = replace(self._windows(), max_windows=self.params.max_stream_windows, spread=True)
        return WindowStream(request, _WindowClassifier(self))

    def frame_requests(self) -> list:
        if self.head is None:
            return []
        p = self.params
        reqs = [self._whole()] if p.whole_clip else []
        if p.window_s:
            reqs += [self._windows()] + ([self._window_stream()] if p.stream_windows else [])
        return reqs

    def classify(self, clips) -> torch.Tensor:
        """uint8 clips (``[B, T, H, W, 3]``, a list of ``[T, H, W, 3]`` or a ``ClipViews``) -> class probabilities
        ``[B, L]`` (batched with other items' clips)."""
        return self.classify_both(clips, reverse=False)[0]

    def classify_both(self, clips, reverse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Class probabilities of ``clips`` (as ``classify``) and, with ``reverse``, of each clip with its frames in
        reverse order: ``([B, L], [B, L] or None)``.

        The clips become model input ``batch_size`` at a time (half as many with ``reverse``), each such part sent
        to the batcher before the next is made: 128 windows of 48 frames at 256 pixels are 4.8 GB of FP32 input,
        which (with a copy to concatenate it) took an item's classifier to 13.8 GiB of process memory. A reversed
        clip is its forward input flipped in time (the frames are resized and normalised one by one, so the same
        values), not a second conversion of a flipped copy. Within a part, clips are stacked ``per_group`` at a time
        (overlapping windows are views of the same decoded frames).
        """
        p = self.params
        part = max(1, p.batch_size // 2 if reverse else p.batch_size)
        fwd, rev = [], []
        for i in range(0, len(clips), part):
            x = self._model_input(clips[i:i + part])
            n = x.shape[0]
            if reverse:
                x = torch.cat([x, x.flip(1)])
            try:
                probs = self._batcher(x)
            except CudaCircuitOpen as e:
                raise GpuFailure(str(e)) from e  # a system failure: the rank stops, the item is redone on a rerun
            del x
            fwd.append(probs[:n])
            rev.append(probs[n:])
        if not fwd:
            empty = torch.empty(0, len(self.head["labels"]))
            return empty, (empty if reverse else None)
        return torch.cat(fwd), (torch.cat(rev) if reverse else None)

    def _model_input(self, clips) -> torch.Tensor:
        group = per_group(clips[0].numel())
        parts = []
        for i in range(0, len(clips), group):
            some = clips[i:i + group]
            parts.append(clips_to_input(some if torch.is_tensor(some) else torch.stack(list(some)),
                                        self.head["image_size"], self.head["mean"], self.head["std"], self._device,
                                        self._dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def apply_video(self, video, media: MediaItem, ctx: FilterContext) -> dict:
        labels = self.head["labels"]
        out = {"label": None, "prob": None, "scores": None, "windows": [], "reversed_windows": []}
        if self.params.whole_clip:
            p = self.classify([video.view(self._whole())])[0]
            k = int(p.argmax())
            out.update(label=labels[k], prob=float(p[k]), scores=list(zip(labels, p.tolist(), strict=True)))
        if self.params.window_s:
            req = self._windows()
            if read_all_through(video, req):  # more windows than the item's decode takes: read all through
                spans, fwd, rev = media.streamed(self._window_stream(), ctx.device)
            else:
                bounds = window_bounds(req, video.meta.num_frames, video.meta.fps, video.meta.timestamps,
                                       video.start_s)
                spans = [(float(s) + video.start_s, float(e) + video.start_s) for s, e in bounds]
                fwd, rev = self.classify_both(ClipViews(lambda w: video.view(req, w), video.windows(req)),
                                              self.params.reversed_windows)
            out["windows"] = self.window_rows(spans, fwd)
            out["reversed_windows"] = self.window_rows(spans, rev) if rev is not None else []
        out["runtime"] = self.runtime_now()  # after the model calls: a trip of the circuit breaker shows
        return out

    def window_rows(self, spans: list[tuple[float, float]], probs: torch.Tensor) -> list[dict]:
        labels = self.head["labels"]
        rows = []
        for (start, end), p in zip(spans, probs, strict=True):
            k = int(p.argmax())
            rows.append({"start_s": start, "end_s": end, "label": labels[k], "prob": float(p[k])})
        return rows


@dataclass(frozen=True)
class _WindowClassifier:
    """A classifier's reader of its windows read all through (``WindowStream``): each group of windows classified
    (and reversed) as it comes, the probabilities kept."""

    filter: ClipClassifierFilter

    @property
    def what(self) -> str:
        return f"the {self.filter.name} classifier"

    def open(self, device: str) -> _WindowsReading:
        return _WindowsReading(self.filter)


class _WindowsReading:
    def __init__(self, f: ClipClassifierFilter):
        self.f = f
        self.spans: list[tuple[float, float]] = []
        self.fwd: list[torch.Tensor] = []
        self.rev: list[torch.Tensor] = []

    def feed(self, clips: ClipViews, spans: list[tuple[float, float]]) -> None:
        fwd, rev = self.f.classify_both(clips, self.f.params.reversed_windows)
        self.spans += spans
        self.fwd.append(fwd)
        if rev is not None:
            self.rev.append(rev)

    def result(self) -> tuple[list[tuple[float, float]], torch.Tensor, torch.Tensor | None]:
        empty = torch.empty(0, len(self.f.head["labels"]))
        fwd = torch.cat(self.fwd) if self.fwd else empty
        if not self.f.params.reversed_windows:
            return self.spans, fwd, None
        return self.spans, fwd, torch.cat(self.rev) if self.rev else empty
