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

    from pipeline.audio.decode import decode_audio
    from pipeline.audio.equivalence import measure, write_report
    from pipeline.audio.pipeline import AudioParams, GpuPipelineParams
    from pipeline.audio.vad import SileroVAD
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
    eq, _chunked, _whole = measure(audio, params, SileroVAD())
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    write_report(eq, params, args.out + ".json", args.out + ".md")
    print(open(args.out + ".md").read())
    return 1 if eq.violations() else 0


if __name__ == "__main__":
    sys.exit(main())
