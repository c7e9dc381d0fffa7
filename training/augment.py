"""Training augmentation on native-resolution numpy images and masks, before runtime pre-processing.

Geometry stays compatible with the runtime: the network still sees resize-longest-side + bottom-right pad, so
"scale" augmentation is a zoom-in crop that the resize then brings back to img_size. A horizontal flip mirrors
the scene, so left and right swap in the request as well ("the mug left of the plate" -> "... right of ...").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

_LR_WORDS = {
    "left": "right",
    "right": "left",
    "leftmost": "rightmost",
    "rightmost": "leftmost",
    "lefthand": "righthand",
    "righthand": "lefthand",
}
_LR_RE = re.compile(r"\b(left|right|leftmost|rightmost|lefthand|righthand)\b", re.IGNORECASE)


def swap_left_right(prompt: str) -> str:
    """Swap left/right words (keeping case) so a request still describes a mirrored scene.

    "left-hand" is handled as two words. Non-spatial uses ("what's left on the table", "the right tool")
    would swap too; callers that know a prompt is not spatial can disable flipping for it.
    """

    def repl(m: re.Match) -> str:
        word = m.group(0)
        out = _LR_WORDS[word.lower()]
        if word.isupper():
            return out.upper()
        if word[0].isupper():
            return out.capitalize()
        return out

    return _LR_RE.sub(repl, prompt)


@dataclass
class AugmentConfig:
    # Probability of a zoom-in crop; the crop keeps min_crop..1 of each side at the original aspect ratio.
    crop_prob: float = 0.5
    min_crop: float = 0.75
    # A crop must keep this fraction of a positive target's pixels, so the answer stays the same object.
    min_target_kept: float = 0.9
    # Mirror probability (left/right swapped in the prompt).
    flip_prob: float = 0.5
    # Colour jitter strengths (0 disables): multiplicative brightness/contrast/saturation ranges 1 +- s.
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2


def random_crop_box(
    rng: np.random.Generator, h: int, w: int, cfg: AugmentConfig, targets: list[np.ndarray]
) -> tuple[int, int, int, int] | None:
    """Return a (top, left, height, width) zoom-in crop that keeps min_target_kept of every target, or None
    to keep the full frame."""
    if cfg.crop_prob <= 0 or rng.random() >= cfg.crop_prob:
        return None
    totals = [int(np.count_nonzero(t)) for t in targets]
    for _ in range(10):
        f = rng.uniform(cfg.min_crop, 1.0)
        ch, cw = max(1, int(round(h * f))), max(1, int(round(w * f)))
        top = int(rng.integers(0, h - ch + 1))
        left = int(rng.integers(0, w - cw + 1))
        if all(
            np.count_nonzero(t[top : top + ch, left : left + cw]) >= cfg.min_target_kept * n
            for t, n in zip(targets, totals, strict=True)
            if n
        ):
            return top, left, ch, cw
    return None


def color_jitter(rng: np.random.Generator, image: np.ndarray, cfg: AugmentConfig) -> np.ndarray:
    """Brightness, contrast and saturation jitter on an H x W x 3 uint8 image, in random order."""
    img = image.astype(np.float32)
    ops = []
    if cfg.brightness > 0:
        ops.append(("b", rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)))
    if cfg.contrast > 0:
        ops.append(("c", rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)))
    if cfg.saturation > 0:
        ops.append(("s", rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)))
    for i in rng.permutation(len(ops)):
        kind, factor = ops[i]
        if kind == "b":
            img = img * factor
        elif kind == "c":
            img = (img - img.mean()) * factor + img.mean()
        else:
            gray = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
            img = (img - gray[..., None]) * factor + gray[..., None]
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def augment(
    rng: np.random.Generator,
    image: np.ndarray,
    masks: list[np.ndarray],
    prompts: list[str],
    cfg: AugmentConfig,
) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
    """Augment one image and every request about it the same way.

    image: H x W x 3 uint8; masks: H x W bool targets (may be empty: unlabeled images); prompts: requests.
    """
    h, w = image.shape[:2]
    box = random_crop_box(rng, h, w, cfg, masks)
    if box is not None:
        top, left, ch, cw = box
        image = image[top : top + ch, left : left + cw]
        masks = [m[top : top + ch, left : left + cw] for m in masks]
    if cfg.flip_prob > 0 and rng.random() < cfg.flip_prob:
        image = image[:, ::-1]
        masks = [m[:, ::-1] for m in masks]
        prompts = [swap_left_right(p) for p in prompts]
    image = color_jitter(rng, image, cfg)
    return np.ascontiguousarray(image), [np.ascontiguousarray(m) for m in masks], list(prompts)


def jitter_feature_statistics(
    features: torch.Tensor, strength: float, generator: torch.Generator
) -> torch.Tensor:
    """B x C x H x W frozen-trunk features -> the same maps with each image's channel statistics redrawn.

    Each map is standardised per image and channel, then given a new spread, its own times exp(strength * e1),
    and a new mean, its own plus strength * e2 times its spread (e1, e2 standard normal per image and channel).
    A picture's content stays where it is; what changes is the feature-level "style" (contrast, texture
    energy, colour cast) in which photographs differ from renders. It is feature-statistics augmentation in
    the manner of DSU (Li et al., ICLR 2022) with a fixed scale, and it commutes with the trunk cache, where
    pixel augmentation does not. strength 0 returns `features` unchanged."""
    if strength <= 0:
        return features
    b, c = features.shape[:2]
    mean = features.mean(dim=(2, 3), keepdim=True)
    spread = features.std(dim=(2, 3), keepdim=True) + 1e-5
    e1, e2 = torch.randn((2, b, c, 1, 1), generator=generator).to(features.device, features.dtype)
    new_spread = spread * torch.exp(strength * e1)
    return (features - mean) / spread * new_spread + mean + strength * e2 * spread
