"""``ChunkClock``: an AVI's packets timed by the file's index (the real files are in tests/video/test_decoders.py
and tests/audio/test_audio_pipeline.py); here the cases a real file rarely shows."""

from dataclasses import dataclass

import numpy as np

from pipeline.media.chunks import CHUNK_HEADER, ChunkClock


@dataclass
class Packet:
    pos: int
    dts: int | None
    pts: int | None = None


def clock(ts, sizes=None, scale=None, pos=None):
    """An index of chunks 100 bytes apart (their headers at ``pos``), at times ``ts``."""
    n = len(ts)
    pos = np.arange(n, dtype=np.int64) * 100 + 1000 if pos is None else np.asarray(pos, np.int64)
    sizes = np.full(n, 92, np.int64) if sizes is None else np.asarray(sizes, np.int64)
    return ChunkClock(pos, np.asarray(ts, np.int64), sizes, scale=scale)


def at(k: int, dts: int, pts: int | None = None) -> Packet:
    """The packet of chunk ``k`` (its data past the header), counted by the demuxer at ``dts``."""
    return Packet(1000 + 100 * k + CHUNK_HEADER, dts, pts if pts is not None else dts)


def test_chunks_passed_over_move_the_packets_after_them_and_are_counted_in_runs():
    c = clock(range(10), sizes=[92, 92, 92, 0, 92, 92, 92, 92, 92, 92], scale=1)
    packets = [at(0, 0), at(1, 1), at(7, 2), at(8, 3), at(9, 4)]  # chunks 2 to 6 passed over (3 empty)
    assert [c.place(p) for p in packets] == [0, 0, 4, 0, 0]
    assert [p.dts for p in packets] == [0, 1, 7, 8, 9] and [p.pts for p in packets] == [0, 1, 7, 8, 9]
    assert c.lost == [(2, 3), (4, 7)] and not c.stopped  # the empty chunk (a frame dropped at capture) is not lost
    assert c.tick(2) == 2 and len(c) == 10 and c.with_data() == 9


def test_a_packet_the_index_does_not_hold_keeps_the_last_shift():
    c = clock(range(6), scale=1)
    c.place(at(0, 0))
    c.place(at(3, 1))
    stray = Packet(5555, 2, 2)  # between chunks, or the index is partial
    assert c.place(stray) == 0 and stray.dts == 4 and c.lost == [(1, 3)]


def test_audio_learns_the_index_units_from_the_first_packet_past_the_start():
    """PCM: the index counts bytes (4 a stereo 16-bit sample), the packets samples."""
    c = clock([0, 4096, 8192, 12288, 16384])
    packets = [at(0, 0), at(1, 1024), at(3, 2048)]
    assert [c.place(p) for p in packets] == [0, 0, 1] and packets[2].dts == 3072 and not c.stopped


def test_a_clock_that_cannot_tell_the_units_stops_and_leaves_the_demuxers_times():
    """A first packet whose count is not 0 where the index's is (audio: no ratio yet), a ratio that is not a whole
    number, an index time the ratio does not divide, or chunks lost before the ratio is known: the packets keep the
    demuxer's count, as without an index."""
    c = clock([0, 100, 200])
    p = at(0, 7)
    assert c.place(p) == 0 and c.stopped and p.dts == 7
    assert c.place(at(2, 8)) == 0  # stopped: nothing moves any more
    c = clock([0, 100, 250])
    c.place(at(0, 0))
    p = at(1, 30)
    assert c.place(p) == 0 and c.stopped and p.dts == 30  # 100 / 30
    c = clock([0, 100, 251])
    c.place(at(0, 0))
    c.place(at(1, 50))  # two index units a tick
    p = at(2, 60)
    assert c.place(p) == 0 and c.stopped and p.dts == 60  # 251 is not a whole number of ticks
    c = clock([0, 4096, 8192, 12288])
    c.place(at(0, 0))
    p = at(3, 1024)  # chunks lost before the ratio is known: 12288 / 1024 would be taken for it
    assert c.place(p) == 0 and c.stopped and p.dts == 1024


def test_a_fresh_clock_starts_over_on_the_same_index():
    c = clock(range(4), scale=1)
    c.place(at(0, 0))
    c.place(at(3, 1))
    again = c.fresh()
    assert again.lost == [] and c.lost == [(1, 3)]
    p = at(0, 0)
    assert again.place(p) == 0 and again.place(at(2, 1)) == 1 and again.lost == [(1, 2)]


def test_a_packet_without_a_decode_time_is_left_alone():
    c = clock(range(3), scale=1)
    p = Packet(1000 + CHUNK_HEADER, None, None)
    assert c.place(p) == 0 and p.dts is None and not c.stopped
