"""HDR frames (PQ or HLG transfer, BT.2020 primaries) tone-mapped to SDR BT.709 in place, for the filters and models.

The decoders hand out an HDR stream's pixels as coded: RGB in the PQ or HLG signal, which shown as SDR is flat and grey
(a PQ test clip made from an SDR one had a standard deviation of 34 levels against the source's 115), so its
exposure, sharpness and every model's input would mean something else than for SDR video. Here each pixel goes to
display light (the PQ EOTF; for HLG the inverse OETF and the OOTF of a 1000-nit display), to BT.709 primaries, is
scaled so that HDR reference white (203 nits, ITU-R BT.2408) is SDR white, has its highlights above ``KNEE`` rolled
off towards white keeping their hue (scaled by the largest channel), and is coded for a BT.1886 display (gamma
2.4). Below the knee this inverts the usual display-referred SDR-in-HDR mapping (``zscale=npl=203``): a grey ramp
so mapped came back within 2-5 levels.
"""

from __future__ import annotations

import math
import threading

import torch

from pipeline.media.probe import HDR_TRANSFERS

REFERENCE_WHITE_NITS = 203.0
"""HDR reference white (ITU-R BT.2408), shown as SDR white."""
KNEE = 0.75
"""Linear SDR level (of white) up to which light is kept as it is; above it, highlights roll off towards white."""
HLG_DISPLAY_NITS = 1000.0
"""The nominal peak of the display an HLG signal is shown on (its OOTF's gamma is 1.2 there)."""

_BT2020_TO_BT709 = torch.tensor([[1.6605, -0.5876, -0.0728],
                                 [-0.1246, 1.1329, -0.0083],
                                 [-0.0182, -0.1006, 1.1187]], dtype=torch.float32)
_BT2020_LUMA = torch.tensor([0.2627, 0.6780, 0.0593], dtype=torch.float32)


def _pq_to_nits(v: torch.Tensor) -> torch.Tensor:
    m1, m2 = 2610 / 16384, 2523 / 4096 * 128
    c1, c2, c3 = 3424 / 4096, 2413 / 4096 * 32, 2392 / 4096 * 32
    p = v.clamp(0, 1) ** (1 / m2)
    return 10000.0 * ((p - c1).clamp(min=0) / (c2 - c3 * p)) ** (1 / m1)


def _hlg_to_scene(v: torch.Tensor) -> torch.Tensor:
    a = 0.17883277
    b, c = 1 - 4 * a, 0.5 - a * math.log(4 * a)
    v = v.clamp(0, 1)
    return torch.where(v <= 0.5, v * v / 3, (torch.exp((v - c) / a) + b) / 12)


def _lut(transfer: str) -> torch.Tensor:
    """Per code value 0..255: display light in nits (PQ) or scene light 0..1 (HLG)."""
    v = torch.arange(256, dtype=torch.float64) / 255
    return (_pq_to_nits(v) if transfer == "smpte2084" else _hlg_to_scene(v)).float()


def _roll_off(m: torch.Tensor) -> torch.Tensor:
    """Light below ``KNEE`` as it is; above it towards 1, with slope 1 at the knee (1 becomes 0.91)."""
    return torch.where(m <= KNEE, m, KNEE + (1 - KNEE) * (1 - torch.exp(-(m - KNEE) / (1 - KNEE))))


def _bt1886_inverse(x: torch.Tensor) -> torch.Tensor:
    """Display light (0..1 of white) to the SDR signal a BT.1886 display (gamma 2.4) shows as that light: the
    display-referred coding that FFmpeg's zscale (zimg) uses between SDR and HDR. The BT.709 OETF instead left a
    grey ramp mapped through PQ up to 25 levels dark (its mid-tones came back within 2-5 levels this way)."""
    return x.clamp(min=0) ** (1 / 2.4)


