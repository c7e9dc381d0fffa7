"""One sample's pixels: its image as the runtime reads it, its target mask checked against the image, and the
mask resized with the image's resize + pad geometry. A bad file raises SampleError, which datasets count and
skip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from converseg_core.errors import InputError
from converseg_core.processing import read_rgb, read_size, resized_shape

from .records import Record, SampleError


def load_rgb(path: Path) -> np.ndarray:
    """The image as the runtime reads it (converseg_core.processing.read_rgb: upright, deep grey scaled), or
    SampleError, which the datasets count and skip."""
    try:
        return read_rgb(path)
    except InputError as exc:
        raise SampleError(str(exc)) from exc


def image_hw(path: Path) -> tuple[int, int]:
    """(height, width) of an image as load_rgb reads it (EXIF orientation applied), from its header only."""
    try:
        return read_size(path)
    except InputError as exc:
        raise SampleError(str(exc)) from exc


def load_mask(record: Record, h: int, w: int) -> np.ndarray:
    """Target mask as H x W bool, checked against the image size."""
    if record.mask is None:
        return np.zeros((h, w), dtype=bool)
    if callable(record.mask):
        mask = record.mask(h, w)
    else:
        try:
            with Image.open(record.mask) as im:
                arr = np.asarray(im.convert("L") if im.mode not in ("L", "1", "P") else im)
        except (OSError, SyntaxError, ValueError) as exc:
            raise SampleError(f"{record.mask}: cannot read mask ({exc})") from exc
        if arr.ndim != 2:
            raise SampleError(f"{record.mask}: mask must be single-channel, got shape {arr.shape}")
        mask = arr != 0  # docs/TRAINING.md: non-zero is target, whatever the maximum
    if mask.shape != (h, w):
        raise SampleError(
            f"{record.mask}: mask size {mask.shape[::-1]} differs from image {record.image} size {(w, h)}"
        )
    if record.negative and mask.any():
        raise SampleError(f"{record.mask}: sample is marked negative but its mask is not empty")
    if not record.negative and not mask.any():
        raise SampleError(f"{record.mask}: positive sample with an empty mask")
    return mask


def resize_mask_padded(mask: np.ndarray, img_size: int) -> np.ndarray:
    """Mask -> img_size x img_size float32 in 0..1 with the image's resize + bottom-right pad geometry."""
    h, w = mask.shape
    nh, nw = resized_shape(h, w, img_size)
    m = Image.fromarray(mask.astype(np.uint8) * 255).resize((nw, nh), Image.BILINEAR)
    out = np.zeros((img_size, img_size), dtype=np.float32)
    out[:nh, :nw] = np.asarray(m, dtype=np.float32) / 255.0
    return out
