"""Silero VAD (the weights its pip package ships), many chunks batched step by step, and segment merging."""

from __future__ import annotations

import threading

import numpy as np
import torch

_IMPORT_LOCK = threading.Lock()


def frame_samples(sample_rate: int) -> int:
    """Samples per VAD frame: 512 at 16 kHz, 256 at 8 kHz."""
    if sample_rate not in (8000, 16000):
        raise ValueError("Silero VAD supports 8000 and 16000 Hz")
    return 512 if sample_rate == 16000 else 256


class SileroVAD:
    """One Silero VAD instance (TorchScript from the silero-vad package; no download).

    The model keeps a recurrent state per batch row, so a batch of chunks runs frame by frame with every row
    independent: row ``b`` gets exactly what a run of chunk ``b`` alone would get.

    Args:
        sample_rate: 16000 or 8000.
        device: ``cpu`` or ``cuda:N``.
    """

    def __init__(self, sample_rate: int = 16000, device: str = "cpu"):
        with _IMPORT_LOCK:
            threads = torch.get_num_threads()
            from silero_vad import load_silero_vad  # importing it sets torch.set_num_threads(1)

            self.model = load_silero_vad()
            torch.set_num_threads(threads)  # restore the configured count
        self.sample_rate = sample_rate
        self.frame = frame_samples(sample_rate)
        self.device = device
        if device != "cpu":
            self.model = self.model.to(device)

    @torch.inference_mode()
    def probs(self, chunks: torch.Tensor, to_cpu: bool = True) -> torch.Tensor:
        """Speech probability per frame for a batch of chunks ``[B, L]`` (L a multiple of the frame): ``[B, L/f]``
        (left on the model's device with ``to_cpu=False``, for callers that order streams themselves)."""
        b, length = chunks.shape
        if length % self.frame:
            raise ValueError(f"chunk length {length} is not a multiple of {self.frame}")
        x = chunks.to(self.device, non_blocking=True)
        self.model.reset_states()
        out = torch.empty(b, length // self.frame, device=x.device)
        for i in range(length // self.frame):
            out[:, i] = self.model(x[:, i * self.frame:(i + 1) * self.frame], self.sample_rate)[:, 0]
        return out.cpu() if to_cpu else out

    def __call__(self, chunks: torch.Tensor) -> torch.Tensor:
        return self.probs(chunks)


def shipped_onnx_path(name: str = "silero_vad.onnx") -> str:
    """An ONNX Silero VAD inside the silero-vad package (no download): the step model by default, or
    ``silero_vad_16k_sequence.onnx``."""
    import os

    import silero_vad

    return os.path.join(os.path.dirname(silero_vad.__file__), "data", name)


class OnnxSileroVAD:
    """The ONNX Silero VAD that the silero-vad package ships, opened through the session factory (provider chain,
    fallback reason, ``ort:`` settings), batched like ``SileroVAD``: the state ``[2, B, 128]`` is per batch row.

    The batch is padded to ``batch_buckets`` (zero chunks, dropped from the output; rows are independent), and every
    bucket runs once at start, so shape-specialised providers build each shape once.

    Args:
        sample_rate: 16000 or 8000.
        provider: ``cpu``, ``cuda`` or ``tensorrt`` (falls back along that chain unless ``strict``).
        device_id: GPU index.
        strict: a fallback from the requested provider is fatal.
        params: per-model ORT settings.
        batch_buckets: batch sizes the model is warmed up on.
        cache_dir: node-local TensorRT engine cache.
        path: an ONNX file with the same interface (default: the shipped one).
    """

    def __init__(self, sample_rate: int = 16000, provider: str = "cpu", device_id: int = 0, strict: bool = False,
                 params=None, batch_buckets: tuple[int, ...] = (4, 8, 16, 32, 64, 96, 128),
                 cache_dir: str | None = None,
                 path: str | None = None):
        from models.onnx_session import make_session, shape_profile

        self.sample_rate = sample_rate
        self.frame = frame_samples(sample_rate)
        self.context = 64 if sample_rate == 16000 else 32
        self.buckets = tuple(sorted(batch_buckets))
        path = path or shipped_onnx_path()
        shapes = [(b, self.context + self.frame) for b in self.buckets]
        profile = shape_profile({"input": shapes, "state": [(2, b, 128) for b in self.buckets]})
        self.ort = make_session(path, provider, device_id, strict=strict, params=params, profile=profile,
                                cache_dir=cache_dir)
        names = {i.name for i in self.ort.session.get_inputs()}
        if names != {"input", "state", "sr"}:
            raise ValueError(f"{path}: a Silero VAD takes inputs input, state, sr; the model has {sorted(names)}")
        self._sr = np.array(sample_rate, np.int64)
        for b in self.buckets:  # start-up self-check on every bucket shape
            self.probs(torch.zeros(b, self.frame))

    def probs(self, chunks: torch.Tensor, to_cpu: bool = True) -> torch.Tensor:
        """Speech probability per frame for a batch of chunks ``[B, L]``: ``[B, L/frame]`` (on the CPU)."""
        from models.masking import pad_to_bucket

        b, length = chunks.shape
        if length % self.frame:
            raise ValueError(f"chunk length {length} is not a multiple of {self.frame}")
        x = pad_to_bucket(chunks.detach().to("cpu", torch.float32), self.buckets, dim=0)[0].numpy()
        padded = x.shape[0]
        state = np.zeros((2, padded, 128), np.float32)
        context = np.zeros((padded, self.context), np.float32)
        out = np.empty((padded, length // self.frame), np.float32)
        run = self.ort.session.run
        for i in range(length // self.frame):
            step = np.concatenate([context, x[:, i * self.frame:(i + 1) * self.frame]], axis=1)
            prob, state = run(None, {"input": step, "state": state, "sr": self._sr})
            out[:, i] = prob[:, 0]
            context = step[:, -self.context:]
        return torch.from_numpy(out[:b])

    def __call__(self, chunks: torch.Tensor) -> torch.Tensor:
        """``probs``: the model as a tensor -> tensor call (what the circuit breaker's CPU subprocess serves)."""
        return self.probs(chunks)


class SequenceSileroVAD:
    """The sequence ONNX Silero VAD that the silero-vad package ships (16 kHz), through the session factory.

    It takes a block of frames, each prefixed with the last 64 samples of the frame before, and runs the recurrent
    state over them inside one ONNX call (its LSTM), where the step model needs one call per 32 ms frame. Its state
    is a single stream (``[1, 1, 128]``), so the chunks of a batch run one after another, each from a zero state as
    with the step models, in calls of at most ``max_frames`` frames with the state carried between them. The
    probabilities equal the TorchScript model's within 1e-4.

    Args:
        sample_rate: 16000 (the only rate the sequence model takes).
        provider, device_id, strict, params, cache_dir: as ``OnnxSileroVAD``.
        max_frames: frames per ONNX call (512: 16 s of audio).
        path: an ONNX file with the same interface (default: the shipped one).
    """

    CONTEXT = 64

    def __init__(self, sample_rate: int = 16000, provider: str = "cpu", device_id: int = 0, strict: bool = False,
                 params=None, max_frames: int = 512, cache_dir: str | None = None, path: str | None = None):
        from models.onnx_session import make_session, shape_profile

        if sample_rate != 16000:
            raise ValueError(f"the sequence Silero VAD takes 16000 Hz audio, not {sample_rate}")
        if max_frames < 1:
            raise ValueError("max_frames must be >= 1")
        self.sample_rate = sample_rate
        self.frame = frame_samples(sample_rate)
        self.max_frames = max_frames
        path = path or shipped_onnx_path("silero_vad_16k_sequence.onnx")
        width = self.CONTEXT + self.frame
        profile = shape_profile({"input": [(1, width), (max_frames, width)], "h": [(1, 1, 128)], "c": [(1, 1, 128)]})
        self.ort = make_session(path, provider, device_id, strict=strict, params=params, profile=profile,
                                cache_dir=cache_dir)
        names = {i.name for i in self.ort.session.get_inputs()}
        if names != {"input", "h", "c"}:
            raise ValueError(f"{path}: a sequence Silero VAD takes inputs input, h, c; the model has {sorted(names)}")
        self.probs(torch.zeros(1, self.frame * max_frames))  # start-up self-check at the largest block

    def probs(self, chunks: torch.Tensor, to_cpu: bool = True) -> torch.Tensor:
        """Speech probability per frame for a batch of chunks ``[B, L]``: ``[B, L/frame]`` (on the CPU)."""
        b, length = chunks.shape
        if length % self.frame:
            raise ValueError(f"chunk length {length} is not a multiple of {self.frame}")
        n = length // self.frame
        frames = chunks.detach().to("cpu", torch.float32).numpy().reshape(b, n, self.frame)
        blocks = np.empty((b, n, self.CONTEXT + self.frame), np.float32)
        blocks[:, :, self.CONTEXT:] = frames
        blocks[:, 0, :self.CONTEXT] = 0.0  # every chunk starts from silence, as after reset_states()
        blocks[:, 1:, :self.CONTEXT] = frames[:, :-1, -self.CONTEXT:]
        out = np.empty((b, n), np.float32)
        run = self.ort.session.run
        for row in range(b):
            h = np.zeros((1, 1, 128), np.float32)
            c = np.zeros((1, 1, 128), np.float32)
            for s in range(0, n, self.max_frames):
                out[row, s:s + self.max_frames], h, c = run(None, {"input": blocks[row, s:s + self.max_frames],
                                                                   "h": h, "c": c})
        return torch.from_numpy(out)

    def __call__(self, chunks: torch.Tensor) -> torch.Tensor:
        return self.probs(chunks)


def whole_file_probs(model: SileroVAD, audio: np.ndarray) -> np.ndarray:
    """Frame probabilities of one file in one pass (the reference the chunked run is compared with)."""
    f = model.frame
    n = int(np.ceil(len(audio) / f))
    padded = np.zeros(n * f, np.float32)
    padded[: len(audio)] = audio
    return model.probs(torch.from_numpy(padded)[None])[0].numpy()


def speech_segments(probs: np.ndarray, n_samples: int, sample_rate: int = 16000, threshold: float = 0.5,
                    min_speech_ms: int = 250, min_silence_ms: int = 100, speech_pad_ms: int = 30) -> list[tuple[float, float]]:
    """Speech segments in seconds from per-frame probabilities, with silero-vad's own state machine
    (``get_speech_timestamps_from_probs``), so whole-file probabilities give exactly ``get_speech_timestamps``."""
    from silero_vad import get_speech_timestamps_from_probs

    stamps = get_speech_timestamps_from_probs(
        [float(p) for p in probs], sampling_rate=sample_rate, threshold=threshold,
        min_speech_duration_ms=min_speech_ms, min_silence_duration_ms=min_silence_ms, speech_pad_ms=speech_pad_ms,
        audio_length_samples=n_samples)
    return [(s["start"] / sample_rate, s["end"] / sample_rate) for s in stamps]


def merge_segments(segments: list[tuple[float, float]], min_gap_s: float = 0.12) -> list[tuple[float, float]]:
    """Union overlapping segments and merge those separated by a gap shorter than ``min_gap_s``."""
    out: list[list[float]] = []
    for start, end in sorted(segments):
        if out and start - out[-1][1] < min_gap_s:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]
