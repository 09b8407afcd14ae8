"""The chunked audio pipeline on real speech: schedule, merge, cuts, and the equivalence contract."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from pipeline.audio.cuts import Cut, final_check, guard, nms
from pipeline.audio.decode import decode_audio
from pipeline.audio.equivalence import measure, write_report
from pipeline.audio.pipeline import AudioParams, GpuPipelineParams, run_audio
from pipeline.audio.schedule import causal_length, chunk_schedule
from pipeline.audio.vad import SileroVAD, merge_segments
from pipeline.errors import DecodeError
from pipeline.media import synthetic


@settings(max_examples=200, deadline=None)
@given(st.floats(0.05, 400), st.floats(1, 30), st.floats(0, 0.45), st.floats(0, 2), st.sampled_from([512, 1024, 4096]))
def test_schedule_tiles_the_file_exactly(total, chunk, overlap_frac, halo, hop):
    # Oracle: valid regions are contiguous from 0 to n, aligned to the hop inside, each inside its processed span.
    overlap = overlap_frac * chunk
    plans = chunk_schedule(total, chunk, overlap, halo, hop)
    n = int(round(total * 16000))
    assert plans[0].valid_start == 0 and plans[-1].valid_end == n
    for a, b in zip(plans, plans[1:]):
        assert a.valid_end == b.valid_start and a.valid_start < a.valid_end
        assert b.valid_start % hop == 0 and b.start % hop == 0
    causal = causal_length(chunk, overlap, halo, hop)
    for p in plans:
        assert p.start <= p.valid_start and p.valid_end <= p.start + p.length
        assert p.length == plans[0].length and p.length % hop == 0
        assert p.valid_end - p.start <= causal <= p.length  # a causal stage reads causal_length samples of each


def test_short_gap_merge_and_boundary_union():
    assert merge_segments([(0.0, 1.0), (1.1, 2.0)], 0.12) == [(0.0, 2.0)]  # 100 ms gap merged
    assert merge_segments([(0.0, 1.0), (1.2, 2.0)], 0.12) == [(0.0, 1.0), (1.2, 2.0)]  # 200 ms kept
    assert merge_segments([(1.5, 3.0), (0.0, 2.0), (2.5, 2.8)], 0.12) == [(0.0, 3.0)]  # overlaps unioned


def test_nms_min_gap_and_final_check():
    cands = [(1.0, 0.9, "pause"), (1.3, 0.95, "breath"), (2.6, 0.5, "pause"), (2.7, 0.6, "pause")]
    assert nms(cands, 1.0) == [(1.3, 0.95, "breath"), (2.7, 0.6, "pause")]
    moved = [Cut(1.0, 1.3, "pause", 0.9), Cut(1.8, 1.7, "pause", 0.5), Cut(3.0, 3.0, "pause", 0.7)]
    kept = final_check(moved, 1.0)  # the guard moved two cuts within 1 s of each other: the weaker one goes
    assert [c.time_s for c in kept] == [1.0, 3.0]
    assert all(b.time_s - a.time_s >= 1.0 for a, b in zip(kept, kept[1:]))


def test_guard_moves_to_zero_crossing_or_quiet():
    sr = 16000
    t = np.arange(sr) / sr
    x = np.sin(2 * np.pi * 50 * t).astype(np.float32)  # zero crossings every 10 ms
    moved = guard(x, 0.503, sr, 0.02)
    assert abs(moved - 0.5) < 1 / sr + 1e-9
    y = np.ones(sr, np.float32)
    y[8000:8040] = 0.001  # no crossing: the quietest place
    assert abs(guard(y, 0.495, sr, 0.02) - 0.50125) < 0.002


@pytest.fixture(scope="module")
def long_speech(tmp_path_factory):
    path = synthetic.long_speech_wav(str(tmp_path_factory.mktemp("speech") / "long.wav"), repeats=2)
    return decode_audio(path)


@pytest.fixture(scope="module")
def vad():
    return SileroVAD()


def test_equivalence_contract_on_real_speech(long_speech, vad, tmp_path):
    from silero_vad import get_speech_timestamps

    params = AudioParams()
    assert len(long_speech) / 16000 > 4 * params.gpu_pipeline.chunk_seconds  # several chunks
    eq, chunked, whole = measure(long_speech, params, vad)
    write_report(eq, params, str(tmp_path / "eq.json"), str(tmp_path / "eq.md"))
    assert eq.chunks >= 5 and eq.cuts_whole >= 10
    assert eq.violations() == [], eq
    assert json.load(open(tmp_path / "eq.json"))["violations"] == []
    assert "| cut_mean_ms |" in (tmp_path / "eq.md").read_text()
    # STFT oracle independent of our chunking code: one torch.stft over the whole file
    from pipeline.audio.features import stft_magnitude

    direct = stft_magnitude(torch.from_numpy(long_speech)[None], params.n_fft, params.stft_hop)[0].numpy()
    assert chunked.features.mag.shape == direct.shape
    assert np.abs(chunked.features.mag - direct).mean() < 1e-4
    # the whole-file run reproduces silero's own timestamps exactly (same probabilities, same state machine)
    stamps = get_speech_timestamps(torch.from_numpy(long_speech), vad.model)
    assert whole.speech == merge_segments([(s["start"] / 16000, s["end"] / 16000) for s in stamps], 0.12)


def test_results_do_not_depend_on_batching(long_speech, vad):
    params = AudioParams()
    small = AudioParams(gpu_pipeline=GpuPipelineParams(batch_chunks=3))
    a = run_audio([long_speech], params, vad.probs)[0]
    b = run_audio([long_speech], small, vad.probs)[0]
    assert np.allclose(a.probs, b.probs, atol=1e-5) and [c.time_s for c in a.cuts] == [c.time_s for c in b.cuts]
    # several files at once: each equals its own run, in its own time base
    both = run_audio([long_speech[: 16000 * 30], long_speech], params, vad.probs)
    assert [c.time_s for c in both[1].cuts] == [c.time_s for c in a.cuts]
    assert both[0].duration_s == pytest.approx(30.0)


def test_an_audio_decode_stops_when_its_item_is_given_up(tmp_path):
    # The oracle: the same file decodes without the event set, and raises at its first frame with it set, so the
    # decode of a stuck item's audio does not go on for a row nobody writes.
    import threading

    from pipeline.errors import ItemTimeout

    path = synthetic.speech_wav(str(tmp_path / "s.wav"), "Given up.")
    given_up = threading.Event()
    assert len(decode_audio(path, given_up=given_up)) > 0
    given_up.set()
    with pytest.raises(ItemTimeout, match="given up"):
        decode_audio(path, given_up=given_up)


def test_eight_khz_and_any_input_rate(tmp_path, vad):
    path = synthetic.speech_wav(str(tmp_path / "s44.wav"), "Testing another sample rate, with two channels.",
                                rate_hz=44100)
    a16 = decode_audio(path, 16000)
    a8 = decode_audio(path, 8000)
    assert len(a16) == pytest.approx(2 * len(a8), rel=0.01)
    r8 = run_audio([a8], AudioParams(sample_rate=8000, gpu_pipeline=GpuPipelineParams(align_hop=4096)),
                   SileroVAD(8000).probs)[0]
    r16 = run_audio([a16], AudioParams(), vad.probs)[0]
    assert r8.speech and r16.speech
    assert r8.speech[0][0] == pytest.approx(r16.speech[0][0], abs=0.15)


def _lag_s(a: np.ndarray, ref: np.ndarray, sr: int = 16000) -> float:
    """Where ``ref``'s speech sits in ``a``, by cross-correlation of the first two seconds of ``ref``."""
    seg = ref[: 2 * sr]
    corr = np.correlate(a, seg, mode="valid")
    return float(np.argmax(corr)) / sr


