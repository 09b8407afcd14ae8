"""Damaged media decoded anyway: corrupt stretches decoded past, counted per process for the metrics log and
Prometheus (``corrupt_media``); and per item, with broken tails (a file cut short), for its row
(``result_info.video_frames_lost``, ``audio_packets_lost`` and ``corrupt_spans``).

A frame lost in a corrupt stretch of a video is the frame shown before it, and a lost audio packet is silence
(``PyAVBackend._decode_in_order``, ``decode_audio``); a file cut short is its decodable prefix (``decode_video``,
``decode_audio``). The item succeeds, a warning names the file where a stretch was passed over, its row says what
was lost and where, and the process's counts show an operator how much of a corpus was damaged.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterable

_LOCK = threading.Lock()
_COUNTS = {"video_frames_lost": 0, "audio_packets_lost": 0}


current_item: contextvars.ContextVar[str | None] = contextvars.ContextVar("current_item", default=None)
"""The manifest id of the item the thread works on (set by the rank's consumer; a decode thread runs in a copy of
its caller's context), so that a warning about a file names the item, not the node cache's name for it."""


class ItemDamage:
    """What one item's decodes found lost in corrupt stretches, for its row.

    Video frames are kept by their places in the clip (``[a, b)`` ranges), so a frame that two decodes of the item
    lose (the first pass and a second one at a reduced size, a scene cut placed at its frame) counts once; frames
    that are not places of the clip (an AVI's chunks the demuxer passed over, ``chunks.ChunkClock``) are kept by
    their own numbering (the index's entries), apart. Audio
    packets are the most that one decode of the item passed over (each decode of the same stream meets the same
    packets). A decode that does not reach a stretch (frames sampled either side of it) does not see it: the counts
    are what the item's decodes met, not a scan of the file.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._video: dict[str, list[tuple[int, int]]] = {}
        self._audio: int | None = None
        self._spans: dict[str, list[tuple[float, float]]] = {"video": [], "audio": []}

    def add_video(self, frames: Iterable[tuple[int, int]], spans: Iterable[tuple[float, float]] = (),
                  numbering: str = "places") -> None:
        """Video frames a decode of the item lost (``[a, b)`` ranges of their places: held in a corrupt stretch, or
        past a broken tail; or of another ``numbering``), and their spans in seconds on the file's timeline (a
        stretch's from its first frame held to the next keyframe, the frames between decoding from damaged
        references; a broken tail's to the end the container gives)."""
        with self._lock:
            self._video.setdefault(numbering, []).extend(frames)
            self._spans["video"] += spans

    def add_audio(self, packets: int, spans: Iterable[tuple[float, float]] = ()) -> None:
        """A finished audio decode of the item, the packets it passed over (0: none) and the spans of silence put
        in their place, in seconds on the file's timeline."""
        with self._lock:
            self._audio = max(self._audio or 0, packets)
            self._spans["audio"] += spans

    @property
    def spans(self) -> list[dict]:
        """Each stream's spans (``stream``, ``start_s``, ``end_s``), overlapping ones (two decodes of one stretch)
        merged, video first, each stream's in time order."""
        with self._lock:
            spans = {k: list(v) for k, v in self._spans.items()}
        return [{"stream": stream, "start_s": round(a, 6), "end_s": round(b, 6)}
                for stream, found in spans.items() for a, b in _merged(found)]

    @property
    def video_frames_lost(self) -> int:
        """Distinct video frames lost in the item's decodes."""
        with self._lock:
            return sum(b - a for found in self._video.values() for a, b in _merged(found))

    @property
    def audio_packets_lost(self) -> int | None:
        """Audio packets lost in the item's audio decode; None where no audio decode of it finished."""
        with self._lock:
            return self._audio


def _merged(ranges):
    """``ranges`` (``(start, end)`` pairs) sorted, those that overlap or touch joined."""
    out: list[list] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


current_damage: contextvars.ContextVar[ItemDamage | None] = contextvars.ContextVar("current_damage", default=None)
"""The tally of the item the thread works on (``MediaItem.damage``, set by the rank's consumer with
``current_item``), where the decoders add what they lose; None outside an item (a decode called on its own)."""


def where(path: str) -> str:
    """``path`` and, where known, the item it holds, for a warning."""
    item = current_item.get()
    return f"{path} (item {item})" if item is not None else path


def record(kind: str, n: int) -> None:
    """Count ``n`` more of ``kind`` (``video_frames_lost`` or ``audio_packets_lost``) for this process."""
    with _LOCK:
        _COUNTS[kind] += n


def video_lost(frames: list[tuple[int, int]], spans: list[tuple[float, float]] = (), held: bool = True,
               numbering: str = "places") -> None:
    """Frames (``[a, b)`` ranges of their places, or of another ``numbering``: ``ItemDamage``) that a video decode
    lost, and their spans (seconds on the file's timeline): kept in the item's tally where the thread works on an
    item, and, where they were ``held`` in a corrupt stretch decoded past (not cut off by a broken tail), counted
    for the process's ``corrupt_media``."""
    if held:
        record("video_frames_lost", sum(b - a for a, b in frames))
    tally = current_damage.get()
    if tally is not None:
        tally.add_video(frames, spans, numbering)


def audio_decoded(packets_lost: int, spans: list[tuple[float, float]] = ()) -> None:
    """An audio decode finished, having passed over ``packets_lost`` packets whose time is silence at ``spans``
    (seconds on the file's timeline): counted for the process and, where the thread works on an item, in the item's
    tally (0 too: its row then says the audio decoded whole)."""
    if packets_lost:
        record("audio_packets_lost", packets_lost)
    tally = current_damage.get()
    if tally is not None:
        tally.add_audio(packets_lost, spans)


def row_damaged(info: dict) -> bool:
    """Whether a row's ``result_info`` says its item's decodes met damage (frames or packets lost, or a span)."""
    return bool((info.get("video_frames_lost") or 0) > 0 or (info.get("audio_packets_lost") or 0) > 0
                or info.get("corrupt_spans"))


def counts() -> dict[str, int]:
    """The counts of this process so far."""
    with _LOCK:
        return dict(_COUNTS)
