"""Container and stream metadata through PyAV, with one decoded frame as proof that the media is readable."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import numpy as np

from pipeline.errors import DecodeError
from pipeline.media.packets import demux, open_container


@dataclass(frozen=True)
class VideoStreamInfo:
    """The main video stream (``main_stream``). ``width`` and ``height`` are after ``rotation`` (the display
    matrix's counter-clockwise degrees: 0, 90, 180 or 270, set by phone cameras): the size of the frames every
    filter sees and the pixels a crop box refers to. ``sample_aspect_ratio`` is the width of one of those pixels
    over its height (DVD and HDV video store 4:3 or 16:9 pictures in non-square pixels; 1.0 where the file does
    not say), and ``interlaced`` says that the first frame holds two fields (combing on motion); ``field_order``
    (ffprobe's ``tt``, ``bb``, ``tb``, ``bt``, ``progressive``; None: not stated) says which is shown first (not a
    column of the probe filter's row: the decoders use it, ``pipeline.video.deinterlace``).

    The colour description, as ffprobe names it (None where the file does not say): ``color_range`` (``tv``:
    limited, ``pc``: full), ``color_primaries``, ``color_transfer`` and ``color_space`` (the YUV matrix). ``hdr`` is
    a PQ (``smpte2084``) or HLG (``arib-std-b67``) transfer: its pictures are tone-mapped to SDR before the filters
    see them (``video.tone_map``, ``pipeline.video.tonemap``); as coded they look flat and grey."""

    codec: str
    width: int
    height: int
    fps: float | None
    frames: int | None
    pix_fmt: str | None
    rotation: int = 0
    index: int = 0
    sample_aspect_ratio: float = 1.0
    interlaced: bool = False
    color_range: str | None = None
    color_primaries: str | None = None
    color_transfer: str | None = None
    color_space: str | None = None
    hdr: bool = False
    field_order: str | None = None


# ITU-T H.273 code points, by the names FFmpeg gives them (libavutil's av_color_*_name, what ffprobe prints);
# 2 (and 0 for range, primaries and transfer) is "unspecified"
COLOR_RANGES = {1: "tv", 2: "pc"}
COLOR_PRIMARIES = {1: "bt709", 4: "bt470m", 5: "bt470bg", 6: "smpte170m", 7: "smpte240m", 8: "film", 9: "bt2020",
                   10: "smpte428", 11: "smpte431", 12: "smpte432", 22: "ebu3213"}
COLOR_TRANSFERS = {1: "bt709", 4: "bt470m", 5: "bt470bg", 6: "smpte170m", 7: "smpte240m", 8: "linear", 9: "log100",
                   10: "log316", 11: "iec61966-2-4", 12: "bt1361e", 13: "iec61966-2-1", 14: "bt2020-10",
                   15: "bt2020-12", 16: "smpte2084", 17: "smpte428", 18: "arib-std-b67"}
COLOR_SPACES = {0: "gbr", 1: "bt709", 4: "fcc", 5: "bt470bg", 6: "smpte170m", 7: "smpte240m", 8: "ycgco",
                9: "bt2020nc", 10: "bt2020c", 11: "smpte2085", 12: "chroma-derived-nc", 13: "chroma-derived-c",
                14: "ictcp"}
HDR_TRANSFERS = frozenset({"smpte2084", "arib-std-b67"})
FIELD_ORDERS = {1: "progressive", 2: "tt", 3: "bb", 4: "tb", 5: "bt"}  # AVFieldOrder, by ffprobe's names


def _field_order(ctx) -> str | None:
    """The codec context's field order by ffprobe's name (None: not stated, or a PyAV without the attribute)."""
    value = getattr(ctx, "field_order", None)
    if isinstance(value, str):  # not the int enum this PyAV gives: a name already
        return value if value in FIELD_ORDERS.values() else None
    try:
        return FIELD_ORDERS.get(int(value or 0))
    except (TypeError, ValueError):
        return None


def _color(names: dict[int, str], *sources) -> str | None:
    """The first stated value among ``sources`` (the codec context's, then the first frame's), by name."""
    for value in sources:
        name = names.get(int(value)) if value is not None else None
        if name is not None:
            return name
    return None


def color_description(ctx, frame) -> dict:
    """The colour fields of ``VideoStreamInfo`` from the codec context and, where it does not state one, the first
    decoded frame (None: not decoded). Values FFmpeg has no name for (reserved code points) are None."""
    def get(attr):
        return [getattr(o, attr, None) for o in (ctx, frame) if o is not None]

    transfer = _color(COLOR_TRANSFERS, *get("color_trc"))
    return {"color_range": _color(COLOR_RANGES, *get("color_range")),
            "color_primaries": _color(COLOR_PRIMARIES, *get("color_primaries")),
            "color_transfer": transfer, "color_space": _color(COLOR_SPACES, *get("colorspace")),
            "hdr": transfer in HDR_TRANSFERS}


@dataclass(frozen=True)
class AudioStreamInfo:
    """The main audio stream (``main_stream``), the one the audio filters decode."""

    codec: str
    sample_rate: int
    channels: int
    index: int = 0


@dataclass(frozen=True)
class MediaInfo:
    container: str
    duration_s: float | None
    bit_rate: int | None
    video_streams: int
    audio_streams: int
    video: VideoStreamInfo | None
    audio: AudioStreamInfo | None
    stated_duration_s: float | None = None  # the header's, where it cannot be true and ``duration_s`` was measured


MIN_FRAME_BYTES = 8
"""The fewest bytes a stored video frame takes with its container's framing (an MKV block's header, an MP4 sample's
entry in the index, an AVI chunk's header): a header that states more frames than its file's size holds this way
states a wrong duration or count (a damaged or a hostile header)."""


def holds_frames(frames: float, size: int) -> bool:
    """Whether a file of ``size`` bytes can hold ``frames`` video frames, ``MIN_FRAME_BYTES`` each (False for NaN)."""
    return frames * MIN_FRAME_BYTES <= size


def _possible(duration: float, video: VideoStreamInfo | None, size: int) -> bool:
    """Whether a file of ``size`` bytes can last ``duration`` seconds: not negative, not endless, and (with video)
    not more frames at its rate than it holds (``holds_frames``)."""
    import math

    if not math.isfinite(duration) or duration < 0:
        return False
    return video is None or not video.fps or holds_frames(duration * video.fps, size)


def decoder_context(container, stream, kind: str):
    """``stream``'s codec context; DecodeError where FFmpeg knows no decoder for it (``kind``: "video" or "audio"),
    which PyAV gives as None: its codec is unknown to FFmpeg or its header is damaged (an AVI's fourcc, an M4A's
    sample entry). Before, every filter failed on it as a bug (an AttributeError)."""
    if stream.codec_context is None:
        raise DecodeError(f"no decoder for the {kind} stream of this {container.format.name} file (its codec is "
                          "unknown to FFmpeg, or its header is damaged)")
    return stream.codec_context


DISCONTINUITY_S = 10.0
"""In a format whose timestamps may jump (MPEG-TS/PS: recordings spliced together), a jump this long or longer,
either way, is a splice, not a gap in the media (ffmpeg's ``dts_delta_threshold``)."""


CUT_SHORT_S = 1.0
"""A file whose streams all end more than this before the duration its header states is cut short (where the
header gives no frame count to check against: Matroska, WebM, FLAC, WAV, an MP3 with a Xing header)."""

STATED_DURATION_FORMATS = ("matroska", "webm", "flac")
"""Formats whose header states the duration FFmpeg gives (Matroska's and WebM's written by the muxer at the end,
FLAC's sample count in its STREAMINFO; where a FLAC written to a pipe leaves it 0, FFmpeg gives none), so that a
file cut short is told by it. Elsewhere FFmpeg may estimate the duration (from the bit rate: an MP3 without a Xing
header, raw streams), and an estimate past the end would call a whole file cut short; or read it from what the file
holds (WAV, Ogg, MPEG-TS), which a file cut short ends early too."""


def stated_duration(container) -> float | None:
    """Seconds from the container's start to the end its header states, where it states one: the duration FFmpeg gives a
    ``STATED_DURATION_FORMATS`` file, or an MP3 whose Xing, Info or VBRI header counts its frames; a WAV's from its
    chunks (``wav_stated_seconds``: FFmpeg gives a WAV cut short the duration of the bytes it holds), an FLV's from its
    ``onMetaData`` (``flv_stated_seconds``: where that says 0, FFmpeg reads the end), an ASF's (WMV, WMA) from its file
    properties (``asf_stated_seconds``). None elsewhere: the end of what the file holds is all there is to go by."""
    import av

    names = container.format.name.split(",")
    if "wav" in names:
        return wav_stated_seconds(container.name)
    if "flv" in names:
        return flv_stated_seconds(container.name)
    if "asf" in names:
        return asf_stated_seconds(container.name)
    if not container.duration:
        return None
    if any(name in names for name in STATED_DURATION_FORMATS) or ("mp3" in names and mp3_counts_frames(container.name)):
        return container.duration / av.time_base
    return None


WAV_PCM_TAGS = (1, 3, 6, 7, 0xFFFE)
"""WAV format tags whose data holds a fixed number of bytes a sample frame (its ``fmt `` chunk's block align): PCM,
float, A-law, mu-law, and the extensible format (PCM or float in practice)."""


def wav_stated_seconds(path: str) -> float | None:
    """The seconds a WAV (or RF64/BW64) file's header says its sound lasts: a PCM file's data chunk size (RF64's from
    its ``ds64`` chunk) in sample frames of its ``fmt `` chunk's block align, a compressed one's ``fact`` chunk's
    sample count (the byte rate its ``fmt`` gives is an estimate: an ADPCM file's said 28 s for 20); at its sample
    rate. None where the header does not say (a file written to a pipe leaves the size 0 or 0xFFFFFFFF; a compressed
    file without a ``fact`` chunk) or cannot be read."""
    import struct

    try:
        with open(path, "rb") as f:
            riff = f.read(12)
            if len(riff) < 12 or riff[:4] not in (b"RIFF", b"RF64", b"BW64") or riff[8:12] != b"WAVE":
                return None
            size64, tag, rate, align, samples = None, 0, 0, 0, 0
            for _ in range(64):  # the chunks before the data: fmt, ds64, fact, LIST, bext, JUNK, ...
                head = f.read(8)
                if len(head) < 8:
                    return None
                kind, size = head[:4], struct.unpack("<I", head[4:])[0]
                if kind == b"data":
                    if riff[:4] != b"RIFF" and size == 0xFFFFFFFF:
                        size = size64
                    if not rate:
                        return None
                    if tag in WAV_PCM_TAGS:
                        return size / align / rate if size and size != 0xFFFFFFFF and align else None
                    return samples / rate if samples else None
                body = f.read(min(size, 16))
                if kind == b"fmt " and len(body) >= 14:
                    tag, _, rate, _, align = struct.unpack("<HHIIH", body[:14])
                elif kind == b"ds64" and len(body) >= 16:
                    size64 = struct.unpack("<Q", body[8:16])[0]
                elif kind == b"fact" and len(body) >= 4:
                    samples = struct.unpack("<I", body[:4])[0]
                f.seek(size + (size & 1) - len(body), 1)  # chunks are padded to an even size
    except OSError:
        return None
    return None


def flv_stated_seconds(path: str) -> float | None:
    """The duration an FLV file's ``onMetaData`` states (the muxer writes it at the end; a file written to a pipe or
    streamed live leaves it 0, and FFmpeg then reads where the last tag ends); None where it states none."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)  # the header, then the script tag
    except OSError:
        return None
    return _flv_number(head, b"duration")


def _flv_number(head: bytes, key: bytes) -> float | None:
    """The number an FLV's ``onMetaData`` gives ``key`` (in ``head``, the file's first bytes: the AMF key, then a
    number, type 0); None where it gives none, 0 or NaN."""
    import struct

    at = head.find(b"\x00" + bytes([len(key)]) + key + b"\x00", 0, 4096) if head[:3] == b"FLV" else -1
    value_at = at + len(key) + 3
    if at < 0 or len(head) < value_at + 8:
        return None
    value = struct.unpack(">d", head[value_at:value_at + 8])[0]
    return value if value > 0 and value == value else None


ASF_HEADER = bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c")
"""The GUID an ASF file (WMV, WMA) starts with: its header object."""

ASF_FILE_PROPERTIES = bytes.fromhex("a1dcab8c47a9cf118ee400c00c205365")
"""The GUID of the ASF header's file properties object, which states the play duration."""


def asf_stated_seconds(path: str) -> float | None:
    """The duration an ASF file's (WMV, WMA) file properties object states: its play duration less the preroll
    (FFmpeg gives a file cut short the duration of what it holds); None where it states none (a broadcast, its
    flag's bit 0: the durations are not valid) or cannot be read."""
    import struct

    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)  # the header object: the file properties come early in it
    except OSError:
        return None
    at = _asf_properties(head, 68)
    if at is None:
        return None
    play, _, preroll, flags = struct.unpack("<QQQI", head[at + 40:at + 68])
    seconds = play / 1e7 - preroll / 1e3
    return seconds if not flags & 1 and seconds > 0 else None


def _asf_properties(head: bytes, need: int) -> int | None:
    """Where the fields of an ASF file's properties object begin in ``head`` (the file's first bytes: after the
    object's GUID and size; its file ID, file size, dates, counts, durations, flags), where ``head`` holds ``need``
    bytes of them; None else."""
    at = head.find(ASF_FILE_PROPERTIES) if head[:16] == ASF_HEADER else -1
    return at + 24 if at >= 0 and len(head) >= at + 24 + need else None


@dataclass(frozen=True)
class Mp3Header:
    """What an MP3's first frame says of the file when it is a Xing, Info (LAME's, FFmpeg's) or VBRI header."""

    frames: int | None
    """The file's frames it counts (None: not counted): the duration FFmpeg then gives (without a count it estimates
    it from the bit rate and the file's size)."""
    start: int
    """Where that frame begins in the file (after an ID3v2 tag)."""
    stream_bytes: int | None
    """The bytes of the audio from that frame on that it states (None: not stated)."""


def mp3_header(path: str) -> Mp3Header | None:
    """The Xing, Info or VBRI header of an MP3 (``Mp3Header``); None where its first frame is none (or unreadable)."""
    import struct

    try:
        with open(path, "rb") as f:
            head = f.read(10)
            start = 0
            if head[:3] == b"ID3" and len(head) == 10:  # an ID3v2 tag first: its size in 7-bit bytes
                size = (head[6] & 0x7F) << 21 | (head[7] & 0x7F) << 14 | (head[8] & 0x7F) << 7 | head[9] & 0x7F
                start = 10 + size + (10 if head[5] & 0x10 else 0)
            f.seek(start)
            data = f.read(4096)
    except OSError:
        return None
    sync = next((i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] & 0xE0 == 0xE0), None)
    if sync is None:
        return None
    frame = data[sync:sync + 64]
    for tag in (b"Xing", b"Info"):  # after the side information: 9, 17 or 32 bytes past the frame header
        at = frame.find(tag, 4, 40)
        if at >= 0 and len(frame) >= at + 12:
            flags = struct.unpack(">I", frame[at + 4:at + 8])[0]
            frames = struct.unpack(">I", frame[at + 8:at + 12])[0] if flags & 1 else None
            field = at + 8 + (4 if flags & 1 else 0)  # the byte count follows the frame count, where each is flagged
            stated = struct.unpack(">I", frame[field:field + 4])[0] if flags & 2 and len(frame) >= field + 4 else None
            return Mp3Header(frames or None, start + sync, stated or None)
    if frame[36:40] == b"VBRI" and len(frame) >= 54:  # version, delay, quality, bytes, frames
        stated, frames = struct.unpack(">II", frame[46:54])
        return Mp3Header(frames or None, start + sync, stated or None)
    return None


