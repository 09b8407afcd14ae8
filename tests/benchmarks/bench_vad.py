#!/usr/bin/env python
"""Seconds of audio per second, side by side on the same real speech and the same thread count:
silero-vad's own ``get_speech_timestamps`` (TorchScript, and with its ONNX model), our batched chunked pipeline
(VAD only, then all stages, with each VAD backend), silero-vad's sequence ONNX runner on the whole file, and many
files at once. Also checks that the outputs agree.

Usage: python tests/benchmarks/bench_vad.py [--minutes 10] [--threads 1] [--files 8] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--wav", help="use this recording instead of generated espeak-ng speech")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs per measure (shared machines)")
    args = parser.parse_args()

    from silero_vad import get_speech_timestamps, load_silero_vad

    from pipeline.audio.decode import decode_audio
    from pipeline.audio.equivalence import match
    from pipeline.audio.pipeline import AudioParams, run_audio
    from pipeline.audio.vad import SileroVAD, merge_segments, speech_segments
    from pipeline.audio.features import stitch_frames
    from pipeline.audio.pipeline import _plans, chunk_tensor, vad_length
    from pipeline.media import synthetic

    if args.wav:
        base = decode_audio(args.wav)
    else:
        base = decode_audio(synthetic.long_speech_wav(os.path.join(tempfile.mkdtemp(), "speech.wav"), repeats=2))
    reps = int(np.ceil(args.minutes * 60 * 16000 / len(base)))
    audio = np.tile(base, reps)[: int(args.minutes * 60 * 16000)]
    seconds = len(audio) / 16000
    torch.set_num_threads(args.threads)
    params = AudioParams()
    rows = []

    def timed(label, fn, audio_s):
        best = float("inf")
        for _ in range(args.repeat):
            t = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t)
        rows.append((label, best, audio_s / best))
        return out

    jit = load_silero_vad()
    torch.set_num_threads(args.threads)  # importing silero-vad set it to 1
    x = torch.from_numpy(audio)
    warm = x[: 30 * 16000]  # the first TorchScript calls profile and optimise the graph: not timed
    get_speech_timestamps(warm, jit)
    ref = timed("silero get_speech_timestamps, TorchScript", lambda: get_speech_timestamps(x, jit), seconds)
    onnx = load_silero_vad(onnx=True)
    torch.set_num_threads(args.threads)
    get_speech_timestamps(warm, onnx)
    ref_onnx = timed("silero get_speech_timestamps, ONNX", lambda: get_speech_timestamps(x, onnx), seconds)

    vad = SileroVAD(16000, args.device)
    torch.set_num_threads(args.threads)
    vad.probs(torch.zeros(4, 512 * 8))  # warm-up (CUDA context, cuDNN), not timed

    def vad_only():
        plans = _plans(len(audio), params, True)
        chunks = chunk_tensor(audio, plans, vad_length(plans, params, True))
        step = params.gpu_pipeline.batch_chunks
        probs = torch.cat([vad.probs(chunks[i:i + step]) for i in range(0, len(chunks), step)])
        stitched = stitch_frames(probs, plans, 512, int(np.ceil(len(audio) / 512)))
        return speech_segments(stitched, len(audio))

    vad_only()  # warm-up at the real batch shape (cuDNN picks its LSTM kernels on first use), not timed
    ours_vad = timed("ours: batched chunked VAD only", vad_only, seconds)
    full = timed("ours: all stages (VAD, STFT, cuts)", lambda: run_audio([audio], params, vad.probs,
                                                                       device=args.device)[0], seconds)
    from models.onnx_session import OrtParams
    from pipeline.audio.vad import OnnxSileroVAD

    onnx_vad = OnnxSileroVAD(16000, "cuda" if args.device.startswith("cuda") else "cpu",
                             params=OrtParams(intra_op_threads=args.threads))
    timed(f"ours: all stages, ONNX VAD ({onnx_vad.ort.execution_provider.replace('ExecutionProvider', '')})",
          lambda: run_audio([audio], params, onnx_vad.probs, device=args.device)[0], seconds)
    from silero_vad.sequence_vad import get_speech_timestamps_sequence

    from pipeline.audio.vad import SequenceSileroVAD

    seq_ref = load_silero_vad(sequence=True)  # the package's own sequence runner: CPU, one ORT thread
    torch.set_num_threads(args.threads)
    timed("silero get_speech_timestamps_sequence", lambda: get_speech_timestamps_sequence(audio, seq_ref), seconds)
    seq_vad = SequenceSileroVAD(16000, "cuda" if args.device.startswith("cuda") else "cpu",
                                params=OrtParams(intra_op_threads=args.threads))
    timed(f"ours: all stages, sequence VAD ({seq_vad.ort.execution_provider.replace('ExecutionProvider', '')})",
          lambda: run_audio([audio], params, seq_vad.probs, device=args.device)[0], seconds)
    if args.device.startswith("cuda"):
        timed("ours: all stages on CUDA streams", lambda: run_audio([audio], params, vad.probs, device=args.device,
                                                                   vad=vad)[0], seconds)
    files = [base[: len(base) - 16000 * i] for i in range(args.files)]
    many_s = sum(len(f) for f in files) / 16000
    timed(f"silero TorchScript, {args.files} files one by one",
          lambda: [get_speech_timestamps(torch.from_numpy(f), jit) for f in files], many_s)
    timed(f"ours: all stages, {args.files} files at once",
          lambda: run_audio(files, params, vad.probs, device=args.device), many_s)

    def bounds(stamps):
        return [t / 16000 for s in stamps for t in (s["start"], s["end"])]

    ours = [t for seg in ours_vad for t in seg]
    ref_b = bounds(ref)
    pairs = match(ours, ref_b)
    diffs = [abs(ours[i] - ref_b[j]) * 1000 for i, j in pairs]
    onnx_pairs = match(bounds(ref_onnx), ref_b)
    print(f"\nVAD benchmark: {seconds / 60:.1f} min of speech, {args.threads} thread(s), device {args.device}, "
          f"best of {args.repeat}")
    print(f"{'measure':<52}{'seconds':>9}{'x real time':>13}")
    for label, dt, speed in rows:
        print(f"{label:<52}{dt:>9.2f}{speed:>12.0f}x")
    ts, on = rows[0][2], rows[1][2]
    print(f"ours all stages vs TorchScript reference: {rows[3][2] / ts:.1f}x; vs ONNX reference: {rows[3][2] / on:.1f}x "
          "(targets 5x and 2x)")
    print(f"VAD boundaries: ours {len(ours)}, reference {len(ref_b)}, matched {len(pairs)}, mean diff "
          f"{np.mean(diffs) if diffs else 0:.2f} ms, max {max(diffs) if diffs else 0:.1f} ms; "
          f"ONNX reference matched {len(onnx_pairs)} of {len(ref_b)}")
    print(f"cuts: {len(full.cuts)} over {full.duration_s:.0f}s, speech ratio {full.speech_ratio:.2f}, merged "
          f"segments {len(merge_segments(full.speech))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