@pytest.fixture(scope="module")
def speech_track(tmp_path_factory):
    return synthetic.speech_wav(str(tmp_path_factory.mktemp("track") / "s.wav"),
                                "A delayed audio track must still line up with the pictures.")


@pytest.mark.parametrize("container,codec", [("mp4", "aac"), ("ts", "aac"), ("mkv", "flac")])
def test_a_delayed_audio_track_lines_up_with_the_video(tmp_path, speech_track, container, codec):
    """Audio that starts 0.7 s after the video (``-itsoffset``): speech times are on the file's timeline, where
    ``ffmpeg -ss`` and the video frames are, not counted from the audio's first sample."""
    path = str(tmp_path / f"delayed.{container}")
    synthetic._ffmpeg(["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=5", "-itsoffset", "0.7",
                       "-i", speech_track, "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
                       "-c:a", codec, path])
    ref = decode_audio(speech_track)
    assert _lag_s(decode_audio(path), ref) == pytest.approx(0.7, abs=0.01)
    assert _lag_s(decode_audio(speech_track), ref) == 0.0


def test_surround_keeps_the_dialogue_level(tmp_path, speech_track):
    """5.1 with the speech in the centre channel: the mono downmix is that channel at its own level, not a sixth of
    it. Stereo is the mean of its two channels: a dual-mono recording is the recording (FFmpeg's float downmix made
    it 1.41x, past 1.0), speech on one side only is half of it."""
    ref = decode_audio(speech_track)
    for layout, pan, gain in (("5.1", "pan=5.1|c2=c0", 1.0), ("stereo", "pan=stereo|c0=c0|c1=c0", 1.0),
                              ("left", "pan=stereo|c0=c0", 0.5)):
        path = str(tmp_path / f"{layout}-{gain}.wav")
        synthetic._ffmpeg(["-i", speech_track, "-af", pan, "-c:a", "pcm_f32le", path])
        got = decode_audio(path)
        n = min(len(got), len(ref))
        assert np.abs(got[:n] - gain * ref[:n]).max() < 1e-4, (layout, gain)


def test_a_gap_in_the_audio_timestamps_is_filled_with_silence(tmp_path, speech_track):
    path = str(tmp_path / "gap.mkv")  # timestamps from 1.5 s on are one second later: dropped packets
    synthetic._ffmpeg(["-i", speech_track, "-af", r"asetpts=PTS+if(gte(T\,1.5)\,1.0/TB\,0)", "-c:a", "flac", path])
    ref = decode_audio(speech_track)
    a = decode_audio(path)
    assert len(a) == pytest.approx(len(ref) + 16000, abs=400)
    tail = ref[32000:40000]  # 2.0-2.5 s of the original sits at 3.0-3.5 s
    assert float(np.argmax(np.correlate(a[40000:56000], tail, mode="valid"))) / 16000 == pytest.approx(0.5, abs=0.005)
    with pytest.raises(DecodeError, match="jumps"):
        decode_audio(path, max_seconds=2.0)  # the silence counts against the cap, before it is allocated


def _wav(path: str, samples: np.ndarray, rate: int = 16000) -> str:
    """Mono float samples as a 16-bit WAV file."""
    import wave

    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


FILM = ("-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=60")  # longer than the speech: -shortest


@pytest.mark.parametrize("ext,encode,reported,slack_s", [
    ("m4a", (), True, 0.05), ("mp3", ("-b:a", "32k"), True, 0.05), ("flac", (), False, 0.05),
    pytest.param("mp3", ("-q:a", "4"), True, 0.05, id="vbr-mp3"),
    pytest.param("avi", ("-c:a", "pcm_s16le"), True, 0.13, id="avi-pcm"),
    pytest.param("avi", ("-c:a", "libmp3lame", "-q:a", "4"), True, 0.05, id="avi-vbr-mp3")])
