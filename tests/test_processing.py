import numpy as np
import pytest
import torch
import torch.nn.functional as F

from converseg_core.processing import (
    bilinear_matrix,
    logit_peak,
    mask_box,
    preprocess,
    resized_shape,
    upsample_logits,
)
from converseg_core.visualize import overlay_masks


@pytest.mark.parametrize("h, w", [(480, 640), (640, 480), (100, 100), (1, 300)])
def test_resized_shape_matches_sam(h, w):
    nh, nw = resized_shape(h, w, 512)
    assert max(nh, nw) == 512
    assert abs(nh / nw - h / w) < 0.02 or min(nh, nw) <= 2


def test_preprocess_normalizes_and_pads_bottom_right():
    img = np.full((30, 60, 3), 200, dtype=np.uint8)
    pre = preprocess(img, img_size=64, pixel_mean=(100.0, 100.0, 100.0), pixel_std=(50.0, 50.0, 50.0))
    assert pre.tensor.shape == (1, 3, 64, 64) and pre.tensor.dtype == np.float32
    assert pre.input_size == (32, 64) and pre.original_size == (30, 60)
    assert np.allclose(pre.tensor[0, :, :32, :], 2.0)
    assert np.all(pre.tensor[0, :, 32:, :] == 0.0)


@pytest.mark.parametrize("out_size, in_size", [(128, 32), (33, 7), (7, 33), (480, 384)])
def test_bilinear_matrix_matches_torch(out_size, in_size):
    x = torch.randn(1, 1, in_size, 1)
    ref = F.interpolate(x, size=(out_size, 1), mode="bilinear", align_corners=False)[0, 0, :, 0].numpy()
    ours = bilinear_matrix(out_size, in_size) @ x[0, 0, :, 0].numpy()
    # torch computes source coordinates in float32: agreement to ~1e-4 is exact up to that rounding.
    assert np.allclose(ours, ref, atol=2e-4)


def test_upsample_logits_matches_sams_two_step_interpolation():
    low = torch.randn(3, 1, 32, 32)
    # SAM: to the padded input, crop the resized image, then to the frame.
    ref = F.interpolate(low, (128, 128), mode="bilinear", align_corners=False)[..., :96, :128]
    ref = F.interpolate(ref, (300, 400), mode="bilinear", align_corners=False)[:, 0].numpy()
    ours = upsample_logits(low.numpy(), img_size=128, input_size=(96, 128), original_size=(300, 400))
    assert ours.shape == (3, 300, 400)
    assert np.abs(ours - ref).max() < 1e-4


def test_logit_peak_maps_the_highest_cell_to_the_camera_and_skips_padding():
    low = np.zeros((32, 32), np.float32)
    low[10, 20] = 5.0  # cell centre (20.5, 10.5) x 4 input pixels per cell -> (82, 42) on the 128 x 96 input
    low[30, 5] = 9.0  # higher, but in the padding below the 96-row resized image
    x, y = logit_peak(low, img_size=128, input_size=(96, 128), original_size=(300, 400))
    assert (x, y) == (int(82 * 400 / 128), int(42 * 300 / 96))
    # The peak lies where the camera-resolution logits are highest, to within one cell.
    smooth = np.exp(-((np.arange(32)[:, None] - 10) ** 2 + (np.arange(32)[None] - 20) ** 2) / 8.0)
    up = upsample_logits(
        smooth[None].astype(np.float32), img_size=128, input_size=(96, 128), original_size=(300, 400)
    )
    uy, ux = np.unravel_index(up[0].argmax(), up[0].shape)
    x, y = logit_peak(smooth, img_size=128, input_size=(96, 128), original_size=(300, 400))
    assert abs(x - ux) <= 400 / 32 and abs(y - uy) <= 300 / 24


def test_mask_box_and_overlay():
    mask = np.zeros((10, 20), dtype=bool)
    assert mask_box(mask) is None
    mask[2:5, 3:9] = True
    assert mask_box(mask) == (3, 2, 8, 4)
    img = np.zeros((10, 20, 3), dtype=np.uint8)
    out = overlay_masks(img, [mask])
    assert out.shape == img.shape and out.dtype == np.uint8
    assert out[3, 5].any() and not out[8, 15].any()
