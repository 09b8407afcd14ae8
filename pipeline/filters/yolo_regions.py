"""``yolo_regions``: abnormal regions (watermarks, subtitles, logos, borders: whatever the model's classes are)
detected by YOLO over sampled frames, aggregated over time, and the safe crop box that excludes them."""

from __future__ import annotations

import hashlib
import os
import subprocess
import uuid
from dataclasses import dataclass, field
from typing import Literal

import fsspec
import pyarrow as pa

from models.circuit_breaker import CudaCircuitOpen, runtime_after_trip
from models.onnx_session import OrtParams
from pipeline.batching import DynamicBatcher
from pipeline.errors import ConfigError, FilterError, GpuFailure
from pipeline.filters.base import RUNTIME, FilterContext, SetupContext, VideoFilter, loading_model
from pipeline.filters.signal import BOX, BlackBorderParams, frames_content_box
from pipeline.media.item import MediaItem
from pipeline.video.crop import aggregate_regions, safe_crop
from pipeline.video.deinterlace import is_interlaced
from pipeline.video.sampling import EveryK
from pipeline.weights import ModelSource
from pipeline.writer import is_local_fs

MP4_AUDIO = frozenset({"aac", "mp3", "mp2", "ac3", "eac3", "alac", "opus"})
"""Audio codecs the cropped MP4 takes as they are (``probe.audio.codec`` names); others (PCM from camera MOV or AVI,
Vorbis, FLAC) are encoded to AAC."""


def _audio_codecs(path: str) -> list[str]:
    """ffmpeg codec arguments for every audio track of ``path`` in the cropped MP4: copied where MP4 holds the
    codec, AAC otherwise (``-c:a copy`` of PCM made the whole encode fail)."""
    from pipeline.media.packets import open_container
    from pipeline.media.probe import codec_name

    with open_container(path) as c:
        codecs = [codec_name(s.codec_context) for s in c.streams.audio]
    args = []
    for i, codec in enumerate(codecs):
        args += [f"-c:a:{i}", "copy"] if codec in MP4_AUDIO else [f"-c:a:{i}", "aac", f"-b:a:{i}", "192k"]
    return args

REGION = pa.struct([("label", pa.string()), ("x", pa.int32()), ("y", pa.int32()), ("w", pa.int32()),
                    ("h", pa.int32()), ("persistence", pa.float32()), ("mean_conf", pa.float32())])


@dataclass(frozen=True)
class YoloRegionsParams:
    model_uri: str = ""
    """YOLO weights (``.pt``, or an exported ``.onnx``/``.engine``): a local path or any fsspec URL."""
    storage_options: dict = field(default_factory=dict)
    classes: tuple[str, ...] = ()
    """Class names that count as abnormal (empty: every class of the model)."""
    step: int = 10
    """Detect on every step-th frame ..."""
    max_frames: int = 64
    """... at most this many frames per item."""
    imgsz: int | tuple[int, ...] = 960
    """Inference size: an int (the long side; the ONNX path letterboxes to that square) or ``[h, w]``, a fixed
    rectangle (``[544, 960]`` for 16:9 video: 0.57x the pixels of the square)."""
    conf: float = 0.25
    iou: float = 0.7
    max_det: int = 300
    """Detections kept per frame."""
    fp16: bool = True
    """FP16 on GPU."""
    batch_size: int = 16
    """Frames per YOLO call, across items."""
    max_wait_ms: float = 10.0
    """How long a batch waits for frames of other items before it runs partly full."""
    min_persistence: float = 0.2
    """A region must appear in at least this fraction of the sampled frames."""
    use_black_borders: bool = True
    """Keep the crop inside the content box: off black bars, text on them, and a blurred copy of the picture
    filling them (``frames_content_box`` with ``blur_fill``)."""
    aspect_min: float = 0.0
    """Allowed crop aspect ratio (width / height) of the picture as shown (anamorphic pixels counted at their
    sample aspect ratio; the box itself is in stored pixels) ..."""
    aspect_max: float = 100.0
    """... range."""
    crop_output: str | None = None
    """Write the cropped clip under this prefix (any fsspec URL) and record its URI; later filters then see the
    cropped frames."""
    crop_storage_options: dict = field(default_factory=dict)
    backend: Literal["auto", "ultralytics", "onnx"] = "auto"
    """``onnx``: run an exported ``.onnx`` through mediasieve's ONNX Runtime session factory (provider chain,
    strict GPU mode, TensorRT profiles from ``batch_buckets``, IOBinding, the CUDA circuit breaker); frames are
    letterboxed on the device to the fixed ``imgsz`` shape. ``ultralytics``: ultralytics' own backend for any weights
    (``.pt``, ``.onnx``, ``.engine``). ``auto``: ``onnx`` for an ``.onnx`` model, else ``ultralytics``."""
    provider: Literal["tensorrt", "cuda", "cpu"] = "cuda"
    """ONNX Runtime provider on a GPU rank (CPU ranks use ``cpu``); falls back TensorRT -> CUDA -> CPU."""
    io_binding: bool = True
    """Bind torch buffers to the ONNX session (no copy through host memory on GPU)."""
    strict_gpu: bool = False
    """Any fallback from the requested provider is fatal."""
    batch_buckets: tuple[int, ...] = (1, 4, 8, 16)
    """Batch sizes the ONNX model is warmed up on; batches are padded to the next bucket."""
    ort: OrtParams = field(default_factory=OrtParams)
    """ONNX Runtime settings: graph optimisation, cuDNN search, TensorRT FP16, engine cache, workspace."""