def test_a_corrupt_stretch_in_a_recording_is_silence_and_the_rest_keeps_its_place(tmp_path, long_speech, caplog,
                                                                                  ext, encode, reported, slack_s):
    """AAC in MP4 (a podcast, a video's sound track), an MP3 at a constant and one at a variable bit rate, a FLAC,
    and PCM and a variable bit rate MP3 in AVI (a camera's or an old download's sound), with 2% of their bytes zeroed
    at the middle: the packets that do not decode are passed over and the time they held is silence (the MP4's
    packets carry their times; the constant rate MP3's stretch is as long as its bytes say, the variable rate one's
    as the frames its Xing header counts and nothing decoded; the AVI's chunks are timed by the file's index, which
    says how many the demuxer passed over); the speech after it is where it was (the clean decode's samples from a
    second past the stretch on). Before, the first two ended at the stretch; the FLAC decoder passes over it
    itself, but the three frames it made of the stretch, untimed, were not counted in the time, and the speech after
    it came 0.216 s late; the AVI's demuxer passed over the stretch without an error and the speech after it came
    early by the time it held, with nothing said. The span may miss the end of the packet before the stretch
    (``slack_s``): zeroed PCM decodes, as silence (an AVI's chunk of it here is 0.128 s)."""
    import logging

    from pipeline.media import damage

    clean = str(tmp_path / f"speech.{ext}")
    synthetic._ffmpeg(["-i", _wav(str(tmp_path / "speech.wav"), long_speech), *encode, clean])
    ref = decode_audio(clean)
    before = damage.counts()["audio_packets_lost"]
    tally = damage.ItemDamage()
    token = damage.current_damage.set(tally)  # as the rank's consumer sets it: the item's row counts the packets
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.audio.decode"):
            got = decode_audio(synthetic.zeroed_middle_copy(clean, str(tmp_path / f"bad.{ext}")))
    finally:
        damage.current_damage.reset(token)
    assert len(got) == pytest.approx(len(ref), abs=0.04 * 16000)  # an MP3 frame at most
    zero = np.flatnonzero(got[:-1] == 0)
    lost = zero[(zero > len(ref) * 0.3) & (zero < len(ref) * 0.7)]  # the stretch: exact zeros where ref speaks
    assert len(lost) > 0.5 * 16000 and np.abs(ref[lost]).max() > 0.05
    after = lost[-1] + 16000
    n = min(len(got), len(ref))
    assert np.abs(got[after:n] - ref[after:n]).mean() < 1e-3 and _lag_s(got[after:n], ref[after:n]) == 0.0
    assert np.array_equal(got[: lost[0] - 16000], ref[: lost[0] - 16000])
    warned = any("audio packets" in r.getMessage() and "did not decode" in r.getMessage() for r in caplog.records)
    assert warned == reported and (damage.counts()["audio_packets_lost"] > before) == reported  # corrupt_media
    assert tally.audio_packets_lost == damage.counts()["audio_packets_lost"] - before  # 0 for the FLAC: decoded whole
    if reported:  # the row's span of the silence: where the clean decode spoke and this one is silent
        (span,) = tally.spans
        assert span["stream"] == "audio"
        a, b = round(span["start_s"] * 16000), round(span["end_s"] * 16000)
        assert b - a > 0.5 * 16000 and not got[a + 1:b - 1].any()  # silence all through
        spoken = lost[np.abs(ref[lost]) > 0.05]  # silent where the clean decode speaks: inside the span
        assert a - slack_s * 16000 <= spoken[0] and spoken[-1] <= b + slack_s * 16000
    else:
        assert tally.spans == []


@pytest.mark.parametrize("ext,film,encode", [
    pytest.param("flac", False, ("-c:a", "flac"), id="flac"),
    pytest.param("flv", True, ("-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", "-shortest"), id="flv-aac"),
    pytest.param("mpg", True, ("-c:v", "mpeg2video", "-c:a", "mp2", "-shortest"), id="mpeg-ps-mp2")])
@pytest.mark.parametrize("garbled", [1, 3])
def test_a_recording_whose_first_packets_do_not_decode_starts_with_their_silence(tmp_path, long_speech, ext, film,
                                                                                  encode, garbled):
    """Flipped bytes in the first audio packets (found by fuzzing damaged files): the ffmpeg CLI decodes the rest,
    and so does the job now, the time they held silence and every frame after them in its place (the clean decode's
    samples; an AAC decoder's noise substitution draws from a generator the lost frames no longer advanced, so
    there within a small mean difference). Before, the probe of the FLAC failed ("first frame does not decode") and
    the audio of both ended before it began ("audio does not decode"): the item failed. The raw FLAC's frames number
    themselves and FLV's and MPEG-PS's packets carry their times; where they do not (MP3, ADTS), a stretch at the
    start is as one in the middle at a variable bit rate."""
    import av

    from pipeline.media.probe import probe_media

    clean = str(tmp_path / f"clean.{ext}")
    synthetic._ffmpeg([*(FILM if film else ()), "-i", _wav(str(tmp_path / "s.wav"), long_speech), *encode, clean])
    bad = synthetic.garbled_packets_copy(clean, str(tmp_path / f"bad.{ext}"), "audio", garbled)
    ref = decode_audio(clean)
    assert probe_media(bad).duration_s == probe_media(clean).duration_s
    got = decode_audio(bad)
    assert len(got) == len(ref)
    with av.open(clean) as c:  # where the first packet after those garbled begins (a FLAC's parser joins them)
        stream = c.streams.audio[0]
        times = [float(p.pts * stream.time_base) for p in c.demux(stream) if p.size][:garbled + 1]
    lost = round((times[-1] - times[0]) * 16000)
    start = np.flatnonzero(got)[0]  # the silence of the frames lost; the first frame after them decodes
    assert lost - 16 <= start <= lost + 1200  # the decoder's first frame after a loss may start quiet
    after = start + 16000
    assert _lag_s(got[after:], ref[after:]) == 0.0
    assert np.abs(got[after:] - ref[after:]).mean() < (1e-3 if ext != "flac" else 1e-6)


