"""``probe``: container and stream metadata, so every success row holds real data."""

from __future__ import annotations

import pyarrow as pa

from pipeline.filters.base import Filter, FilterContext
from pipeline.media.item import MediaItem


class ProbeFilter(Filter):
    """Container format, duration, bit rate, and the parameters of the main video and audio streams (the ones
    marked default, else the first: what the other filters decode), with their container indices."""

    weight_free = True
    output_type = pa.struct([
        ("container", pa.string()),
        ("duration_s", pa.float64()),
        ("bit_rate", pa.int64()),
        ("video_streams", pa.int32()),
        ("audio_streams", pa.int32()),
        ("video", pa.struct([
            ("codec", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
            ("fps", pa.float64()), ("frames", pa.int64()), ("pix_fmt", pa.string()),
            ("rotation", pa.int32()), ("index", pa.int32()), ("sample_aspect_ratio", pa.float64()),
            ("interlaced", pa.bool_()), ("color_range", pa.string()), ("color_primaries", pa.string()),
            ("color_transfer", pa.string()), ("color_space", pa.string()), ("hdr", pa.bool_()),
        ])),
        ("audio", pa.struct([("codec", pa.string()), ("sample_rate", pa.int32()), ("channels", pa.int32()),
                             ("index", pa.int32())])),
    ])

    def apply(self, media: MediaItem, ctx: FilterContext) -> dict:
        info = media.info
        return {
            "container": info.container,
            "duration_s": info.duration_s,
            "bit_rate": info.bit_rate,
            "video_streams": info.video_streams,
            "audio_streams": info.audio_streams,
            "video": _columns(info.video, self.output_type.field("video").type),
            "audio": _columns(info.audio, self.output_type.field("audio").type),
        }


def _columns(stream, struct: pa.StructType) -> dict | None:
    """A stream's fields that its column holds: what the probe keeps for the decoders alone (``field_order``) is
    not part of the row."""
    return None if stream is None else {f.name: getattr(stream, f.name) for f in struct}