def _map(codes: torch.Tensor, transfer: str) -> torch.Tensor:
    """uint8 HDR RGB ``[..., 3]`` -> uint8 SDR RGB, computed pixel by pixel (``tone_map_`` looks it up)."""
    dev = codes.device
    light = _lut(transfer).to(dev)[codes.long()]
    if transfer == "smpte2084":
        light = light / REFERENCE_WHITE_NITS
    else:  # HLG: scene light to display light (BT.2100's OOTF on luminance, gamma 1.2 on a 1000-nit display)
        y = (light @ _BT2020_LUMA.to(dev)).clamp(min=1e-6).unsqueeze(-1)
        light = light * y ** 0.2 * (HLG_DISPLAY_NITS / REFERENCE_WHITE_NITS)
    light = (light @ _BT2020_TO_BT709.to(dev).T).clamp(min=0)
    peak = light.amax(dim=-1, keepdim=True).clamp(min=1e-6)
    light = light * (_roll_off(peak) / peak)
    return (_bt1886_inverse(light.clamp(0, 1)) * 255).round_().clamp_(0, 255).to(torch.uint8)


_TABLES: dict[tuple[str, str], torch.Tensor] = {}
_TABLES_LOCK = threading.Lock()


def _table(transfer: str, device: torch.device) -> torch.Tensor:
    """``_map`` of every 8-bit RGB triple, made once per transfer and device in a process: ``[2**24]`` int32 whose
    bytes are the SDR R, G, B and a pad (64 MiB; about a second to make here). A look-up per pixel costs 17-20 ms per
    1080p frame on this CPU, the arithmetic 200-400 ms (``bench_tonemap.py``)."""
    key = (transfer, str(device))
    with _TABLES_LOCK:
        if key not in _TABLES:
            _TABLES[key] = _cpu_table(transfer).to(device)
        return _TABLES[key]


def _cpu_table(transfer: str) -> torch.Tensor:
    """The table, made on the CPU: made on a GPU, its float arithmetic (pow, exp) rounded some triples otherwise
    (seen on an H200: PQ frames not byte-equal to the CPU's), so another device gets a copy (64 MiB) of these
    bytes, and NVDEC frames are mapped exactly as CPU-decoded ones. Made under ``_TABLES_LOCK``."""
    key = (transfer, "cpu")
    if key not in _TABLES:
        table = torch.zeros((1 << 24, 4), dtype=torch.uint8)
        step = 1 << 20
        for start in range(0, 1 << 24, step):
            i = torch.arange(start, start + step, dtype=torch.int32)
            codes = torch.stack([(i >> 16) & 255, (i >> 8) & 255, i & 255], dim=-1)
            table[start:start + step, :3] = _map(codes, transfer)
        _TABLES[key] = table.view(torch.int32).view(-1)
    return _TABLES[key]


def tone_map_(frames: torch.Tensor, transfer: str) -> torch.Tensor:
    """Map uint8 RGB ``[N, H, W, 3]`` frames coded in an HDR ``transfer`` (``HDR_TRANSFERS``) to SDR BT.709, in place on
    their device, a frame at a time (``_map`` of each pixel, looked up). Returns ``frames``.

    Raises:
        ValueError: a transfer other than PQ or HLG.
    """
    if transfer not in HDR_TRANSFERS:
        raise ValueError(f"no tone mapping from the transfer {transfer!r} (only {', '.join(sorted(HDR_TRANSFERS))})")
    if frames.shape[0] == 0:
        return frames
    table = _table(transfer, frames.device)
    looked_up = torch.empty(frames.shape[1:3] + (4,), dtype=torch.uint8, device=frames.device)
    flat = looked_up.view(torch.int32).view(-1)
    for frame in frames:
        c = frame.to(torch.int32)
        torch.index_select(table, 0, ((c[..., 0] << 16) | (c[..., 1] << 8) | c[..., 2]).reshape(-1), out=flat)
        frame.copy_(looked_up[..., :3])
    return frames