def test_a_flac_captured_part_way_through_a_stream_starts_with_its_first_frame(tmp_path, long_speech):
    """A FLAC written to a pipe counts no samples in its header, and one captured from a live stream numbers its
    frames on from the stream's: its audio starts with its first frame, as before, though a FLAC whose header counts
    its samples now starts at sample 0 (where its first frames are lost, their silence: the test above)."""
    import subprocess

    import av

    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", _wav(str(tmp_path / "s.wav"), long_speech), "-t", "20",
                          "-f", "flac", "pipe:1"], capture_output=True, check=True).stdout
    whole = tmp_path / "pipe.flac"
    whole.write_bytes(raw)
    with av.open(str(whole)) as c:
        packets = [p for p in c.demux(c.streams.audio[0]) if p.size]
    joined = packets[20]  # the capture begins at this frame: the header, then the frames from it on
    capture = tmp_path / "capture.flac"
    capture.write_bytes(raw[:packets[0].pos] + raw[joined.pos:])
    full, got = decode_audio(str(whole)), decode_audio(str(capture))
    assert len(got) == len(full) - joined.pts
    assert np.array_equal(got, full[joined.pts:])


def test_a_corrupt_stretch_in_an_mpeg_ps_film_keeps_its_sound_in_place(tmp_path, long_speech):
    """A DVD rip's or a broadcast capture's MPEG-PS with a stretch zeroed from inside one MP2 packet to just inside
    one 30 packets (2.16 s) on: the demuxer passes over the packets between without an error and the one after the
    stretch, its head lost, does not decode. Its packets carry their times, so the speech after is where they say
    (the clean decode's samples). Before, the stream was taken for a raw one whose demuxer counts packets: the bytes
    of the packet that failed were added to a time that already held the stretch, and the audio after it came
    2.1 s early (found by fuzzing damaged files)."""
    import av

    clean = str(tmp_path / "film.mpg")
    synthetic._ffmpeg(["-i", _wav(str(tmp_path / "s.wav"), long_speech), *FILM, "-c:v", "mpeg2video", "-c:a", "mp2",
                       "-shortest", clean])
    data = bytearray(open(clean, "rb").read())
    with av.open(clean) as c:
        origin = c.start_time / av.time_base  # the decode's zero
        packets = [p for p in c.demux(c.streams.audio[0]) if p.size]
        first, last = packets[len(packets) // 2], packets[len(packets) // 2 + 30]
        a = data.find(bytes(first)[:64], first.pos) + 32
        b = data.find(bytes(last)[:64], last.pos) + 100
    data[a:b] = bytes(b - a)
    bad = str(tmp_path / "bad.mpg")
    open(bad, "wb").write(data)
    ref, got = decode_audio(clean), decode_audio(bad)
    assert len(got) == len(ref)
    before, after = (round((float(p.pts * p.time_base) - origin) * 16000) for p in (first, last))
    assert np.array_equal(got[:before], ref[:before])
    assert _lag_s(got[after + 16000:], ref[after + 16000:]) == 0.0
    assert np.abs(got[after + 16000:] - ref[after + 16000:]).mean() < 1e-4


def _zeroed(src: str, dst: str, *at: float, fraction: float = 0.02) -> str:
    """A copy of ``src`` with ``fraction`` of its bytes zeroed at each share ``at`` of them."""
    data = bytearray(open(src, "rb").read())
    for share in at:
        a, n = int(len(data) * share), int(len(data) * fraction)
        data[a:a + n] = bytes(n)
    open(dst, "wb").write(data)
    return dst


@pytest.mark.parametrize("case", ["no-xing", "cut-short", "two-stretches", "to-the-end"])
def test_a_corrupt_stretch_in_a_variable_bit_rate_mp3_that_cannot_tell_its_length_ends_it(tmp_path, long_speech,
                                                                                          case):
    """A raw stream whose packets vary in size: how long a stretch was is known only from the frames the Xing
    header counts, and only for one stretch in a file that holds every byte the header states. Without the header,
    in a file cut short (the frames missing at the end would be taken for the stretch's), or at a second stretch
    (the two shares are unknown), the audio ends at the (first) stretch, as before, and the row says what is lost:
    from there to the file's stated (or estimated) end; as where nothing decodes after the stretch."""
    from pipeline.media import damage

    clean = str(tmp_path / "speech.mp3")
    xing = () if case != "no-xing" else ("-write_xing", "0")
    synthetic._ffmpeg(["-i", _wav(str(tmp_path / "speech.wav"), long_speech), "-q:a", "4", *xing, clean])
    whole = len(decode_audio(clean))
    bad = str(tmp_path / "bad.mp3")
    if case == "cut-short":
        _zeroed(clean, bad, 0.5)
        data = open(bad, "rb").read()
        open(bad, "wb").write(data[: len(data) * 9 // 10])
    elif case == "to-the-end":
        _zeroed(clean, bad, 0.94, fraction=0.06)
    else:
        _zeroed(clean, bad, *((0.3, 0.6) if case == "two-stretches" else (0.5,)))
    tally = damage.ItemDamage()
    token = damage.current_damage.set(tally)
    try:
        got = len(decode_audio(bad))
    finally:
        damage.current_damage.reset(token)
    first = {"two-stretches": 0.3, "to-the-end": 0.94}.get(case, 0.5)
    assert got < (first + 0.05) * whole
    (span,) = tally.spans  # from where the audio ends to the file's stated end
    assert span["stream"] == "audio" and span["start_s"] == pytest.approx(got / 16000, abs=0.05)
    if case != "no-xing":  # without the header FFmpeg estimates the end from the bit rate
        assert span["end_s"] == pytest.approx(whole / 16000, abs=0.5)


def _cut_at_a_packet(whole: str, cut: str, share: float = 0.4) -> str:
    """``cut``: the bytes of ``whole`` up to the start of the main audio stream's packet nearest ``share`` of them,
    a download that stopped between packets (no partial packet whose decode error would say so)."""
    import av

    data = open(whole, "rb").read()
    with av.open(whole) as c:
        starts = [p.pos for p in c.demux(c.streams.audio[0]) if p.size and p.pos is not None and p.pos > 0]
    at = min(starts, key=lambda pos: abs(pos - share * len(data)))
    open(cut, "wb").write(data[:at])
    return cut


def _seconds_and_tally(path: str):
    """The seconds ``path``'s sound decodes to, and its item's tally of damage."""
    from pipeline.media import damage

    tally = damage.ItemDamage()
    token = damage.current_damage.set(tally)
    try:
        return len(decode_audio(path)) / 16000, tally
    finally:
        damage.current_damage.reset(token)


_COVER = ("-f", "lavfi", "-i", "color=c=red:s=64x64:d=0.04", "-map", "0", "-map", "1", "-c:v", "png",
          "-disposition:v", "attached_pic", "-id3v2_version", "3")


@pytest.mark.parametrize("ext,encode", [
    ("m4a", ("-c:a", "aac", "-movflags", "+faststart")), ("mka", ("-c:a", "aac")), ("webm", ("-c:a", "libopus")),
    ("flac", ("-c:a", "flac")), ("wav", ("-c:a", "pcm_s16le")), ("wav", ("-c:a", "pcm_f32le", "-rf64", "always")),
    ("wav", ("-c:a", "adpcm_ms")), ("mp3", ("-c:a", "libmp3lame", "-b:a", "128k")),
    ("mp3", (*_COVER, "-c:a", "libmp3lame", "-q:a", "4")), ("wma", ("-c:a", "wmav2"))],
    ids=["m4a", "mka", "webm", "flac", "wav", "rf64", "adpcm-wav", "mp3-info", "mp3-xing-cover", "wma"])
def test_a_recording_cut_short_says_so_in_the_items_tally(tmp_path, ext, encode):
    """A download of 6 s of sound that stopped between packets at 40% of its bytes decodes as its prefix without an
    error: its header lists more packets than demux (M4A), or states an end that every stream ends well before (Matroska
    and WebM's duration, FLAC's sample count, a PCM WAV's data size, an ADPCM WAV's ``fact`` count, an MP3's Xing or
    Info frame count, behind an ID3 tag with a cover picture, a WMA's play duration), so the row's span runs from where
    the sound ends to the stated end (FFmpeg gives a WAV cut short the duration of what it holds); the whole recording
    has none."""

    whole = str(tmp_path / f"whole.{ext}")
    synthetic._ffmpeg(["-f", "lavfi", "-i", "sine=frequency=440:duration=6", *encode, whole])
    cut = _cut_at_a_packet(whole, str(tmp_path / f"cut.{ext}"))
    for path, lost in ((whole, False), (cut, True)):
        n, tally = _seconds_and_tally(path)
        if not lost:
            assert n == pytest.approx(6.0, abs=0.1) and tally.spans == []  # WMA's last packet: 6.08 s
            continue
        (span,) = tally.spans
        assert 1.5 < n < 3.5 and span["stream"] == "audio" and tally.audio_packets_lost == 0
        assert span["start_s"] == pytest.approx(n, abs=1e-3) and span["end_s"] == pytest.approx(6.0, abs=0.06)


def test_the_header_readers_take_only_what_a_header_states(tmp_path):
    """The readers of a header's stated end say nothing where it states none or cannot be read (the end of what the file
    holds then stands): a WAV cut inside its header or with no ``fmt `` chunk before its data, a missing file, an FLV
    whose ``onMetaData`` says 0 or NaN, a WMV flagged a broadcast or cut inside its header, an MP3 whose Xing header
    does not flag a frame count; and read it where it does (a Xing or VBRI frame count behind a 1 kB ID3 tag, an RF64
    data size from its ``ds64``)."""
    import struct

    from pipeline.media.probe import (ASF_FILE_PROPERTIES, ASF_HEADER, asf_stated_seconds, flv_stated_seconds,
                                      mp3_counts_frames, wav_stated_seconds)

    def write(name: str, data: bytes) -> str:
        (tmp_path / name).write_bytes(data)
        return str(tmp_path / name)

    fmt = b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16)
    riff = b"RIFF" + struct.pack("<I", 0) + b"WAVE"
    assert wav_stated_seconds(write("ok.wav", riff + fmt + b"data" + struct.pack("<I", 64000))) == 2.0
    assert wav_stated_seconds(write("head.wav", (riff + fmt)[:20])) is None
    assert wav_stated_seconds(write("nofmt.wav", riff + b"data" + struct.pack("<I", 64000))) is None
    assert wav_stated_seconds(write("piped.wav", riff + fmt + b"data" + b"\xff" * 4)) is None
    assert wav_stated_seconds(str(tmp_path / "missing.wav")) is None
    ds64 = b"ds64" + struct.pack("<IQQQI", 28, 0, 96000, 0, 0)
    rf64 = b"RF64" + b"\xff" * 4 + b"WAVE" + ds64 + fmt + b"data" + b"\xff" * 4
    assert wav_stated_seconds(write("big.wav", rf64)) == 3.0
    assert wav_stated_seconds(write("not.wav", b"OggS" + bytes(40))) is None

    def flv(seconds: float) -> bytes:
        return b"FLV\x01\x05" + bytes(20) + b"\x00\x08duration\x00" + struct.pack(">d", seconds)

    assert flv_stated_seconds(write("a.flv", flv(12.5))) == 12.5
    assert flv_stated_seconds(write("b.flv", flv(0.0))) is None
    assert flv_stated_seconds(write("c.flv", flv(float("nan")))) is None
    assert flv_stated_seconds(write("d.flv", b"RIFF" + flv(12.5)[3:])) is None

    def asf(play_s: float, preroll_ms: int, flags: int) -> bytes:
        return ASF_HEADER + bytes(14) + ASF_FILE_PROPERTIES + struct.pack("<Q", 104) + bytes(40) + struct.pack(
            "<QQQI", int(play_s * 1e7), 0, preroll_ms, flags) + bytes(16)

    assert asf_stated_seconds(write("a.wmv", asf(9.1, 3100, 2))) == pytest.approx(6.0)
    assert asf_stated_seconds(write("live.wmv", asf(9.1, 3100, 1))) is None  # a broadcast: no valid duration
    assert asf_stated_seconds(write("short.wmv", asf(9.1, 3100, 2)[:60])) is None
    assert asf_stated_seconds(write("not.wmv", bytes(16) + asf(9.1, 3100, 2)[16:])) is None

    frame = b"\xff\xfb\x90\x64" + bytes(32)  # MPEG-1 layer III, stereo: 32 bytes of side information
    id3 = b"ID3\x03\x00\x00" + bytes([0, 0, 8, 0]) + bytes(1024)  # a tag of 1024 bytes (7-bit size bytes)
    assert mp3_counts_frames(write("xing.mp3", id3 + frame + b"Xing" + struct.pack(">II", 1, 230) + bytes(64)))
    assert not mp3_counts_frames(write("flags.mp3", id3 + frame + b"Xing" + struct.pack(">II", 0, 0) + bytes(64)))
    vbri = frame + b"VBRI" + struct.pack(">HHHII", 1, 0, 0, 9000, 230) + bytes(64)
    assert mp3_counts_frames(write("vbri.mp3", vbri))
    assert not mp3_counts_frames(write("plain.mp3", frame + bytes(200)))
    assert not mp3_counts_frames(write("empty.mp3", b""))


def test_the_size_a_header_states_is_read_where_it_is_stated(tmp_path):
    """The bytes a header says its file has (the end of a file that was not cut short): an FLV's ``filesize``, an
    ASF's file size, a Matroska Segment's size (from where its data starts), an MP3's Xing byte count (from its
    frame, behind an ID3 tag); none where the size is unknown (a Matroska file written live), not a number, not
    flagged, or the file is missing; a file holds its stated size when it has at least those bytes."""
    import struct

    from pipeline.media.probe import ASF_FILE_PROPERTIES, ASF_HEADER, holds_stated_size, stated_size

    def write(name: str, data: bytes) -> str:
        (tmp_path / name).write_bytes(data)
        return str(tmp_path / name)

    def flv(size: float) -> bytes:
        return b"FLV\x01\x05" + bytes(20) + b"\x00\x08filesize\x00" + struct.pack(">d", size) + bytes(10)

    assert stated_size(write("a.flv", flv(5000.0))) == 5000 and not holds_stated_size(str(tmp_path / "a.flv"))
    assert stated_size(write("b.flv", flv(float("nan")))) is None and stated_size(write("c.flv", flv(0.0))) is None
    assert holds_stated_size(write("d.flv", flv(40.0)))  # 43 bytes on disk
    asf = ASF_HEADER + bytes(14) + ASF_FILE_PROPERTIES + struct.pack("<Q", 104) + bytes(16) + struct.pack("<Q", 999)
    assert stated_size(write("a.wmv", asf + bytes(64))) == 999
    ebml = b"\x1a\x45\xdf\xa3" + b"\x84" + bytes(4)  # an EBML header of 4 bytes, then the Segment
    assert stated_size(write("a.mkv", ebml + b"\x18\x53\x80\x67" + b"\x42\x00" + bytes(600))) == 9 + 6 + 512
    assert holds_stated_size(str(tmp_path / "a.mkv"))  # 615 bytes on disk, 527 stated
    assert stated_size(write("live.mkv", ebml + b"\x18\x53\x80\x67" + b"\x01" + b"\xff" * 7 + bytes(64))) is None
    assert stated_size(write("other.mkv", ebml + b"\x1f\x43\xb6\x75" + b"\x84" + bytes(64))) is None
    frame = b"\xff\xfb\x90\x64" + bytes(32)
    id3 = b"ID3\x03\x00\x00" + bytes([0, 0, 8, 0]) + bytes(1024)
    assert stated_size(write("a.mp3", id3 + frame + b"Xing" + struct.pack(">III", 3, 230, 9000) + bytes(64))) == (
        1034 + 9000)
    assert stated_size(write("b.mp3", id3 + frame + b"Xing" + struct.pack(">II", 1, 230) + bytes(64))) is None
    assert stated_size(str(tmp_path / "missing.flv")) is None and not holds_stated_size(str(tmp_path / "missing"))


def _silence_then_noise_mp3(path: str) -> str:
    """A variable bit rate MP3 without a Xing header whose first frames are silent: FFmpeg estimates its duration
    from their low bit rate, 33.6 s for 20."""
    synthetic._ffmpeg(["-f", "lavfi", "-i", "anoisesrc=d=20:a=0.5", "-af", "volume='if(lt(t,10),0,1)':eval=frame",
                       "-c:a", "libmp3lame", "-q:a", "4", "-write_xing", "0", path])
    return path


def test_files_whose_header_states_no_end_are_not_called_cut_short(tmp_path):
    """Where the header states no end, only what the file holds says where it ends: a WAV or FLAC written to a pipe
    (data size 0xFFFFFFFF, sample count 0), an Ogg, and an MP3 without a Xing header, whose duration FFmpeg
    estimates from its first frames' bit rate (far past its end here: a whole file must not be called cut short).
    Cut short, such files decode as their prefix with nothing in the row (a limit, in the README)."""
    import subprocess

    import av


    files = [_silence_then_noise_mp3(str(tmp_path / "vbr.mp3"))]
    with av.open(files[0]) as c:
        assert c.duration / av.time_base > 30  # the estimate a header-less check would take for the end
    for ext, codec in (("wav", "pcm_s16le"), ("flac", "flac"), ("ogg", "libvorbis")):
        files.append(str(tmp_path / f"piped.{ext}"))
        with open(files[-1], "wb") as out:
            subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=duration=20", "-c:a", codec,
                            "-f", ext, "-"], stdout=out, check=True)
    assert open(files[1], "rb").read(8)[4:] == b"\xff\xff\xff\xff"  # the RIFF size a pipe leaves
    for whole in files:
        for path in (whole, _cut_at_a_packet(whole, whole + ".cut")):
            n, tally = _seconds_and_tally(path)
            assert tally.spans == [], path
            assert n == pytest.approx(20.0, abs=0.06) if path == whole else 4 < n < 12, (path, n)


