"""Verifier: keeps only samples whose answer a model can actually be asked to find.

Reasons for rejection (counted per reason in index.json):
- target_too_small: a target shows fewer than `min_target_pixels` pixels
- target_occluded: a target shows less than `min_visible_fraction` of its whole silhouette (hidden behind
  others, inside a container, or cut off by the frame edge)
- ambiguous: a single-answer request with two near-equal candidates (flagged by the generator)
- empty_mask: a positive request whose merged mask is empty
- negative_not_empty: a negative request with a non-empty mask
- region_too_small: a region answer smaller than `min_region_pixels`
- mask_mismatch: an object answer whose mask is not exactly the union of its targets' instance masks

`scene_disagreements` checks a whole scene the same way: its graph must agree with its instance masks.
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
    min_visible_fraction: float = 0.3  # an object mostly hidden or cut off cannot be named reliably
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


# Pixels of slack between a rendered mask and the convex silhouette polygon it is compared with (edge pixels).
SILHOUETTE_SLACK = 0.1


def scene_disagreements(graph: dict, instance: np.ndarray) -> list[str]:
    """Every way a scene graph contradicts its instance masks (H x W int, -1 none, else object id); empty
    when they agree. Checked: pixel areas and boxes, the visibility fractions (shown <= in frame <= 1), and that relations name objects that exist and agree with
    the objects' own `on` / `inside` fields."""
    out = []
    objs = graph["objects"]
    ids, counts = np.unique(instance[instance >= 0], return_counts=True)
    area = dict(zip(ids.tolist(), counts.tolist(), strict=True))
    if set(area) - {o["id"] for o in objs}:
        out.append(f"mask ids {sorted(set(area) - {o['id'] for o in objs})} are not in the scene graph")
    for o in objs:
        k = o["id"]
        if o["pixel_area"] != area.get(k, 0):
            out.append(f"object {k}: pixel_area {o['pixel_area']} but {area.get(k, 0)} pixels in the mask")
        if area.get(k, 0):
            ys, xs = np.nonzero(instance == k)
            box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
            if o["bbox_2d"] != box:
                out.append(f"object {k}: bbox_2d {o['bbox_2d']} but the mask spans {box}")
        vf, ff = o["visible_fraction"], o.get("in_frame_fraction", 1.0)
        if not (0.0 <= vf <= ff + SILHOUETTE_SLACK and ff <= 1.0):
            out.append(f"object {k}: visible_fraction {vf} and in_frame_fraction {ff} disagree")
    for a, rel, b in graph["relations"]:
        if not (0 <= a < len(objs) and 0 <= b < len(objs)) or a == b:
            out.append(f"relation {[a, rel, b]} names a missing object")
        elif rel == "in" and objs[a].get("inside") != b:
            out.append(f"relation {[a, rel, b]} but object {a} is inside {objs[a].get('inside')}")
        elif rel == "on" and objs[a].get("on") != b:
            out.append(f"relation {[a, rel, b]} but object {a} is on {objs[a].get('on')}")
    return out
