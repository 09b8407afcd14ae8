"""Interlaced frames (two fields, 1/50 or 1/60 s apart, in alternate lines) made progressive, for the filters and models.

Broadcast and camcorder video (576i, 480i, 1080i: DV, DVD, MPEG-2 and H.264 transport streams) stores each frame as
two fields. Where anything moves, the decoded frame shows both positions in alternate lines (combing): a 720x576
clip with a box moving 12 pixels a field measured a Laplacian variance (the sharpness filter) of 2,057 where the
progressive source had 851, and every frame difference and model input carries the teeth.

Here each frame keeps its first field (the one shown first, at the frame's time: the top field for ``tt``/``bt``
streams, the bottom for ``bb``/``tb``) and, in the other field's lines, replaces each pixel that lies outside the
range of the kept lines above and below it by more than ``COMB_THRESHOLD`` (in luma), the same way as the pixel two
lines up or down does, by their mean. Still parts keep both fields (full vertical detail); moving edges, where the
fields disagree, take the first field's picture. This is an intra-frame (comb-adaptive, linear) deinterlacer: it
needs no neighbouring frames, so it fits frames sampled far apart, which a temporal one (yadif, bwdif) would have to
decode around. On the clip above it took the Laplacian variance to 824 and the mean absolute difference from the
progressive frame of that time from 5.0 to 1.1 levels (taking the first field alone and stretching it: 1.7). About
3 ms a 576i frame on two CPU threads.

Frames bound for a smaller size (``video.decode_max_side``, the reduced pass, the classifiers' inputs) are
deinterlaced at the stored height and then resized: on a 320x240 clip of the same kind, at 160x120, this came within
0.7 levels of the progressive frame so resized, where the first field alone resized came within 1.3 (its still parts
lose the second field's lines) and the frames as stored 2.4.
"""

from __future__ import annotations

import torch

from pipeline.media.probe import FIELD_ORDERS
from pipeline.video.preprocess import per_group

COMB_THRESHOLD = 10
"""Luma levels (of 255) by which a pixel of the second field must lie outside the range of its neighbours above and
below, from the first field, to count as combing; progressive detail (an edge) lies between them. Strong grain reads
as combing in places: of progressive frames with Gaussian noise of 4 levels per channel none was touched, of 10
levels 4% of the pixels (a test card with text: 0.1%)."""
COMB_SPREAD = 5
"""Width in pixels over which a combed pixel's decision spreads along its line, so that the fringe of a moving edge
(a pixel just under the threshold) does not keep a tooth."""

INTERLACED_ORDERS = frozenset(FIELD_ORDERS.values()) - {"progressive"}
"""The field orders the probe names (``probe.FIELD_ORDERS``) that say a stream is interlaced."""
FIRST_FIELD_BOTTOM = frozenset({"bb", "tb"})
"""Those whose bottom field is shown first."""


def first_field(field_order: str | None, rotation: int, height: int, codec: str | None = None) -> int | None:
    """The row parity (0: even rows, the top field) of the field shown first, in the upright frames the decoders
    hand out, or None where the frames are not deinterlaced: a stream turned a quarter (its fields are columns;
    interlaced video is not shot on phones).

    Args:
        field_order: the stream's field order as ffprobe names it (``tt``, ``bb``, ``tb``, ``bt``). Where the
            stream does not state one: bottom first for standard-definition DV (``dvvideo`` at 480 or 576 lines,
            which codes it per frame; FFmpeg's demuxers leave the stream's order unknown), top first otherwise (HD
            broadcast).
        rotation: the display rotation in degrees (0, 90, 180, 270).
        height: the stored height (a half turn maps row ``y`` to ``height - 1 - y``).
        codec: the stream's codec (FFmpeg's name).
    """
    if rotation % 180:
        return None
    if field_order in INTERLACED_ORDERS:
        parity = 1 if field_order in FIRST_FIELD_BOTTOM else 0
    else:
        parity = 1 if codec == "dvvideo" and height in (480, 576) else 0
    return (height - 1 - parity) % 2 if rotation == 180 else parity


def is_interlaced(stream) -> bool:
    """Whether a stream (the probe's ``VideoStreamInfo``) is deinterlaced: its first frame holds two fields, or the
    stream states a field order (a progressive intro before interlaced programme flags the first frame
    progressive). The deinterlacer leaves frames without combing as they are, so a stream that says so wrongly
    costs decode time, not pictures."""
    return bool(stream.interlaced or stream.field_order in INTERLACED_ORDERS)