def _tone_hz(x: np.ndarray, sr: int = 16000) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum)) * sr / len(x)


def _ts_segment(path: str, hz: int, rate: int, channels: int, offset_s: float = 0.0) -> str:
    synthetic._ffmpeg(["-f", "lavfi", "-i", f"sine=frequency={hz}:sample_rate={rate}:duration=2",
                       "-ac", str(channels), "-c:a", "aac", "-output_ts_offset", str(offset_s), "-f", "mpegts", path])
    return path


def test_a_recording_that_switches_audio_format_decodes_whole(tmp_path):
    """A TV recording switches from 48 kHz stereo to 44.1 kHz 5.1 at an ad break (two TS recordings spliced): one
    resampler cannot take both (PyAV raised ValueError and the item failed)."""
    path = str(tmp_path / "switch.ts")
    with open(path, "wb") as out:
        for seg in (_ts_segment(str(tmp_path / "a.ts"), 440, 48000, 2),
                    _ts_segment(str(tmp_path / "b.ts"), 660, 44100, 6)):
            out.write(open(seg, "rb").read())
    a = decode_audio(path)
    assert len(a) == pytest.approx(4 * 16000, abs=1600)
    assert _tone_hz(a[8000:24000]) == pytest.approx(440, abs=5)
    assert _tone_hz(a[-24000:-8000]) == pytest.approx(660, abs=5)


