"""Container and stream metadata through PyAV, with one decoded frame as proof that the media is readable."""

from __future__ import annotations

from dataclasses import dataclass, replace

from pipeline.errors import DecodeError


@dataclass(frozen=True)
class VideoStreamInfo:
    """The first video stream. ``width`` and ``height`` are the display size, after ``rotation`` (the display
    matrix's counter-clockwise degrees: 0, 90, 180 or 270, set by phone cameras): the size of the frames every
    filter sees and the pixels a crop box refers to."""

    codec: str
    width: int
    height: int
    fps: float | None
    frames: int | None
    pix_fmt: str | None
    rotation: int = 0


@dataclass(frozen=True)
class AudioStreamInfo:
    codec: str
    sample_rate: int
    channels: int


@dataclass(frozen=True)
class MediaInfo:
    container: str
    duration_s: float | None
    bit_rate: int | None
    video_streams: int
    audio_streams: int
    video: VideoStreamInfo | None
    audio: AudioStreamInfo | None


DISCONTINUITY_S = 10.0
"""In a format whose timestamps may jump (MPEG-TS/PS: recordings spliced together), a jump this long or longer,
either way, is a splice, not a gap in the media (ffmpeg's ``dts_delta_threshold``)."""


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


def first_video_stream(container):
    """The stream every video backend decodes (decord and torchcodec skip cover art the same way)."""
    streams = video_streams(container)
    if not streams:
        raise DecodeError("no video stream")
    return streams[0]


def codec_name(ctx) -> str:
    """The codec, not the decoder FFmpeg picked for it: ``av1`` whether libdav1d or libaom decodes it."""
    return getattr(ctx.codec, "canonical_name", None) or ctx.name


def _open(path: str):
    import av

    try:
        return av.open(path, metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError, OSError) as e:
        raise DecodeError(f"cannot open media: {type(e).__name__}: {e}") from e


def probe_media(path: str) -> MediaInfo:
    """Read container and first-stream metadata and decode one frame of the first stream.

    Args:
        path: local file path.

    Returns:
        The metadata of the container and of its first video and audio streams.

    Raises:
        DecodeError: the file is empty, not media, has no audio or video stream, or its first frame does not
            decode.
    """
    import av

    with _open(path) as container:
        vstreams = video_streams(container)  # cover art is not video
        astreams = list(container.streams.audio)
        if not vstreams and not astreams:
            raise DecodeError(f"no audio or video stream in {container.format.name} container")
        video = audio = None
        if vstreams:
            s = vstreams[0]
            ctx = s.codec_context
            rate = s.average_rate or s.guessed_rate
            video = VideoStreamInfo(
                codec=codec_name(ctx), width=int(ctx.width), height=int(ctx.height),
                fps=float(rate) if rate else None, frames=int(s.frames) or None,
                pix_fmt=ctx.pix_fmt,
            )
            if video.width <= 0 or video.height <= 0:
                raise DecodeError(f"video stream has no size ({video.width}x{video.height})")
        if astreams:
            s = astreams[0]
            ctx = s.codec_context
            audio = AudioStreamInfo(codec=codec_name(ctx), sample_rate=int(ctx.sample_rate or 0),
                                    channels=int(ctx.channels or 0))
        duration = float(container.duration) / av.time_base if container.duration else None
        if duration is None:
            first = vstreams[0] if vstreams else astreams[0]
            if first.duration and first.time_base:
                duration = float(first.duration * first.time_base)
        try:
            stream = vstreams[0] if vstreams else astreams[0]
            frame = next(iter(container.decode(stream)), None)
        except (av.error.FFmpegError, ValueError, StopIteration) as e:
            raise DecodeError(f"first frame does not decode: {type(e).__name__}: {e}") from e
        if frame is None:
            raise DecodeError("stream holds no decodable frame")
        if video is not None and stream is vstreams[0]:
            turns = quarter_turns(getattr(frame, "rotation", 0))
            if turns:
                w, h = (video.height, video.width) if turns % 2 else (video.width, video.height)
                video = replace(video, width=w, height=h, rotation=90 * turns)
        return MediaInfo(
            container=container.format.name, duration_s=duration,
            bit_rate=int(container.bit_rate) if container.bit_rate else None,
            video_streams=len(vstreams), audio_streams=len(astreams), video=video, audio=audio,
        )
