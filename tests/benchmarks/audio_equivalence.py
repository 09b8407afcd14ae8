#!/usr/bin/env python
"""Write the audio equivalence report (JSON and Markdown): the chunked pipeline against a one-chunk whole-file run
and against silero-vad's own ``get_speech_timestamps`` on real speech.

Usage: python tests/benchmarks/audio_equivalence.py [--wav FILE] [--minutes 10] [--out reports/audio_equivalence]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def main() -> int:
    import numpy as np
    import torch
    from silero_vad import get_speech_timestamps

    from pipeline.audio.decode import decode_audio
    from pipeline.audio.equivalence import compare, write_report
    from pipeline.audio.pipeline import AudioParams, GpuPipelineParams, run_audio
    from pipeline.audio.vad import SileroVAD, merge_segments
    from pipeline.media import synthetic

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--wav")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--halo", type=float, default=0.5)
    parser.add_argument("--out", default=os.path.join(ROOT, "reports", "audio_equivalence"))
    args = parser.parse_args()
    base = decode_audio(args.wav) if args.wav else decode_audio(
        synthetic.long_speech_wav(os.path.join(tempfile.mkdtemp(), "speech.wav"), repeats=2))
    audio = np.tile(base, int(np.ceil(args.minutes * 60 * 16000 / len(base))))[: int(args.minutes * 60 * 16000)]
    params = AudioParams(gpu_pipeline=GpuPipelineParams(halo_seconds=args.halo))
    vad = SileroVAD()
    chunked = run_audio([audio], params, vad.probs)[0]
    whole = run_audio([audio], params, vad.probs, chunked=False)[0]
    stamps = get_speech_timestamps(torch.from_numpy(audio), vad.model, threshold=params.threshold,
                                   min_speech_duration_ms=params.min_speech_ms,
                                   min_silence_duration_ms=params.min_silence_ms, speech_pad_ms=params.speech_pad_ms)
    reference = merge_segments([(s["start"] / 16000, s["end"] / 16000) for s in stamps], params.merge_gap_ms / 1000)
    eq = compare(chunked, whole, reference)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    write_report(eq, params, args.out + ".json", args.out + ".md")
    print(open(args.out + ".md").read())
    return 1 if eq.violations() else 0


if __name__ == "__main__":
    sys.exit(main())
