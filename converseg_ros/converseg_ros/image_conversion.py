"""sensor_msgs/Image and CompressedImage <-> numpy, without ROS and without cv_bridge.

Every function takes duck-typed messages (anything with the fields of sensor_msgs/Image), so this module
imports and is tested without rclpy. Incoming pixel data is viewed with ``np.frombuffer`` (no copy) and
outgoing data is returned as ``bytes``: assigning a numpy array to ``Image.data`` costs about 58 ms per
640x480 frame in rclpy, assigning bytes about 0.05 ms (docs/ROS.md).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from converseg_core.errors import InputError
from converseg_core.processing import pil_to_rgb, scale_to_u8

# encoding -> (channels, numpy dtype of one channel, channel order: "rgb", "bgr" or "grey")
_ENCODINGS: dict[str, tuple[int, str, str]] = {
    "rgb8": (3, "u1", "rgb"),
    "bgr8": (3, "u1", "bgr"),
    "rgba8": (4, "u1", "rgb"),
    "bgra8": (4, "u1", "bgr"),
    "8UC3": (3, "u1", "bgr"),  # OpenCV's default order
    "mono8": (1, "u1", "grey"),
    "8UC1": (1, "u1", "grey"),
    "mono16": (1, "u2", "grey"),
    "16UC1": (1, "u2", "grey"),
}

SUPPORTED_ENCODINGS = tuple(_ENCODINGS)

# A compressed payload larger than this is refused before decoding (a 4K PNG is about 25 MB).
MAX_COMPRESSED_BYTES = 64 * 1024 * 1024


class ImageConversionError(ValueError):
    """A frame that cannot be turned into RGB. ``reason`` is a short stable key counted in diagnostics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def image_to_rgb(msg: Any, *, max_side: int) -> np.ndarray:
    """Return the frame as an H x W x 3 uint8 RGB array.

    8-bit colour encodings come back as a read-only view of ``msg.data`` (no copy), grey and 16-bit
    encodings as a new array. 16-bit images (mono16, 16UC1, e.g. IR or depth) are scaled so the frame's
    maximum maps to 255, because the model wants 8-bit contrast, not units.

    Raises ImageConversionError for unsupported encodings, zero-size or oversized frames (a side above
    ``max_side``), a ``step`` too small for the width, and data whose length is not ``height * step``.
    """
    check_image(msg, max_side=max_side)
    channels, dtype, order = _ENCODINGS[str(msg.encoding)]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    row_bytes = width * channels * np.dtype(dtype).itemsize
    data = msg.data
    buf = np.frombuffer(data, dtype=np.uint8)
    rows = buf.reshape(height, step)[:, :row_bytes]  # drops the row padding, still a view
    if dtype == "u1":
        pixels = rows.reshape(height, width, channels) if channels > 1 else rows
    else:
        endian = ">" if msg.is_bigendian else "<"
        pixels = np.ascontiguousarray(rows).view(endian + dtype).reshape(height, width)
    if order == "grey":
        grey = pixels if pixels.dtype == np.uint8 else scale_to_u8(pixels)
        return np.repeat(grey[:, :, None], 3, axis=2)
    # Both are strided views of the message buffer: the alpha channel and the BGR order cost nothing here.
    return pixels[:, :, :3] if order == "rgb" else pixels[:, :, 2::-1]


def check_image(msg: Any, *, max_side: int) -> None:
    """The constant-time checks of image_to_rgb (fields only, no pixel touched): cheap enough for a
    subscription callback, so a bad frame is counted even when a newer frame replaces it before decoding."""
    encoding = str(msg.encoding)
    if encoding not in _ENCODINGS:
        raise ImageConversionError(
            "unsupported_encoding",
            f"unsupported encoding {encoding!r}; supported: {', '.join(SUPPORTED_ENCODINGS)}",
        )
    channels, dtype, _ = _ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    _check_size(height, width, max_side)
    row_bytes = width * channels * np.dtype(dtype).itemsize
    if step < row_bytes:
        raise ImageConversionError(
            "bad_step", f"step {step} is smaller than width x bytes per pixel = {row_bytes} ({encoding})"
        )
    if len(msg.data) != height * step:
        raise ImageConversionError(
            "bad_data_length",
            f"data has {len(msg.data)} bytes, expected height x step = {height} x {step} = {height * step}",
        )