def mp3_counts_frames(path: str) -> bool:
    """Whether an MP3's first frame is a Xing, Info or VBRI header that counts the file's frames (``Mp3Header``)."""
    header = mp3_header(path)
    return header is not None and bool(header.frames)


def cut_short_by_duration(path: str, stated: float | None, origin: float, end: float, check=None) -> bool:
    """Whether ``path``, one of whose streams ends at ``end`` (seconds on the file's timeline, ``origin`` being the
    container's start), was cut short: the duration its header ``stated`` (``stated_duration``; None: none stated)
    lies more than ``CUT_SHORT_S`` after that end and after every stream's end (a demux of every stream, made only
    then: a film's sound may go on after its pictures), and the file does not hold every byte its header says it
    has (``holds_stated_size``: then the stated duration is wrong, not the file). ``check``: called every few
    thousand packets of that demux (a decode given up raises there)."""
    return (stated is not None and stated - end > CUT_SHORT_S
            and stated - _streams_end(path, origin, check) > CUT_SHORT_S and not holds_stated_size(path))


EBML_MAGIC = b"\x1a\x45\xdf\xa3"
"""The first four bytes of a Matroska or WebM file (its EBML header)."""

MKV_SEGMENT = b"\x18\x53\x80\x67"
"""The ID of a Matroska file's Segment element, whose size covers the rest of the file."""


