"""Corrupt stretches decoded past, counted per process for the metrics log and Prometheus (``corrupt_media``).

A frame lost in a corrupt stretch of a video is the frame shown before it, and a lost audio packet is silence
(``PyAVBackend._decode_in_order``, ``decode_audio``): the item succeeds, a warning names the file, and these counts
show an operator how much of a corpus was damaged. The rows do not say it: a field in ``result_info`` would change
the schema that a rerun over an earlier version's output resumes in.
"""

from __future__ import annotations

import contextvars
import threading

_LOCK = threading.Lock()
_COUNTS = {"video_frames_lost": 0, "audio_packets_lost": 0}


current_item: contextvars.ContextVar[str | None] = contextvars.ContextVar("current_item", default=None)
"""The manifest id of the item the thread works on (set by the rank's consumer; a decode thread runs in a copy of
its caller's context), so that a warning about a file names the item, not the node cache's name for it."""


def where(path: str) -> str:
    """``path`` and, where known, the item it holds, for a warning."""
    item = current_item.get()
    return f"{path} (item {item})" if item is not None else path


def record(kind: str, n: int) -> None:
    """Count ``n`` more of ``kind`` (``video_frames_lost`` or ``audio_packets_lost``)."""
    with _LOCK:
        _COUNTS[kind] += n


def counts() -> dict[str, int]:
    """The counts of this process so far."""
    with _LOCK:
        return dict(_COUNTS)
