"""Pick a model's presence threshold on a validation split and write it into a copy of its checkpoint.

    python -m training.calibrate --checkpoint runs/x/student/model.pt --data runs/x/data/train --split val \\
        --out runs/x/student/calibrated.pt

The presence head answers "is what was asked for in the picture at all?"; below `presence_threshold` the
Segmenter returns an empty mask. Training does not choose that threshold, so this script does: one evaluation
pass over the validation requests (`training.evaluate --presence-sweep`), then the threshold with the best
balanced accuracy, (N-acc + T-acc) / 2, ties broken towards 0.5. Balanced, because the two errors both
matter to a robot: acting on an object that is not what was asked for (a missed no-target request) and
saying "not here" when it is. Calibrate on validation scenes only, never on the test set you report.

The output checkpoint is the input with `config.presence_threshold` replaced and the sweep recorded under
`meta["presence_calibration"]`; the weights are untouched.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from converseg_core.checkpoint import load_checkpoint, write_checkpoint

from .evaluate import EvalConfig, evaluate
from .metrics import GroupMetrics
from .train import add_dataclass_args, arg

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
    device: str = arg("cpu", help="torch device")
    threads: int = arg(0, help="torch CPU threads (0: PyTorch's default)")
    allow_partial: bool = arg(False, help="read data engine output without index.json")


def choose_threshold(sweep: dict[float, GroupMetrics]) -> float:
    """The threshold with the highest (N-acc + T-acc) / 2; ties go to the one nearest 0.5."""
    usable = {t: m for t, m in sweep.items() if m.n_acc is not None and m.t_acc is not None}
    if not usable:
        some = next(iter(sweep.values()), None)
        found = "no samples" if some is None else f"{some.n_negative} no-target, {some.n_positive} positive"
        raise ValueError(f"calibration needs no-target and positive requests in its data; found {found}")
    return max(usable, key=lambda t: ((usable[t].n_acc + usable[t].t_acc) / 2, -abs(t - 0.5)))


def calibrate(cfg: CalibrateConfig) -> dict:
    """Sweep, choose, write the calibrated checkpoint and OUT.calibration.json; return the record."""
    out = Path(cfg.out)
    if out.resolve() == Path(cfg.checkpoint).resolve():
        raise SystemExit("--out must differ from --checkpoint: the input checkpoint is never overwritten")
    if not cfg.thresholds or not all(0.0 <= t <= 1.0 for t in cfg.thresholds):
        raise SystemExit(f"--thresholds must be values in [0, 1], got {cfg.thresholds}")
    work = out.with_name(out.stem + "_calibration")
    metrics = evaluate(
        EvalConfig(
            checkpoint=cfg.checkpoint,
            data=cfg.data,
            out_dir=str(work),
            device=cfg.device,
            split=cfg.split,
            val_fraction=cfg.val_fraction,
            num_panels=0,
            threads=cfg.threads,
            allow_partial=cfg.allow_partial,
            presence_sweep=list(cfg.thresholds),
            name="calibration",
        )
    )
    sweep = {float(t): GroupMetrics(**m) for t, m in metrics["presence_sweep"].items()}
    chosen = choose_threshold(sweep)
    record = {
        "presence_threshold": chosen,
        "previous_threshold": metrics["presence_threshold"],
        "criterion": "max (N-acc + T-acc) / 2 on the validation requests, ties towards 0.5",
        "data": cfg.data,
        "split": cfg.split,
        "samples": metrics["overall"]["n"],
        "sweep": {
            str(t): {k: m.to_dict()[k] for k in ("giou", "ciou", "n_acc", "t_acc")} for t, m in sweep.items()
        },
    }
    checkpoint = load_checkpoint(cfg.checkpoint)
    checkpoint.config = checkpoint.config.replace(presence_threshold=chosen)
    checkpoint.meta = {**checkpoint.meta, "presence_calibration": record}
    checkpoint.extra = {}  # optimizer state etc. belong to training's last.pt, not to a released model
    write_checkpoint(checkpoint, out)
    Path(str(out) + ".calibration.json").write_text(json.dumps(record, indent=2) + "\n")
    best = sweep[chosen]
    log.info(
        "presence threshold %.2f (was %.2f): N-acc %.1f, T-acc %.1f, gIoU %.1f on %d validation requests -> %s",
        chosen,
        record["previous_threshold"],
        best.n_acc,
        best.t_acc,
        best.giou or 0.0,
        record["samples"],
        out,
    )
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_dataclass_args(parser, CalibrateConfig)
    cfg = CalibrateConfig(**vars(parser.parse_args(argv)))
    record = calibrate(cfg)
    print(json.dumps({k: v for k, v in record.items() if k != "sweep"}, indent=2))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sys.exit(main())