def _ebml_size(data: bytes, at: int) -> tuple[int | None, int]:
    """The element size (an EBML variable-length integer) at ``at`` and where its data starts; None where the size
    is unknown (all ones: a file written live) or cannot be read."""
    if at >= len(data) or not data[at]:
        return None, at
    length = 8 - data[at].bit_length() + 1
    if at + length > len(data):
        return None, at
    value = data[at] & (0xFF >> length)
    for b in data[at + 1:at + length]:
        value = value << 8 | b
    return (None if value == (1 << 7 * length) - 1 else value), at + length


def stated_size(path: str) -> int | None:
    """The bytes a file's header says the file has, where it says: an FLV's ``onMetaData`` ``filesize``, an ASF's
    (WMV, WMA) file properties' file size, a Matroska or WebM file's Segment (its size, from where its data starts),
    an MP3's Xing or VBRI byte count (from its frame); None elsewhere, where it is left unknown (a file written
    live) or cannot be read. The muxers write them as they write the duration, at the end."""
    import struct

    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return None
    if head[:3] == b"FLV":
        size = _flv_number(head, b"filesize")
        return int(size) if size is not None else None
    if head[:16] == ASF_HEADER:
        at = _asf_properties(head, 24)
        return (struct.unpack("<Q", head[at + 16:at + 24])[0] or None) if at is not None else None  # after its ID
    if head[:4] == EBML_MAGIC:
        size, data = _ebml_size(head, 4)
        if size is None or head[data + size:data + size + 4] != MKV_SEGMENT:
            return None
        segment, start = _ebml_size(head, data + size + 4)
        return start + segment if segment is not None else None
    mp3 = mp3_header(path)
    return mp3.start + mp3.stream_bytes if mp3 is not None and mp3.stream_bytes else None


