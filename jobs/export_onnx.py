#!/usr/bin/env python
"""Export the configured torch models to ONNX and check torch against ONNX Runtime on the same inputs.

Video classifiers (``clip_classifier`` filters) are written as ``model.onnx`` inside their model directory (with a
dynamic batch dimension); YOLO weights (``yolo_regions``) go through ultralytics' own exporter, as ``<name>.onnx``
beside the ``.pt``. A model at a remote URI (S3, any fsspec URL) gets its export uploaded next to it, where every
node of a job finds it (the report's ``uri``). Prints the largest differences.

Usage: python jobs/export_onnx.py --config configs/X.yaml [--filters vfx rov] [--opset 17]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def export_classifier(path: str, opset: int = 17, check_batch: int = 3) -> dict:
    """Write ``<path>/model.onnx`` and return torch-vs-ORT differences on random clips."""
    import torch

    from models.onnx_classifier import OnnxClassifier
    from models.video_classifier import VideoClassifier

    model = VideoClassifier.load(path, "cpu")
    t, s = model.cfg.num_frames, model.cfg.image_size
    out = os.path.join(path, "model.onnx")
    torch.onnx.export(model, (torch.randn(1, t, 3, s, s),), out, input_names=["clips"], output_names=["logits"],
                      dynamic_axes={"clips": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset, dynamo=False)
    x = torch.randn(check_batch, t, 3, s, s)
    with torch.inference_mode():
        ref = model(x)
    got = OnnxClassifier(out, t, s)(x)
    diff = (ref - got).abs()
    cos = torch.nn.functional.cosine_similarity(ref, got, dim=1).min()
    return {"model": out, "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "min_cosine": float(cos), "argmax_equal": bool((ref.argmax(1) == got.argmax(1)).all())}


def export_yolo(path: str, imgsz, dynamic: bool = True, nms: bool | None = None) -> dict:
    """Export YOLO weights with ultralytics' exporter (dynamic batch and size by default; ``nms``: ultralytics'
    option, None for raw predictions, False for the NMS-free head of end-to-end models such as YOLO26, True to embed
    NMS), then run the torch model and the ONNX file (through mediasieve's session factory, as ``yolo_regions`` runs
    it) on the same inputs and report the differences of the raw predictions (boxes in pixels, class scores); for
    an NMS-free or NMS-embedded export, only the file and its output layout."""
    import torch

    import models.yolo  # noqa: F401 - offline settings first
    from ultralytics import YOLO

    from models.yolo import OnnxYoloModel, input_hw

    h, w = input_hw(imgsz)
    out = str(YOLO(path).export(format="onnx", imgsz=[h, w], dynamic=dynamic, simplify=False, nms=nms))
    torch.manual_seed(0)
    x = torch.rand(2 if dynamic and not nms else 1, 3, h, w)  # an embedded NMS runs at its export batch, 1
    runner = OnnxYoloModel(out, (h, w), buckets=(x.shape[0],), io_binding=False)
    if runner.end2end:  # post-NMS detections: no torch output of the same layout to compare with
        return {"model": out, "end2end": True}
    model = YOLO(path).model.float().fuse().eval()  # fused as the exporter and the predictor fuse it
    with torch.inference_mode():
        ref = model(x)
    ref = ref[0] if isinstance(ref, (tuple, list)) else ref
    got = runner(x)
    diff = (ref - got).abs()
    return {"model": out, "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "max_rel_diff": float((diff / (ref.abs() + 1.0)).max())}


def publish(local_file: str, uri: str, storage_options: dict | None) -> str:
    """Put an exported file at ``uri`` (any fsspec URL) in one piece, so that every node of a job finds it where its
    config says; returns the URI."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    fs.put_file(local_file, path)  # one PUT on an object store: the object appears only when complete
    return uri


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import load_raw, build_config
    from pipeline.model_pool import localize_model

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--filters", nargs="*", help="filter names to export (default: all model filters)")
    parser.add_argument("--opset", type=int, default=17)
    args = parser.parse_args(argv)
    cfg = build_config(load_raw(args.config))
    cache = cfg.model_pool.model_cache_dir or os.path.join(cfg.storage.cache_dir, "models")
    report = {}
    for spec in cfg.filters:
        if args.filters and spec.name not in args.filters:
            continue
        if spec.type not in ("clip_classifier", "yolo_regions"):
            continue
        uri, options = spec.params["model_uri"], spec.params.get("storage_options")
        local = localize_model(uri, cache, 0, lambda: None, options)
        if spec.type == "clip_classifier":
            report[spec.name] = export_classifier(local, args.opset)
            target = uri.rstrip("/") + "/model.onnx"  # where `backend: onnx` looks for it
        else:
            imgsz = spec.params.get("imgsz", 960)
            report[spec.name] = export_yolo(local, imgsz if isinstance(imgsz, int) else tuple(imgsz))
            target = os.path.splitext(uri)[0] + ".onnx"  # set model_uri to it to run it in ONNX Runtime
        if "://" in uri and not uri.startswith("file://"):  # a remote model: the export goes next to it
            report[spec.name]["uri"] = publish(report[spec.name]["model"], target, options)
    print(json.dumps(report, indent=2))
    # classifier logits within 1e-3; YOLO boxes are in pixels (up to imgsz), so relative to the value
    bad = [k for k, v in report.items() if v.get("argmax_equal") is False
           or v.get("max_rel_diff", v.get("max_abs_diff", 0)) > 1e-3]
    return 1 if bad else 0


if __name__ == "__main__":
    from pipeline.proc import exit_now

    exit_now(main())  # without the 0.5-0.7 s teardown of torch's libraries
