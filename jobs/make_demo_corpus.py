#!/usr/bin/env python
"""Generate the demo corpus and its manifest: real clips, real speech, and a few broken files.

Usage: python jobs/make_demo_corpus.py [--out demo]
Writes <out>/corpus/... and <out>/manifest.parquet (paths relative to the corpus root).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipeline.media import synthetic  # noqa: E402

SPEECH = ("The quick brown fox jumps over the lazy dog. We sieve large media corpora to choose training data. "
          "Each clip gets exactly one row in a parquet table, and a rerun picks up where the last one stopped.")


def make_corpus(out: str) -> str:
    """Write the demo corpus under ``out`` and return the manifest path."""
    corpus = os.path.join(out, "corpus")
    os.makedirs(os.path.join(corpus, "video"), exist_ok=True)
    os.makedirs(os.path.join(corpus, "audio"), exist_ok=True)
    rows = []

    def add(item_id: str, rel: str, kind: str) -> None:
        rows.append({"video_id": item_id, "video_path": rel, "kind": kind})

    for i in range(4):
        synthetic.motion_clip(os.path.join(corpus, f"video/motion_{i}.mp4"), seconds=2.0 + i)
        add(f"motion_{i}", f"video/motion_{i}.mp4", "motion")
    synthetic.still_clip(os.path.join(corpus, "video/still.mp4"), seconds=4.0, speech=SPEECH)
    add("still_speech", "video/still.mp4", "still image with speech")
    synthetic.letterboxed_clip(os.path.join(corpus, "video/letterbox.mp4"), seconds=3.0, subtitle="Subtitles on the bar")
    add("letterbox", "video/letterbox.mp4", "black bars, a subtitle on the bottom bar")
    synthetic.lavfi_clip(os.path.join(corpus, "video/anamorphic.mp4"), "testsrc2=size=720x405:rate=25", 3.0,
                         "scale=720:480,setsar=32/27")  # a 16:9 picture in NTSC DVD's 720x480 pixels
    add("anamorphic", "video/anamorphic.mp4", "16:9 in non-square pixels, as DVD stores it")
    synthetic.moving_box_clip(os.path.join(corpus, "video/interlaced.ts"), "720x576", seconds=2.0, interlace="tff",
                              codec=("-c:v", "mpeg2video", "-q:v", "2"))
    add("interlaced", "video/interlaced.ts", "576i broadcast MPEG-2 in a transport stream, top field first")
    synthetic.shots_clip(os.path.join(corpus, "video/shots.mp4"), (("testsrc2", 1.52), ("pal75bars", 1.0),
                                                                   ("rgbtestsrc", 0.12), ("yuvtestsrc", 1.5)))
    add("shots", "video/shots.mp4", "four shots: hard cuts at frames 38, 63 and 66 (a 3-frame shot)")
    frames = []
    for k in range(24):  # a bar moving over red, then over blue: a cut at frame 12
        f = np.zeros((120, 160, 3), np.uint8)
        f[..., 0 if k < 12 else 2] = 180
        f[40:80, 6 * k:6 * k + 16] = 255
        frames.append(f)
    synthetic.animated_webp(os.path.join(corpus, "video/sticker.webp"), frames, [80] * 24)
    add("sticker", "video/sticker.webp", "animated WebP (FFmpeg does not decode it: Pillow does), a cut at frame 12")
    if synthetic.has_zscale():
        synthetic.hdr_copy(os.path.join(corpus, "video/motion_0.mp4"), os.path.join(corpus, "video/hdr_pq.mp4"))
        add("hdr_pq", "video/hdr_pq.mp4", "HDR10 (PQ, BT.2020) made from motion_0")
    else:
        print("this ffmpeg has no zscale (libzimg): the demo has no HDR clip")
    damaged = os.path.join(corpus, "video/.whole.mp4")
    synthetic.motion_clip(damaged, seconds=12.0)
    synthetic.zeroed_middle_copy(damaged, os.path.join(corpus, "video/damaged.mp4"))
    os.remove(damaged)
    add("damaged", "video/damaged.mp4", "12 s with 2% of its bytes zeroed at the middle: decoded past (a warning, "
        "the row's result_info.video_frames_lost and audio_packets_lost, "
        "corrupt_media in the metrics)")
    whole = synthetic.lavfi_clip(os.path.join(corpus, "video/.whole.mp4"), "testsrc2=size=320x240:rate=25", 4.0,
                                 extra=("-movflags", "+faststart"))
    with open(whole, "rb") as f:
        data = f.read()
    with open(os.path.join(corpus, "video/cut_short.mp4"), "wb") as f:
        f.write(data[: len(data) * 2 // 5])  # a download cut short: the index (first) lists all 4 s
    os.remove(whole)
    add("cut_short", "video/cut_short.mp4", "4 s cut short after about 1.6 s: its prefix decodes (the row's "
        "result_info.video_frames_lost and corrupt_spans say what is lost)")
    synthetic.speech_wav(os.path.join(corpus, "audio/speech.wav"), SPEECH)
    add("speech", "audio/speech.wav", "speech")
    for name, path in synthetic.broken_files(os.path.join(corpus, "broken")).items():
        add(f"broken_{name}", os.path.relpath(path, corpus), f"broken: {name}")
    add("missing", "video/does_not_exist.mp4", "broken: missing")
    manifest = os.path.join(out, "manifest.parquet")
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    return manifest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo")
    args = parser.parse_args()
    manifest = make_corpus(args.out)
    print(f"demo corpus: {os.path.join(args.out, 'corpus')}  manifest: {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
