"""ConverSeg evaluation metrics: gIoU, cIoU, N-acc and T-acc, overall and per group.

Definitions (as in the ConverSeg paper):
- gIoU: mean over samples of the per-sample IoU. An empty prediction on an empty target counts as IoU 1.
- cIoU: cumulative intersection / cumulative union over the same samples (large masks weigh more).
- N-acc: fraction of no-target (negative) queries for which the model predicts nothing (absent or empty mask).
- T-acc: fraction of positive queries for which the model predicts something (present and non-empty mask).

gIoU and cIoU are reported on positives (the headline numbers) and on all samples (negatives then add IoU 1
when the prediction is empty, IoU 0 otherwise, and nothing to the cIoU sums beyond false-positive pixels).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np


@dataclass
class SampleResult:
    """Per-sample counts. intersection and union are pixel counts at the image's own resolution."""

    intersection: int
    union: int
    negative: bool
    predicted_present: bool
    # A positive's: does the model's highest mask logit (whatever presence says) lie on the target? None when
    # not known (a negative, or no peak given).
    pointed: bool | None = None
    # A positive's IoU had presence accepted it (the model's mask whatever presence said): what a perfect
    # presence decision would have scored. None for a negative.
    ungated_iou: float | None = None

    @property
    def iou(self) -> float:
        # Empty prediction on an empty target is a perfect answer.
        return 1.0 if self.union == 0 else self.intersection / self.union


def score_sample(
    pred: np.ndarray,
    target: np.ndarray,
    *,
    negative: bool,
    present: bool = True,
    peak: tuple[int, int] | None = None,
) -> SampleResult:
    """Score one prediction.

    pred, target: H x W bool (or 0/1) masks of the same shape. present: the model's presence decision; an
    absent prediction is treated as an empty mask whatever pred holds (a positive's `ungated_iou` still scores
    pred). peak: (x, y) pixel of the model's highest mask logit (SegmentationResult.peak), scored for
    positives as `pointed`.
    """
    pred = np.asarray(pred).astype(bool, copy=False)
    target = np.asarray(target).astype(bool, copy=False)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape")
    if negative and target.any():
        raise ValueError("a negative sample has a non-empty target mask; the dataset is inconsistent")
    inter = int(np.count_nonzero(pred & target))
    union = int(np.count_nonzero(pred | target))
    ungated_iou = None if negative else (1.0 if union == 0 else inter / union)
    answered = bool(present and pred.any())
    if not present:  # scored as an empty mask: nothing kept, the union is the target
        inter, union = 0, int(np.count_nonzero(target))
    pointed = None
    if peak is not None and not negative:
        x, y = peak
        if not (0 <= y < target.shape[0] and 0 <= x < target.shape[1]):
            raise ValueError(f"peak {peak} lies outside the {target.shape[1]} x {target.shape[0]} image")
        pointed = bool(target[y, x])
    return SampleResult(inter, union, bool(negative), answered, pointed, ungated_iou)


# Edges of the target-size groups, as a share of the image's pixels. On the data engine's 256 x 192 test
# scenes the quartiles of positive targets fall near 1 %, 2.5 % and 5 %.
TARGET_SIZE_EDGES = (0.01, 0.025, 0.05)


def target_size_group(target_pixels: int, image_pixels: int) -> str | None:
    """Name of the target-size group of a positive sample ("0-1 %", "1-2.5 %", ...); None for an empty target.

    The names sort in size order (">" sorts after the digits), so MetricAccumulator.by lists them small to
    large.
    """
    if image_pixels <= 0:
        raise ValueError(f"image_pixels must be positive, got {image_pixels}")
    if target_pixels <= 0:
        return None
    share = target_pixels / image_pixels
    lo = 0.0
    for hi in TARGET_SIZE_EDGES:
        if share < hi:
            return f"{100 * lo:g}-{100 * hi:g} %"
        lo = hi
    return f">= {100 * lo:g} %"


# How training.calibrate ranks presence thresholds; training.compare reports both (points, higher is better).
CRITERIA = {"targets": "gIoU + N-acc + T-acc", "balanced": "(N-acc + T-acc) / 2"}


def criterion_score(name: str, giou, n_acc, t_acc):
    """A calibration criterion from its metrics (floats or numpy arrays alike): 'targets' = gIoU + N-acc +
    T-acc, the three metrics the accuracy targets name; 'balanced' = (N-acc + T-acc) / 2, which ignores masks."""
    if name == "targets":
        return giou + n_acc + t_acc
    if name == "balanced":
        return (n_acc + t_acc) / 2
    raise ValueError(f"unknown criterion {name!r}; one of {sorted(CRITERIA)}")


@dataclass
class GroupMetrics:
    """Metrics of one group of samples; percentages in 0..100, None where the group has no such sample."""

    n: int
    n_positive: int
    n_negative: int
    giou: float | None
    ciou: float | None
    giou_all: float | None
    ciou_all: float | None
    n_acc: float | None
    t_acc: float | None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def summarize(results: list[SampleResult]) -> GroupMetrics:
    pos = [r for r in results if not r.negative]
    neg = [r for r in results if r.negative]

    def pct(x: float) -> float:
        return round(100.0 * float(x), 3)

    def g(rs):
        return pct(float(np.mean([r.iou for r in rs]))) if rs else None

    def c(rs):
        if not rs:
            return None
        inter = sum(r.intersection for r in rs)
        union = sum(r.union for r in rs)
        return pct(1.0 if union == 0 else inter / union)

    return GroupMetrics(
        n=len(results),
        n_positive=len(pos),
        n_negative=len(neg),
        giou=g(pos),
        ciou=c(pos),
        giou_all=g(results),
        ciou_all=c(results),
        n_acc=pct(np.mean([not r.predicted_present for r in neg])) if neg else None,
        t_acc=pct(np.mean([r.predicted_present for r in pos])) if pos else None,
    )