class YoloRegionsFilter(VideoFilter):
    params_type = YoloRegionsParams
    output_type = pa.struct([("regions", pa.list_(REGION)), ("crop", BOX), ("crop_area_ratio", pa.float32()),
                             ("frames", pa.int32()), ("crop_uri", pa.string()), ("runtime", RUNTIME)])

    def __init__(self, name, params):
        super().__init__(name, params)
        self._batcher: DynamicBatcher | None = None
        if not params.model_uri:
            raise ConfigError(f"filters.{name}.model_uri is required")
        if params.step < 1 or params.batch_size < 1 or params.max_det < 1:
            raise ConfigError(f"filters.{name}: step, batch_size and max_det must be >= 1")
        if not isinstance(params.imgsz, int) and len(params.imgsz) != 2:
            raise ConfigError(f"filters.{name}.imgsz: an integer or [height, width], got {list(params.imgsz)}")
        self.onnx = params.backend == "onnx" or (params.backend == "auto"
                                                  and params.model_uri.lower().endswith(".onnx"))
        if self.onnx and params.batch_size > max(params.batch_buckets, default=0):
            raise ConfigError(f"filters.{name}: batch_size {params.batch_size} exceeds the largest batch bucket")
        self.names: dict[int, str] = {}
        self.class_ids: list[int] | None = None

    @property
    def _pool_key(self) -> str:
        return f"yolo:{self.params.model_uri}"

    def model_sources(self) -> dict[str, ModelSource]:
        return {"model_uri": ModelSource(self.params.model_uri, self.params.storage_options)}

    def setup(self, ctx: SetupContext) -> None:
        import numpy as np

        from models.onnx_session import ProviderError
        from models.yolo import OnnxYoloDetector, YoloDetector, check_engine

        p = self.params
        if not self.onnx and p.model_uri.lower().endswith(".engine"):
            try:
                check_engine(ctx.device)
            except ValueError as e:
                raise ConfigError(f"filters.{self.name}: {e}") from e
        local = ctx.localize(self.params.model_uri, self.params.storage_options)
        # the crop encodes into the node cache's scratch, where a killed process's partial file is swept; never
        # next to the media, which without the cache is the source corpus itself (shared, perhaps read-only)
        self._scratch = ctx.scratch_dir()
        strict = p.strict_gpu or ctx.strict_gpu
        provider = p.provider if ctx.device.startswith("cuda") else "cpu"
        trt_cache = ctx.engine_cache() if self.onnx else None

        def build(device):
            if not self.onnx:
                return YoloDetector(local, device, p.imgsz, p.conf, p.iou, p.fp16, p.max_det)
            try:
                return OnnxYoloDetector(local, device, p.imgsz, p.conf, p.iou, provider, p.batch_buckets,
                                        p.io_binding, strict, p.ort, trt_cache, p.max_det)
            except ProviderError as e:
                raise ConfigError(f"filters.{self.name}: strict_gpu: {e}") from e
            except ValueError as e:  # the model does not fit the configuration (input size, batch, metadata)
                raise ConfigError(f"filters.{self.name}: {e}") from e

        with loading_model(self.name, p.model_uri):
            ctx.pool.add(self._pool_key, build, lambda d: d.detect(np.zeros((1, 64, 64, 3), np.uint8)))
        self._pool = ctx.pool
        key, pool = self._pool_key, ctx.pool

        def run_batch(frames: list) -> list:
            with pool.acquire(key) as det:
                return det.detect(frames, self.class_ids)

        # Frames of several queued items share one YOLO call. Through ultralytics only when they have the same size
        # (it letterboxes a batch of one size to the smallest stride multiple, so mixing sizes would change the
        # detections against a lone run); the ONNX path letterboxes every frame to the same square.
        self._batcher = DynamicBatcher(run_batch, p.batch_size, p.max_wait_ms / 1000.0, runners=pool.instances,
                                       group_key=None if self.onnx else (lambda frames: frames[0].shape))
        with ctx.pool.acquire(self._pool_key) as det:
            self.names = det.names
            self.runtime = det.runtime()
        if p.classes:
            unknown = [c for c in p.classes if c not in self.names.values()]
            if unknown:
                raise ConfigError(f"filters.{self.name}.classes {unknown} are not classes of the model "
                                  f"({sorted(self.names.values())})")
            self.class_ids = [i for i, n in self.names.items() if n in p.classes]

    def _request(self) -> EveryK:
        return EveryK(self.params.step, self.params.max_frames)

    def frame_requests(self) -> list:
        return [self._request()]

    def apply_video(self, video, media: MediaItem, ctx: FilterContext) -> dict:
        p = self.params
        frames = video.view(self._request())
        host = frames if self.onnx else frames.cpu().numpy()  # the ONNX path letterboxes on the rank's device
        per_frame = []
        for start in range(0, len(host), p.batch_size):
            try:
                dets = self._batcher(list(host[start:start + p.batch_size]))
            except CudaCircuitOpen as e:
                raise GpuFailure(str(e)) from e  # a system failure: the rank stops, the item is redone on a rerun
            for d in dets:
                per_frame.append([(self.names[int(c)], float(s), tuple(float(v) for v in box))
                                  for box, c, s in zip(d.xyxy, d.cls, d.conf, strict=True)])
        # detections are in decoded pixels (plus any earlier crop); map them to source pixels
        sx, sy = video.scale
        ox, oy = (video.crop[0], video.crop[1]) if video.crop else (0, 0)
        per_frame = [[(lab, conf, ((b[0] + ox) * sx, (b[1] + oy) * sy, (b[2] + ox) * sx, (b[3] + oy) * sy))
                      for lab, conf, b in f] for f in per_frame]
        regions = aggregate_regions(per_frame, p.min_persistence)
        W, H = video.meta.width, video.meta.height
        content = None
        if p.use_black_borders:
            x, y, w, h = frames_content_box(frames, ctx.device, BlackBorderParams.threshold,
                                            BlackBorderParams.min_fraction, blur_fill=True).box
            content = ((x + ox) * sx, (y + oy) * sy, (x + ox + w) * sx, (y + oy + h) * sy)
        sar = media.info.video.sample_aspect_ratio or 1.0  # the allowed aspect is the picture's, as shown
        crop = safe_crop(W, H, [r.box for r in regions], content, p.aspect_min / sar, p.aspect_max / sar)
        uri = None
        if p.crop_output and crop[2] > crop[0] and crop[3] > crop[1]:
            uri = self._write_crop(media, crop)
            video.set_crop_source(crop)
        return {
            "regions": [{"label": r.label, "x": round(r.box[0]), "y": round(r.box[1]), "w": round(r.box[2] - r.box[0]),
                         "h": round(r.box[3] - r.box[1]), "persistence": r.persistence, "mean_conf": r.mean_conf}
                        for r in regions],
            "crop": {"x": crop[0], "y": crop[1], "w": crop[2] - crop[0], "h": crop[3] - crop[1]},
            "crop_area_ratio": (crop[2] - crop[0]) * (crop[3] - crop[1]) / float(W * H),
            "frames": len(per_frame),
            "crop_uri": uri,
            "runtime": self.runtime_now(),
        }

    def batchers(self) -> dict:
        return {self.name: self._batcher} if self._batcher is not None else {}

    def runtime_now(self) -> dict | None:
        return runtime_after_trip(self.runtime)

    def _write_crop(self, media: MediaItem, crop: tuple[int, int, int, int]) -> str:
        """Encode the cropped clip (audio copied) locally, then move or upload it whole under ``crop_output``.
        Interlaced video is deinterlaced first (FFmpeg's bwdif, a frame per frame), as the filters saw it
        (``video.deinterlace``): a crop of the woven frames coded as progressive H.264 would carry the combing
        unmarked, and a crop at an odd line would swap the fields."""
        name = hashlib.sha256(media.item_id.encode("utf-8", "surrogatepass")).hexdigest()[:32] + ".mp4"
        os.makedirs(self._scratch, exist_ok=True)
        tmp = os.path.join(self._scratch, f"crop-{uuid.uuid4().hex[:8]}.mp4.part")
        x1, y1, x2, y2 = crop
        vf = f"crop={x2 - x1}:{y2 - y1}:{x1}:{y1}"
        if is_interlaced(media.info.video) and (media.video_config is None or media.video_config.deinterlace):
            vf = f"bwdif=mode=send_frame:parity=auto:deint=interlaced,{vf}"
        cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-i", media.local_path,
               "-vf", vf, "-map", f"0:{media.info.video.index}", "-map", "0:a?",
               "-c:v", "libx264", "-preset", "veryfast", "-crf", "18", *_audio_codecs(media.local_path), "-f", "mp4", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
            if proc.returncode != 0:
                raise FilterError(f"{self.name}: crop encode failed: {proc.stderr[-500:]}")
            fs, root = fsspec.core.url_to_fs(self.params.crop_output, **self.params.crop_storage_options)
            final = f"{root.rstrip('/')}/{name[:2]}/{name}"
            fs.makedirs(os.path.dirname(final), exist_ok=True)
            if is_local_fs(fs):
                part = final + f".{uuid.uuid4().hex[:8]}.part"
                fs.put_file(tmp, part)
                fs.mv(part, final)
            else:
                fs.put_file(tmp, final)  # an object appears only when its upload completes
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        proto = self.params.crop_output.split("://", 1)[0] + "://" if "://" in self.params.crop_output else ""
        return proto + final
