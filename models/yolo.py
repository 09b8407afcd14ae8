"""YOLO detection through ultralytics, from a local weights file (``.pt``, or an exported ``.onnx``/``.engine``).

ultralytics is imported only after ``YOLO_OFFLINE`` and ``YOLO_AUTOINSTALL`` are set: without them it may try to
reach a hub or pip-install missing packages while the job runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from models.masking import pad_to_bucket
from models.onnx_session import OrtParams, device_index, graph_input, make_session, run_bound, shape_profile
from pipeline.video.preprocess import per_group

os.environ.setdefault("YOLO_OFFLINE", "true")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("YOLO_VERBOSE", "false")


@dataclass
class Detections:
    """Boxes of one frame in the frame's pixels: ``xyxy [n, 4]``, ``cls [n]``, ``conf [n]``."""

    xyxy: np.ndarray
    cls: np.ndarray
    conf: np.ndarray


class YoloDetector:
    """One YOLO instance on one device.

    Args:
        path: local weights file.
        device: ``cpu`` or ``cuda:N``.
        imgsz: inference size (long side, letterboxed), or ``(h, w)``.
        conf: confidence threshold.
        iou: NMS IoU threshold.
        fp16: half precision (GPU only).
        max_det: detections kept per frame.
    """

    def __init__(self, path: str, device: str = "cpu", imgsz=960, conf: float = 0.25, iou: float = 0.7,
                 fp16: bool = False, max_det: int = 300):
        from ultralytics import YOLO

        self.model = YOLO(path, task="detect")
        self.device = device
        self.imgsz = imgsz if isinstance(imgsz, int) else list(imgsz)
        self.conf = conf
        self.iou = iou
        self.max_det = max_det
        self.half = fp16 and device.startswith("cuda")
        self.names: dict[int, str] = dict(self.model.names)
        from ultralytics.cfg import DEFAULT_CFG_DICT

        # newer ultralytics takes the precision as `quantize` and deprecates `half`
        self._precision = ({"quantize": 16 if self.half else None} if "quantize" in DEFAULT_CFG_DICT
                           else {"half": self.half})

    def runtime(self) -> dict:
        """Where the model runs: ``backend`` (``ultralytics-pt``, ``-onnx``, ``-engine``), the execution provider
        read from ultralytics' ONNX Runtime session when there is one (after the first ``detect``), else the
        device."""
        backend = "ultralytics-" + os.path.splitext(self.model.ckpt_path or self.model.model_name or "")[1].lstrip(".")
        provider = self.device
        predictor = getattr(self.model, "predictor", None)
        session = getattr(getattr(predictor, "model", None), "session", None)
        if session is not None and hasattr(session, "get_providers"):
            provider = session.get_providers()[0]
        return {"backend": backend, "execution_provider": provider, "io_binding": None, "fallback_reason": None}

    def detect(self, frames_rgb, classes: list[int] | None = None) -> list[Detections]:
        """Detect on a batch of RGB uint8 frames (``[B, H, W, 3]``, or a list of ``[H, W, 3]`` of any sizes),
        converted to the BGR ultralytics expects."""
        bgr = [np.ascontiguousarray(f[..., ::-1]) for f in frames_rgb]
        results = self.model.predict(bgr, imgsz=self.imgsz, conf=self.conf, iou=self.iou, device=self.device,
                                     classes=classes, verbose=False, batch=len(bgr), max_det=self.max_det,
                                     **self._precision)
        out = []
        for r in results:  # the predictor runs its own copy of the model, on `device` and in FP16 when asked
            b = r.boxes
            out.append(Detections(b.xyxy.cpu().numpy(), b.cls.cpu().numpy().astype(int), b.conf.cpu().numpy()))
        return out