def holds_stated_size(path: str) -> bool:
    """Whether the file holds every byte its header says it has (``stated_size``; False where it says none)."""
    size = stated_size(path)
    try:
        return size is not None and os.path.getsize(path) >= size
    except OSError:
        return False


def _streams_end(path: str, origin: float, check=None) -> float:
    """Where the last packet of any stream of ``path`` ends, in seconds on the file's timeline."""
    end = 0.0
    with open_container(path) as c:
        for n, p in enumerate(demux(c)):
            if check is not None and n % 4096 == 0:
                check()
            if p.pts is not None and p.size:
                end = max(end, float((p.pts + (p.duration or 0)) * p.stream.time_base) - origin)
    return end


def timestamps_may_jump(container) -> bool:
    """Whether the container's format is flagged AVFMT_TS_DISCONT (MPEG-TS, MPEG-PS)."""
    import av

    return bool(container.format.flags & av.format.Flags.ts_discont.value)


def quarter_turns(rotation: float | None) -> int:
    """Counter-clockwise quarter turns (0-3) of a display-matrix rotation in degrees (PyAV says -90 for 270)."""
    return int(round((rotation or 0.0) / 90.0)) % 4


def video_streams(container) -> list:
    """The container's video streams, without cover art (an MP3's or M4A's picture is a one-frame "video" stream
    marked ``attached_pic``): an audio file with a cover is an audio file."""
    import av

    pic = av.stream.Disposition.attached_pic
    return [s for s in container.streams.video if not (s.disposition & pic)]


