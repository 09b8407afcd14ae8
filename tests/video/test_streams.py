"""Files with several streams of a kind: every filter reads the main one (marked default, else the first), the one
a player shows, and the probe reports which it was; and what a stream says of its pixels (aspect, interlacing)."""

import numpy as np
import pytest
import torch

from pipeline.audio.decode import decode_audio
from pipeline.config import VideoConfig
from pipeline.errors import DecodeError
from pipeline.media import synthetic
from pipeline.media.item import MediaItem
from pipeline.media.probe import probe_media
from pipeline.video.decoders import available_backends, decode_video
from pipeline.video.sampling import Uniform

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _two_pictures(path, default: int | None):
    """A red 320x240 stream, then a blue 160x120 one; ``default`` marks one of them (None: both)."""
    flags = ["-disposition:v:0", "default", "-disposition:v:1", "default"] if default is None else [
        f"-disposition:v:{default}", "default", f"-disposition:v:{1 - default}", "0"]
    synthetic._ffmpeg(["-f", "lavfi", "-i", "color=c=red:size=320x240:rate=25:duration=2",
                       "-f", "lavfi", "-i", "color=c=blue:size=160x120:rate=25:duration=2",
                       "-map", "0", "-map", "1", "-c:v", "libx264", "-pix_fmt", "yuv420p", *flags, path])
    return path


def _colour(frames):
    return tuple(int(round(v)) for v in frames.float().mean(dim=(0, 1, 2)).tolist())


def _near(got, want):
    return all(abs(g - w) <= 12 for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("ext", ["mp4", "mkv"])
def test_the_default_video_stream_is_decoded_by_every_backend(tmp_path, ext):
    path = _two_pictures(str(tmp_path / f"two.{ext}"), default=1)
    info = probe_media(path)
    assert (info.video_streams, info.video.index, info.video.width, info.video.height) == (2, 1, 160, 120)
    request = Uniform(4)
    for names in (("decord", "torchcodec", "pyav"), ("torchcodec",), ("pyav",)):
        item = MediaItem("two", path, 0, [request], VideoConfig(), available_backends(names))
        video = item.video()
        assert video.backend != "decord" and video.frames.shape[1:3] == (120, 160), (names, video.backend)
        assert _near(_colour(video.view(request)), BLUE), (names, _colour(video.view(request)))
    tc = available_backends(("torchcodec",))[0]  # a decode without meta() first finds the main stream itself
    assert _near(_colour(tc.decode(path, [0, 5], (160, 120), "cpu", False)), BLUE)
    # decord decodes its own FFmpeg's pick, the red stream: it is not asked
    with pytest.raises(DecodeError, match="several video streams"):
        decode_video(path, [request], available_backends(("decord",)), several_streams=True)
    red = decode_video(path, [request], available_backends(("decord",)))  # what it would have given
    assert _near(_colour(red.frames), RED)


def test_with_no_single_default_the_first_stream_is_the_main_one(tmp_path):
    path = _two_pictures(str(tmp_path / "both.mkv"), default=None)
    assert probe_media(path).video.index == 0
    request = Uniform(2)
    for names in (("torchcodec",), ("pyav",)):
        video = MediaItem("both", path, 0, [request], VideoConfig(), available_backends(names)).video()
        assert _near(_colour(video.frames), RED) and video.frames.shape[1:3] == (240, 320), names


def test_the_default_audio_track_is_the_one_decoded(tmp_path):
    """A film's commentary or dub before the main track: the VAD must hear the track marked default."""
    path = str(tmp_path / "dub.mkv")
    synthetic._ffmpeg(["-f", "lavfi", "-i", "anullsrc=r=48000:cl=stereo", "-f", "lavfi", "-i",
                       "sine=frequency=440:sample_rate=44100:duration=2", "-t", "2", "-map", "0", "-map", "1",
                       "-c:a", "aac", "-disposition:a:0", "0", "-disposition:a:1", "default", path])
    info = probe_media(path)
    assert (info.audio_streams, info.audio.index, info.audio.sample_rate) == (2, 1, 44100)
    audio = decode_audio(path)
    rms = float(np.sqrt(np.mean(np.square(audio[4000:-4000]))))
    assert rms > 0.05  # lavfi's sine peaks at 1/8 (RMS 0.088); the first track is silent


def test_probe_reports_non_square_pixels_and_interlacing(tmp_path):
    """DVD-style anamorphic video stores a wide picture in narrow pixels; broadcast MPEG-2 is interlaced. The row
    says so (the frames the filters see have square pixels: ``test_anamorphic_video_is_decoded_with_square_pixels``,
    and are deinterlaced: ``test_deinterlace``)."""
    wide = str(tmp_path / "wide.mp4")
    synthetic._ffmpeg(["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25:duration=1", "-vf", "setsar=32/27",
                       "-c:v", "libx264", "-pix_fmt", "yuv420p", wide])
    v = probe_media(wide).video
    assert (v.width, v.height, v.sample_aspect_ratio, v.interlaced) == (320, 240, pytest.approx(32 / 27), False)
    turned = probe_media(synthetic.rotated_copy(wide, str(tmp_path / "turned.mp4"), 90)).video
    assert (turned.width, turned.height) == (240, 320)
    assert turned.sample_aspect_ratio == pytest.approx(27 / 32)  # the pixels turn with the picture
    tv = str(tmp_path / "tv.mpg")
    synthetic._ffmpeg(["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=50:duration=1", "-vf", "interlace",
                       "-c:v", "mpeg2video", "-flags", "+ilme+ildct", tv])
    assert probe_media(tv).video.interlaced
    assert probe_media(tv).video.field_order in ("tt", "bb")  # which field is shown first, as the stream says
    plain = probe_media(_two_pictures(str(tmp_path / "plain.mp4"), default=0)).video
    assert (plain.sample_aspect_ratio, plain.interlaced, plain.index) == (1.0, False, 0)


COLOURS = {  # name: ffmpeg output options
    "hdr10": ["-pix_fmt", "yuv420p10le", "-color_primaries", "bt2020", "-color_trc", "smpte2084",
              "-colorspace", "bt2020nc"],
    "hlg": ["-pix_fmt", "yuv420p10le", "-color_primaries", "bt2020", "-color_trc", "arib-std-b67",
            "-colorspace", "bt2020nc", "-color_range", "tv"],
    "hd": ["-pix_fmt", "yuv420p", "-color_primaries", "bt709", "-color_trc", "bt709", "-colorspace", "bt709"],
    "full_range": ["-pix_fmt", "yuvj420p", "-color_range", "pc", "-color_trc", "iec61966-2-1"],
    "untagged": ["-pix_fmt", "yuv420p"],
}


@pytest.mark.parametrize("name", sorted(COLOURS))
def test_probe_reports_the_colour_description_as_ffprobe_does(tmp_path, name):
    """HDR video (PQ, HLG) reaches the filters as coded, without tone mapping: the row says so, and names range,
    primaries, transfer and matrix as ffprobe does (the oracle here), None where the file does not say."""
    import json
    import subprocess

    path = str(tmp_path / f"{name}.mp4")
    synthetic._ffmpeg(["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=0.4", "-c:v", "libx264",
                       "-preset", "ultrafast", *COLOURS[name], path])
    ffprobe = json.loads(subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-of", "json", "-show_entries",
         "stream=color_range,color_primaries,color_transfer,color_space", path],
        capture_output=True, text=True, check=True).stdout)["streams"][0]
    v = probe_media(path).video
    for field in ("color_range", "color_primaries", "color_transfer", "color_space"):
        said = ffprobe.get(field)
        assert getattr(v, field) == (None if said in (None, "unknown", "reserved") else said), field
    assert v.hdr == (name in ("hdr10", "hlg"))
    if name == "hdr10":
        assert (v.color_transfer, v.color_primaries, v.pix_fmt) == ("smpte2084", "bt2020", "yuv420p10le")
    if name == "untagged":
        assert (v.color_primaries, v.color_transfer, v.color_space) == (None, None, None)


