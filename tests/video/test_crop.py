import pytest
from hypothesis import given, settings, strategies as st

from pipeline.video.crop import aggregate_regions, safe_crop


def area(b):
    return (b[2] - b[0]) * (b[3] - b[1])


def test_subtitle_band_is_cut_off():
    assert safe_crop(1920, 1080, [(300, 900, 1600, 1000)]) == (0, 0, 1920, 900)


def test_corner_watermark_keeps_the_largest_area():
    box = safe_crop(1920, 1080, [(1700, 20, 1900, 120)])
    assert box == (0, 0, 1700, 1080) or box == (0, 120, 1920, 1080)
    assert area(box) == max(1700 * 1080, 1920 * 960)


def test_aspect_ratio_and_content_box():
    box = safe_crop(1920, 1080, [], content=(0, 140, 1920, 940), aspect_min=1.0, aspect_max=1.5)
    w, h = box[2] - box[0], box[3] - box[1]
    assert 1.0 <= w / h <= 1.5 + 0.01 and box[1] >= 140 and box[3] <= 940 and h == 800


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 600), st.integers(0, 400), st.integers(5, 300), st.integers(5, 200)),
                max_size=5),
       st.floats(0.3, 1.0), st.floats(1.0, 3.0))
def test_safe_crop_never_touches_a_region(rects, lo, hi):
    # Oracle: the result is inside the frame, overlaps no region, and has an allowed aspect ratio.
    regions = [(x, y, min(640, x + w), min(480, y + h)) for x, y, w, h in rects]
    b = safe_crop(640, 480, regions, aspect_min=lo, aspect_max=hi)
    assert 0 <= b[0] <= b[2] <= 640 and 0 <= b[1] <= b[3] <= 480
    for r in regions:
        assert not (min(b[2], r[2]) > max(b[0], r[0]) and min(b[3], r[3]) > max(b[1], r[1]))
    if area(b) > 100:
        assert lo - 0.02 <= (b[2] - b[0]) / (b[3] - b[1]) <= hi + 0.02


def test_aggregate_keeps_persistent_regions_only():
    logo = ("logo", 0.9, (10, 10, 60, 40))
    frames = [[logo, ("logo", 0.3, (300, 300, 310, 310))] if i == 0 else [("logo", 0.8, (12, 11, 61, 42))]
              for i in range(10)]
    regions = aggregate_regions(frames, min_persistence=0.5)
    assert len(regions) == 1 and regions[0].label == "logo" and regions[0].persistence == 1.0
    assert regions[0].box == (10, 10, 61, 42)
    assert aggregate_regions(frames, min_persistence=0.05)[1].persistence == pytest.approx(0.1)