def main_stream(streams: list):
    """The stream a player shows: the first one marked ``default``, else the first (None for no streams).

    A film's MKV holds a commentary track before the main one, or a camera file a proxy before the picture; the
    default flag is how the file says which one it is (the ffmpeg CLI and torchcodec choose by it as well).
    """
    import av

    flagged = [s for s in streams if s.disposition & av.stream.Disposition.default]
    return (flagged or streams or [None])[0]


def main_video_stream(container):
    """The video stream every backend decodes (cover art never counts; see ``main_stream``)."""
    stream = main_stream(video_streams(container))
    if stream is None:
        raise DecodeError("no video stream")
    return stream


def main_audio_stream(container):
    """The audio stream the audio filters decode (see ``main_stream``)."""
    stream = main_stream(list(container.streams.audio))
    if stream is None:
        raise DecodeError("no audio stream")
    return stream


def codec_name(ctx) -> str:
    """The codec, not the decoder FFmpeg picked for it: ``av1`` whether libdav1d or libaom decodes it."""
    return getattr(ctx.codec, "canonical_name", None) or ctx.name


@dataclass(frozen=True)
class Animation:
    """An animated image: its size, and each frame's time in seconds from the first."""

    width: int
    height: int
    times: np.ndarray
    duration_s: float

    @property
    def fps(self) -> float:
        """Frames per second on average; 0 where the frames take no time."""
        return len(self.times) / self.duration_s if self.duration_s > 0 else 0.0


