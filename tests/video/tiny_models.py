"""Tiny randomly initialised models the tests build and save locally (never a hub download)."""

from __future__ import annotations

import os

import torch

from models.video_classifier import ClassifierHead, HeadConfig, save_classifier

LABELS = ["no", "yes", "maybe"]


def tiny_videomae(path: str, pooling: str = "attentive", depth: int = 2, seed: int = 0, num_frames: int = 4,
                  image_size: int = 32) -> str:
    from transformers import VideoMAEConfig, VideoMAEModel

    torch.manual_seed(seed)
    cfg = VideoMAEConfig(image_size=image_size, patch_size=16, num_frames=num_frames, tubelet_size=2, hidden_size=32,
                         num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    backbone = VideoMAEModel(cfg)
    head_cfg = HeadConfig(labels=LABELS, pooling=pooling, depth=depth, num_heads=2, num_frames=num_frames,
                          image_size=image_size)
    head = ClassifierHead(32, head_cfg)
    with torch.no_grad():  # a spread of logits, so that labels differ between inputs
        head.fc.weight.mul_(4)
    return save_classifier(path, backbone, head, head_cfg)


def tiny_vjepa2(path: str, seed: int = 0) -> str:
    from transformers import VJEPA2Config, VJEPA2Model

    torch.manual_seed(seed)
    cfg = VJEPA2Config(crop_size=32, frames_per_clip=4, patch_size=16, tubelet_size=2, hidden_size=32,
                       num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2.0, pred_hidden_size=16,
                       pred_num_hidden_layers=1, pred_num_attention_heads=2)
    backbone = VJEPA2Model(cfg)
    head_cfg = HeadConfig(labels=LABELS, pooling="linear", num_frames=4, image_size=32)
    return save_classifier(path, backbone, ClassifierHead(32, head_cfg), head_cfg)


def as_pt_head(path: str) -> str:
    """Replace head.safetensors with a torch checkpoint (the weights_only path)."""
    from safetensors.torch import load_file

    state = load_file(os.path.join(path, "head.safetensors"))
    torch.save(state, os.path.join(path, "head.pt"))
    os.remove(os.path.join(path, "head.safetensors"))
    return path


YOLO_NAMES = {0: "watermark", 1: "subtitle", 2: "logo"}


def tiny_yolo(path: str, seed: int = 0, arch: str = "v8/yolov8.yaml") -> str:
    """A yolov8n-shaped detector (or another ``cfg/models`` architecture of ultralytics, e.g. ``26/yolo26.yaml``)
    with three abnormal-region classes and random weights, saved as .pt."""
    import ultralytics
    import yaml

    import models.yolo  # noqa: F401 - sets YOLO_OFFLINE / YOLO_AUTOINSTALL before ultralytics loads
    from ultralytics import YOLO

    torch.manual_seed(seed)
    base = os.path.join(os.path.dirname(ultralytics.__file__), "cfg", "models", *arch.split("/"))
    spec = yaml.safe_load(open(base))
    spec["nc"] = len(YOLO_NAMES)
    spec["scale"] = "n"  # the smallest; ultralytics also reads the scale from the file name, so it says n too
    yaml_path = os.path.join(os.path.dirname(path), f"tiny-{os.path.splitext(os.path.basename(arch))[0]}n.yaml")
    with open(yaml_path, "w") as f:
        yaml.safe_dump(spec, f)
    model = YOLO(yaml_path, task="detect")
    model.model.names = dict(YOLO_NAMES)
    model.save(path)
    return path


def lively_yolo(path: str, seed: int = 0, arch: str = "v8/yolov8.yaml") -> str:
    """``tiny_yolo`` made to give input-dependent detections: a freshly initialised detector's activations vanish
    through its depth (every box is the whole frame, every score equal), so its batch-norm statistics are set from
    random images, and the head's biases spread the scores and favour small boxes. Still random weights: for
    parity tests, never for findings."""
    from ultralytics import YOLO

    tiny_yolo(path, seed, arch)
    model = YOLO(path, task="detect")
    net = model.model.float()
    torch.manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a cumulative average over the calibration batches
    net.train()
    with torch.no_grad():
        for _ in range(8):
            net(torch.rand(4, 3, 160, 160))
    net.eval()
    head = net.model[-1]
    if head.reg_max != 16:  # YOLO26: sides regressed directly; only its (one-to-one) class scores lifted
        with torch.no_grad():
            for branch in [*head.cv3, *(getattr(head, "one2one_cv3", None) or [])]:
                branch[-1].bias.fill_(-1.0)
    else:  # the YOLOv8 head
        with torch.no_grad():
            for branch in head.cv3:  # class scores
                branch[-1].bias.fill_(-2.0)
            for branch in head.cv2:  # box distances (16 bins per side): near bins more likely
                branch[-1].weight.mul_(0.3)
                branch[-1].bias.copy_((-0.6 * torch.arange(16.0)).repeat(4))
    model.save(path)
    return path
