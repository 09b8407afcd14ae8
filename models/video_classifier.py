"""A video clip classifier: a transformers video backbone (VideoMAE, V-JEPA 2, or any model with the same
interface) plus a pooling head, loaded from a local directory.

Directory layout (``save_classifier`` writes it)::

    backbone/           transformers ``save_pretrained`` output (config.json, model.safetensors)
    head.safetensors    head weights (``head.pt`` is read with ``torch.load(weights_only=True)`` instead)
    head.json           {"pooling": "linear"|"attentive", "depth": int, "num_heads": int, "labels": [...],
                         "num_frames": int, "image_size": int, "mean": [3 floats], "std": [3 floats]}
"""

from __future__ import annotations

import inspect
import json
import math
import os
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from models.masking import masked_mean, masked_softmax_scores


@dataclass
class HeadConfig:
    labels: list[str]
    pooling: str = "linear"
    depth: int = 1
    num_heads: int = 4
    num_frames: int = 16
    image_size: int = 224
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


class CrossAttentionBlock(nn.Module):
    """A learned query attends over the backbone tokens (pre-norm), then an MLP."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def _attend(self, q: torch.Tensor, kv: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """``nn.MultiheadAttention``'s computation with its own weights, written out so that the mask is a
        ``masked_fill`` before the softmax and every reshape takes its sizes from the input (exportable with
        dynamic batch and token axes)."""
        a = self.attn
        w_q, w_k, w_v = a.in_proj_weight.chunk(3)
        b_q, b_k, b_v = a.in_proj_bias.chunk(3)
        b, lq = q.shape[0], q.shape[1]
        heads, d, e = a.num_heads, a.head_dim, a.embed_dim  # constants of the layer, not of the input

        def split(t):
            return t.reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2)

        qh, kh, vh = split(F.linear(q, w_q, b_q)), split(F.linear(kv, w_k, b_k)), split(F.linear(kv, w_v, b_v))
        weights = masked_softmax_scores(qh @ kh.transpose(-1, -2) / math.sqrt(d), valid)
        out = (weights @ vh).transpose(1, 2).reshape(b, lq, e)
        return a.out_proj(out)

    def forward(self, q: torch.Tensor, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``valid``: ``[B, N]`` bool, True for real tokens (None: all are)."""
        kv = self.norm_kv(x)
        q = q + self._attend(self.norm_q(q), kv, valid)
        return q + self.mlp(self.norm_mlp(q))


class ClassifierHead(nn.Module):
    """Mean pooling + linear, or attentive pooling of ``depth`` cross-attention blocks + linear."""

    def __init__(self, dim: int, cfg: HeadConfig):
        super().__init__()
        self.pooling = cfg.pooling
        if cfg.pooling == "attentive":
            self.query = nn.Parameter(torch.zeros(1, 1, dim))
            nn.init.trunc_normal_(self.query, std=0.02)
            self.blocks = nn.ModuleList([CrossAttentionBlock(dim, cfg.num_heads) for _ in range(cfg.depth)])
        elif cfg.pooling != "linear":
            raise ValueError(f"unknown pooling {cfg.pooling!r}")
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, len(cfg.labels))

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``[B, N, D]`` tokens; ``valid`` (``[B, N]`` bool) marks real tokens when the token axis is
        padded to a bucket: attention and mean pooling then see the valid tokens only."""
        if self.pooling == "attentive":
            q = self.query.expand(tokens.shape[0], -1, -1)
            for block in self.blocks:
                q = block(q, tokens, valid)
            pooled = q[:, 0]
        else:
            pooled = tokens.mean(dim=1) if valid is None else masked_mean(tokens, valid)
        return self.fc(self.norm(pooled))


class VideoClassifier(nn.Module):
    """Backbone + head; ``forward`` takes normalised clips ``[B, T, 3, S, S]`` and returns logits ``[B, L]``."""

    def __init__(self, backbone: nn.Module, head: ClassifierHead, cfg: HeadConfig):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.cfg = cfg
        params = inspect.signature(backbone.forward).parameters
        self._input_name = "pixel_values_videos" if "pixel_values_videos" in params else "pixel_values"
        self._extra = {"skip_predictor": True} if "skip_predictor" in params else {}

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        out = self.backbone(**{self._input_name: clips}, **self._extra)
        return self.head(out.last_hidden_state)

    @classmethod
    def load(cls, path: str, device: str = "cpu", fp16: bool = False) -> VideoClassifier:
        """Load from a local directory (see the module docstring); FP16 on GPU when asked, FP32 on CPU."""
        from transformers import AutoModel

        with open(os.path.join(path, "head.json")) as f:
            cfg = HeadConfig(**json.load(f))
        backbone = AutoModel.from_pretrained(os.path.join(path, "backbone"), local_files_only=True)
        head = ClassifierHead(backbone.config.hidden_size, cfg)
        st_path, pt_path = os.path.join(path, "head.safetensors"), os.path.join(path, "head.pt")
        if os.path.exists(st_path):
            from safetensors.torch import load_file

            state = load_file(st_path)
        else:
            state = torch.load(pt_path, map_location="cpu", weights_only=True)
        head.load_state_dict(state)
        model = cls(backbone, head, cfg).eval().to(device)
        if fp16 and device.startswith("cuda"):
            model = model.half()
        return model


def save_classifier(path: str, backbone: nn.Module, head: ClassifierHead, cfg: HeadConfig) -> str:
    """Write a classifier directory that ``VideoClassifier.load`` reads."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    backbone.save_pretrained(os.path.join(path, "backbone"))
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, os.path.join(path, "head.safetensors"))
    with open(os.path.join(path, "head.json"), "w") as f:
        json.dump(asdict(cfg), f)
    return path
