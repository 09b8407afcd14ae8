"""Run an exported video classifier (``model.onnx`` in the classifier directory) through ONNX Runtime.

Inputs are padded to a few batch-size buckets, so that shape-specialised backends (TensorRT engines, cuDNN
algorithm choices) are built once and warmed up at start; padded rows are dropped from the output (rows of a
batch are independent, so padding never changes a result). With ``io_binding`` the input and output are bound to
torch buffers (CPU, or the rank's GPU), so nothing is copied through host memory between preprocessing and the
model.
"""

from __future__ import annotations

import numpy as np
import torch

from models.masking import bucket_for, pad_to_bucket
from models.onnx_session import OrtParams, device_index, graph_input, make_session, run_bound, shape_profile


class OnnxClassifier:
    """Logits of normalised clips ``[B, T, 3, S, S]`` from an ONNX classifier.

    Args:
        path: local ONNX file.
        num_frames: T expected by the model.
        image_size: S expected by the model.
        provider: ``cpu``, ``cuda`` or ``tensorrt`` (falls back along that chain unless ``strict``).
        device: the rank's device (``cuda:N`` binds GPU buffers).
        buckets: batch sizes the model is warmed up on; a batch is padded to the smallest bucket that holds it.
        io_binding: bind torch buffers instead of passing numpy arrays.
        strict: a fallback from the requested provider is fatal.
        params: per-model ORT settings (graph optimisation, cuDNN search, TensorRT FP16, engine cache, workspace).
        cache_dir: node-local default for the TensorRT engine cache.
    """

    def __init__(self, path: str, num_frames: int, image_size: int, provider: str = "cpu", device: str = "cpu",
                 buckets: tuple[int, ...] = (1, 2, 4, 8), io_binding: bool = True, strict: bool = False,
                 params: OrtParams | None = None, cache_dir: str | None = None):
        device_id = device_index(device)
        input_name, _ = graph_input(path)
        profile = shape_profile({input_name: [(b, num_frames, 3, image_size, image_size) for b in buckets]})
        self.ort = make_session(path, provider, device_id, strict=strict, params=params, profile=profile,
                                cache_dir=cache_dir)
        inputs, outputs = self.ort.session.get_inputs(), self.ort.session.get_outputs()
        if len(inputs) != 1:
            raise ValueError(f"{path}: expected one input, the model has {[i.name for i in inputs]}")
        shape = inputs[0].shape
        want = [None, num_frames, 3, image_size, image_size]
        if len(shape) != 5 or any(isinstance(s, int) and w is not None and s != w for s, w in zip(shape, want)):
            raise ValueError(f"{path}: input {inputs[0].name} has shape {shape}; preprocessing makes "
                             f"[B, {num_frames}, 3, {image_size}, {image_size}]")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        self.buckets = tuple(sorted(buckets))
        self.on_gpu = self.ort.execution_provider != "CPUExecutionProvider" and device.startswith("cuda")
        self.device = device if self.on_gpu else "cpu"
        self.io_binding = io_binding
        self.shape = (num_frames, 3, image_size, image_size)
        self.num_labels: int | None = None
        for b in self.buckets:  # start-up self-check: every bucket shape runs once before the first item
            out = self(torch.zeros(b, *self.shape))
            self.num_labels = out.shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        # zero rows up to the bucket (bigger than every bucket: as is; callers cap batches at the largest)
        x, _ = pad_to_bucket(x.to(self.device, torch.float32), self.buckets, dim=0)
        x = x.contiguous()
        b = x.shape[0]
        if not self.io_binding:
            return torch.from_numpy(self.ort.session.run([self.output_name], {self.input_name: x.cpu().numpy()})[0])[:n]
        out = torch.empty(b, self.num_labels, device=self.device) if self.num_labels else None
        return run_bound(self.ort.session, self.input_name, x, self.output_name, out)[:n]


def export_head(head: torch.nn.Module, dim: int, path: str, opset: int = 17) -> str:
    """Export a pooling head with dynamic batch and token axes; inputs ``tokens [B, N, D]`` and ``valid [B, N]``
    (bool), output ``logits [B, L]``."""
    tokens = torch.randn(2, 5, dim)
    valid = torch.ones(2, 5, dtype=torch.bool)
    torch.onnx.export(head.eval(), (tokens, valid), path, input_names=["tokens", "valid"], output_names=["logits"],
                      dynamic_axes={"tokens": {0: "batch", 1: "tokens"}, "valid": {0: "batch", 1: "tokens"},
                                    "logits": {0: "batch"}}, opset_version=opset, dynamo=False)
    return path


class OnnxHead:
    """A pooling head over variable-length token sequences in ONNX Runtime, padded to (batch, length) buckets.

    Every bucket pair is warmed up at start (and spans the TensorRT profile), so no shape is first seen while
    items are waiting; the ``valid`` mask keeps the padded tokens out of attention and pooling, so a padded run
    equals the native-length one.
    """

    def __init__(self, path: str, dim: int, batch_buckets: tuple[int, ...] = (1, 4, 8),
                 length_buckets: tuple[int, ...] = (64, 128, 256), provider: str = "cpu", device_id: int = 0,
                 strict: bool = False, params: OrtParams | None = None, cache_dir: str | None = None):
        self.batch_buckets, self.length_buckets = tuple(sorted(batch_buckets)), tuple(sorted(length_buckets))
        shapes = [(b, n, dim) for b in self.batch_buckets for n in self.length_buckets]
        profile = shape_profile({"tokens": shapes, "valid": [s[:2] for s in shapes]})
        self.ort = make_session(path, provider, device_id, strict=strict, params=params, profile=profile,
                                cache_dir=cache_dir)
        names = [i.name for i in self.ort.session.get_inputs()]
        if names != ["tokens", "valid"]:
            raise ValueError(f"{path}: a head takes inputs ['tokens', 'valid'], the model has {names}")
        self.dim = dim
        for b, n, _ in shapes:  # start-up self-check on every bucket shape
            self._run(np.zeros((b, n, dim), np.float32), np.ones((b, n), bool))

    def _run(self, tokens: np.ndarray, valid: np.ndarray) -> np.ndarray:
        return self.ort.session.run(["logits"], {"tokens": tokens, "valid": valid})[0]

    def __call__(self, sequences: list[torch.Tensor]) -> torch.Tensor:
        """Logits ``[len(sequences), L]`` of ``[N_i, D]`` token sequences of any lengths."""
        out = []
        for start in range(0, len(sequences), self.batch_buckets[-1]):
            part = sequences[start:start + self.batch_buckets[-1]]
            b = bucket_for(len(part), self.batch_buckets)
            n = bucket_for(max(len(s) for s in part), self.length_buckets)
            tokens = np.zeros((b, n, self.dim), np.float32)
            valid = np.zeros((b, n), bool)
            for i, s in enumerate(part):
                tokens[i, : len(s)] = s.detach().cpu().float().numpy()
                valid[i, : len(s)] = True
            valid[len(part):, 0] = True  # padded rows: one valid token, so no row is empty; they are dropped
            out.append(torch.from_numpy(self._run(tokens, valid)[: len(part)]))
        return torch.cat(out)
