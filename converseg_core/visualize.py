"""Overlays for people: mask tinted over the frame, with its outline. numpy only."""

from __future__ import annotations

import numpy as np

PALETTE = np.array(
    [(255, 64, 64), (64, 160, 255), (64, 220, 96), (255, 200, 0), (200, 96, 255), (0, 220, 220)],
    dtype=np.float32,
)


def outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` that touch a pixel outside it (4-neighbourhood)."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def overlay_masks(image: np.ndarray, masks: list[np.ndarray], alpha: float = 0.45) -> np.ndarray:
    """image: H x W x 3 uint8; masks: H x W bool each -> H x W x 3 uint8 with each mask tinted and outlined."""
    out = image.astype(np.float32)
    for i, mask in enumerate(masks):
        color = PALETTE[i % len(PALETTE)]
        out[mask] = (1.0 - alpha) * out[mask] + alpha * color
        out[outline(mask)] = color
    return out.clip(0, 255).astype(np.uint8)