# IoU edges of the outcome classes of an answered positive (PositiveOutcomes): below WRONG_IOU the mask lies
# on something else (another object, the wrong region); from GOOD_IOU on it is the target, outlined usably.
WRONG_IOU = 0.1
GOOD_IOU = 0.5


@dataclass
class PositiveOutcomes:
    """Where a group's positives lose their IoU; shares in 0..100 of its positives, None without positives.

    rejected + wrong + partial + good = 100. gIoU is answered_iou x (100 - rejected) / 100: presence
    rejections and poor masks can be told apart from the gated results alone.
    """

    n_positive: int
    rejected: float | None  # nothing answered: presence below the threshold, or an empty mask
    wrong: float | None  # answered, IoU < WRONG_IOU
    partial: float | None  # answered, WRONG_IOU <= IoU < GOOD_IOU
    good: float | None  # answered, IoU >= GOOD_IOU
    answered_iou: float | None  # mean IoU (0..100) of the answered positives
    # share of the positives whose highest mask logit lies on the target, answered or not: grounding apart
    # from presence and mask shape (None when no peak was scored)
    pointed: float | None = None
    # mean IoU (0..100) of every positive's mask whatever presence said: the gIoU a perfect presence decision
    # would give these masks, so masks_alone - gIoU is what presence costs (None when not scored)
    masks_alone: float | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def positive_outcomes(results: list[SampleResult]) -> PositiveOutcomes:
    pos = [r for r in results if not r.negative]
    if not pos:
        return PositiveOutcomes(0, None, None, None, None, None)
    answered = [r.iou for r in pos if r.predicted_present]
    iou = np.array(answered, dtype=float)
    peaks = [r.pointed for r in pos if r.pointed is not None]
    ungated = [r.ungated_iou for r in pos if r.ungated_iou is not None]

    def share(count: int) -> float:
        return round(100.0 * count / len(pos), 3)

    return PositiveOutcomes(
        n_positive=len(pos),
        rejected=share(len(pos) - len(answered)),
        wrong=share(int(np.count_nonzero(iou < WRONG_IOU))),
        partial=share(int(np.count_nonzero((iou >= WRONG_IOU) & (iou < GOOD_IOU)))),
        good=share(int(np.count_nonzero(iou >= GOOD_IOU))),
        answered_iou=round(100.0 * float(iou.mean()), 3) if answered else None,
        pointed=round(100.0 * float(np.mean(peaks)), 3) if peaks else None,
        masks_alone=round(100.0 * float(np.mean(ungated)), 3) if len(ungated) == len(pos) else None,
    )


def presence_auc(presence: np.ndarray, negative: np.ndarray) -> float | None:
    """How well the presence score alone tells present from absent, whatever the threshold: the chance that a
    random positive request scores above a random negative one (ties count half), in 0..100 (ROC AUC, as
    the Mann-Whitney statistic over average ranks). None without both kinds."""
    presence = np.asarray(presence, dtype=float)
    negative = np.asarray(negative, dtype=bool)
    n_neg, n_pos = int(negative.sum()), int((~negative).sum())
    if not n_neg or not n_pos:
        return None
    order = np.argsort(presence, kind="mergesort")
    ranks = np.empty(len(presence), dtype=float)
    ranks[order] = np.arange(1, len(presence) + 1)
    _, first, counts = np.unique(presence[order], return_index=True, return_counts=True)
    for start, count in zip(first[counts > 1], counts[counts > 1], strict=True):
        ranks[order[start : start + count]] = start + (count + 1) / 2.0
    u = ranks[~negative].sum() - n_pos * (n_pos + 1) / 2.0
    return round(100.0 * u / (n_pos * n_neg), 3)


@dataclass
class MetricAccumulator:
    """Collects SampleResults with group labels (e.g. family, template split) and summarizes them."""

    results: list[SampleResult] = field(default_factory=list)
    groups: dict[str, dict[str, list[int]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list))
    )

    def add(self, result: SampleResult, **labels: str) -> None:
        idx = len(self.results)
        self.results.append(result)
        for key, value in labels.items():
            if value is not None:
                self.groups[key][str(value)].append(idx)

    def overall(self) -> GroupMetrics:
        return summarize(self.results)

    def members(self, key: str) -> dict[str, list[SampleResult]]:
        """The results of each group of `key`, groups in name order."""
        return {
            name: [self.results[i] for i in idx] for name, idx in sorted(self.groups.get(key, {}).items())
        }

    def by(self, key: str) -> dict[str, GroupMetrics]:
        return {name: summarize(rs) for name, rs in self.members(key).items()}

    def outcomes_by(self, key: str) -> dict[str, PositiveOutcomes]:
        return {name: positive_outcomes(rs) for name, rs in self.members(key).items()}

    def to_dict(self) -> dict:
        return {
            "overall": self.overall().to_dict(),
            **{f"by_{key}": {k: v.to_dict() for k, v in self.by(key).items()} for key in sorted(self.groups)},
        }


def batch_iou_counts(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intersection and union per sample for N x H x W boolean arrays (numpy)."""
    pred = pred.reshape(pred.shape[0], -1).astype(bool)
    target = target.reshape(target.shape[0], -1).astype(bool)
    return (pred & target).sum(1), (pred | target).sum(1)