def test_a_splice_in_mpeg_ts_is_not_an_hour_of_silence(tmp_path):
    """The second recording's clock is an hour later. In MPEG-TS (timestamps may restart at a splice) such a jump
    is a discontinuity, as ffmpeg treats it, not missing audio to fill."""
    path = str(tmp_path / "splice.ts")
    with open(path, "wb") as out:
        for seg in (_ts_segment(str(tmp_path / "a.ts"), 440, 48000, 2),
                    _ts_segment(str(tmp_path / "b.ts"), 660, 48000, 2, offset_s=3600)):
            out.write(open(seg, "rb").read())
    a = decode_audio(path, max_seconds=600)
    assert len(a) == pytest.approx(4 * 16000, abs=1600)


def test_audio_decode_errors(tmp_path, media_dir):
    with pytest.raises(DecodeError, match="no audio stream"):
        decode_audio(f"{media_dir}/still.mp4")
    with pytest.raises(DecodeError):
        decode_audio(f"{media_dir}/broken/random.mp4")
    with pytest.raises(DecodeError, match="cap"):
        decode_audio(f"{media_dir}/speech.wav", max_seconds=0.1)
    assert decode_audio(f"{media_dir}/motion.mp4").shape[0] == pytest.approx(16000, rel=0.05)  # a video's audio


