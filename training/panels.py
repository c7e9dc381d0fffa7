"""Overlay panels for validation and evaluation: image | ground truth (green) | prediction (red), with the request."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def overlay(
    image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int], alpha: float = 0.5
) -> np.ndarray:
    out = image.astype(np.float32).copy()
    m = mask.astype(bool)
    out[m] = out[m] * (1 - alpha) + np.asarray(color, np.float32) * alpha
    return out.astype(np.uint8)


def make_panel(
    image: np.ndarray,
    target: np.ndarray | None,
    pred: np.ndarray,
    caption: str,
    *,
    max_side: int = 256,
) -> Image.Image:
    """image: H x W x 3 uint8; target/pred: H x W bool. Returns one PIL image with a caption strip."""
    h, w = image.shape[:2]
    scale = max_side / max(h, w)
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    tiles = [image]
    if target is not None:
        tiles.append(overlay(image, target, (0, 220, 0)))
    tiles.append(overlay(image, pred, (230, 30, 30)))
    tiles = [Image.fromarray(t).resize(size, Image.BILINEAR) for t in tiles]
    strip = 30
    panel = Image.new("RGB", (size[0] * len(tiles), size[1] + strip), (255, 255, 255))
    for i, t in enumerate(tiles):
        panel.paste(t, (i * size[0], strip))
    ImageDraw.Draw(panel).text((4, 4), caption[:160], fill=(0, 0, 0))
    return panel


def save_panels(panels: list[Image.Image], path: str | Path, columns: int = 1) -> Path:
    """Stack panels into one PNG (columns side by side, rows top to bottom)."""
    if not panels:
        raise ValueError("no panels to save")
    w = max(p.width for p in panels)
    h = max(p.height for p in panels)
    rows = (len(panels) + columns - 1) // columns
    sheet = Image.new("RGB", (w * columns, h * rows), (255, 255, 255))
    for i, p in enumerate(panels):
        sheet.paste(p, ((i % columns) * w, (i // columns) * h))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
