"""AVI packets timed by the file's index, so that a corrupt stretch in the middle of the file moves nothing after it.

FFmpeg's AVI demuxer times a packet by counting the chunks before it (frames for video, blocks or bytes for audio).
A stretch of the file that no longer holds chunks (a bad sector, a damaged download: zeroed bytes) is passed over
by resynchronising at the next chunk header, without an error, so every packet after it came early by the time
the lost chunks held: in a 60-s AVI with 2% of its bytes zeroed at the middle, the pictures after 29 s were
1.3 s early (the windows, cuts and speech times after the stretch with them), the audio too, the sound out of step
with the pictures by nothing (both early) but the file's last 1.3 s reported as a broken tail that was not there.

The file's index (``idx1``, or OpenDML's ``indx`` of files over 1 GB; FFmpeg reads it when the file is opened and
PyAV hands it out as ``stream.index_entries``) lists every chunk's place in the file and its time. ``ChunkClock``
looks each packet up there by its byte position and moves its timestamps to the index's, and counts the chunks
with data that the demuxer passed over, for the item's row (``result_info.video_frames_lost``,
``audio_packets_lost`` and ``corrupt_spans``). A file without an index (cut short before it, or written without
one) is timed by the demuxer's count as before: it is then the only clock there is.
"""

from __future__ import annotations

import numpy as np

CHUNK_HEADER = 8
"""Bytes of a RIFF chunk's header (its id and size): FFmpeg's index places a chunk at its header, a packet's
``pos`` is where its data starts."""


class ChunkClock:
    """One pass over a stream's packets, each moved onto the time the file's index gives its chunk.

    ``place`` is called with every packet the demuxer gives, in order. Index timestamps of audio with a sample size
    (PCM) count bytes where the packets' count samples: the ratio is learnt from the first packet past the start
    that the index places (until then the two must agree at 0; video's is 1); chunks lost before it, or a ratio
    that is not a whole number, stop the clock and leave the demuxer's times (``stopped``).
    """

    def __init__(self, pos: np.ndarray, ts: np.ndarray, size: np.ndarray, scale: int | None = None):
        order = np.argsort(pos, kind="stable")
        self._pos, self._ordinal = pos[order], order  # the entries by their place in the file
        self._ts, self._size = ts, size  # by ordinal: the index's order (its times ascending)
        self._at = pos.tolist()  # by ordinal, for the usual case: a packet is the chunk after the last one
        self._last = -1  # the ordinal of the last packet placed
        self._scale = self._known = scale  # index units per packet tick (video: 1; audio: learnt)
        self._shift = 0  # ticks added to the last packet placed (and to packets the index does not hold)
        self.stopped = False
        self.lost: list[tuple[int, int]] = []
        """``[a, b)`` ordinals of chunks with data that the demuxer passed over (runs of them; empty chunks, frames
        dropped at capture, are not lost)."""

    @classmethod
    def of(cls, container, stream) -> ChunkClock | None:
        """The clock of ``stream`` where ``container`` is an AVI with an index; None else."""
        if "avi" not in container.format.name.split(","):
            return None
        entries = [(e.pos, e.timestamp, e.size) for e in stream.index_entries]  # about 0.3 us an entry
        if not entries:
            return None
        a = np.asarray(entries, dtype=np.int64)
        return cls(a[:, 0], a[:, 1], a[:, 2], scale=1 if stream.type == "video" else None)

    def fresh(self) -> ChunkClock:
        """A clock for another pass over the same stream (the index is shared)."""
        clock = ChunkClock.__new__(ChunkClock)
        clock.__dict__.update(self.__dict__)
        clock._last, clock._scale, clock._shift, clock.stopped, clock.lost = -1, self._known, 0, False, []
        return clock

    def __len__(self) -> int:
        return len(self._ts)

    def with_data(self) -> int:
        """The chunks the index lists that hold data (empty ones are frames dropped at capture)."""
        return int((self._size > 0).sum())

    def _entry(self, pos: int | None) -> int | None:
        if pos is None or pos < 0:
            return None
        k = self._last + 1
        if k < len(self._at) and self._at[k] in (pos - CHUNK_HEADER, pos):
            return k
        for at in (pos - CHUNK_HEADER, pos):
            i = int(np.searchsorted(self._pos, at))
            if i < len(self._pos) and self._pos[i] == at:
                return int(self._ordinal[i])
        return None

    def place(self, packet) -> int:
        """Move ``packet``'s timestamps onto its chunk's time in the index; the chunks with data passed over since
        the packet placed before it (0: none)."""
        if self.stopped or packet.dts is None:
            return 0
        k = self._entry(packet.pos)
        if k is None or k <= self._last:  # a packet the index does not hold (or holds earlier): the last shift
            self._move(packet, self._shift)
            return 0
        ts = int(self._ts[k])
        if self._scale is None:
            if k != self._last + 1:  # chunks lost before the ratio is known: the count cannot give it
                self.stopped = True
                return 0
            if packet.dts > 0 and ts > 0:
                if ts % packet.dts:
                    self.stopped = True
                    return 0
                self._scale = ts // packet.dts
            elif packet.dts != ts:
                self.stopped = True
                return 0
        scale = self._scale or 1
        if ts % scale:
            self.stopped = True
            return 0
        passed = 0
        if k > self._last + 1:  # runs of the chunks with data between (after a seek: all before it, in one go)
            held = np.flatnonzero(self._size[self._last + 1:k] > 0) + self._last + 1
            breaks = np.flatnonzero(np.diff(held) != 1) + 1
            self.lost += [(int(run[0]), int(run[-1]) + 1) for run in np.split(held, breaks) if len(run)]
            passed = len(held)
        self._shift = ts // scale - packet.dts
        self._last = k
        self._move(packet, self._shift)
        return passed

    @staticmethod
    def _move(packet, shift: int) -> None:
        if shift:
            packet.dts += shift
            if packet.pts is not None:
                packet.pts += shift

    def tick(self, ordinal: int) -> int:
        """The time of the chunk at ``ordinal`` in packet ticks (the stream's time base)."""
        return int(self._ts[ordinal]) // (self._scale or 1)
