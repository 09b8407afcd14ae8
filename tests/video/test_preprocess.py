"""Frames to model input: resize of the short side, centre crop, normalisation, dtype, and the grouped float
conversion that bounds memory giving exactly what one pass gives."""

import pytest
import torch

import pipeline.video.preprocess as pre

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def test_a_flat_colour_normalises_to_its_value_at_the_model_size():
    frames = torch.empty(2, 3, 90, 160, 3, dtype=torch.uint8)
    frames[..., 0], frames[..., 1], frames[..., 2] = 200, 100, 0
    x = pre.clips_to_input(frames, 64, MEAN, STD, "cpu")
    assert x.shape == (2, 3, 3, 64, 64) and x.dtype == torch.float32
    for c, v in enumerate((200, 100, 0)):
        assert torch.allclose(x[:, :, c], torch.tensor((v / 255 - MEAN[c]) / STD[c]), atol=1e-5)


def test_short_side_resize_and_centre_crop():
    frames = torch.zeros(1, 1, 100, 300, 3, dtype=torch.uint8)
    frames[..., :, 100:200, :] = 255  # a white middle third: the centre square of the 50x150 resize
    x = pre.clips_to_input(frames, 50, [0.0] * 3, [1.0] * 3, "cpu")[0, 0]
    assert x.shape == (3, 50, 50)
    # the centre square is the white third (a crop anywhere else would hold black); its edge columns blend a little
    assert x[:, :, 1:-1].min() > 0.99 and 0.8 < x[:, :, 0].max() < 0.95


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_groups_bounding_the_float_copy_change_nothing(monkeypatch, dtype):
    frames = torch.randint(0, 256, (3, 5, 72, 128, 3), dtype=torch.uint8)
    whole = pre.clips_to_input(frames, 32, MEAN, STD, "cpu", dtype)
    monkeypatch.setattr(pre, "GROUP_BYTES", 72 * 128 * 3 * 4 * 4)  # 15 frames in groups of 4
    grouped = pre.clips_to_input(frames, 32, MEAN, STD, "cpu", dtype)
    assert grouped.dtype == dtype and torch.equal(grouped, whole)