def compressed_to_rgb(msg: Any, *, max_side: int) -> np.ndarray:
    """Decode a sensor_msgs/CompressedImage (JPEG, PNG, anything Pillow reads) into H x W x 3 uint8 RGB.

    The image size is read from the header before any pixel is decoded, so a decompression bomb is refused
    without allocating it.
    """
    from PIL import Image as PILImage

    data = msg.data
    if len(data) == 0:
        raise ImageConversionError("corrupt_compressed", "compressed image payload is empty")
    if len(data) > MAX_COMPRESSED_BYTES:
        raise ImageConversionError(
            "image_too_large", f"compressed payload of {len(data)} bytes exceeds {MAX_COMPRESSED_BYTES}"
        )
    try:
        with PILImage.open(io.BytesIO(memoryview(data))) as img:
            _check_size(img.height, img.width, max_side)
            rgb = pil_to_rgb(img)  # the one image reader of every path: upright, deep grey scaled
    except ImageConversionError:
        raise
    except PILImage.DecompressionBombError as exc:  # Pillow's own header check, above any max_input_side
        raise ImageConversionError("image_too_large", f"compressed image header: {exc}") from exc
    except InputError as exc:  # NaN or infinite pixels in a float image
        raise ImageConversionError("invalid_pixels", f"compressed image ({msg.format!r}): {exc}") from exc
    except Exception as exc:  # Pillow raises many types for truncated or garbage data
        raise ImageConversionError(
            "corrupt_compressed", f"cannot decode compressed image ({msg.format!r}): {exc}"
        ) from exc
    return rgb


def _check_size(height: int, width: int, max_side: int) -> None:
    if height <= 0 or width <= 0:
        raise ImageConversionError("empty_image", f"image has zero size ({width} x {height})")
    if height > max_side or width > max_side:
        raise ImageConversionError(
            "image_too_large", f"image {width} x {height} exceeds max_input_side={max_side}"
        )


def mono8_fields(mask: np.ndarray) -> dict[str, Any]:
    """Fields of a sensor_msgs/Image (mono8) holding ``mask`` (H x W uint8), data as bytes."""
    height, width = mask.shape
    return dict(
        height=height,
        width=width,
        encoding="mono8",
        is_bigendian=0,
        step=width,
        data=np.ascontiguousarray(mask, dtype=np.uint8).tobytes(),
    )


def rgb8_fields(rgb: np.ndarray) -> dict[str, Any]:
    """Fields of a sensor_msgs/Image (rgb8) holding ``rgb`` (H x W x 3 uint8), data as bytes."""
    height, width, _ = rgb.shape
    return dict(
        height=height,
        width=width,
        encoding="rgb8",
        is_bigendian=0,
        step=3 * width,
        data=np.ascontiguousarray(rgb, dtype=np.uint8).tobytes(),
    )


def rgb_to_image_fields(rgb: np.ndarray, encoding: str = "rgb8") -> dict[str, Any]:
    """Fields of a sensor_msgs/Image in ``encoding`` from an RGB array: the inverse of image_to_rgb.

    Used by the demo camera and the tests; supports the 8-bit encodings (rgb8, bgr8, rgba8, bgra8, mono8).
    """
    if encoding == "rgb8":
        pixels = rgb
    elif encoding == "bgr8":
        pixels = rgb[:, :, ::-1]
    elif encoding in ("rgba8", "bgra8"):
        colour = rgb if encoding == "rgba8" else rgb[:, :, ::-1]
        alpha = np.full(rgb.shape[:2] + (1,), 255, dtype=np.uint8)
        pixels = np.concatenate([colour, alpha], axis=2)
    elif encoding == "mono8":
        pixels = rgb.mean(axis=2).astype(np.uint8)
    else:
        raise ValueError(f"rgb_to_image_fields does not write {encoding!r}")
    height, width = rgb.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    return dict(
        height=height,
        width=width,
        encoding=encoding,
        is_bigendian=0,
        step=width * channels,
        data=np.ascontiguousarray(pixels).tobytes(),
    )