def test_a_stream_an_flv_adds_part_way_is_passed_over(tmp_path):
    """A caption in an FLV (an ``onTextData`` tag, as live streams carry them) makes a stream FFmpeg adds when it
    meets it, after the streams it found on opening. PyAV then raised IndexError at the end of every pass over the
    file (its flush asks for a stream it never listed): the item failed as a bug in a filter (found by fuzzing
    damaged files, where a garbled tag reads as one). The pictures, the sound and the probe are now as the file's
    without the caption."""
    from pipeline.video.decoders import PyAVBackend

    clean = str(tmp_path / "clean.flv")
    synthetic._ffmpeg(["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=4", "-f", "lavfi", "-i",
                       "sine=frequency=440:sample_rate=44100:duration=4", "-c:v", "libx264", "-preset", "ultrafast",
                       "-pix_fmt", "yuv420p", "-c:a", "aac", clean])
    captioned = synthetic.flv_caption_copy(clean, str(tmp_path / "captioned.flv"), share=0.7)
    assert np.array_equal(decode_audio(captioned), decode_audio(clean))
    request = Uniform(100)
    got = decode_video(captioned, [request], [PyAVBackend()], random_access=False)
    want = decode_video(clean, [request], [PyAVBackend()], random_access=False)
    assert got.frames.shape[0] == want.frames.shape[0] == 100 and torch.equal(got.frames, want.frames)
    assert probe_media(captioned).duration_s == probe_media(clean).duration_s


@pytest.mark.parametrize("ext", ["mkv", "mp4", "avi", "mp3", "wav"])
def test_a_file_whose_tags_are_not_utf8_decodes(tmp_path, ext):
    """A title in Latin-1 (as old tools and Windows code pages write tags; a damaged header reads as such): PyAV
    refused to open the file (``UnicodeDecodeError``), so every decode but the probe's failed and the item with it
    (found by fuzzing damaged files; the ffmpeg CLI decodes them whole). Every backend decodes it now."""
    import subprocess

    path = str(tmp_path / f"latin1.{ext}")
    pictures = ext not in ("mp3", "wav")
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    "sine=frequency=440:sample_rate=16000:duration=2",
                    *(["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=2"] if pictures else []),
                    "-metadata", b"title=Caf\xe9 cr\xe8me", path], check=True)
    assert probe_media(path).duration_s == pytest.approx(2.0, abs=0.1)
    assert len(decode_audio(path)) == pytest.approx(32000, abs=1600)  # an MP3 frame and its delay at most
    if pictures:
        seeking = ("decord", "torchcodec") if ext != "avi" else ()  # an AVI's MPEG-4 part 2: PyAV alone
        for backend in available_backends((*seeking, "pyav")):
            video = decode_video(path, [Uniform(5)], [backend], random_access=ext != "avi")
            assert video.frames.shape == (5, 120, 160, 3) and video.backend == backend.name, backend.name
