"""HDR (PQ and HLG) frames tone-mapped to SDR before the filters see them, on clips made from an SDR source by
FFmpeg's own display-referred mapping (zscale, SDR white at 203 nits): the SDR source is the oracle."""

import numpy as np
import pytest
import torch

from pipeline.config import FilterSpec, VideoConfig
from pipeline.filters import build_filters, frame_requests_of
from pipeline.filters.base import FilterContext
from pipeline.media import synthetic
from pipeline.media.item import MediaItem
from pipeline.video.decoders import available_backends
from pipeline.video.tonemap import tone_map_

TRANSFERS = ("smpte2084", "arib-std-b67")


pytestmark = pytest.mark.skipif(not synthetic.has_zscale(), reason="this ffmpeg has no zscale (libzimg) for HDR clips")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("hdr")
    tagged = ("-color_primaries", "bt709", "-color_trc", "bt709", "-colorspace", "bt709")
    # half saturation: on fully saturated primaries FFmpeg's HLG mapping (its OOTF per channel) and BT.2100's (on
    # luminance, which this follows) differ; on natural colours they agree
    out = {"sdr": synthetic.lavfi_clip(str(d / "sdr.mp4"), "testsrc2=size=320x240:rate=25", 2.0, "hue=s=0.5",
                                       extra=tagged),
           "ramp": synthetic.lavfi_clip(str(d / "ramp.mp4"), "nullsrc=size=256x32:rate=25", 0.2,
                                        "geq=lum='16+X*219/255':cb=128:cr=128", extra=tagged)}
    for t in TRANSFERS:
        out[t] = synthetic.hdr_copy(out["sdr"], str(d / f"{t}.mp4"), t)
        out[f"ramp-{t}"] = synthetic.hdr_copy(out["ramp"], str(d / f"ramp-{t}.mp4"), t)
    return out


def _frames(path, **video):
    from pipeline.video.sampling import Uniform

    item = MediaItem("x", path, 0, [Uniform(2)], VideoConfig(**video), available_backends(("pyav",)))
    return item.video().frames[0].numpy().astype(float)


@pytest.mark.parametrize("transfer", TRANSFERS)
def test_a_grey_ramp_comes_back_as_it_was(clips, transfer):
    # Oracle: the SDR ramp the HDR clip was made from. Below the knee (75% of white in light, level 225) the
    # mapping is the inverse of FFmpeg's; as coded, the HDR ramp is 20 or more levels off.
    sdr, raw = _frames(clips["ramp"])[16, :, 1], _frames(clips[f"ramp-{transfer}"], tone_map=False)[16, :, 1]
    mapped = _frames(clips[f"ramp-{transfer}"])[16, :, 1]
    below = sdr < 220
    assert np.abs(mapped - sdr)[below].mean() < 3 and np.abs(mapped - sdr)[below].max() <= 10
    assert np.abs(raw - sdr)[below].max() >= 20
    top, knee = mapped[sdr > 235].mean(), mapped[(sdr > 200) & (sdr < 220)].mean()
    assert knee < top <= 255  # highlights rolled off, not clipped or turned back


@pytest.mark.parametrize("transfer", TRANSFERS)
def test_exposure_and_sharpness_of_hdr_are_those_of_its_sdr_source(clips, transfer):
    def measure(path, **video):
        filters = build_filters((FilterSpec("exposure", "exposure"), FilterSpec("sharpness", "sharpness")))
        item = MediaItem("x", path, 0, frame_requests_of(filters), VideoConfig(**video),
                         available_backends(("pyav",)))
        return {f.name: f.apply(item, FilterContext("cpu", None)) for f in filters}

    sdr, mapped, raw = measure(clips["sdr"]), measure(clips[transfer]), measure(clips[transfer], tone_map=False)
    # measured: PQ mean luma 0.473 (as coded 0.389) against 0.482, Laplacian variance 540 (160) against 560;
    # HLG 0.490 (0.432) and 564 (379)
    for name, key in (("exposure", "mean_luma"), ("sharpness", "laplacian_var")):
        off, off_raw = abs(mapped[name][key] - sdr[name][key]), abs(raw[name][key] - sdr[name][key])
        assert off < 0.3 * off_raw, (name, sdr[name][key], mapped[name][key], raw[name][key])
    assert abs(mapped["exposure"]["mean_luma"] - sdr["exposure"]["mean_luma"]) < 0.03
    assert mapped["sharpness"]["laplacian_var"] == pytest.approx(sdr["sharpness"]["laplacian_var"], rel=0.2)
    assert mapped["exposure"]["label"] == sdr["exposure"]["label"]


def test_both_passes_are_mapped(clips):
    from pipeline.video.sampling import AtFps, Uniform

    def item(path, **video):
        reqs = [Uniform(2), AtFps(4.0, max_side=128)]
        return MediaItem("x", path, 0, reqs, VideoConfig(reduced_pass_bytes=1, **video),
                         available_backends(("pyav",))).video()

    sdr, hdr = item(clips["sdr"]), item(clips["smpte2084"])
    assert hdr.reduced is not None and hdr.reduced.frames.shape == sdr.reduced.frames.shape
    for a, b in ((sdr, hdr), (sdr.reduced, hdr.reduced)):
        assert abs(a.frames.float().mean() - b.frames.float().mean()) < 8


def test_an_unknown_transfer_is_refused():
    with pytest.raises(ValueError, match="bt709"):
        tone_map_(torch.zeros(1, 2, 2, 3, dtype=torch.uint8), "bt709")


@pytest.mark.parametrize("transfer", TRANSFERS)
def test_the_look_up_table_is_the_arithmetic(transfer):
    from pipeline.video.tonemap import _map

    frames = torch.randint(0, 256, (3, 40, 50, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(tone_map_(frames.clone(), transfer), _map(frames, transfer))
    planar = frames.permute(0, 3, 1, 2).contiguous()  # a decoder's NHWC view of planar frames: mapped in place too
    tone_map_(planar.permute(0, 2, 3, 1), transfer)
    assert torch.equal(planar.permute(0, 2, 3, 1), _map(frames, transfer))
