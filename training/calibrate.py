"""Pick a model's presence rule (threshold, and the predicted IoU's weight) on a validation split; write it into a
copy of its checkpoint.

    python -m training.calibrate --checkpoint runs/x/student/model.pt --data runs/x/data/train --split val \\
        --out runs/x/student/calibrated.pt

The presence head answers "is what was asked for in the picture at all?"; below `presence_threshold` the
Segmenter returns an empty mask. Training does not choose that threshold, so this script does: one evaluation
pass over the validation requests with every mask kept (`training.evaluate --presence-threshold 0
--presence-sweep`), then the threshold with the best criterion (`--criterion`), ties broken towards 0.5:
- `targets` (default): gIoU + N-acc + T-acc, the three metrics the accuracy targets name, each a point. Both
  errors matter to a robot (acting on an object that is not what was asked for, a missed no-target request;
  saying "not here" when it is), and so does the mask: a positive the rule rejects scores 0 in gIoU, so a
  threshold that buys a point of N-acc with more than a point of gIoU + T-acc is not chosen.
- `balanced`: (N-acc + T-acc) / 2. It ignores the masks, so on honestly phrased negatives it buys N-acc
  with gated gIoU.
Calibrate on validation scenes only, never on the test set you report.

The decoder's own predicted IoU of a request's mask is evidence too: a mask it rates poorly more often answers
a request whose target is absent. So, unless `--keep-score-weight`, the same pass also fits
`presence_score_weight` w (presence = sigmoid(presence logit + w * predicted IoU)) by a logistic regression of
"target present" on the two, and sweeps thresholds for that rule as well. The fitted rule replaces the
checkpoint's own only if its criterion is higher beyond the validation set's noise: the lower end of
a 95 % interval of the gain, from a bootstrap over validation scenes, must be above 0 (`--bootstrap 0`
keeps any gain). A few thousand requests decide a threshold well, but a 0.2-point "gain" of a second
parameter is noise, and a change of rule can move gIoU by several points for a fraction of a point of
the criterion. No second pass: gating changes which requests answer, not their masks.

`--mask-refinement 0 0.5 1` also chooses the scale of the mask refinement by the frame's own features
(modeling/refine.py, an inference setting with no weights): the presence rule is calibrated once per scale, one
evaluation pass each, and the scale whose rule scores highest on the criterion wins (ties to the smaller).

The output checkpoint is the input with `config.presence_threshold`, `config.presence_score_weight` and
`config.mask_refinement` replaced and the sweeps recorded under `meta["presence_calibration"]`; the weights are
untouched.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from converseg_core.anchoring import copy_sidecar
from converseg_core.checkpoint import Checkpoint, load_checkpoint, write_checkpoint
from converseg_core.errors import ConverSegError
from converseg_core.files import atomic_write_text

from .cli import arg, config_parser
from .compare import scene_resamples
from .evaluate import EvalConfig, evaluate, presence_sweep
from .metrics import CRITERIA, GroupMetrics, SampleResult, criterion_score

log = logging.getLogger("training.calibrate")

DEFAULT_THRESHOLDS = [round(0.05 * i, 2) for i in range(1, 20)]  # 0.05 ... 0.95


@dataclass
class CalibrateConfig:
    checkpoint: str = arg(help="ConverSeg checkpoint to calibrate (torch)")
    data: str = arg(help="dataset the validation requests come from (data engine folder, JSONL, ...)")
    out: str = arg(help="calibrated checkpoint to write (the input is never modified)")
    split: str = arg(
        "val",
        help="'val': the scenes the training run held out (use the run's --val-fraction); "
        "'all': every sample of --data (a separate calibration set)",
        choices=["all", "val"],
    )
    val_fraction: float = arg(0.05, help="with --split val: the training run's --val-fraction")
    thresholds: list[float] = arg(DEFAULT_THRESHOLDS, help="presence thresholds to try", nargs="*")
    keep_score_weight: bool = arg(
        False,
        help="only choose the threshold; keep the checkpoint's presence_score_weight (0 unless an earlier "
        "calibration fitted one) instead of fitting how much the decoder's predicted IoU adds",
    )
    bootstrap: int = arg(
        2000,
        help="scene bootstrap resamples for the fitted weight's gain (its 95 %% interval must lie above 0); "
        "0: keep the fitted weight on any gain",
    )
    seed: int = arg(0, help="bootstrap random seed")
    criterion: str = arg(
        "targets",
        help="what the threshold maximises on the validation requests: 'targets' = gIoU + N-acc + T-acc (a "
        "rejected positive scores 0 in gIoU, so masks count); 'balanced' = (N-acc + T-acc) / 2 (ignores "
        "masks)",
        choices=sorted(CRITERIA),
    )
    device: str = arg("cpu", help="torch device")
    threads: int = arg(0, help="torch CPU threads (0: PyTorch's default)")
    allow_partial: bool = arg(False, help="read data engine output without index.json")
    mask_refinement: list[float] = arg(
        [],
        help="mask refinement scales to try (modeling/refine.py; 0 = off): the presence rule is calibrated for "
        "each, one evaluation pass apiece, and the scale whose rule scores highest is written, ties to the "
        "smaller; none given: keep the checkpoint's",
        nargs="*",
    )


def criterion_value(m: GroupMetrics, criterion: str) -> float:
    """The calibration criterion of one sweep point (points; higher is better)."""
    return criterion_score(criterion, m.giou or 0.0, m.n_acc, m.t_acc)


def choose_threshold(sweep: dict[float, GroupMetrics], criterion: str = "targets") -> float:
    """The threshold with the highest criterion; ties go to the one nearest 0.5."""
    usable = {t: m for t, m in sweep.items() if m.n_acc is not None and m.t_acc is not None}
    if not usable:
        some = next(iter(sweep.values()), None)
        found = "no samples" if some is None else f"{some.n_negative} no-target, {some.n_positive} positive"
        raise ValueError(f"calibration needs no-target and positive requests in its data; found {found}")
    return max(usable, key=lambda t: (criterion_value(usable[t], criterion), -abs(t - 0.5)))


def fit_score_weight(presence: np.ndarray, score: np.ndarray, negative: np.ndarray) -> float | None:
    """Weight w of the predicted IoU next to the presence logit (presence = sigmoid(logit + w * IoU)), from a
    logistic regression of "target present" on the two (L2-regularised, Newton steps on standardised
    features). None when the fit gives the presence logit no positive weight (a head that does not separate
    the requests, or too few of either kind); then the rule is left as it is."""
    p = np.clip(np.asarray(presence, dtype=np.float64), 1e-7, 1 - 1e-7)
    x = np.stack([np.log(p / (1 - p)), np.asarray(score, dtype=np.float64)], axis=1)
    y = (~np.asarray(negative, dtype=bool)).astype(np.float64)
    if y.min() == y.max():
        return None
    mu, sd = x.mean(0), x.std(0)
    if np.any(sd < 1e-9):
        return None
    z = np.concatenate([(x - mu) / sd, np.ones((len(x), 1))], axis=1)
    w = np.zeros(3)
    ridge = np.diag([1.0, 1.0, 0.0])  # as scikit-learn's default C = 1; the intercept is not penalised
    for _ in range(100):
        q = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -50, 50)))
        grad = z.T @ (q - y) + ridge @ w
        hess = (z * (q * (1 - q))[:, None]).T @ z + ridge
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    a_logit, a_score = w[0] / sd[0], w[1] / sd[1]
    if not np.isfinite(a_logit) or a_logit <= 0 or not np.isfinite(a_score):
        return None
    return float(a_score / a_logit)


def rescored_presence(samples: list[dict], extra_weight: float) -> np.ndarray:
    """sigmoid(presence logit + extra_weight * predicted IoU) of ungated samples.jsonl lines."""
    p = np.clip(np.array([s["presence"] for s in samples], dtype=np.float64), 1e-7, 1 - 1e-7)
    score = np.array([s["score"] for s in samples], dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-(np.log(p / (1 - p)) + extra_weight * score)))


def gain_interval(
    samples: list[dict],
    rule_a: tuple[float, float],
    rule_b: tuple[float, float],
    *,
    criterion: str,
    resamples: int,
    seed: int,
) -> tuple[float, float, float]:
    """The criterion of rule B minus rule A (points), and its 95 % interval from a bootstrap over scenes.

    A rule is (extra weight on top of the samples' presence, threshold); samples are ungated samples.jsonl
    lines, so a positive's gated IoU is its mask's IoU where the rule keeps it and 0 where it does not. Scenes
    are resampled, not requests: a scene's requests share an image, so they are not independent evidence.
    """
    negative = np.array([bool(s["negative"]) for s in samples])
    if negative.all() or not negative.any():
        raise ValueError("the criterion needs no-target and positive requests")
    union = np.array([s["union"] for s in samples], dtype=np.float64)
    iou = np.array([s["intersection"] for s in samples], dtype=np.float64) / np.maximum(union, 1.0)
    scene_names = [str(s.get("scene", s["id"])) for s in samples]
    index = {name: i for i, name in enumerate(dict.fromkeys(scene_names))}
    scene = np.array([index[name] for name in scene_names])
    n = len(index)
    weights = np.vstack([np.ones(n), scene_resamples(n, resamples, seed)])[:, scene]
    values = []
    with np.errstate(invalid="ignore", divide="ignore"):  # a resample without negatives: NaN, dropped
        neg_w, pos_w = (weights * negative).sum(1), (weights * ~negative).sum(1)
        for extra, threshold in (rule_a, rule_b):
            keep = rescored_presence(samples, extra) >= threshold
            n_acc = (weights * (negative & ~keep)).sum(1) / neg_w
            t_acc = (weights * (~negative & keep)).sum(1) / pos_w
            giou = (weights * np.where(~negative & keep, iou, 0.0)).sum(1) / pos_w
            values.append(criterion_score(criterion, giou, n_acc, t_acc))
    diff = (values[1] - values[0]) * 100
    low, high = np.nanpercentile(diff[1:], [2.5, 97.5]) if resamples else (np.nan, np.nan)
    return float(diff[0]), float(low), float(high)


def rescored_sweep(
    samples: list[dict], extra_weight: float, thresholds: list[float]
) -> dict[float, GroupMetrics]:
    """The threshold sweep for presence logit + extra_weight * predicted IoU, from ungated samples.jsonl lines."""
    presence = rescored_presence(samples, extra_weight)
    pool = [
        (
            float(pr),
            SampleResult(s["intersection"], s["union"], bool(s["negative"]), bool(s["present"])),
            s["target_pixels"],
        )
        for pr, s in zip(presence, samples, strict=True)
    ]
    return presence_sweep(pool, thresholds)


def calibrate(cfg: CalibrateConfig) -> dict:
    """Sweep, choose, write the calibrated checkpoint and OUT.calibration.json; return the record."""
    out = Path(cfg.out)
    if out.resolve() == Path(cfg.checkpoint).resolve():
        raise SystemExit("--out must differ from --checkpoint: the input checkpoint is never overwritten")
    if not cfg.thresholds or not all(0.0 < t < 1.0 for t in cfg.thresholds):
        # A stored threshold of 0 or 1 decides nothing; exports refuse it (config.inference_default_problems).
        raise SystemExit(f"--thresholds must be values strictly between 0 and 1, got {cfg.thresholds}")
    if cfg.bootstrap != 0 and cfg.bootstrap < 100:
        raise SystemExit(f"--bootstrap must be 0 or at least 100 for a 95 % interval, got {cfg.bootstrap}")
    bad = [s for s in cfg.mask_refinement if not (math.isfinite(s) and s >= 0)]
    if bad:
        raise SystemExit(f"--mask-refinement scales must be finite and >= 0, got {bad}")
    work = out.with_name(out.stem + "_calibration")
    checkpoint = load_checkpoint(cfg.checkpoint)
    checkpoint.extra = {}  # optimizer state etc. belong to training's last.pt, not to a released model
    own_scale = checkpoint.config.mask_refinement
    scales = list(dict.fromkeys(cfg.mask_refinement)) or [own_scale]
    tried = {}
    for scale in scales:
        if len(scales) > 1:
            log.info("mask refinement %g: calibrating presence", scale)
        place = work if len(scales) == 1 else work / f"refinement_{scale:g}"
        tried[scale] = presence_rule(cfg, checkpoint, scale, place)
    # The scale whose best rule scores highest; ties go to the smaller scale (the plainer model).
    scale = max(tried, key=lambda s: (criterion_value(tried[s][1], cfg.criterion), -s))
    record, kept = tried[scale]
    record = {
        **record,
        "mask_refinement": scale,
        "previous_mask_refinement": own_scale,
        "mask_refinement_tried": {
            f"{s:g}": {k: m.to_dict()[k] for k in ("giou", "ciou", "n_acc", "t_acc")}
            for s, (_, m) in tried.items()
        },
    }
    checkpoint.config = checkpoint.config.replace(
        presence_threshold=record["presence_threshold"],
        presence_score_weight=record["presence_score_weight"],
        mask_refinement=scale,
    )
    checkpoint.meta = {**checkpoint.meta, "presence_calibration": record}
    write_checkpoint(checkpoint, out)
    copy_sidecar(cfg.checkpoint, out)
    atomic_write_text(Path(str(out) + ".calibration.json"), json.dumps(record, indent=2) + "\n")
    log.info(
        "presence threshold %.2f (was %.2f), predicted-IoU weight %g (was %g; fitted %s), mask refinement %g "
        "(was %g): N-acc %.1f, T-acc %.1f, gIoU %.1f on %d validation requests -> %s",
        record["presence_threshold"],
        record["previous_threshold"],
        record["presence_score_weight"],
        record["previous_score_weight"],
        record["fitted_score_weight"],
        scale,
        own_scale,
        kept.n_acc,
        kept.t_acc,
        kept.giou or 0.0,
        record["samples"],
        out,
    )
    return record


def presence_rule(
    cfg: CalibrateConfig, checkpoint: Checkpoint, scale: float, work: Path
) -> tuple[dict, GroupMetrics]:
    """The presence rule of the checkpoint with mask refinement `scale` (one evaluation pass over the
    validation requests in `work`), and the validation metrics it keeps."""
    source = Path(cfg.checkpoint)
    if scale != checkpoint.config.mask_refinement:
        work.mkdir(parents=True, exist_ok=True)
        source = work / "model.pt"
        write_checkpoint(replace(checkpoint, config=checkpoint.config.replace(mask_refinement=scale)), source)
        copy_sidecar(cfg.checkpoint, source)
    own_weight = checkpoint.config.presence_score_weight
    try:
        metrics = evaluate(
            EvalConfig(
                checkpoint=str(source),
                data=cfg.data,
                out_dir=str(work),
                device=cfg.device,
                split=cfg.split,
                val_fraction=cfg.val_fraction,
                num_panels=0,
                threads=cfg.threads,
                allow_partial=cfg.allow_partial,
                presence_threshold=0.0,  # every mask kept: samples.jsonl then holds the ungated counts
                presence_sweep=list(cfg.thresholds),
                name="calibration",
            )
        )
    finally:
        if source != Path(cfg.checkpoint):
            source.unlink(missing_ok=True)
    sweeps = {own_weight: {float(t): GroupMetrics(**m) for t, m in metrics["presence_sweep"].items()}}
    fitted, gain = None, None
    if not cfg.keep_score_weight:
        with open(work / "samples.jsonl") as f:
            samples = [json.loads(line) for line in f]
        # samples.jsonl's presence already includes the checkpoint's own weight; the fit adds to it.
        extra = fit_score_weight(
            np.array([s["presence"] for s in samples]),
            np.array([s["score"] for s in samples]),
            np.array([s["negative"] for s in samples]),
        )
        if extra is None:
            log.warning(
                "the presence head does not separate the validation requests; presence_score_weight kept"
            )
        else:
            fitted = round(own_weight + extra, 4)
            if fitted != own_weight:
                sweeps[fitted] = rescored_sweep(samples, fitted - own_weight, list(cfg.thresholds))
    best = {w: choose_threshold(s, cfg.criterion) for w, s in sweeps.items()}
    weight = own_weight
    if fitted is not None and fitted != own_weight:
        points, low, high = gain_interval(
            samples, (0.0, best[own_weight]), (fitted - own_weight, best[fitted]), criterion=cfg.criterion,
            resamples=cfg.bootstrap, seed=cfg.seed,
        )  # fmt: skip
        better = criterion_value(sweeps[fitted][best[fitted]], cfg.criterion) > criterion_value(
            sweeps[own_weight][best[own_weight]], cfg.criterion
        )
        beyond_noise = cfg.bootstrap == 0 or low > 0
        gain = {
            "points": round(points, 3),
            "ci95": [round(low, 3), round(high, 3)] if cfg.bootstrap else None,  # no NaN in the JSON
            "resamples": cfg.bootstrap,
        }
        if better and beyond_noise:
            weight = fitted
        elif better:
            log.info(
                "fitted predicted-IoU weight %g gains %.2f criterion points, 95%% interval [%.2f, %.2f] over "
                "validation scenes: within noise, the checkpoint's rule (weight %g) is kept",
                fitted, points, low, high, own_weight,
            )  # fmt: skip
    chosen = best[weight]
    sweep = sweeps[weight]
    record = {
        "presence_threshold": chosen,
        "presence_score_weight": weight,
        "previous_threshold": checkpoint.config.presence_threshold,
        "previous_score_weight": own_weight,
        "fitted_score_weight": fitted,
        "criterion": f"max {CRITERIA[cfg.criterion]} on the validation requests, ties towards 0.5; the fitted "
        "score weight only if its gain's 95 % scene-bootstrap interval lies above 0",
        "criterion_name": cfg.criterion,
        "fitted_weight_gain": gain,
        "data": cfg.data,
        "split": cfg.split,
        "samples": metrics["overall"]["n"],
        "candidates": {
            str(w): {
                "threshold": t,
                **{k: sweeps[w][t].to_dict()[k] for k in ("giou", "ciou", "n_acc", "t_acc")},
            }
            for w, t in best.items()
        },
        "sweep": {
            str(t): {k: m.to_dict()[k] for k in ("giou", "ciou", "n_acc", "t_acc")} for t, m in sweep.items()
        },
    }
    return record, sweep[chosen]


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(CalibrateConfig, __doc__)
    cfg = CalibrateConfig(**vars(parser.parse_args(argv)))
    try:
        record = calibrate(cfg)
    except ConverSegError as exc:  # a refused checkpoint, a model that gives non-finite outputs
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in record.items() if k != "sweep"}, indent=2))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sys.exit(main())
