"""Decode the audio stream of an audio file or a video container to mono float32 at one rate (PyAV)."""

from __future__ import annotations

import numpy as np

from pipeline.errors import DecodeError


GAP_S = 0.05
"""A jump in the audio timestamps longer than this (after the first frame) is a gap to fill with silence;
shorter ones are rounding in the container's time base."""


def decode_audio(path: str, sample_rate: int = 16000, max_seconds: float | None = None,
                 channels: int = 1) -> np.ndarray:
    """The first audio stream of ``path`` as float32 in [-1, 1] at ``sample_rate``: ``[N]`` mono, or ``[2, N]``
    with ``channels=2`` (a mono source is duplicated).

    Sample 0 is the start of the file's timeline (the container's start, what ``ffmpeg -ss`` counts from), so
    speech times line up with the video: audio that starts after the video (a delayed track, common in MPEG-TS and
    edited MP4) is preceded by silence, and a gap in its timestamps (dropped packets) is filled with silence.

    Args:
        path: local file (any container PyAV opens: WAV, FLAC, MP3, MP4, MKV, ...), any rate and channel count.
        sample_rate: output rate (16000; 8000 where the VAD supports it).
        max_seconds: refuse longer audio (a cap a hostile file cannot exceed).

    Raises:
        DecodeError: no audio stream, undecodable, or over the cap.
    """
    import av

    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise DecodeError(f"cannot open media: {type(e).__name__}: {e}") from e
    with container:
        if not container.streams.audio:
            raise DecodeError("no audio stream")
        stream = container.streams.audio[0]
        layout = "mono" if channels == 1 else "stereo"
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=sample_rate)
        parts: list[np.ndarray] = []
        total = 0
        cap = None if max_seconds is None else int(max_seconds * sample_rate)
        expected = float(container.start_time) / av.time_base if container.start_time is not None else 0.0
        first = True
        try:
            for frame in container.decode(stream):
                t = frame.time  # seconds on the file's timeline; None where the stream has no timestamps
                if t is not None:
                    gap = t - expected
                    if gap * sample_rate >= 0.5 and (first or gap > GAP_S):
                        silence = int(round(gap * sample_rate))
                        if cap is not None and total + silence > cap:
                            raise DecodeError(f"audio starts or jumps {gap:.1f}s into the file, past the "
                                              f"{max_seconds:.0f}s cap")
                        parts.append(np.zeros((channels, silence), np.float32))
                        total += silence
                    expected = max(expected, t + frame.samples / float(frame.sample_rate or sample_rate))
                first = False
                for out in resampler.resample(frame):
                    arr = out.to_ndarray().reshape(channels, -1)
                    parts.append(arr)
                    total += arr.shape[1]
                if cap is not None and total > cap:
                    raise DecodeError(f"audio longer than the {max_seconds:.0f}s cap")
            for out in resampler.resample(None):
                parts.append(out.to_ndarray().reshape(channels, -1))
        except av.error.FFmpegError as e:
            if not parts:
                raise DecodeError(f"audio does not decode: {type(e).__name__}: {e}") from e
            # a broken tail: keep what decoded
    if not parts:
        raise DecodeError("audio stream holds no samples")
    audio = np.concatenate(parts, axis=1).astype(np.float32, copy=False)
    return audio[0] if channels == 1 else audio


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Mono float32 from one rate to another with FFmpeg's resampler (through PyAV)."""
    import av

    if from_rate == to_rate:
        return audio
    resampler = av.AudioResampler(format="fltp", layout="mono", rate=to_rate)
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio[None], dtype=np.float32), format="fltp",
                                       layout="mono")
    frame.sample_rate = from_rate
    out = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(out).astype(np.float32, copy=False)