def test_speech_cuts_in_the_job(tmp_path, media_dir, long_speech):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.config import build_config, validate_config
    from pipeline.distributed import DistContext
    from pipeline.runner import run_rank
    from tests.conftest import base_config, make_corpus, write_manifest

    rows = make_corpus(str(tmp_path / "c"), media_dir, 3, kinds=("speech.wav", "still.mp4", "motion.mp4"))
    synthetic.long_speech_wav(str(tmp_path / "c" / "long.wav"), repeats=1)
    rows.append({"video_id": "long", "video_path": "long.wav", "batch": 0})
    rows.append({"video_id": "capped", "video_path": "long.wav", "batch": 0})
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    raw = base_config(manifest, str(tmp_path / "c"), str(tmp_path / "out"), str(tmp_path / "cache"),
                      filters={"speech_cuts": {"min_speech_ms": 250}})
    cfg = build_config(raw)
    validate_config(cfg)
    outcome = run_rank(cfg, DistContext())
    assert outcome.summary["this_run"]["succeeded"] == 5
    table = pq.read_table(str(tmp_path / "out" / "parts"))
    assert pa.types.is_list(table.schema.field("speech_cuts").type.field("speech").type)
    by_id = {r["video_id"]: r["speech_cuts"] for r in table.to_pylist()}
    long = by_id["long"]
    assert long["chunking"]["chunks"] >= 4 and long["speech_ratio"] > 0.5 and len(long["cuts"]) >= 5
    assert [p["duration_s"] for p in long["pieces"]] == pytest.approx(
        [b - a for a, b in zip([0.0] + long["cuts"], long["cuts"] + [long["duration_s"]])])
    assert by_id["id-0001"] is None  # a video without an audio stream
    assert by_id["id-0002"]["speech"] == [] and by_id["id-0002"]["cuts"] == []  # a sine tone is not speech
    # the same file run with a cap below its length fails with a typed error, and nothing else does
    raw["filters"] = {"speech_cuts": {"max_seconds": 5.0}}
    raw["output"]["dir"] = str(tmp_path / "out2")
    cfg = build_config(raw)
    validate_config(cfg)
    run_rank(cfg, DistContext())
    types = {r["video_id"]: r["result_info"]["error_type"] for r in pq.read_table(str(tmp_path / "out2" / "parts")).to_pylist()}
    assert types["long"] == "DecodeError" and types["id-0000"] is None


def test_speech_cuts_config_errors():
    from pipeline.config import FilterSpec
    from pipeline.errors import ConfigError
    from pipeline.filters import validate_filter_specs

    for params, msg in [({"sample_rate": 22050}, "16000 or 8000"), ({"gpu_pipeline": {"align_hop": 1000}}, "multiple"),
                        ({"gpu_pipeline": {"overlap_seconds": 20}}, "overlap_seconds"),
                        ({"gpu_pipeline": {"bogus": 1}}, "unknown key"),
                        ({"vad_backend": "onnx_sequence", "sample_rate": 8000}, "onnx_sequence takes 16000 Hz")]:
        with pytest.raises(ConfigError, match=msg):
            validate_filter_specs((FilterSpec("a", "speech_cuts", True, params),))


