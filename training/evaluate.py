"""Evaluate a ConverSeg model: gIoU, cIoU, N-acc, T-acc overall, per concept family, seen vs held-out templates.

    python -m training.evaluate --checkpoint runs/student/model.pt --data data/test --out-dir runs/eval_student

Scoring goes through converseg_core.Segmenter, the runtime inference path (pre-processing, the backend,
presence gating, upsampling to the camera frame), with any backend (`--backend onnxruntime` on an exported
folder). Masks are compared at the image's own resolution. Each image is encoded once and all its requests are
decoded together, so this is not slower than a batched torch loop on a CPU. Writes metrics.json, metrics.md
(tables), samples.jsonl (one line per scored request: its counts, presence, predicted IoU and mask size, for
paired comparisons of two models with `python -m training.compare`) and overlay panels (panels_*.png: image |
target | prediction).

Definitions: see training/metrics.py. A sample whose image or mask cannot be read, or whose image the model
refuses (e.g. larger than max_input_side), is skipped and counted in `skipped` (reported in both outputs);
`--strict` stops instead. Non-finite model outputs stop the run (converseg_core's ModelOutputError).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from converseg_core.errors import ConverSegError, InputError
from converseg_core.files import atomic_write_text

from .cli import arg, config_parser
from .metrics import (
    GOOD_IOU,
    WRONG_IOU,
    GroupMetrics,
    MetricAccumulator,
    PositiveOutcomes,
    SampleResult,
    positive_outcomes,
    presence_auc,
    score_sample,
    target_size_group,
)
from .panels import make_panel, save_panels
from .records import DatasetError, Record, SampleError, read_records
from .sample_io import load_mask, load_rgb
from .splits import split_records, unused_records

log = logging.getLogger("training.evaluate")


@dataclass
class EvalConfig:
    checkpoint: str = arg(help="ConverSeg checkpoint (torch) or exported folder (onnxruntime, tensorrt)")
    data: str = arg(help="dataset: data engine folder, ConverSeg .jsonl, items.json or COCO .json")
    out_dir: str = arg("runs/eval", help="where metrics.json, metrics.md and panels go")
    backend: str = arg("torch", help="inference backend", choices=["torch", "onnxruntime", "tensorrt"])
    device: str = arg("cpu", help="torch backend device")
    split: str = arg(
        "all",
        help="'val': only the scenes a training run with the same --val-fraction held out; 'unused': the "
        "held-out-template requests of its training scenes, which it never trained on (phrasing "
        "generalization without touching the test set)",
        choices=["all", "val", "unused"],
    )
    val_fraction: float = arg(0.05, help="with --split val or unused: the training run's --val-fraction")
    heldout_templates: list[str] = arg(
        [],
        help="template ids to report as held-out (besides samples marked so); with --split unused, also the "
        "training run's --heldout-templates",
        nargs="*",
    )
    limit: int = arg(0, help="evaluate at most this many samples (0: all)")
    presence_threshold: float | None = arg(None, help="override the model's presence threshold")
    mask_threshold: float | None = arg(None, help="override the model's mask logit threshold")
    presence_sweep: list[float] = arg(
        [],
        help="also score these presence thresholds (same pass; a table of gIoU, cIoU, N-acc, T-acc per "
        "threshold, to pick one on a validation split, e.g. --split val)",
        nargs="*",
    )
    num_panels: int = arg(
        16, help="overlay panels to write (half the worst positives, half the first samples)"
    )
    name: str | None = arg(None, help="label of this model in the tables (default: the checkpoint file name)")
    threads: int = arg(
        0, help="torch CPU threads (0: PyTorch's default; 1 is fastest on a shared, loaded machine)"
    )
    strict: bool = arg(False, help="stop at the first unreadable sample instead of skipping and counting it")
    allow_partial: bool = arg(False, help="read data engine output without index.json")


def template_split(r: Record, heldout: set[str]) -> str:
    if r.template_split:
        return r.template_split
    return "heldout" if r.template_id is not None and r.template_id in heldout else "seen"


def sample_ids(records: list[Record]) -> list[str]:
    """One id per request for samples.jsonl, which training.compare pairs by id. Repeated ids (two merged
    datasets, a COCO file that reuses `id`) would merge requests there, so then every id gets its index."""
    ids = [r.sample_id or f"{r.image}#{i}" for i, r in enumerate(records)]
    if len(set(ids)) < len(ids):
        repeated = len(ids) - len(set(ids))
        warnings.warn(
            f"{repeated} request id(s) repeat in the data; samples.jsonl ids become 'ID#index'", stacklevel=2
        )
        ids = [f"{sid}#{i}" for i, sid in enumerate(ids)]
    return ids


def rendered_kind_group(r: Record) -> str | None:
    """The group "rendered" or "not rendered" where the data marks whether a request's objects (a negative's: the kind it
    asks for) are of a kind the data engine renders (tests/data/real_photos); None where it does not say."""
    if "rendered_kind" not in r.extra:
        return None
    return "rendered" if r.extra["rendered_kind"] else "not rendered"


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def markdown_table(title: str, rows: dict[str, GroupMetrics]) -> str:
    lines = [
        f"### {title}",
        "",
        "| group | n | positives | negatives | gIoU | cIoU | N-acc | T-acc |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in rows.items():
        lines.append(
            f"| {name} | {m.n} | {m.n_positive} | {m.n_negative} | {fmt(m.giou)} | {fmt(m.ciou)} | {fmt(m.n_acc)} | {fmt(m.t_acc)} |"
        )
    return "\n".join(lines) + "\n"


def outcomes_table(rows: dict[str, PositiveOutcomes]) -> str:
    lines = [
        "### Where positives lose IoU",
        "",
        f"Shares of each group's positives: rejected (nothing answered), wrong (answered, IoU < {WRONG_IOU:g}), "
        f"partial (IoU {WRONG_IOU:g}-{GOOD_IOU:g}), good (IoU >= {GOOD_IOU:g}); answered IoU: mean IoU of the "
        "answered ones. gIoU = answered IoU x (100 - rejected) / 100. Pointed: share of the positives whose "
        "highest mask logit lies on the target, answered or not (grounding, apart from presence and mask shape). "
        "Masks alone: the mean IoU of every positive's mask whatever presence said, the gIoU a perfect presence "
        "decision would give; masks alone - gIoU is what presence costs the group.",
        "",
        "| group | positives | rejected | wrong | partial | good | answered IoU | pointed | masks alone |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, o in rows.items():
        if o.n_positive:
            lines.append(
                f"| {name} | {o.n_positive} | {fmt(o.rejected)} | {fmt(o.wrong)} | {fmt(o.partial)} | "
                f"{fmt(o.good)} | {fmt(o.answered_iou)} | {fmt(o.pointed)} | {fmt(o.masks_alone)} |"
            )
    return "\n".join(lines) + "\n"


def presence_sweep(pool: list[tuple[float, SampleResult, int]], thresholds: list[float]) -> dict:
    """Overall metrics per presence threshold from ungated per-sample scores (presence, score, target pixel
    count): a request whose presence is below the threshold predicts nothing, so it keeps no intersection
    and its union is its target."""
    out = {}
    for t in sorted(set(thresholds)):
        gated = MetricAccumulator()
        for presence, s, target_pixels in pool:
            if presence < t:
                s = SampleResult(0, target_pixels, s.negative, False)
            gated.add(s, family="all", template="all", kind="all")
        out[t] = gated.overall()
    return out


def evaluate(cfg: EvalConfig) -> dict:
    """Score every sample; write metrics.json, metrics.md and panels; return the metrics dict."""
    from converseg_core import Segmenter

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if cfg.threads > 0:
        import torch

        torch.set_num_threads(cfg.threads)
        try:  # numpy's BLAS (post-processing matmuls) oversubscribes a loaded machine just like torch
            from threadpoolctl import threadpool_limits

            threadpool_limits(cfg.threads)
        except ImportError:
            pass
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = read_records(cfg.data, allow_partial=cfg.allow_partial)
    if cfg.split == "val":
        _, records = split_records(records, val_fraction=cfg.val_fraction)
    elif cfg.split == "unused":
        records = unused_records(
            records, val_fraction=cfg.val_fraction, heldout_templates=cfg.heldout_templates
        )
    if cfg.limit < 0:
        raise SystemExit(f"--limit must be 0 (all) or a positive count, got {cfg.limit}")
    if cfg.limit > 0:
        records = records[: cfg.limit]
    if not records:
        raise SystemExit(f"{cfg.data}: no samples to evaluate (check --split / --val-fraction)")
    heldout = set(cfg.heldout_templates)

    kwargs = {"device": cfg.device} if cfg.backend == "torch" else {}
    seg = Segmenter.from_checkpoint(
        cfg.checkpoint,
        backend=cfg.backend,
        presence_threshold=cfg.presence_threshold,
        mask_threshold=cfg.mask_threshold,
        **kwargs,
    )
    threshold = seg.presence_threshold
    bad = [t for t in cfg.presence_sweep if not 0.0 <= t <= 1.0]
    if bad:
        raise SystemExit(f"--presence-sweep thresholds must lie in [0, 1], got {bad}")
    # Masks are computed for every request (ungated) and gated here: a positive's mask is scored whatever
    # presence said (masks alone), and one pass scores every threshold of --presence-sweep.
    seg.presence_threshold = 0.0
    # (presence probability, ungated score, target pixel count) per sample, for the sweep
    sweep_pool: list[tuple[float, SampleResult, int]] = []
    by_image: dict[Path, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_image[r.image].append(i)

    acc = MetricAccumulator()
    per_sample: list[dict] = []  # samples.jsonl
    skipped: list[str] = []
    panel_pool: list[tuple[float, int, object]] = []
    first_panels: list = []
    t0 = time.perf_counter()
    from tqdm import tqdm

    ids = sample_ids(records)
    for image_path, idxs in tqdm(by_image.items(), desc="evaluate", dynamic_ncols=True):
        try:
            image = load_rgb(image_path)
            h, w = image.shape[:2]
            masks = {i: load_mask(records[i], h, w) for i in idxs}
            seg.set_image(image)  # InputError: an image the model refuses (e.g. over max_input_side)
        except (SampleError, InputError) as exc:
            if cfg.strict:
                raise
            skipped.extend(ids[i] for i in idxs)
            warnings.warn(f"skipping {len(idxs)} sample(s) of {image_path}: {exc}", stacklevel=1)
            continue
        results = seg.predict([records[i].prompt for i in idxs])
        for i, res in zip(idxs, results, strict=True):
            r = records[i]
            present = res.presence >= threshold
            target_px = int(np.count_nonzero(masks[i]))
            s = score_sample(res.mask, masks[i], negative=r.negative, present=present, peak=res.peak)
            if cfg.presence_sweep:
                ungated = score_sample(res.mask, masks[i], negative=r.negative)
                sweep_pool.append((res.presence, ungated, target_px))
            if not present:
                res.mask = np.zeros_like(res.mask)
            family = r.family or "unknown"
            split = template_split(r, heldout)
            acc.add(
                s,
                family=family,
                template=split,
                family_template=f"{family}: {split}",
                kind="negative" if r.negative else "positive",
                target_size=target_size_group(target_px, h * w),
                # data engine negatives: "absent" (nothing answers) or "attribute" (the category is there,
                # not in the colour asked for); None for positives and for data that does not say
                negative_kind=r.extra.get("negative_kind") if r.negative else None,
                rendered_kind=rendered_kind_group(r),
            )
            per_sample.append(
                {
                    "id": ids[i],
                    "scene": r.scene_id or str(r.image),
                    "family": family,
                    "split": split,
                    "template": r.template_id,
                    "negative": s.negative,
                    **({"negative_kind": r.extra["negative_kind"]} if "negative_kind" in r.extra else {}),
                    **({"rendered_kind": r.extra["rendered_kind"]} if "rendered_kind" in r.extra else {}),
                    "intersection": s.intersection,
                    "union": s.union,
                    "present": s.predicted_present,
                    **({"pointed": s.pointed} if s.pointed is not None else {}),
                    **({"ungated_iou": round(s.ungated_iou, 5)} if s.ungated_iou is not None else {}),
                    "presence": round(float(res.presence), 5),
                    "score": round(float(res.score), 5),
                    "mask_pixels": int(np.count_nonzero(res.mask)),
                    "target_pixels": target_px,
                }
            )
            if cfg.num_panels:
                cap = f"{r.prompt} | IoU {s.iou:.2f} presence {res.presence:.2f}" + (
                    " [negative]" if r.negative else ""
                )
                if len(first_panels) < cfg.num_panels // 2:
                    first_panels.append(make_panel(image, masks[i], res.mask, cap))
                elif not r.negative and len(panel_pool) < 4 * cfg.num_panels:
                    panel_pool.append((s.iou, i, make_panel(image, masks[i], res.mask, cap)))
    seconds = time.perf_counter() - t0
    if not acc.results:
        raise SystemExit(f"{cfg.data}: every sample was skipped ({len(skipped)}); nothing to score")

    name = cfg.name or Path(cfg.checkpoint).name
    metrics = acc.to_dict()
    metrics.update(
        model=name,
        checkpoint=str(cfg.checkpoint),
        backend=cfg.backend,
        data=str(cfg.data),
        split=cfg.split,
        img_size=seg.config.img_size,
        presence_threshold=threshold,
        mask_threshold=seg.mask_threshold,
        skipped=len(skipped),
        skipped_samples=skipped[:100],
        seconds=round(seconds, 1),
        config=asdict(cfg),
    )
    overall = acc.overall()
    templates = acc.by("template")
    # Which groups' positives fail by rejection, which by a mask on the wrong thing.
    outcome_groups = {
        "all": {"all": positive_outcomes(acc.results)},
        "templates": acc.outcomes_by("template"),
        "target size": acc.outcomes_by("target_size"),
        "family": acc.outcomes_by("family"),
    }
    if acc.groups.get("rendered_kind"):  # only data that marks it (tests/data/real_photos)
        outcome_groups["kind"] = acc.outcomes_by("rendered_kind")
    metrics["outcomes"] = {
        key: {name: o.to_dict() for name, o in rows.items()} for key, rows in outcome_groups.items()
    }
    # Threshold-free: does the presence score rank present above absent, overall and per template split?
    splits = {
        "all": per_sample,
        **{f"templates: {k}": [r for r in per_sample if r["split"] == k] for k in templates},
    }
    metrics["presence_auc"] = {
        name: presence_auc([r["presence"] for r in rows], [r["negative"] for r in rows])
        for name, rows in splits.items()
    }
    if (
        "seen" in templates
        and "heldout" in templates
        and templates["seen"].giou is not None
        and templates["heldout"].giou is not None
    ):
        metrics["heldout_giou_gap"] = round(templates["seen"].giou - templates["heldout"].giou, 3)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    with open(out_dir / "samples.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in per_sample)

    md = [f"## {name} on {cfg.data} ({cfg.split})", ""]
    md.append(
        f"{overall.n} samples ({overall.n_positive} positive, {overall.n_negative} no-target), backend {cfg.backend}, "
        f"img_size {seg.config.img_size}, {len(skipped)} skipped, {seconds:.0f} s. gIoU/cIoU on positives; "
        "N-acc on no-target queries; T-acc on positives.\n"
    )
    md.append(
        markdown_table(
            "Overall and by template split",
            {"all": overall, **{f"templates: {k}": v for k, v in templates.items()}},
        )
    )
    md.append(
        "Presence AUC (threshold-free: the chance a present target's presence exceeds an absent one's, in %): "
        + ", ".join(f"{name} {fmt(auc)}" for name, auc in metrics["presence_auc"].items())
        + "\n"
    )
    md.append(markdown_table("By concept family", acc.by("family")))
    md.append(markdown_table("By concept family and template split", acc.by("family_template")))
    md.append(markdown_table("By target size (share of the image; positives only)", acc.by("target_size")))
    if acc.groups.get("rendered_kind"):
        md.append(markdown_table("By kind: does the data engine render it?", acc.by("rendered_kind")))
    if acc.groups.get("negative_kind"):
        md.append(markdown_table("Negatives by kind (N-acc: said 'not here')", acc.by("negative_kind")))
    md.append(
        outcomes_table(
            {
                (name if key == "all" else f"{key}: {name}"): o
                for key, rows in outcome_groups.items()
                for name, o in rows.items()
            }
        )
    )
    if cfg.presence_sweep:
        sweep = presence_sweep(sweep_pool, cfg.presence_sweep)
        metrics["presence_sweep"] = {str(t): m.to_dict() for t, m in sweep.items()}
        atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
        md.append(
            markdown_table(
                f"Presence threshold sweep (the model's: {threshold:g})",
                {f"presence >= {t:g}": m for t, m in sweep.items()},
            )
        )
    atomic_write_text(out_dir / "metrics.md", "\n".join(md))

    if cfg.num_panels:
        worst = [
            p
            for _, _, p in sorted(panel_pool, key=lambda x: (x[0], x[1]))[
                : cfg.num_panels - len(first_panels)
            ]
        ]
        if first_panels:
            save_panels(first_panels, out_dir / "panels_first.png", columns=2)
        if worst:
            save_panels(worst, out_dir / "panels_worst.png", columns=2)
    log.info(
        "%s: gIoU %s cIoU %s N-acc %s T-acc %s, IoU >= %g on %s %% of positives (%d samples, %d skipped)",
        name,
        fmt(overall.giou),
        fmt(overall.ciou),
        fmt(overall.n_acc),
        fmt(overall.t_acc),
        GOOD_IOU,
        fmt(positive_outcomes(acc.results).good),
        overall.n,
        len(skipped),
    )
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(EvalConfig, __doc__)
    cfg = EvalConfig(**vars(parser.parse_args(argv)))
    try:
        metrics = evaluate(cfg)
    except (ConverSegError, DatasetError) as exc:  # a refused checkpoint or export; a bad sample (--strict)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(Path(cfg.out_dir, "metrics.md").read_text())
    return 0 if metrics["overall"]["n"] else 1


if __name__ == "__main__":
    sys.exit(main())