def interlaced_decode(stream, backends: list, device: str) -> tuple[int | None, list]:
    """How an interlaced stream is decoded: the row parity of its first field (``first_field``) and the backends in
    the order to try. On the CPU, PyAV goes first: decord and torchcodec convert interlaced 4:2:0 colour across the
    two fields (after deinterlacing, 3.3 levels from the progressive oracle on a moving test clip, PyAV 1.1) and
    were no faster on 576i and 1080i (``bench_deinterlace.py``). NVDEC ranks keep their order.

    Args:
        stream: the probe's ``VideoStreamInfo``.
        backends: the backend instances in the configured order.
        device: ``cpu``, or the rank's GPU for NVDEC decode.
    """
    first = first_field(stream.field_order, stream.rotation, stream.height, stream.codec)
    if device == "cpu":
        backends = sorted(backends, key=lambda b: b.name != "pyav")
    return first, backends


def deinterlace(frames: torch.Tensor, first: int, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` interlaced frames (any width: the decoders may scale each line, which keeps the
    fields apart) -> uint8 ``[N, h, w, 3]`` progressive frames at ``size = (w, h)``, on the frames' device.

    Args:
        frames: decoded frames at the stored height, upright.
        first: row parity of the field shown first (``first_field``).
        size: the ``(w, h)`` wanted.
    """
    from pipeline.video.decoders import resize_frames

    n, height, width, _ = frames.shape
    w, h = size
    out = frames.clone()
    group = per_group(height * width * 3 * 8)  # int16 copies of the lines and their neighbours
    for i in range(0, n, group):
        _fill_combed_(out[i:i + group], first)
    return resize_frames(out, size) if (height, width) != (h, w) else out


def _luma(frames: torch.Tensor) -> torch.Tensor:
    """uint8 RGB ``[..., 3]`` -> int16 luma ``[...]`` (integer BT.601-like weights, 2:5:1)."""
    r, g, b = (frames[..., c].to(torch.int16) for c in range(3))
    return (2 * r + 5 * g + b) >> 3  # a shift: floor division of int16 is three times slower here


def _neighbours(x: torch.Tensor, second: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The lines above and below each second-field line of ``x`` (``[N, H, ...]``), from the first field; at the
    frame's top or bottom edge, the one neighbour there is, twice."""
    rows = x[:, second::2].shape[1]
    if second:
        above = x[:, 0::2][:, :rows]
    else:  # the top line has no line above it
        above = torch.cat([x[:, 1:2], x[:, 1::2]], dim=1)[:, :rows]
    below = x[:, second + 1::2]
    if below.shape[1] < rows:  # nor the bottom line one below it
        below = torch.cat([below, above[:, -1:]], dim=1)
    return above, below


def _with_a_neighbour(outside: torch.Tensor) -> torch.Tensor:
    """``outside`` (bool ``[N, rows, W]``, per line of the second field) where the same pixel of the second-field
    line above or below is outside too, the same way: combing runs down a moving edge, while noise, grain and a
    thin horizontal line leave one line alone."""
    near = torch.zeros_like(outside)
    near[:, 1:] |= outside[:, :-1]
    near[:, :-1] |= outside[:, 1:]
    return outside & near


def _fill_combed_(frames: torch.Tensor, first: int) -> None:
    """In place: the second field's combed pixels of uint8 ``[N, H, W, 3]`` set to the mean of their neighbours
    above and below (first-field lines)."""
    second = 1 - first
    if frames.shape[1] < 2:
        return
    lum = _luma(frames)
    la, lc = _neighbours(lum, second)
    lb = lum[:, second::2]
    combed = (_with_a_neighbour(lb - torch.maximum(la, lc) > COMB_THRESHOLD)
              | _with_a_neighbour(torch.minimum(la, lc) - lb > COMB_THRESHOLD))
    if not combed.any():
        return
    spread = combed.clone()
    for shift in range(1, COMB_SPREAD // 2 + 1):
        spread[..., shift:] |= combed[..., :-shift]
        spread[..., :-shift] |= combed[..., shift:]
    above, below = _neighbours(frames, second)
    lines = frames[:, second::2]  # a view: written in place, at the combed pixels only (a few in a hundred)
    lines[spread] = ((above[spread].to(torch.int16) + below[spread].to(torch.int16) + 1) >> 1).to(torch.uint8)
