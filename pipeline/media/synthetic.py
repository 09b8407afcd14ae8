"""Real media files made with the ffmpeg CLI and espeak-ng, with known content, for the demo and the tests."""

from __future__ import annotations

import os
import shutil
import subprocess


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(f"{tool} is not installed (apt-get install -y ffmpeg espeak-ng)")
    return path


def _ffmpeg(args: list[str]) -> None:
    cmd = [_need("ffmpeg"), "-hide_banner", "-loglevel", "error", "-y", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed: {' '.join(cmd)}\n{proc.stderr}")


def speech_wav(path: str, text: str, rate_hz: int = 16000, words_per_min: int = 150) -> str:
    """Real speech from espeak-ng, resampled to ``rate_hz`` mono WAV."""
    raw = path + ".espeak.wav"
    subprocess.run([_need("espeak-ng"), "-s", str(words_per_min), "-w", raw, text], check=True, capture_output=True)
    _ffmpeg(["-i", raw, "-ar", str(rate_hz), "-ac", "1", path])
    os.remove(raw)
    return path


def motion_clip(path: str, seconds: float = 3.0, size: str = "320x240", fps: int = 25, audio: bool = True) -> str:
    """A moving test pattern (testsrc2) with a sine tone, H.264/AAC in MP4."""
    args = ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={fps}:duration={seconds}"]
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:duration={seconds}", "-c:a", "aac"]
    _ffmpeg(args + ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-shortest", path])
    return path


def still_clip(path: str, seconds: float = 3.0, size: str = "320x240", fps: int = 25, speech: str | None = None) -> str:
    """One frame held for ``seconds`` (a static video), optionally over real speech."""
    args = ["-f", "lavfi", "-i", f"testsrc=size={size}:rate=1:duration=1", "-vf", f"fps={fps},loop=-1:1:0",
            "-t", str(seconds)]
    if speech:
        wav = path + ".speech.wav"
        speech_wav(wav, speech)
        args = ["-f", "lavfi", "-i", f"testsrc=size={size}:rate=1:duration=1", "-i", wav, "-vf",
                f"fps={fps},loop=-1:1:0", "-t", str(seconds), "-c:a", "aac"]
    _ffmpeg(args + ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", path])
    if speech:
        os.remove(wav)
    return path


def letterboxed_clip(path: str, seconds: float = 3.0, inner: str = "320x180", outer: str = "320x240", fps: int = 25,
                     subtitle: str | None = None) -> str:
    """A moving pattern padded with black bars top and bottom (letterbox) to ``outer``; with ``subtitle``, that text
    burnt into the middle of the bottom bar for the middle third of the clip."""
    w, h = (int(v) for v in outer.split("x"))
    vf = f"pad={w}:{h}:(ow-iw)/2:(oh-ih)/2:black"
    if subtitle:
        bar = (h - int(inner.split("x")[1])) // 2
        size = max(8, bar * 2 // 5)
        vf += "," + text_overlay(subtitle, "(w-tw)/2", f"{h - bar + (bar - size) // 2}", size, seconds / 3,
                                 2 * seconds / 3)
    _ffmpeg(["-f", "lavfi", "-i", f"testsrc2=size={inner}:rate={fps}:duration={seconds}",
             "-vf", vf, "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", path])
    return path


def blur_filled_clip(path: str, inner: str = "360x640", outer: str = "1136x640", seconds: float = 2.0,
                     tilt: float = 0.0) -> str:
    """A textured moving picture (testsrc2 with film grain) of size ``inner`` centred on ``outer`` over a blurred copy
    of itself enlarged to fill ``outer``, as editing apps put an upright phone video on a landscape frame (or a
    landscape one on an upright frame); with ``tilt`` (radians), the picture turned on the blurred copy."""
    (w, h), (ow, oh) = ((int(v) for v in inner.split("x")), (int(v) for v in outer.split("x")))
    fill = f"scale={ow}:-2" if ow / w >= oh / h else f"scale=-2:{oh}"
    fg = "[b]"
    graph = f"[0]noise=alls=25:allf=t,split[a][b];[a]{fill},boxblur=20,crop={ow}:{oh}[bg];"
    if tilt:
        graph += f"[b]format=rgba,rotate={tilt}:c=none:ow=rotw({tilt}):oh=roth({tilt})[t];"
        fg = "[t]"
    graph += f"[bg]{fg}overlay=(W-w)/2:(H-h)/2"
    _ffmpeg(["-f", "lavfi", "-i", f"testsrc2=size={inner}:rate=25:duration={seconds}", "-filter_complex", graph,
             "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", path])
    return path


def font_file() -> str:
    """A TrueType font for ffmpeg's drawtext (fontconfig's match for sans, else DejaVu Sans)."""
    fc = shutil.which("fc-match")
    if fc:
        found = subprocess.run([fc, "-f", "%{file}", "sans"], capture_output=True, text=True).stdout.strip()
        if found and os.path.exists(found):
            return found
    fallback = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    if os.path.exists(fallback):
        return fallback
    raise RuntimeError("no font for ffmpeg's drawtext (apt-get install -y fonts-dejavu-core fontconfig)")


def text_overlay(text: str, x: str, y: str, size: int, start_s: float = 0.0, end_s: float | None = None) -> str:
    """A drawtext filter: white ``text`` of ``size`` pixels at ``x``, ``y`` (ffmpeg expressions, ``tw``/``th``
    the text's size), shown from ``start_s`` to ``end_s`` (None: to the end), as burnt-in subtitles or a logo."""
    if any(c in text for c in "'\\:%,;[]="):
        raise ValueError(f"text {text!r}: letters, digits, spaces and .!? only (the rest needs filtergraph escapes)")
    shown = ""
    if start_s > 0 or end_s is not None:
        shown = f":enable='between(t,{start_s},{1e9 if end_s is None else end_s})'"
    return f"drawtext=fontfile={font_file()}:text='{text}':fontcolor=white:fontsize={size}:x={x}:y={y}{shown}"


def rotated_copy(src: str, dst: str, degrees: int) -> str:
    """``src`` stream-copied with a display-matrix rotation, as a phone camera records video held sideways: the
    coded frames are unchanged and players (and the ffmpeg CLI) turn them upright. ``degrees`` is the rotation
    PyAV and torchcodec then report. FFmpeg 5 writes it from the legacy ``rotate`` tag, FFmpeg 6 and later from
    ``-display_rotation`` (whose sign convention differs), so each way is checked by reading the file back."""
    from pipeline.media.probe import probe_media

    attempts = [["-i", src, "-c", "copy", "-metadata:s:v:0", f"rotate={degrees}", dst],
                ["-display_rotation", str(degrees), "-i", src, "-c", "copy", dst],
                ["-display_rotation", str(-degrees), "-i", src, "-c", "copy", dst]]
    for args in attempts:
        try:
            _ffmpeg(args)
        except RuntimeError:
            continue
        if probe_media(dst).video.rotation == degrees % 360:
            return dst
    raise RuntimeError(f"this ffmpeg cannot write a {degrees} degree display rotation")


def broken_files(directory: str) -> dict[str, str]:
    """Empty, random-bytes, truncated and not-media files, named by what is wrong with them."""
    os.makedirs(directory, exist_ok=True)
    out = {}
    out["empty"] = os.path.join(directory, "empty.mp4")
    open(out["empty"], "wb").close()
    out["random"] = os.path.join(directory, "random.mp4")
    with open(out["random"], "wb") as f:
        f.write(os.urandom(64 * 1024))
    out["notmedia"] = os.path.join(directory, "notes.mp4")
    with open(out["notmedia"], "w") as f:
        f.write("this is a text file with a video extension\n" * 100)
    full = os.path.join(directory, ".full.mp4")
    motion_clip(full, seconds=2.0, audio=False)
    out["truncated"] = os.path.join(directory, "truncated.mp4")
    with open(full, "rb") as f:
        data = f.read()
    with open(out["truncated"], "wb") as f:
        f.write(data[: len(data) // 3])  # moov atom at the end is cut off
    os.remove(full)
    return out


def zeroed_middle_copy(src: str, dst: str, fraction: float = 0.02) -> str:
    """A copy of ``src`` with ``fraction`` of its bytes zeroed at its middle (a bad sector, a damaged download):
    the container's index still lists every packet, and the packets there do not decode."""
    data = bytearray(open(src, "rb").read())
    a, n = len(data) // 2, int(len(data) * fraction)
    data[a:a + n] = bytes(n)
    with open(dst, "wb") as f:
        f.write(data)
    return dst


def garbled_packets_copy(src: str, dst: str, kind: str = "audio", first: int = 2, seed: int = 0) -> str:
    """A copy of ``src`` with the bytes of the first ``first`` packets of its first ``kind`` stream replaced in place
    by random ones (flipped bits at the start of a download; the first 64 of a packet split across the container's
    own): the container is untouched, those packets do not decode, and every packet after them is as it was."""
    import random

    import av

    data = bytearray(open(src, "rb").read())
    rng = random.Random(seed)
    with av.open(src) as c:
        stream = getattr(c.streams, kind)[0]
        done = 0
        for packet in c.demux(stream):
            if done == first:
                break
            if not packet.size:
                continue
            payload = bytes(packet)
            at = data.find(payload, max(0, packet.pos or 0))
            if at < 0:  # split across the container's own packets (MPEG-PS): its head, with the frame's header
                payload = payload[:64]
                at = data.find(payload, max(0, packet.pos or 0))
            if at < 0:
                raise ValueError(f"packet {done} of {src} is not stored in the file as it demuxes")
            data[at:at + len(payload)] = rng.randbytes(len(payload))
            done += 1
    with open(dst, "wb") as f:
        f.write(data)
    return dst


def mkv_stating_duration(src: str, dst: str, seconds: float) -> str:
    """A copy of the Matroska ``src`` whose Segment Info states ``seconds`` as its duration (a muxer's bug, a damaged
    or a hostile header), its frames as they were. The Duration element keeps its width (4 or 8 bytes); the
    timecode scale is FFmpeg's default, a millisecond."""
    import struct

    data = bytearray(open(src, "rb").read())
    at = data.find(b"\x44\x89")  # the Duration element's ID, then its size as one byte (0x84 or 0x88)
    if at < 0 or data[at + 2] not in (0x84, 0x88):
        raise ValueError(f"{src} states no duration this can rewrite")
    value = seconds * 1000.0
    data[at + 3:at + 3 + (data[at + 2] & 0x0F)] = struct.pack(">f" if data[at + 2] == 0x84 else ">d", value)
    with open(dst, "wb") as f:
        f.write(data)
    return dst


def mp4_stating_frames(src: str, dst: str, count: int) -> str:
    """A copy of the MP4 ``src`` whose first track's ``stts`` states its first run of samples as ``count`` (a
    damaged or a hostile index: four bytes of the ``moov``), its samples as they were."""
    data = bytearray(open(src, "rb").read())
    at = data.find(b"stts")
    if at < 4:
        raise ValueError(f"{src} has no stts box")
    data[at + 12:at + 16] = count.to_bytes(4, "big")  # after the type: version and flags, entries, then the count
    with open(dst, "wb") as f:
        f.write(data)
    return dst


def flv_caption_copy(src: str, dst: str, share: float = 0.7, text: str = "a caption") -> str:
    """A copy of the FLV ``src`` with a caption (an ``onTextData`` script tag, as a live stream's captions come) put
    before the tag at ``share`` of its tags: FFmpeg adds a subtitle stream when it meets it, past the streams it
    found on opening."""
    import struct

    def amf_string(value: str) -> bytes:
        raw = value.encode()
        return struct.pack(">H", len(raw)) + raw

    data = open(src, "rb").read()
    starts, pos = [], 13  # the FLV header (9 bytes) and the first PreviousTagSize
    while pos + 11 <= len(data):
        starts.append(pos)
        pos += 11 + int.from_bytes(data[pos + 1:pos + 4], "big") + 4
    at = starts[int(len(starts) * share)]
    ts = int.from_bytes(data[at + 4:at + 7], "big") | data[at + 7] << 24
    body = (b"\x02" + amf_string("onTextData") + b"\x08" + struct.pack(">I", 1) + amf_string("text") + b"\x02"
            + amf_string(text) + b"\x00\x00\x09")
    tag = (bytes([18]) + len(body).to_bytes(3, "big") + (ts & 0xFFFFFF).to_bytes(3, "big") + bytes([ts >> 24 & 0xFF])
           + bytes(3) + body + struct.pack(">I", 11 + len(body)))
    with open(dst, "wb") as f:
        f.write(data[:at] + tag + data[at:])
    return dst


def broken_pictures_copy(src: str, dst: str, seed: int = 0) -> str:
    """``src`` remuxed with every video packet replaced by random bytes of the same size and timing, the audio
    untouched: a recording whose pictures are lost and whose sound is not."""
    import random

    import av

    rng = random.Random(seed)
    with av.open(src) as inp, av.open(dst, "w") as out:
        vin, ain = inp.streams.video[0], inp.streams.audio[0]
        vout, aout = out.add_stream_from_template(vin), out.add_stream_from_template(ain)
        for packet in inp.demux(vin, ain):
            if packet.size == 0:
                continue
            if packet.stream is vin:
                noise = av.Packet(rng.randbytes(packet.size))
                noise.pts, noise.dts, noise.time_base = packet.pts, packet.dts, packet.time_base
                noise.is_keyframe = packet.is_keyframe
                noise.stream = vout
                out.mux(noise)
            else:
                packet.stream = aout
                out.mux(packet)
    return dst


def lavfi_clip(path: str, source: str = "testsrc2=size=320x240:rate=25", seconds: float = 2.0, vf: str | None = None,
               codec: tuple[str, ...] = ("-c:v", "libx264", "-preset", "ultrafast"), pix_fmt: str = "yuv420p",
               extra: tuple[str, ...] = ()) -> str:
    """A clip from any lavfi source with an optional filter chain (``vf``), codec and pixel format."""
    args = ["-f", "lavfi", "-i", f"{source}:duration={seconds}"]
    if vf:
        args += ["-vf", vf]
    _ffmpeg(args + list(codec) + ["-pix_fmt", pix_fmt, *extra, path])
    return path


def two_scene_clip(path: str, seconds_each: float = 2.0, size: str = "320x240", fps: int = 25) -> str:
    """A moving pattern followed by SMPTE bars: exactly one hard cut, at ``seconds_each``."""
    return shots_clip(path, (("testsrc2", seconds_each), ("smptebars", seconds_each)), size, fps)


SIX_SHOTS = (("testsrc2", 1.52), ("smptebars", 0.6), ("testsrc", 0.12), ("rgbtestsrc", 1.2), ("pal100bars", 1.0),
             ("yuvtestsrc", 1.56))
"""Six shots for ``shots_clip``, 6 s: at 25 fps the cuts fall at frames 38, 53, 56, 86 and 111 (two of them 3
frames apart, a shot shorter than a sample interval at 4 a second)."""


def shots_clip(path: str, shots: tuple[tuple[str, float], ...], size: str = "320x240", fps: int = 25,
               grain: int = 0, preset: str = "ultrafast") -> str:
    """Shots of lavfi sources (``(source, seconds)``), joined by hard cuts: each at the sum of the seconds before
    it (frame ``fps`` times that). ``grain``: moving noise of that strength over them, which with a slower x264
    ``preset`` makes frames that cost their decoder what a film's do (flat patterns at ultrafast decode several
    times faster)."""
    args, joined = [], ""
    for k, (source, seconds) in enumerate(shots):
        args += ["-f", "lavfi", "-i", f"{source}=size={size}:rate={fps}:duration={seconds}"]
        joined += f"[{k}:v]"
    noise = f",noise=alls={grain}:allf=t+u" if grain else ""
    _ffmpeg(args + ["-filter_complex", f"{joined}concat=n={len(shots)}:v=1:a=0{noise}[v]", "-map", "[v]",
                    "-c:v", "libx264", "-preset", preset, "-pix_fmt", "yuv420p", path])
    return path


def rate_drop_clip(path: str, size: str = "160x120") -> str:
    """A variable frame rate: a moving pattern, then bars, 150 frames; the first 50 at 25 fps (0-2 s), the rest at
    10 fps (to 12 s), so that the cut to the bars, frame 75, plays at 4.5 s."""
    _ffmpeg(["-f", "lavfi", "-i", f"testsrc2=size={size}:rate=25:duration=3", "-f", "lavfi", "-i",
             f"smptebars=size={size}:rate=25:duration=3", "-filter_complex",
             "[0:v][1:v]concat=n=2:v=1[c];[c]setpts='if(lt(N,50),N/25,2+(N-50)/10)/TB'[v]", "-map", "[v]",
             "-fps_mode", "vfr", "-c:v", "libx264", "-preset", "ultrafast", path])
    return path


PARAGRAPHS = [
    "Sieving a large corpus starts with knowing what is in it. Every clip is fetched, decoded once, and measured.",
    "Some recordings are long lectures. Others are short interviews, with pauses, breaths, and laughter between the "
    "sentences.",
    "We cut speech at natural pauses, so that every piece starts and ends in silence. A breath is a weaker place to "
    "cut than a real pause.",
    "The chunked pipeline must agree with a single pass over the whole file. Otherwise the cut points would depend on "
    "how the file happened to be split.",
    "Numbers matter here: ten milliseconds on average, thirty at the ninety fifth percentile, and the same count of "
    "cuts within one percent.",
]


def long_speech_wav(path: str, repeats: int = 2, rate_hz: int = 16000, words_per_min: int = 160) -> str:
    """Real speech of several paragraphs (espeak-ng), ``repeats`` times over, with natural sentence pauses."""
    text = " ".join(PARAGRAPHS * repeats)
    return speech_wav(path, text, rate_hz, words_per_min)


def has_zscale() -> bool:
    """Whether the ffmpeg CLI has the ``zscale`` filter (libzimg), which ``hdr_copy`` needs."""
    out = subprocess.run([_need("ffmpeg"), "-hide_banner", "-filters"], capture_output=True, text=True).stdout
    return " zscale " in out


def hdr_copy(src: str, dst: str, transfer: str = "smpte2084") -> str:
    """``src`` (SDR BT.709) as 10-bit BT.2020 HDR video in ``transfer`` (``smpte2084``: PQ, ``arib-std-b67``: HLG),
    by FFmpeg's display-referred mapping with SDR white at 203 nits (ITU-R BT.2408), tagged as HDR cameras tag it."""
    _ffmpeg(["-i", src, "-vf", f"zscale=tin=709:min=709:pin=709:rin=tv:t={transfer}:m=2020_ncl:p=2020:r=tv:npl=203,"
             "format=yuv420p10le", "-c:v", "libx264", "-preset", "ultrafast", "-crf", "12", "-profile:v", "high10",
             "-color_primaries", "bt2020", "-color_trc", transfer, "-colorspace", "bt2020nc", dst])
    return dst


def moving_box_clip(path: str, size: str = "320x240", fps: int = 50, seconds: float = 1.0,
                    interlace: str | None = None, codec: tuple[str, ...] = ("-c:v", "libx264", "-crf", "10")) -> str:
    """A still test card with a moving pattern (testsrc2) crossing it at 12 pixels a frame, over the middle third
    of its height. ``interlace`` (``tff`` or ``bff``): the same at ``fps`` woven into interlaced frames at half the
    rate (each frame's first field from frame ``2i`` of the progressive clip, its second from ``2i + 1``), coded as
    interlaced (``-flags +ilme+ildct``, the field order in the stream), as broadcast and camcorders store it."""
    w, h = (int(v) for v in size.split("x"))
    graph = (f"testsrc=size={size}:rate=1:duration=1,loop=-1:1:0,fps={fps},trim=duration={seconds}[bg];"
             f"testsrc2=size={h // 3}x{h // 3}:rate={fps}:duration={seconds}[fg];"
             f"[bg][fg]overlay=x='mod(t*{12 * fps}\\,{w - h // 3})':y={h // 3},format=yuv420p")
    args = ["-filter_complex", graph + (f",interlace=scan={interlace}:lowpass=0" if interlace else "")]
    if interlace:
        args += ["-flags", "+ilme+ildct", "-top", "1" if interlace == "tff" else "0"]
        if "libx264" in codec:
            args += ["-x264-params", f"{interlace}=1"]
    _ffmpeg(args + list(codec) + ["-pix_fmt", "yuv420p", path])
    return path


def animated_webp(path: str, frames: list, durations_ms: list[int]) -> str:
    """A lossless animated WebP (Pillow) of ``frames`` (uint8 ``[h, w, 3]`` arrays), each shown for its duration:
    what FFmpeg reads as a 0x0 stream."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=list(durations_ms), lossless=True, loop=0)
    return path