def check_engine(device: str) -> None:
    """Refuse a TensorRT ``.engine`` where it cannot run, before ultralytics fails on it deep in a worker: an engine
    is built for one GPU model and TensorRT version and runs only on a CUDA device with the ``tensorrt`` package
    (which mediasieve does not install: its wheels are tied to the CUDA stack of the image)."""
    import importlib.util

    if not device.startswith("cuda"):
        raise ValueError(f"a TensorRT .engine runs only on a CUDA device, and this rank is {device}; give the "
                         f"exported .onnx (with provider: tensorrt on GPU ranks) to run on any rank")
    if importlib.util.find_spec("tensorrt") is None:
        raise ValueError("a TensorRT .engine needs the tensorrt Python package, which is not installed; install the "
                         "wheel that matches the image's CUDA and the TensorRT the engine was built with, or give "
                         "the exported .onnx with provider: tensorrt")


def input_hw(imgsz) -> tuple[int, int]:
    """``imgsz`` as the model's input ``(height, width)``: an int is a square, ``[h, w]`` a fixed rectangle (e.g.
    ``[384, 640]`` for a corpus of 16:9 video, 0.6x the pixels of a 640 square)."""
    if isinstance(imgsz, int):
        return imgsz, imgsz
    h, w = imgsz
    return int(h), int(w)


def letterbox(frames, size, device: str = "cpu",
              resize: str | None = None) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """RGB uint8 frames (a list of ``[H, W, 3]`` numpy arrays or tensors, any sizes) -> the model input
    ``[B, 3, h, w]`` float32 in [0, 1] on ``device`` (``size``: an int for a square, or ``(h, w)``), and each
    frame's ``(H, W)``.

    The geometry is ultralytics' ``LetterBox`` with a fixed shape (scale to fit, centre, pad with 114), so boxes
    map back with its ``scale_boxes``. On CPU the resize is cv2's INTER_LINEAR, as in ultralytics (the same pixels,
    and 50x faster than torch's float resize); on a GPU it is bilinear in torch on the device, frames of one size
    in one call (at most one level from cv2's fixed-point arithmetic). ``resize``: ``cv2`` or ``torch`` instead of
    that choice.
    """
    th, tw = input_hw(size)
    on_gpu = (resize or ("torch" if torch.device(device).type == "cuda" else "cv2")) == "torch"
    canvas = torch.full((len(frames), 3, th, tw), 114, dtype=torch.uint8, device=device)
    shapes = [(int(f.shape[0]), int(f.shape[1])) for f in frames]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(shapes):
        groups.setdefault(s, []).append(i)
    for (h, w), idx in groups.items():
        r = min(th / h, tw / w)
        nw, nh = max(round(w * r), 1), max(round(h * r), 1)
        top, left = round((th - nh) / 2 - 0.1), round((tw - nw) / 2 - 0.1)
        if on_gpu:
            group = per_group(h * w * 3 * 4)  # bounds the float copy of source-size frames
            for g in range(0, len(idx), group):
                part = idx[g:g + group]
                x = torch.stack([torch.as_tensor(frames[i]) for i in part]).to(device, non_blocking=True)
                x = x.permute(0, 3, 1, 2)
                if (nw, nh) != (w, h):
                    x = torch.nn.functional.interpolate(x.float(), size=(nh, nw), mode="bilinear",
                                                        align_corners=False)
                    x = x.round_().clamp_(0, 255).to(torch.uint8)
                canvas[part, :, top:top + nh, left:left + nw] = x
            continue
        import cv2

        for i in idx:
            f = frames[i].cpu().numpy() if torch.is_tensor(frames[i]) else np.asarray(frames[i])
            if (nw, nh) != (w, h):
                f = cv2.resize(f, (nw, nh), interpolation=cv2.INTER_LINEAR)
            canvas[i, :, top:top + nh, left:left + nw] = torch.from_numpy(f).permute(2, 0, 1)
    return canvas.float().div_(255.0), shapes


