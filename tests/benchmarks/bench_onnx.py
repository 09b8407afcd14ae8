#!/usr/bin/env python
"""Video classifier inference, side by side in one run: torch eager, ONNX Runtime on CPU with and without
IOBinding, and (with onnxruntime-gpu on a GPU) ORT CUDA with and without IOBinding and TensorRT FP16; latency per
batch and clips/s; and the first-call cost of an unseen batch shape with and without buckets.
The model has random weights (a ViT-S-like VideoMAE by default): for speed only, never for its outputs.

Then the YOLO detector of ``yolo_regions``: ultralytics on the .pt, ultralytics' own ONNX backend, and ours.

Usage: python tests/benchmarks/bench_onnx.py [--frames 8] [--size 112] [--hidden 384] [--layers 6] [--batch 4]
       [--yolo-size 640] [--yolo-batch 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--yolo-size", type=int, default=640, help="YOLO input size (0: skip the YOLO rows)")
    parser.add_argument("--yolo-batch", type=int, default=4)
    args = parser.parse_args()
    import onnxruntime as ort
    from transformers import VideoMAEConfig, VideoMAEModel


    import importlib.util

    from models.onnx_classifier import OnnxClassifier
    from models.video_classifier import ClassifierHead, HeadConfig, VideoClassifier, save_classifier

    spec = importlib.util.spec_from_file_location("export_onnx", os.path.join(ROOT, "jobs", "export_onnx.py"))
    export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export)
    path = os.path.join(tempfile.mkdtemp(), "cls")
    cfg = VideoMAEConfig(image_size=args.size, num_frames=args.frames, hidden_size=args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         intermediate_size=4 * args.hidden)
    hc = HeadConfig(labels=["a", "b", "c"], pooling="attentive", num_heads=args.hidden // 64, num_frames=args.frames,
                    image_size=args.size)
    save_classifier(path, VideoMAEModel(cfg), ClassifierHead(args.hidden, hc), hc)
    parity = export.export_classifier(path)
    onnx_path = os.path.join(path, "model.onnx")
    b, t, s = args.batch, args.frames, args.size
    x = torch.randn(b, t, 3, s, s)
    rows = []
    model = VideoClassifier.load(path, "cpu")
    with torch.inference_mode():
        rows.append(("torch eager, CPU", timed(lambda: model(x), args.repeats)))
    for binding in (False, True):
        runner = OnnxClassifier(onnx_path, t, s, "cpu", "cpu", (b,), io_binding=binding)
        rows.append((f"ORT CPU, IOBinding {'on' if binding else 'off'}", timed(lambda: runner(x), args.repeats)))
    gpu = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
    if gpu:
        xg = x.cuda()
        gmodel = VideoClassifier.load(path, "cuda:0", fp16=True)
        with torch.inference_mode():
            rows.append(("torch eager, CUDA FP16", timed(lambda: (gmodel(xg.half()), torch.cuda.synchronize()),
                                                         args.repeats)))
        for binding in (False, True):
            runner = OnnxClassifier(onnx_path, t, s, "cuda", "cuda:0", (b,), io_binding=binding)
            rows.append((f"ORT {runner.ort.execution_provider}, IOBinding {'on' if binding else 'off'}",
                         timed(lambda: runner(xg), args.repeats)))
    # first call of an unseen batch shape: without buckets (a fresh shape) and with (padded to a warmed bucket)
    plain = OnnxClassifier(onnx_path, t, s, "cpu", "cpu", (b,), io_binding=True)
    t0 = time.perf_counter()
    plain(torch.randn(b - 1 if b > 1 else 2, t, 3, s, s))
    unseen = time.perf_counter() - t0
    bucketed = OnnxClassifier(onnx_path, t, s, "cpu", "cpu", tuple(range(1, b + 1)), io_binding=True)
    t0 = time.perf_counter()
    bucketed(torch.randn(b - 1 if b > 1 else 1, t, 3, s, s))
    warmed = time.perf_counter() - t0

    print(f"\nONNX benchmark: VideoMAE hidden {args.hidden} x {args.layers} layers, {t} frames at {s}px, batch {b}; "
          f"torch vs ORT max |diff| {parity['max_abs_diff']:.2e}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'runtime':<40}{'ms/batch':>10}{'clips/s':>10}")
    for label, sec in rows:
        print(f"{label:<40}{sec * 1000:>10.1f}{b / sec:>10.1f}")
    print(f"first call of an unseen batch shape: {unseen * 1000:.1f} ms without buckets, {warmed * 1000:.1f} ms when "
          "it falls in a warmed bucket (on CPU the gap is small; TensorRT builds an engine per unseen shape)")
    head_benchmark(args.hidden, args.repeats)
    if args.yolo_size:
        yolo_benchmark(args.yolo_size, args.yolo_batch, args.repeats)
    return 0


def yolo_benchmark(imgsz: int, batch: int, repeats: int) -> None:
    """YOLOv8n-shaped detector (random weights), frames to detections (letterbox, model, NMS): ultralytics on the
    .pt (torch eager), ultralytics' own ONNX backend, and the ``yolo_regions`` ONNX path through the session factory
    with and without IOBinding; on a GPU with onnxruntime-gpu also CUDA and TensorRT FP16."""
    import numpy as np
    import onnxruntime as ort

    from models.yolo import OnnxYoloDetector, YoloDetector
    from tests.video.test_yolo_regions import export_yolo_onnx
    from tests.video.tiny_models import lively_yolo

    pt = lively_yolo(os.path.join(tempfile.mkdtemp(), "yolov8n-random.pt"))
    onnx_path = export_yolo_onnx(pt, imgsz)
    frames = list(np.random.default_rng(0).integers(0, 256, (batch, 720, 1280, 3), dtype=np.uint8))
    gpu = torch.cuda.is_available()
    device = "cuda:0" if gpu else "cpu"
    runners = [("ultralytics .pt, torch eager" + (" FP16" if gpu else ""), YoloDetector(pt, device, imgsz, fp16=gpu)),
               ("ultralytics' ONNX backend", YoloDetector(onnx_path, device, imgsz))]
    rect = (imgsz * 9 // 16 + 31) // 32 * 32, imgsz  # the fixed 16:9 shape, [384, 640] for 640
    for shape in (imgsz, rect):
        for binding in (False, True):
            name = f"{shape}x{shape}" if shape == imgsz else f"{shape[0]}x{shape[1]}"
            runners.append((f"ours {name}, ORT CPU, IOBinding {'on' if binding else 'off'}",
                            OnnxYoloDetector(onnx_path, "cpu", shape, buckets=(batch,), io_binding=binding)))
    if gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        for provider, binding in (("cuda", False), ("cuda", True), ("tensorrt", True)):
            det = OnnxYoloDetector(onnx_path, device, rect, provider=provider, buckets=(batch,), io_binding=binding)
            runners.append((f"ours {rect[0]}x{rect[1]}, ORT {det.ort.execution_provider}, IOBinding "
                            f"{'on' if binding else 'off'}", det))
    rows = [(label, timed(lambda d=det: d.detect(frames), repeats)) for label, det in runners]
    print(f"\nYOLO (yolov8n shape, random weights) on {batch} frames of 1280x720 at imgsz {imgsz}, frames -> detections "
          f"(ultralytics letterboxes a batch of one size to the smallest stride multiple, {rect[0]}x{rect[1]} here; ours "
          "to one fixed shape)")
    print(f"{'runtime':<48}{'ms/batch':>10}{'frames/s':>10}")
    for label, sec in rows:
        print(f"{label:<48}{sec * 1000:>10.1f}{batch / sec:>10.1f}")


def head_benchmark(dim: int, repeats: int) -> None:
    """The attentive head over variable-length token sequences: native lengths one by one, padded to length
    buckets with a mask in torch, and the exported head in ORT with (batch, length) buckets."""
    import numpy as np
    import onnxruntime as ort

    from models.masking import valid_mask
    from models.onnx_classifier import OnnxHead, export_head
    from models.video_classifier import ClassifierHead, HeadConfig

    torch.manual_seed(0)
    head = ClassifierHead(dim, HeadConfig(labels=["a", "b", "c"], pooling="attentive", depth=2,
                                          num_heads=dim // 64)).eval()
    lengths = [int(n) for n in np.random.default_rng(0).integers(20, 250, 32)]
    seqs = [torch.randn(n, dim) for n in lengths]
    buckets = (64, 128, 256)
    path = export_head(head, dim, os.path.join(tempfile.mkdtemp(), "head.onnx"))

    def torch_padded():
        out = []
        for i in range(0, len(seqs), 8):
            part = seqs[i:i + 8]
            n = min(b for b in buckets if b >= max(len(q) for q in part))
            x = torch.zeros(len(part), n, dim)
            for j, q in enumerate(part):
                x[j, : len(q)] = q
            out.append(head(x, valid_mask(x, torch.tensor([len(q) for q in part]))))
        return torch.cat(out)

    with torch.inference_mode():
        native = torch.cat([head(q[None]) for q in seqs])
        diff = (torch_padded() - native).abs().max().item()
        rows = [("torch, one sequence at a time", timed(lambda: [head(q[None]) for q in seqs], repeats)),
                ("torch, length buckets + mask, batch 8", timed(torch_padded, repeats))]
    runner = OnnxHead(path, dim, (1, 8), buckets)
    ort_diff = (runner(seqs) - native).abs().max().item()
    rows.append(("ORT CPU, (batch, length) buckets", timed(lambda: runner(seqs), repeats)))
    plain = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = np.random.randn(8, 77, dim).astype(np.float32)
    t0 = time.perf_counter()
    plain.run(None, {"tokens": x, "valid": np.ones((8, 77), bool)})
    unseen = time.perf_counter() - t0
    t0 = time.perf_counter()
    runner([torch.from_numpy(r) for r in x])
    warmed = time.perf_counter() - t0
    print(f"\nattentive head (dim {dim}, depth 2) over {len(seqs)} sequences of 20-250 tokens; padded vs native max "
          f"|diff| torch {diff:.1e}, ORT {ort_diff:.1e}")
    print(f"{'runtime':<40}{'ms/all':>10}{'seq/s':>10}")
    for label, sec in rows:
        print(f"{label:<40}{sec * 1000:>10.1f}{len(seqs) / sec:>10.1f}")
    print(f"first call of an unseen length (77 tokens): {unseen * 1000:.1f} ms on a fresh session, {warmed * 1000:.1f} ms "
          "padded into a warmed bucket")


if __name__ == "__main__":
    sys.exit(main())