def test_feature_cache_window_and_times():
    from pipeline.audio.features import FeatureCache

    mags = np.arange(100 * 3, dtype=np.float32).reshape(100, 3)
    cache = FeatureCache(mags, hop=256, sample_rate=16000)  # frames every 16 ms
    w = cache.get_window(0.4, 0.1)  # frames starting within 50 ms of 400 ms: 350..450 ms -> frames 22..28
    assert w.shape == (7, 3) and w[0, 0] == mags[22, 0] and w[-1, 0] == mags[28, 0]
    assert cache.get_window(0.0, 0.1).shape[0] == 4 and cache.get_window(10.0, 0.1).shape[0] == 0
    assert cache.frame_times()[25] == pytest.approx(0.4)


def test_onnx_vad_through_the_session_factory_matches_torchscript(long_speech, vad):
    """The ONNX Silero VAD the package ships, opened by the session factory, batched with buckets: the same
    probabilities as TorchScript, padded batches equal lone rows, and the pipeline's output unchanged."""
    from pipeline.audio.vad import OnnxSileroVAD

    onnx = OnnxSileroVAD(16000, "cpu", batch_buckets=(4, 16))
    assert onnx.ort.providers == ["CPUExecutionProvider"] and onnx.ort.fallback_reason is None
    chunks = torch.from_numpy(long_speech[: 3 * 16000 * 8].reshape(3, -1).copy())
    ref = vad.probs(chunks)
    got = onnx.probs(chunks)  # 3 rows padded to the bucket of 4
    assert got.shape == ref.shape and (got - ref).abs().max() < 1e-4
    assert torch.allclose(torch.cat([onnx.probs(c[None]) for c in chunks]), got, atol=1e-6)
    a = run_audio([long_speech], AudioParams(), vad.probs)[0]
    b = run_audio([long_speech], AudioParams(), onnx.probs)[0]
    assert a.speech == b.speech and [c.time_s for c in a.cuts] == [c.time_s for c in b.cuts]
    with pytest.raises(ValueError, match="multiple of 512"):
        onnx.probs(torch.zeros(1, 1000))


def test_sequence_vad_matches_torchscript_and_silero_whole_file(long_speech, vad):
    """The package's sequence ONNX model through the session factory: per chunk from a zero state, in calls of
    max_frames frames with the state carried across calls, the same probabilities as the TorchScript step model; the
    whole file in one row gives silero-vad's own get_speech_timestamps; the pipeline's output unchanged."""
    from silero_vad import get_speech_timestamps

    from pipeline.audio.vad import SequenceSileroVAD, speech_segments

    seq = SequenceSileroVAD(16000, "cpu", max_frames=100)  # a 250-frame chunk spans three calls
    assert seq.ort.providers == ["CPUExecutionProvider"] and seq.ort.fallback_reason is None
    chunks = torch.from_numpy(long_speech[: 3 * 512 * 250].reshape(3, -1).copy())
    ref = vad.probs(chunks)
    got = seq.probs(chunks)
    assert got.shape == ref.shape and (got - ref).abs().max() < 1e-4
    assert (ref > 0.5).any() and (ref < 0.5).any()  # speech and pauses: the comparison means something
    n = len(long_speech) // 512 * 512
    whole = seq.probs(torch.from_numpy(long_speech[:n].copy())[None])[0].numpy()
    stamps = get_speech_timestamps(torch.from_numpy(long_speech[:n].copy()), vad.model)
    assert speech_segments(whole, n) == [(s["start"] / 16000, s["end"] / 16000) for s in stamps]
    a = run_audio([long_speech], AudioParams(), vad.probs)[0]
    b = run_audio([long_speech], AudioParams(), seq.probs)[0]
    assert a.speech == b.speech and [c.time_s for c in a.cuts] == [c.time_s for c in b.cuts]
    with pytest.raises(ValueError, match="multiple of 512"):
        seq.probs(torch.zeros(1, 1000))
    with pytest.raises(ValueError, match="takes 16000 Hz"):
        SequenceSileroVAD(8000)
    from pipeline.audio.vad import shipped_onnx_path

    with pytest.raises(ValueError, match=r"takes inputs input, h, c; the model has \['input', 'sr', 'state'\]"):
        SequenceSileroVAD(path=shipped_onnx_path())  # the step model is not a sequence model


def test_speech_cuts_with_the_onnx_vad_in_the_job(tmp_path, media_dir):
    import pyarrow.parquet as pq

    from pipeline.config import build_config, validate_config
    from pipeline.distributed import DistContext
    from pipeline.runner import run_rank
    from tests.conftest import base_config, make_corpus, write_manifest

    rows = make_corpus(str(tmp_path / "c"), media_dir, 2, kinds=("speech.wav",))
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    out, summaries = {}, {}
    for name, params in (("ts", {}), ("onnx", {"vad_backend": "onnx", "vad_ort": {"graph_optimization_level": "basic"},
                                               "vad_batch_buckets": [2, 8]}),
                         ("seq", {"vad_backend": "onnx_sequence"})):
        raw = base_config(manifest, str(tmp_path / "c"), str(tmp_path / name), str(tmp_path / "cache"),
                          filters={"speech_cuts": params})
        cfg = build_config(raw)
        validate_config(cfg)
        summaries[name] = run_rank(cfg, DistContext()).summary
        out[name] = pq.read_table(str(tmp_path / name / "parts")).to_pylist()[0]["speech_cuts"]
    assert out["onnx"]["vad_runtime"] == {"backend": "onnx", "execution_provider": "CPUExecutionProvider",
                                          "io_binding": False, "fallback_reason": None}
    assert out["ts"]["vad_runtime"]["backend"] == "torchscript"
    assert summaries["onnx"]["models"]["speech_cuts/vad"][0]["backend"] == "onnx"
    assert out["onnx"]["speech"] == out["ts"]["speech"] and out["onnx"]["cuts"] == out["ts"]["cuts"]
    assert out["seq"]["vad_runtime"] == out["onnx"]["vad_runtime"]
    assert out["seq"]["speech"] == out["ts"]["speech"] and out["seq"]["cuts"] == out["ts"]["cuts"]
