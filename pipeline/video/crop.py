"""Abnormal regions aggregated over time, and the safe crop that excludes them.

Boxes are ``(x1, y1, x2, y2)`` in source pixels, half-open.
"""

from __future__ import annotations

from dataclasses import dataclass

Box = tuple[float, float, float, float]


@dataclass
class Region:
    label: str
    box: Box
    persistence: float
    mean_conf: float


def _overlap(a: Box, b: Box) -> float:
    """Intersection over the smaller box (stable boxes of one watermark overlap almost fully)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return inter / smaller if smaller > 0 else 0.0


def aggregate_regions(frames: list[list[tuple[str, float, Box]]], min_persistence: float, merge_overlap: float = 0.5,
                      max_regions: int = 8) -> list[Region]:
    """Cluster per-frame detections of each label into regions that persist over time.

    Args:
        frames: for each sampled frame, its detections ``(label, confidence, box)``.
        min_persistence: keep regions seen in at least this fraction of the sampled frames.
        merge_overlap: a detection joins a cluster whose union box it overlaps by this much (of the smaller box).
        max_regions: keep the most persistent ones.

    Returns:
        Regions, most persistent first; each box is the union of its detections.
    """
    clusters: list[dict] = []
    for fi, dets in enumerate(frames):
        for label, conf, box in dets:
            for c in clusters:
                if c["label"] == label and _overlap(c["box"], box) >= merge_overlap:
                    c["box"] = (min(c["box"][0], box[0]), min(c["box"][1], box[1]),
                                max(c["box"][2], box[2]), max(c["box"][3], box[3]))
                    c["frames"].add(fi)
                    c["confs"].append(conf)
                    break
            else:
                clusters.append({"label": label, "box": tuple(box), "frames": {fi}, "confs": [conf]})
    n = max(1, len(frames))
    regions = [Region(c["label"], c["box"], len(c["frames"]) / n, sum(c["confs"]) / len(c["confs"]))
               for c in clusters if len(c["frames"]) / n >= min_persistence]
    regions.sort(key=lambda r: (-r.persistence, -r.mean_conf))
    return regions[:max_regions]


def _intersects(a: Box, b: Box) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def _fit_aspect(x1: float, y1: float, x2: float, y2: float, lo: float, hi: float) -> Box:
    """Shrink a box about its centre until width/height lies in ``[lo, hi]``."""
    w, h = x2 - x1, y2 - y1
    if h <= 0 or w <= 0:
        return (x1, y1, x1, y1)
    ar = w / h
    if ar > hi:
        nw = h * hi
        cx = (x1 + x2) / 2
        return (cx - nw / 2, y1, cx + nw / 2, y2)
    if ar < lo:
        nh = w / lo
        cy = (y1 + y2) / 2
        return (x1, cy - nh / 2, x2, cy + nh / 2)
    return (x1, y1, x2, y2)


def safe_crop(width: int, height: int, regions: list[Box], content: Box | None = None,
              aspect_min: float = 0.0, aspect_max: float = float("inf")) -> Box:
    """The largest box inside ``content`` (default: the frame) that overlaps no region, at an allowed aspect ratio.

    Every maximal empty rectangle has each edge on the content boundary or on a region's edge, so searching the
    rectangles spanned by those coordinates is exhaustive; each is then shrunk about its centre to the allowed
    aspect ratio (a shrunk box stays free) and the largest result wins. Returns integer pixels, even sizes.
    """
    cx1, cy1, cx2, cy2 = content or (0, 0, width, height)
    clipped = [(max(cx1, r[0]), max(cy1, r[1]), min(cx2, r[2]), min(cy2, r[3])) for r in regions]
    clipped = [r for r in clipped if r[2] > r[0] and r[3] > r[1]]
    xs = sorted({cx1, cx2, *(r[0] for r in clipped), *(r[2] for r in clipped)})
    ys = sorted({cy1, cy2, *(r[1] for r in clipped), *(r[3] for r in clipped)})
    best, best_area = (cx1, cy1, cx1, cy1), 0.0
    for i, x1 in enumerate(xs):
        for x2 in xs[i + 1:]:
            for j, y1 in enumerate(ys):
                for y2 in ys[j + 1:]:
                    if (x2 - x1) * (y2 - y1) <= best_area:
                        continue
                    if any(_intersects((x1, y1, x2, y2), r) for r in clipped):
                        break  # a taller box from this y1 hits the same region
                    box = _fit_aspect(x1, y1, x2, y2, aspect_min, aspect_max)
                    area = (box[2] - box[0]) * (box[3] - box[1])
                    if area > best_area:
                        best, best_area = box, area
    x1, y1 = int(-(-best[0] // 1)), int(-(-best[1] // 1))  # ceil: stay inside
    w, h = int(best[2] - x1) // 2 * 2, int(best[3] - y1) // 2 * 2
    return (x1, y1, x1 + max(0, w), y1 + max(0, h))
