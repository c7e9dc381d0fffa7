"""INT8 calibration data, in numpy: real camera-like images, pre-processed exactly as at run time.

The TensorRT calibrator class (export/build_trt.py) only copies these batches to the GPU; everything that
decides what the calibrator sees lives here, so it is tested without TensorRT.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from converseg_core.files import atomic_write_bytes
from converseg_core.processing import read_rgb

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")


def find_images(directory: str | Path) -> list[Path]:
    """Image files under `directory` (recursively, into symlinked folders too: a folder of links to a dataset's
    shards is the usual way to pick some), sorted so a seed gives the same selection everywhere."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"calibration image folder {directory} does not exist")
    paths, seen = [], set()
    for root, dirs, files in os.walk(directory, followlinks=True):  # Path.rglob skips linked folders
        seen.add(os.path.realpath(root))
        dirs[:] = [d for d in dirs if os.path.realpath(os.path.join(root, d)) not in seen]  # no link cycles
        paths += [Path(root) / f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    paths = sorted(p for p in paths if p.is_file())
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {directory}")
    return paths


class CalibrationBatcher:
    """Yields calibration batches shaped like the image encoder's input, `batch_size x 3 x S x S` float32.

    Only whole batches are produced (a partial last batch would skew the activation histograms towards its
    few images); the images left over are logged. With `shuffle`, a seeded shuffle picks `max_images`
    images spread over the whole folder rather than the first ones in name order (consecutive frames of
    one recording are near duplicates).

    preprocess: H x W x 3 uint8 -> 1 x 3 x S x S (or 3 x S x S) float32, the runtime's own pre-processing,
    so calibration sees the same value range as inference.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        *,
        preprocess: Callable[[np.ndarray], np.ndarray],
        input_shape: Sequence[int],
        max_images: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        if len(input_shape) != 4 or input_shape[1] != 3:
            raise ValueError(f"calibration input shape must be B x 3 x S x S, got {tuple(input_shape)}")
        self.batch_size = int(input_shape[0])
        self.input_shape = tuple(int(d) for d in input_shape)
        paths = list(paths)
        if shuffle:
            random.Random(seed).shuffle(paths)
        if max_images is not None:
            paths = paths[:max_images]
        num_batches = len(paths) // self.batch_size
        if num_batches == 0:
            raise ValueError(
                f"{len(paths)} calibration image(s) do not fill one batch of {self.batch_size}; give more images"
            )
        dropped = len(paths) - num_batches * self.batch_size
        if dropped:
            log.warning(
                "calibration: %d image(s) left out to keep whole batches of %d", dropped, self.batch_size
            )
        self.paths = paths[: num_batches * self.batch_size]
        self.num_batches = num_batches
        self.preprocess = preprocess
        self.batch_index = 0

    @property
    def num_images(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[np.ndarray]:
        for index in range(self.num_batches):
            self.batch_index = index
            start = index * self.batch_size
            batch = np.empty(self.input_shape, dtype=np.float32)
            for row, path in enumerate(self.paths[start : start + self.batch_size]):
                sample = np.asarray(self.preprocess(read_rgb(path)), dtype=np.float32)
                sample = (
                    sample.reshape(sample.shape[-3:]) if sample.ndim == 4 and sample.shape[0] == 1 else sample
                )
                if sample.shape != self.input_shape[1:]:
                    raise ValueError(
                        f"pre-processing of {path} gave {sample.shape}, the engine input needs "
                        f"{self.input_shape[1:]}: the calibration pre-processing and the model disagree"
                    )
                batch[row] = sample
            yield batch


def read_cache(path: Path | None) -> bytes | None:
    """Calibration cache bytes, or None (no path, or no file yet): TensorRT then calibrates from images."""
    if path is None or not path.is_file():
        return None
    log.info("using INT8 calibration cache %s", path)
    return path.read_bytes()


def write_cache(path: Path | None, cache: bytes) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, bytes(cache))
    log.info("wrote INT8 calibration cache %s (%d bytes)", path, len(cache))
