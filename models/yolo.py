"""YOLO detection through ultralytics, from a local weights file (``.pt``, or an exported ``.onnx``/``.engine``).

ultralytics is imported only after ``YOLO_OFFLINE`` and ``YOLO_AUTOINSTALL`` are set: without them it may try to
reach a hub or pip-install missing packages while the job runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

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
        imgsz: inference size (long side, letterboxed).
        conf: confidence threshold.
        iou: NMS IoU threshold.
        fp16: half precision (GPU only).
    """

    def __init__(self, path: str, device: str = "cpu", imgsz: int = 960, conf: float = 0.25, iou: float = 0.7,
                 fp16: bool = False):
        from ultralytics import YOLO

        self.model = YOLO(path, task="detect")
        self.device = device
        self.imgsz = imgsz
        self.conf = conf
        self.iou = iou
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
                                     classes=classes, verbose=False, batch=len(bgr), **self._precision)
        out = []
        for r in results:  # the predictor runs its own copy of the model, on `device` and in FP16 when asked
            b = r.boxes
            out.append(Detections(b.xyxy.cpu().numpy(), b.cls.cpu().numpy().astype(int), b.conf.cpu().numpy()))
        return out