class OnnxYoloModel:
    """The raw forward of an exported YOLO (``.onnx``) through the session factory: ``[B, 3, h, w]`` -> the
    model's predictions (``[B, 4 + classes, anchors]``, or ``[B, max_det, 6]`` for an end-to-end export).

    Batches are padded to ``buckets`` (rows are independent), every bucket runs once at start, and with
    ``io_binding`` the input and a per-bucket output buffer (reused; read it before the next call) are bound by
    pointer. Picklable arguments only, so the circuit breaker can rebuild it on CPU in a subprocess.

    Args:
        path: local ONNX file exported by ultralytics (its metadata holds the class names).
        imgsz: input size: an int (a square) or ``(h, w)``.
        provider: ``cpu``, ``cuda`` or ``tensorrt`` (falls back along that chain unless ``strict``).
        device: the rank's device (``cuda:N`` binds GPU buffers).
        buckets: batch sizes.
        io_binding: bind torch buffers instead of passing numpy arrays.
        strict: a fallback from the requested provider is fatal.
        params: per-model ORT settings.
        cache_dir: node-local default for the TensorRT engine cache.
    """

    def __init__(self, path: str, imgsz, provider: str = "cpu", device: str = "cpu",
                 buckets: tuple[int, ...] = (1, 4, 8, 16), io_binding: bool = True, strict: bool = False,
                 params: OrtParams | None = None, cache_dir: str | None = None):
        import ast

        input_name, shape = graph_input(path)
        h, w = input_hw(imgsz)
        if len(shape) != 4 or (shape[1] is not None and shape[1] != 3):
            raise ValueError(f"{path}: input {input_name} has shape {shape}; a YOLO detector takes [B, 3, H, W]")
        if any(isinstance(d, int) and d != want for d, want in zip(shape[2:], (h, w))):
            raise ValueError(f"{path}: exported for {shape[2]}x{shape[3]} (h x w) inputs, imgsz is {h}x{w} (export "
                             "with dynamic=True, or set imgsz to the exported size)")
        if isinstance(shape[0], int) and set(buckets) != {shape[0]}:
            raise ValueError(f"{path}: exported with a fixed batch of {shape[0]}; set batch_buckets to "
                             f"[{shape[0]}] or export with dynamic=True")
        self.buckets = tuple(sorted(buckets))
        profile = shape_profile({input_name: [(b, 3, h, w) for b in self.buckets]})
        self.ort = make_session(path, provider, device_index(device), strict=strict, params=params,
                                profile=profile, cache_dir=cache_dir)
        meta = self.ort.session.get_modelmeta().custom_metadata_map
        if "names" not in meta:
            raise ValueError(f"{path}: no class names in the ONNX metadata (export it with ultralytics: "
                             "python jobs/export_onnx.py)")
        self.names: dict[int, str] = {int(k): str(v) for k, v in ast.literal_eval(meta["names"]).items()}
        args = ast.literal_eval(meta.get("args", "{}"))
        # post-NMS output [B, max_det, 6]: an end-to-end (NMS-free) head, or NMS embedded at export (nms=True)
        self.end2end = str(meta.get("end2end", "False")) == "True" or args.get("nms") is True
        export_batch = int(meta.get("batch", 1))
        if args.get("nms") is True and set(self.buckets) != {export_batch}:
            # the embedded NMS graph is only right at its export batch (other rows come back empty)
            raise ValueError(f"{path}: exported with NMS embedded, which runs only at its export batch of "
                             f"{export_batch}; set batch_buckets to [{export_batch}] and batch_size to at most that, "
                             "or export without nms")
        stride = int(meta.get("stride", 32))
        if h % stride or w % stride:
            raise ValueError(f"{path}: imgsz {h}x{w} is not a multiple of the model's stride {stride}")
        self.input_name = self.ort.session.get_inputs()[0].name
        self.output_name = self.ort.session.get_outputs()[0].name
        self.hw = (h, w)
        self.on_gpu = self.ort.execution_provider != "CPUExecutionProvider" and device.startswith("cuda")
        self.device = device if self.on_gpu else "cpu"
        self.io_binding = io_binding
        self._out: dict[int, torch.Tensor] = {}
        for b in self.buckets:  # start-up self-check: every bucket shape runs once, and the output is what we parse
            y = self(torch.zeros(b, 3, h, w))
            want = 6 if self.end2end else 4 + len(self.names)
            if y.dim() != 3 or y.shape[2 if self.end2end else 1] != want:
                raise ValueError(f"{path}: output {self.output_name} has shape {list(y.shape)}; expected "
                                 + ("[B, max_det, 6]" if self.end2end else f"[B, {want}, anchors]"))
            if io_binding:
                self._out[b] = torch.empty(y.shape, device=self.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        top = self.buckets[-1]
        if x.shape[0] > top:  # more frames than the largest bucket: in bucket-sized parts (copied out of the buffer)
            return torch.cat([self._run(x[i:i + top]).clone() for i in range(0, x.shape[0], top)])
        return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x, _ = pad_to_bucket(x.to(self.device, torch.float32), self.buckets, dim=0)
        x = x.contiguous()
        if not self.io_binding:
            return torch.from_numpy(self.ort.session.run([self.output_name], {self.input_name: x.cpu().numpy()})[0])[:n]
        return run_bound(self.ort.session, self.input_name, x, self.output_name, self._out.get(x.shape[0]))[:n]


class OnnxYoloDetector:
    """``YoloDetector``'s interface (``names``, ``detect``, ``runtime``) for an exported ``.onnx``, run through the
    session factory instead of ultralytics' own backend: the provider chain, strict GPU mode, TensorRT profiles
    from the batch buckets, IOBinding and the CUDA circuit breaker apply, as for every other ONNX model.

    Frames are letterboxed to one fixed ``imgsz`` (a square, or ``(h, w)``), so frames of any size share a batch and
    one engine shape; detections come from ultralytics' own NMS and box scaling.

    Args:
        path, imgsz, provider, device, buckets, io_binding, strict, params, cache_dir: as ``OnnxYoloModel``.
        conf: confidence threshold.
        iou: NMS IoU threshold.
        max_det: detections kept per frame.
    """

    def __init__(self, path: str, device: str = "cpu", imgsz=960, conf: float = 0.25, iou: float = 0.7,
                 provider: str = "cpu", buckets: tuple[int, ...] = (1, 4, 8, 16), io_binding: bool = True,
                 strict: bool = False, params: OrtParams | None = None, cache_dir: str | None = None,
                 max_det: int = 300):
        import functools

        from models.circuit_breaker import CircuitBreaker

        self.model = OnnxYoloModel(path, imgsz, provider, device, buckets, io_binding, strict, params, cache_dir)
        cpu = functools.partial(OnnxYoloModel, path, imgsz, "cpu", "cpu", self.model.buckets, False, params=params)
        self.forward = CircuitBreaker(self.model, cpu, strict)
        self.ort = self.model.ort
        self.names = self.model.names
        self.conf, self.iou, self.max_det = conf, iou, max_det
        self.io_binding = io_binding

    def runtime(self) -> dict:
        return self.ort.runtime(self.io_binding)

    def detect(self, frames_rgb, classes: list[int] | None = None) -> list[Detections]:
        """Detect on RGB uint8 frames (``[B, H, W, 3]``, or a list of ``[H, W, 3]`` of any sizes; numpy or torch)."""
        from ultralytics.utils import nms, ops

        x, shapes = letterbox(list(frames_rgb), self.model.hw, self.model.device)
        preds = self.forward(x)
        kept = nms.non_max_suppression(preds, self.conf, self.iou, classes, max_det=self.max_det,
                                       end2end=self.model.end2end)
        out = []
        for k, shape in zip(kept, shapes, strict=True):
            boxes = ops.scale_boxes(self.model.hw, k[:, :4].clone(), shape)
            out.append(Detections(boxes.cpu().numpy(), k[:, 5].cpu().numpy().astype(int), k[:, 4].cpu().numpy()))
        return out