SHORTEST_FRAME_MS = 20
"""A frame of an animated image shown for less than this (0 or 10 ms in many GIFs and WebPs) is shown for
``DEFAULT_FRAME_MS``, as browsers do."""
DEFAULT_FRAME_MS = 100


def read_webp_animation(path: str) -> Animation:
    """An animated WebP's canvas size and frame times, from its RIFF chunks (``VP8X``: the canvas; one ``ANMF`` per
    frame, with its duration), no pixel decoded: FFmpeg up to 8.1 reads such a file as a 0x0 stream that does not
    decode (its frames are decoded by Pillow, the ``pillow`` video backend). A frame shown for less than
    ``SHORTEST_FRAME_MS`` counts ``DEFAULT_FRAME_MS``.

    Raises:
        DecodeError: not a WebP, cut short (the RIFF header counts more bytes than the file has), or no animation.
    """
    import os

    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:] != b"WEBP":
            raise DecodeError("not a WebP file (no RIFF WEBP header)")
        end = 8 + int.from_bytes(head[4:8], "little")
        size = os.fstat(f.fileno()).st_size
        if end > size:
            raise DecodeError(f"WebP cut short: {size} of its {end} bytes")
        width = height = None
        shown = []
        pos = 12
        while pos + 8 <= end:
            f.seek(pos)
            fourcc, n = f.read(4), int.from_bytes(f.read(4), "little")
            if fourcc == b"VP8X" and n >= 10:
                canvas = f.read(10)
                width, height = 1 + int.from_bytes(canvas[4:7], "little"), 1 + int.from_bytes(canvas[7:10], "little")
            elif fourcc == b"ANMF" and n >= 16:
                ms = int.from_bytes(f.read(16)[12:15], "little")
                shown.append(ms if ms >= SHORTEST_FRAME_MS else DEFAULT_FRAME_MS)
            pos += 8 + n + (n & 1)  # chunks are padded to an even size
    if width is None or not shown:
        raise DecodeError("WebP without an animation (no VP8X canvas or ANMF frame)")
    ms = np.asarray(shown, dtype=np.float64)
    return Animation(width, height, np.concatenate([[0.0], np.cumsum(ms[:-1])]) / 1000.0, float(ms.sum()) / 1000.0)


def _animated_webp(path: str, container: str, video_streams: int) -> MediaInfo:
    """The probe of an animated WebP, from its chunks (``read_webp_animation``)."""
    a = read_webp_animation(path)
    video = VideoStreamInfo(codec="webp", width=a.width, height=a.height, fps=a.fps or None, frames=len(a.times),
                            pix_fmt=None)
    return MediaInfo(container=container, duration_s=a.duration_s, bit_rate=None, video_streams=video_streams,
                     audio_streams=0, video=video, audio=None)


def _open(path: str):
    import av

    try:
        return open_container(path)
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError, OSError) as e:
        raise DecodeError(f"cannot open media: {type(e).__name__}: {e}") from e


def stated_frames(info: MediaInfo) -> float | None:
    """The frames the header of ``info``'s file states for its main video stream: the larger of its count and its
    duration (as stated, where the probe measured another) times its rate, by which decord reserves memory; None
    without video or either figure."""
    v = info.video
    if v is None:
        return None
    stated = info.stated_duration_s if info.stated_duration_s is not None else info.duration_s
    by_time = stated * v.fps if stated and v.fps else 0.0
    return max(float(v.frames or 0), by_time) or None


FIRST_FRAME_PATIENCE = 256
"""Packets that do not decode before the first frame that does, at most (a damaged start: a zeroed sector, flipped
bits in the first GOP or the first audio frames), before the stream is called undecodable."""


