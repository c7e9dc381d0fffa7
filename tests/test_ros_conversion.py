"""converseg_ros.image_conversion without ROS: every encoding, padded rows, byte order, bad frames."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
from converseg_ros.image_conversion import (
    SUPPORTED_ENCODINGS,
    ImageConversionError,
    compressed_to_rgb,
    image_to_rgb,
    mono8_fields,
    rgb8_fields,
    rgb_to_image_fields,
)
from PIL import Image

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)


def msg(**fields):
    return SimpleNamespace(**fields)


def padded(fields: dict, pad: int) -> dict:
    """The same image with ``pad`` junk bytes at the end of every row."""
    rows = np.frombuffer(fields["data"], np.uint8).reshape(fields["height"], fields["step"])
    junk = np.full((fields["height"], pad), 0xAB, np.uint8)
    return fields | dict(step=fields["step"] + pad, data=np.concatenate([rows, junk], axis=1).tobytes())


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
@pytest.mark.parametrize("pad", [0, 3])
def test_colour_encodings_round_trip(encoding, pad):
    fields = padded(rgb_to_image_fields(RGB, encoding), pad)
    out = image_to_rgb(msg(**fields), max_side=64)
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, RGB)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
def test_colour_encodings_are_zero_copy(encoding):
    fields = rgb_to_image_fields(RGB, encoding)
    data = bytearray(fields["data"])
    out = image_to_rgb(msg(**fields | {"data": data}), max_side=64)
    assert np.shares_memory(out, np.frombuffer(data, np.uint8))


def test_mono8_is_grey_in_all_channels():
    fields = padded(rgb_to_image_fields(RGB, "mono8"), 2)
    out = image_to_rgb(msg(**fields), max_side=64)
    grey = RGB.mean(axis=2).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], grey)


@pytest.mark.parametrize("encoding", ["mono16", "16UC1"])
@pytest.mark.parametrize("bigendian", [0, 1])
@pytest.mark.parametrize("pad", [0, 4])
def test_16_bit_both_byte_orders_scaled_to_max(encoding, bigendian, pad):
    depth = np.array([[0, 1000, 2000], [3000, 4000, 4000]], dtype=np.uint16)
    data = depth.astype(">u2" if bigendian else "<u2").tobytes()
    fields = padded(
        dict(height=2, width=3, step=6, encoding=encoding, is_bigendian=bigendian, data=data), pad
    )
    out = image_to_rgb(msg(**fields), max_side=64)
    np.testing.assert_array_equal(out[:, :, 0], np.array([[0, 63, 127], [191, 255, 255]], np.uint8))


def test_all_zero_16_bit_frame_is_black():
    data = np.zeros((2, 2), "<u2").tobytes()
    out = image_to_rgb(
        msg(height=2, width=2, step=4, encoding="16UC1", is_bigendian=0, data=data), max_side=8
    )
    assert not out.any()


def test_works_on_array_array_as_rclpy_gives_it():
    import array

    fields = rgb_to_image_fields(RGB, "rgb8")
    out = image_to_rgb(msg(**fields | {"data": array.array("B", fields["data"])}), max_side=64)
    np.testing.assert_array_equal(out, RGB)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (dict(encoding="yuv422"), "unsupported_encoding"),
        (dict(encoding="32FC1"), "unsupported_encoding"),
        (dict(data=bytes(5 * 21 - 1)), "bad_data_length"),
        (dict(data=bytes(5 * 21 + 1)), "bad_data_length"),
        (dict(step=20), "bad_step"),
        (dict(height=0, data=b""), "empty_image"),
        (dict(width=0, step=0, data=b""), "empty_image"),
        (dict(height=100, step=21, data=bytes(100 * 21)), "image_too_large"),
    ],
)
def test_bad_frames_name_their_reason(change, reason):
    fields = rgb_to_image_fields(RGB, "rgb8") | change
    with pytest.raises(ImageConversionError) as info:
        image_to_rgb(msg(**fields), max_side=64)
    assert info.value.reason == reason
    assert str(info.value)


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_compressed_sixteen_bit_grey_is_scaled_like_mono16():
    deep = (np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) * 500).astype(np.uint16)  # up to 59,500
    out = compressed_to_rgb(msg(format="png", data=png_bytes(deep)), max_side=64)
    assert out.shape == (12, 10, 3) and out.dtype == np.uint8
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255 and 100 < out[6, 0, 0] < 155  # not clipped at 255


def test_compressed_decodes():
    out = compressed_to_rgb(msg(format="png", data=png_bytes(RGB)), max_side=64)
    np.testing.assert_array_equal(out, RGB)


@pytest.mark.parametrize("data", [b"", b"not an image at all", None])
def test_corrupt_compressed_is_rejected(data):
    if data is None:
        data = png_bytes(RGB)[:40]  # truncated
    with pytest.raises(ImageConversionError) as info:
        compressed_to_rgb(msg(format="png", data=data), max_side=64)
    assert info.value.reason == "corrupt_compressed"


def test_compressed_size_is_checked_before_decoding():
    big = np.zeros((100, 10, 3), np.uint8)
    with pytest.raises(ImageConversionError) as info:
        compressed_to_rgb(msg(format="png", data=png_bytes(big)), max_side=64)
    assert info.value.reason == "image_too_large"


def forged_png(width: int, height: int) -> bytes:
    """A few hundred bytes whose PNG header claims width x height (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(64)))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("side", [100_000, 5000])
def test_a_forged_huge_png_is_too_large_not_corrupt(side):
    # 100000 x 100000 trips Pillow's own bomb check inside Image.open (it was counted as corrupt_compressed).
    with pytest.raises(ImageConversionError) as info:
        compressed_to_rgb(msg(format="png", data=forged_png(side, side)), max_side=4096)
    assert info.value.reason == "image_too_large"


def test_outgoing_fields_carry_bytes():
    mask = (RNG.integers(0, 3, size=(4, 6))).astype(np.uint8)
    fields = mono8_fields(mask)
    assert isinstance(fields["data"], bytes) and fields["step"] == 6 and fields["encoding"] == "mono8"
    fields = rgb8_fields(RGB[:, ::-1])  # non-contiguous input is made contiguous
    assert isinstance(fields["data"], bytes) and fields["step"] == 21
    assert np.frombuffer(fields["data"], np.uint8).reshape(5, 7, 3).tolist() == RGB[:, ::-1].tolist()


def test_supported_encodings_listed():
    assert {"rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16", "16UC1"} <= set(SUPPORTED_ENCODINGS)
