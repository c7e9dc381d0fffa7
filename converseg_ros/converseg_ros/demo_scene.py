"""Frames for the demo camera, without ROS: data engine renders when a folder is given, else a synthetic
kitchen table drawn in numpy (a red mug, a blue bowl, a green apple and a knife that drift slowly)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class DemoSample:
    rgb: np.ndarray  # H x W x 3 uint8
    query: str | None  # the request that goes with this picture (data engine), or None


def synthetic_frames(width: int, height: int, count: int = 30) -> list[np.ndarray]:
    """``count`` H x W x 3 uint8 frames of a loop in which the objects drift a few pixels."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    table = np.stack(
        [150 + 30 * np.sin(xx / 37.0), 105 + 20 * np.sin(xx / 37.0 + 0.5), 70 + 0 * xx], axis=2
    )  # wood-like stripes
    table[: height // 4] = (200, 205, 210)  # wall
    table = table.astype(np.uint8)
    s = min(width, height) / 480.0
    frames = []
    for i in range(count):
        dx = 12 * s * np.sin(2 * np.pi * i / count)
        img = table.copy()
        # red mug: body and handle
        cx, cy = 0.30 * width + dx, 0.55 * height
        body = (np.abs(xx - cx) < 45 * s) & (np.abs(yy - cy) < 55 * s)
        handle = (np.hypot(xx - (cx + 52 * s), yy - cy) < 26 * s) & (
            np.hypot(xx - (cx + 52 * s), yy - cy) > 14 * s
        )
        img[body | (handle & (xx > cx + 45 * s))] = (200, 30, 35)
        # blue bowl: lower half-ellipse
        bx, by = 0.62 * width - dx, 0.58 * height
        bowl = (((xx - bx) / (80 * s)) ** 2 + ((yy - by) / (50 * s)) ** 2 < 1) & (yy > by - 10 * s)
        img[bowl] = (40, 70, 190)
        # green apple
        ax, ay = 0.82 * width, 0.45 * height + dx
        img[np.hypot(xx - ax, yy - ay) < 30 * s] = (70, 170, 50)
        # knife: blade and handle
        kx, ky = 0.50 * width, 0.85 * height
        img[(np.abs(yy - ky) < 5 * s) & (xx > kx - 90 * s) & (xx < kx + 20 * s)] = (190, 190, 195)
        img[(np.abs(yy - ky) < 7 * s) & (xx >= kx + 20 * s) & (xx < kx + 70 * s)] = (40, 30, 25)
        frames.append(img)
    return frames


def dataset_samples(folder: str | Path, limit: int = 64) -> list[DemoSample]:
    """Images and prompts from a data engine output folder (python -m training.dataengine): every
    ``shard-*/samples.jsonl``, one sample per image, at most ``limit``. Empty if the folder has none."""
    from PIL import Image

    root = Path(folder)
    samples: list[DemoSample] = []
    seen: set[Path] = set()
    for jsonl in sorted(root.glob("shard-*/samples.jsonl")):
        for line in jsonl.read_text(encoding="utf-8").splitlines():
            if len(samples) >= limit:
                return samples
            try:
                row = json.loads(line)
                path = jsonl.parent / row["image"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
            if path in seen or not path.is_file():
                continue
            seen.add(path)
            with Image.open(path) as img:
                samples.append(
                    DemoSample(np.asarray(img.convert("RGB")), str(row.get("prompt") or "") or None)
                )
    return samples