def first_frame(container, stream):
    """The first frame of ``stream`` that decodes, passing over up to ``FIRST_FRAME_PATIENCE`` packets that do not
    (the ffmpeg CLI decodes such a file from its first good frame; ``container.decode`` ends at the first error).

    Raises:
        DecodeError: no packet decodes before the patience runs out (with the first error), or none at all.
    """
    import av

    first_error, bad = None, 0
    for packet in demux(container, stream):
        try:
            frames = packet.decode()
        except (av.error.FFmpegError, ValueError) as e:
            first_error, bad = first_error or e, bad + 1
            if bad > FIRST_FRAME_PATIENCE:
                break
            continue
        if frames:
            return frames[0]
    if first_error is not None:
        raise DecodeError(f"first frame does not decode: {type(first_error).__name__}: {first_error}") from first_error
    raise DecodeError("stream holds no decodable frame")


def probe_media(path: str) -> MediaInfo:
    """Read container and main-stream metadata and decode one frame of the main video (else audio) stream.

    Args:
        path: local file path.

    Returns:
        The metadata of the container and of its main video and audio streams (``main_stream``).

    Raises:
        DecodeError: the file is empty, not media, has no audio or video stream, or neither its video's nor its
            audio's first frame decodes (broken pictures with sound that decodes probe fine; the video filters
            then fail on the pictures, the audio filters run).
    """
    import av

    with _open(path) as container:
        vstreams = video_streams(container)  # cover art is not video
        astreams = list(container.streams.audio)
        if not vstreams and not astreams:
            raise DecodeError(f"no audio or video stream in {container.format.name} container")
        video = audio = None
        vmain, amain = main_stream(vstreams), main_stream(astreams)
        if vmain is not None:
            ctx = decoder_context(container, vmain, "video")
            rate = vmain.average_rate or vmain.guessed_rate
            sar = ctx.sample_aspect_ratio
            video = VideoStreamInfo(
                codec=codec_name(ctx), width=int(ctx.width), height=int(ctx.height),
                fps=float(rate) if rate else None, frames=int(vmain.frames) or None,
                pix_fmt=ctx.pix_fmt, index=vmain.index,
                sample_aspect_ratio=float(sar) if sar else 1.0,  # 0:1 and None both mean: not stated
                field_order=_field_order(ctx),
            )
            if video.width <= 0 or video.height <= 0:
                if video.codec == "webp":  # an animation: FFmpeg decodes still WebP only
                    return _animated_webp(path, container.format.name, len(vstreams))
                raise DecodeError(f"video stream has no size ({video.width}x{video.height})")
        if amain is not None:
            ctx = decoder_context(container, amain, "audio")
            audio = AudioStreamInfo(codec=codec_name(ctx), sample_rate=int(ctx.sample_rate or 0),
                                    channels=int(ctx.channels or 0), index=amain.index)
        duration = float(container.duration) / av.time_base if container.duration else None
        stream = vmain if vmain is not None else amain
        if duration is None and stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        stated = None
        if duration is not None and not _possible(duration, video, os.path.getsize(path)):
            # a damaged or hostile header (an MKV stating 10^9 s or -5 s for 4): where the streams end, measured
            origin = container.start_time / av.time_base if container.start_time is not None else 0.0
            stated, duration = duration, _streams_end(path, origin) or None
        try:
            frame = first_frame(container, stream)
        except DecodeError:
            if stream is amain or amain is None:
                raise
            # the pictures are broken but the sound is not: the audio filters can still use the item (the video
            # filters fail on it in their own decode). From the start again: the pictures' search read on past the
            # sound's first packets, and past all of them in a short file
            with _open(path) as again:
                first_frame(again, again.streams[amain.index])
            frame = None
        if stream is amain and frame is not None:  # what the audio decodes to, where the header's guess differs
            audio = replace(audio, sample_rate=int(frame.sample_rate or audio.sample_rate),
                            channels=int(frame.layout.nb_channels or audio.channels))
        if video is not None:
            video = replace(video, **color_description(vmain.codec_context, frame))
        if frame is not None and video is not None:
            video = replace(video, interlaced=bool(getattr(frame, "interlaced_frame", False)))
            turns = quarter_turns(getattr(frame, "rotation", 0))
            if turns:
                w, h = (video.height, video.width) if turns % 2 else (video.width, video.height)
                sar = 1.0 / video.sample_aspect_ratio if turns % 2 else video.sample_aspect_ratio
                video = replace(video, width=w, height=h, rotation=90 * turns, sample_aspect_ratio=sar)
        return MediaInfo(
            container=container.format.name, duration_s=duration,
            bit_rate=int(container.bit_rate) if container.bit_rate else None,
            video_streams=len(vstreams), audio_streams=len(astreams), video=video, audio=audio,
            stated_duration_s=stated,
        )
