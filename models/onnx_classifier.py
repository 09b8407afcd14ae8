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

from models.onnx_session import OrtParams, graph_input, make_session, shape_profile


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
        device_id = int(device.split(":")[1]) if device.startswith("cuda:") else 0
        input_name, _ = graph_input(path)
        profile = shape_profile(input_name, [(b, num_frames, 3, image_size, image_size) for b in buckets])
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

    def _bucket(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        return n  # bigger than every bucket: run as is (callers cap batches at the largest bucket)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        b = self._bucket(n)
        x = x.to(self.device, torch.float32)
        if b > n:
            x = torch.cat([x, x.new_zeros(b - n, *x.shape[1:])])
        x = x.contiguous()
        if not self.io_binding:
            return torch.from_numpy(self.ort.session.run([self.output_name], {self.input_name: x.cpu().numpy()})[0])[:n]
        out = torch.empty(b, self.num_labels or 1, device=self.device) if self.num_labels else None
        binding = self.ort.session.io_binding()
        kind, index = ("cuda", int(self.device.split(":")[1])) if self.on_gpu else ("cpu", 0)
        if self.on_gpu:
            torch.cuda.current_stream(self.device).synchronize()  # preprocessing kernels done before ORT reads
        binding.bind_input(self.input_name, kind, index, np.float32, list(x.shape), x.data_ptr())
        if out is not None:
            binding.bind_output(self.output_name, kind, index, np.float32, list(out.shape), out.data_ptr())
        else:
            binding.bind_output(self.output_name, kind, index)
        self.ort.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        if out is None:
            out = torch.from_numpy(binding.copy_outputs_to_cpu()[0])
        return out[:n]
