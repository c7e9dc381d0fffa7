"""Pre- and post-processing in numpy, shared by every backend (torch, ONNX Runtime, TensorRT).

Pre-processing follows SAM: resize so the longest side equals img_size (bilinear, PIL), normalize with the
pixel mean/std, pad bottom-right to img_size x img_size. Post-processing undoes it: the decoder's low-res
logits are upsampled to the padded input, cropped to the resized image, and resized to the camera frame,
both steps bilinear with align_corners=False, as SAM's postprocess_masks does with F.interpolate.
Both upsampling steps are linear, so they are folded into two small matrices per (frame size): one matmul
on each side instead of two full-size interpolations. Those matmuls run on one BLAS thread: they take about
a millisecond, and a multi-threaded OpenBLAS leaves its worker threads busy-waiting for work long after the
call, taking the cores from the inference runtime (measured with ONNX Runtime on 2 cores: a new frame took
77-80 ms with OpenBLAS's threads, 57-59 ms with one; docs/benchmarks/export.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from threadpoolctl import ThreadpoolController

from .errors import InputError

# EXIF orientations (tag 0x0112) 5 to 8 transpose the image: ImageOps.exif_transpose swaps its sides.
ORIENTATION_TAG = 0x0112
QUARTER_TURNS = (5, 6, 7, 8)


def resized_shape(height: int, width: int, target: int) -> tuple[int, int]:
    """Shape after resizing the longest side to `target` (SAM's ResizeLongestSide.get_preprocess_shape).
    A side never shrinks below one pixel: SAM's rounding gives 0 for a 1100 x 1 strip at 512."""
    scale = target / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """H x W x 3 uint8 RGB from an image file opened with Pillow, as a viewer shows it.

    The EXIF orientation is applied (a phone photo stored sideways comes out upright, so "the cup on the
    left" means what the user sees). 16-bit and float grey images are scaled by their maximum: Pillow's
    convert("RGB") would clip them at 255 and return an almost white frame. Everything else (palette, grey,
    alpha, CMYK) goes through convert("RGB").
    """
    if img.getexif().get(ORIENTATION_TAG, 1) != 1:  # exif_transpose would copy every upright frame too
        img = ImageOps.exif_transpose(img)
    if is_deep_grey(img):
        return np.repeat(scale_to_u8(np.asarray(img))[:, :, None], 3, axis=2)
    return np.asarray(img.convert("RGB"))


def read_rgb(path: str | Path) -> np.ndarray:
    """The one image reader of every path (CLI, training, evaluation, export calibration and verification):
    the image file as H x W x 3 uint8 RGB, upright as a viewer shows it (pil_to_rgb, which also decodes the
    ROS node's compressed frames).

    Raises InputError naming the file and the problem: missing, a folder, not an image, truncated, too many
    pixels for Pillow's decompression-bomb guard, NaN or infinite pixels.
    """
    try:
        with Image.open(path) as img:
            return pil_to_rgb(img)
    except FileNotFoundError:
        raise InputError(f"{path}: no such image file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not an image file") from None
    except Image.DecompressionBombError as exc:
        raise InputError(f"{path}: refused, too many pixels ({exc})") from exc
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        # Pillow reports a truncated or garbled file with any of these, depending on the format
        raise InputError(f"{path}: cannot be read as an image ({exc})") from exc


def read_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of the array read_rgb(path) returns, from the file's header only (nothing decoded): an
    EXIF orientation that turns the image by 90 degrees swaps the stored sides, as read_rgb does."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(ORIENTATION_TAG, 1) in QUARTER_TURNS:
                width, height = height, width
    except FileNotFoundError:
        raise InputError(f"{path}: no such image file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: cannot be read as an image ({exc})") from exc
    return height, width


def is_deep_grey(img: Image.Image) -> bool:
    """16-bit or float single-channel Pillow image (depth, IR), which convert("RGB") would clip at 255."""
    return img.mode in ("I", "F") or img.mode.startswith("I;16")


def scale_to_u8(pixels: np.ndarray) -> np.ndarray:
    """A deep grey image (16-bit, 32-bit or float) as uint8, scaled so its maximum is 255; negatives are 0
    and an all-zero image stays black.

    Raises InputError for NaN or infinite pixels: one of them would set the scale of every other pixel (the
    whole frame black, or NaN cast to uint8), and a frame whose pixels are not all measured is not one to act
    on."""
    grey = pixels.astype(np.float64)
    finite = np.isfinite(grey)
    if not finite.all():
        bad = int(grey.size - np.count_nonzero(finite))
        raise InputError(
            f"{bad} of {grey.size} pixels are NaN or infinite (a float image with missing readings?); "
            "replace them with a finite value (e.g. 0) before segmenting"
        )
    grey = np.clip(grey, 0.0, None)
    top = float(grey.max()) if grey.size else 0.0
    if top <= 0:
        return np.zeros(grey.shape, dtype=np.uint8)
    # Divide first: the brightest pixel is then exactly 255 (x * (255 / top) can land on 254.99...).
    return (grey / top * 255.0).astype(np.uint8)


def validate_image(image: object, *, max_side: int) -> np.ndarray:
    """Return `image` as a C-contiguous H x W x 3 uint8 array, or raise InputError saying what is wrong."""
    if not isinstance(image, np.ndarray):
        raise InputError(f"image must be a numpy array (H x W x 3 uint8 RGB), got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise InputError(f"image dtype must be uint8 (0..255 RGB), got {image.dtype}; convert before calling")
    if image.ndim != 3:
        raise InputError(f"image must have shape H x W x 3, got shape {image.shape}")
    height, width, channels = image.shape
    if channels != 3:
        raise InputError(
            f"image must have 3 channels (RGB), got {channels}; drop alpha or expand grey to RGB first"
        )
    if height == 0 or width == 0:
        raise InputError(f"image is empty (shape {image.shape})")
    if max(height, width) > max_side:
        raise InputError(
            f"image {width}x{height} exceeds the configured limit of {max_side} pixels on its longest side"
        )
    return np.ascontiguousarray(image)


@dataclass(frozen=True)
class PreprocessedImage:
    """tensor: 1 x 3 x S x S float32 network input; input_size: (h, w) of the resized image inside it;
    original_size: (H, W) of the camera frame."""

    tensor: np.ndarray
    input_size: tuple[int, int]
    original_size: tuple[int, int]


def preprocess(
    image: np.ndarray,
    *,
    img_size: int,
    pixel_mean: tuple[float, float, float],
    pixel_std: tuple[float, float, float],
) -> PreprocessedImage:
    """image: H x W x 3 uint8 RGB (already validated)."""
    height, width = image.shape[:2]
    new_h, new_w = resized_shape(height, width, img_size)
    if (new_h, new_w) != (height, width):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
    out = np.zeros((1, 3, img_size, img_size), dtype=np.float32)
    # Channel by channel, straight from the uint8 planes into the output: (x - mean) / std as x * (1 / std)
    # - mean / std, with no H x W x 3 float temporaries (5x faster than the broadcast form at 512 x 384).
    planes = image.transpose(2, 0, 1)
    for c in range(3):
        inv_std = np.float32(1.0 / pixel_std[c])
        target = out[0, c, :new_h, :new_w]
        np.multiply(planes[c], inv_std, out=target, casting="unsafe")
        target -= np.float32(pixel_mean[c]) * inv_std
    return PreprocessedImage(tensor=out, input_size=(new_h, new_w), original_size=(height, width))


def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """out_size x in_size matrix M with M @ x == F.interpolate(x, mode='bilinear', align_corners=False)
    along one axis (no antialiasing)."""
    scale = in_size / out_size
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = src - i0
    m = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), 1.0 - w1)
    np.add.at(m, (rows, i1), w1)
    return m


