"""The equivalence contract: the chunked pipeline against a one-chunk whole-file run and against silero-vad's own
``get_speech_timestamps``; measured figures and a JSON / Markdown report."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.audio.pipeline import AudioParams, AudioResult

BOUNDS = {"cut_mean_ms": 10.0, "cut_p95_ms": 30.0, "cut_count_diff_pct": 1.0, "guard_shift_mean_ms": 15.0,
          "stft_mae": 1e-4, "vad_mean_ms": 10.0, "vad_p95_ms": 30.0}


def match(a: list[float], b: list[float], radius: float = 0.5) -> list[tuple[int, int]]:
    """Greedy one-to-one matching of two sorted time lists, closest pairs first, within ``radius`` seconds."""
    pairs = sorted((abs(x - y), i, j) for i, x in enumerate(a) for j, y in enumerate(b) if abs(x - y) <= radius)
    used_a, used_b, out = set(), set(), []
    for _d, i, j in pairs:
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            out.append((i, j))
    return sorted(out)


def _stats(diffs_s: list[float]) -> tuple[float, float]:
    if not diffs_s:
        return 0.0, 0.0
    d = np.abs(np.asarray(diffs_s)) * 1000.0
    return float(d.mean()), float(np.percentile(d, 95))


@dataclass
class Equivalence:
    duration_s: float
    chunks: int
    cuts_chunked: int
    cuts_whole: int
    cut_mean_ms: float
    cut_p95_ms: float
    cut_count_diff_pct: float
    guard_shift_mean_ms: float
    stft_mae: float
    vad_boundaries: int
    vad_boundaries_reference: int
    vad_mean_ms: float
    vad_p95_ms: float
    prob_max_abs_diff: float
    prob_mean_abs_diff: float

    def violations(self) -> list[str]:
        d = asdict(self)
        return [f"{k} = {d[k]:.4g} > {v}" for k, v in BOUNDS.items() if d[k] > v]


def compare(chunked: AudioResult, whole: AudioResult, reference: list[tuple[float, float]]) -> Equivalence:
    """Measure the contract's figures for one file.

    Args:
        chunked: the chunked pipeline's result.
        whole: the one-chunk whole-file result.
        reference: silero-vad's ``get_speech_timestamps`` on the whole file (seconds), matching parameters.
    """
    a = [c.time_s for c in chunked.cuts]
    b = [c.time_s for c in whole.cuts]
    pairs = match(a, b)
    cut_mean, cut_p95 = _stats([a[i] - b[j] for i, j in pairs])
    shifts = [chunked.cuts[i].guard_shift_s - whole.cuts[j].guard_shift_s for i, j in pairs]
    ours = [t for seg in chunked.speech for t in seg]
    ref = [t for seg in reference for t in seg]
    vpairs = match(ours, ref)
    unmatched = len(ours) + len(ref) - 2 * len(vpairs)
    vad_mean, vad_p95 = _stats([ours[i] - ref[j] for i, j in vpairs] + [0.5] * unmatched)
    n = min(len(chunked.features.mag), len(whole.features.mag))
    return Equivalence(
        duration_s=chunked.duration_s, chunks=len(chunked.plans), cuts_chunked=len(a), cuts_whole=len(b),
        cut_mean_ms=cut_mean, cut_p95_ms=cut_p95,
        cut_count_diff_pct=100.0 * abs(len(a) - len(b)) / max(1, len(b)),
        guard_shift_mean_ms=_stats(shifts)[0],
        stft_mae=float(np.abs(chunked.features.mag[:n] - whole.features.mag[:n]).mean()) if n else 0.0,
        vad_boundaries=len(ours), vad_boundaries_reference=len(ref), vad_mean_ms=vad_mean, vad_p95_ms=vad_p95,
        prob_max_abs_diff=float(np.abs(chunked.probs - whole.probs).max()),
        prob_mean_abs_diff=float(np.abs(chunked.probs - whole.probs).mean()),
    )


def measure(audio: np.ndarray, params: AudioParams, vad) -> tuple[Equivalence, AudioResult, AudioResult]:
    """Run the chunked pipeline, the one-chunk whole-file run and silero-vad's ``get_speech_timestamps`` (same
    parameters, same merge) on ``audio`` with the ``SileroVAD`` ``vad``, and compare them."""
    import torch
    from silero_vad import get_speech_timestamps

    from pipeline.audio.pipeline import run_audio
    from pipeline.audio.vad import merge_segments

    chunked = run_audio([audio], params, vad.probs)[0]
    whole = run_audio([audio], params, vad.probs, chunked=False)[0]
    sr = params.sample_rate
    stamps = get_speech_timestamps(torch.from_numpy(audio), vad.model, threshold=params.threshold, sampling_rate=sr,
                                   min_speech_duration_ms=params.min_speech_ms,
                                   min_silence_duration_ms=params.min_silence_ms, speech_pad_ms=params.speech_pad_ms)
    reference = merge_segments([(s["start"] / sr, s["end"] / sr) for s in stamps], params.merge_gap_ms / 1000)
    return compare(chunked, whole, reference), chunked, whole


def write_report(eq: Equivalence, params: AudioParams, json_path: str, md_path: str) -> None:
    """The figures as JSON and as a Markdown table with the bounds and a verdict per line."""
    body = {"figures": asdict(eq), "bounds": BOUNDS, "violations": eq.violations(),
            "chunking": asdict(params.gpu_pipeline)}
    with open(json_path, "w") as f:
        json.dump(body, f, indent=2)
    d = asdict(eq)
    lines = ["# Audio pipeline equivalence: chunked vs whole file", "",
             f"{eq.duration_s:.1f} s of speech, {eq.chunks} chunks "
             f"(chunk {params.gpu_pipeline.chunk_seconds}s, overlap {params.gpu_pipeline.overlap_seconds}s, "
             f"halo {params.gpu_pipeline.halo_seconds}s, hop {params.gpu_pipeline.align_hop}); "
             f"{eq.cuts_chunked} cuts chunked, {eq.cuts_whole} whole.", "",
             "| figure | measured | bound | ok |", "| --- | --- | --- | --- |"]
    for k, v in BOUNDS.items():
        lines.append(f"| {k} | {d[k]:.4g} | {v} | {'yes' if d[k] <= v else 'NO'} |")
    lines += ["", f"VAD probability difference, chunked vs whole: max {eq.prob_max_abs_diff:.4f}, "
              f"mean {eq.prob_mean_abs_diff:.6f}.", ""]
    with open(md_path, "w") as f:
        f.write("\n".join(lines))
