"""Verifier: keeps only samples whose answer a model can actually be asked to find.

Reasons for rejection (counted per reason in index.json):
- target_too_small: a target shows fewer than `min_target_pixels` pixels
- target_occluded: a target shows less than `min_visible_fraction` of its silhouette
- ambiguous: a single-answer request with two near-equal candidates (flagged by the generator)
- empty_mask: a positive request whose merged mask is empty
- negative_not_empty: a negative request with a non-empty mask
- region_too_small: a region answer smaller than `min_region_pixels`
- mask_mismatch: an object answer whose mask is not exactly the union of its targets' instance masks
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

REASONS = (
    "target_too_small",
    "target_occluded",
    "ambiguous",
    "empty_mask",
    "negative_not_empty",
    "region_too_small",
    "mask_mismatch",
)


@dataclass(frozen=True)
class VerifierConfig:
    min_target_pixels: int = 120  # ~11 x 11 px at 512 x 384: below that a request is a guess
    min_visible_fraction: float = 0.3  # an object mostly hidden cannot be named reliably
    min_region_pixels: int = 400


class Verifier:
    def __init__(self, config: VerifierConfig | None = None):
        self.config = config or VerifierConfig()
        self.counts: Counter = Counter()

    def check(self, request, mask: np.ndarray, graph: dict, instance: np.ndarray) -> str | None:
        """Return the rejection reason, or None to keep. Counts every rejection."""
        reason = self._reason(request, mask, graph, instance)
        self.counts["kept" if reason is None else reason] += 1
        return reason

    def _reason(self, request, mask, graph, instance) -> str | None:
        c = self.config
        area = int(mask.sum())
        if request.negative:
            return "negative_not_empty" if area else None
        if request.ambiguous:
            return "ambiguous"
        if request.answer_kind == "region":
            if area == 0:
                return "empty_mask"
            return "region_too_small" if area < c.min_region_pixels else None
        if area == 0:
            return "empty_mask"
        for t in request.targets:
            o = graph["objects"][t]
            if o["pixel_area"] < c.min_target_pixels:
                return "target_too_small"
            if o["visible_fraction"] < c.min_visible_fraction:
                return "target_occluded"
        expected = np.isin(instance, request.targets)
        if not np.array_equal(expected, mask):
            return "mask_mismatch"
        return None