@lru_cache(maxsize=32)
def _upsample_matrices(
    low_res: int, img_size: int, input_size: tuple[int, int], original_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    # low-res -> padded input (img_size), crop to the resized image, -> camera frame; per axis.
    rows = (
        bilinear_matrix(original_size[0], input_size[0]) @ bilinear_matrix(img_size, low_res)[: input_size[0]]
    )
    cols = (
        bilinear_matrix(original_size[1], input_size[1]) @ bilinear_matrix(img_size, low_res)[: input_size[1]]
    )
    return rows.astype(np.float32), np.ascontiguousarray(cols.T.astype(np.float32))


def upsample_logits(
    low_res_logits: np.ndarray, *, img_size: int, input_size: tuple[int, int], original_size: tuple[int, int]
) -> np.ndarray:
    """low_res_logits: Q x L x L (or Q x 1 x L x L) -> Q x H x W float32 logits at camera resolution."""
    logits = np.asarray(low_res_logits, dtype=np.float32)
    if logits.ndim == 4:
        logits = logits[:, 0]
    rows, cols_t = _upsample_matrices(logits.shape[-1], img_size, tuple(input_size), tuple(original_size))
    with _blas_controller().limit(limits=1, user_api="blas"):
        return rows @ logits @ cols_t


@lru_cache(maxsize=1)
def _blas_controller() -> ThreadpoolController:
    """Created once: it inspects the loaded native libraries (milliseconds)."""
    return ThreadpoolController()


def logit_peak(
    low_res_logits: np.ndarray, *, img_size: int, input_size: tuple[int, int], original_size: tuple[int, int]
) -> tuple[int, int]:
    """(x, y) camera pixel of the highest logit of one L x L low-resolution mask (padding excluded): where the
    model is surest the answer lies, whether or not it finds the target present."""
    logits = np.asarray(low_res_logits, dtype=np.float32).reshape(low_res_logits.shape[-2:])
    cell = img_size / logits.shape[-1]  # network-input pixels per low-resolution cell
    (in_h, in_w), (h, w) = input_size, original_size
    valid = logits[: max(1, math.ceil(in_h / cell)), : max(1, math.ceil(in_w / cell))]
    row, col = np.unravel_index(int(np.argmax(valid)), valid.shape)
    y = min(h - 1, int((row + 0.5) * cell * h / in_h))
    x = min(w - 1, int((col + 0.5) * cell * w / in_w))
    return x, y


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight box (x0, y0, x1, y1), inclusive pixel coordinates, of a bool mask; None if empty."""
    ys = np.flatnonzero(mask.any(axis=1))
    if ys.size == 0:
        return None
    xs = np.flatnonzero(mask.any(axis=0))
    return int(xs[0]), int(ys[0]), int(xs[-1]), int(ys[-1])


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def presence_probability(
    presence_logits: np.ndarray, iou_scores: np.ndarray, score_weight: float
) -> np.ndarray:
    """Q probabilities that each request's target is in the picture: the presence head's logit, plus
    `score_weight` times the decoder's predicted IoU of the request's mask (ConverSegConfig.presence_score_weight).
    presence_logits: Q (or Q x 1); iou_scores: Q x 1 (or Q)."""
    logits = np.asarray(presence_logits, dtype=np.float64).reshape(-1)
    if score_weight:
        logits = (
            logits + score_weight * np.asarray(iou_scores, dtype=np.float64).reshape(len(logits), -1)[:, 0]
        )
    return sigmoid(logits)
