"""Average the weights of ConverSeg checkpoints of one architecture into a new, uncalibrated checkpoint.

    python -m training.average --checkpoints runs/x/a/model.pt runs/x/b/model.pt --out runs/x/ab.pt
    python -m training.calibrate --checkpoint runs/x/ab.pt --data runs/x/data/train --split val --out runs/x/ab_cal.pt

Models fine-tuned from one another (a warm restart and the run it started from) usually lie in one basin of
the loss, and the average of their weights is often better on new data than either (Wortsman et al., "Model
soups", 2022; Izmailov et al., "Averaging weights leads to wider optima", 2018). It costs no training: only a
calibration and an evaluation tell whether it helps. Averaging models trained from different initialisations
gives nonsense, and nothing here can detect that; the inputs must share an ancestor.

Every floating-point tensor (BatchNorm running statistics included) becomes the weighted mean of the inputs';
integer tensors (BatchNorm's batch counters) are copied from the first input. The architecture must match
exactly. The presence rule does not carry over: a rule chosen for one set of weights says nothing about
another, so the output has the config's default presence threshold and predicted-IoU weight, and needs
`training.calibrate` before any evaluation that gates on presence.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from pathlib import Path

import torch

from converseg_core.checkpoint import Checkpoint, load_checkpoint, write_checkpoint
from converseg_core.config import ConverSegConfig
from converseg_core.errors import CheckpointError

from .cli import arg, config_parser

log = logging.getLogger("training.average")

# What training.calibrate writes: these may differ between the inputs and are reset in the output.
CALIBRATION_FIELDS = ("presence_threshold", "presence_score_weight", "mask_refinement")


@dataclasses.dataclass
class AverageConfig:
    checkpoints: list[str] = arg(help="two or more ConverSeg checkpoints of the same architecture", nargs="+")
    out: str = arg(help="averaged checkpoint to write (uncalibrated: run training.calibrate on it)")
    weights: list[float] = arg(
        [], help="one weight per checkpoint, non-negative, summing to 1 (default: equal weights)", nargs="*"
    )


def _architecture(config: ConverSegConfig) -> dict:
    arch = config.to_dict()
    for name in CALIBRATION_FIELDS:
        arch.pop(name)
    return arch


def check_weights(weights: list[float], count: int) -> list[float]:
    """The weights to use for `count` checkpoints: equal by default; otherwise one each, >= 0, summing to 1."""
    if count < 2:
        raise ValueError(f"averaging needs at least two checkpoints, got {count}")
    if not weights:
        return [1.0 / count] * count
    if len(weights) != count:
        raise ValueError(f"{len(weights)} weights for {count} checkpoints: give one weight per checkpoint")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights must be finite and non-negative, got {weights}")
    if abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"weights must sum to 1, got {weights} (sum {sum(weights):.6g})")
    return list(weights)


def average_checkpoints(checkpoints: list[Checkpoint], weights: list[float], names: list[str]) -> Checkpoint:
    """The weighted average of `checkpoints` (same architecture and keys), uncalibrated. `names` label the
    inputs in error messages and in the output's meta."""
    weights = check_weights(weights, len(checkpoints))
    if len(names) != len(checkpoints):
        raise ValueError(f"{len(names)} names for {len(checkpoints)} checkpoints")
    first = checkpoints[0]
    arch = _architecture(first.config)
    for ckpt, name in zip(checkpoints[1:], names[1:], strict=True):
        other = _architecture(ckpt.config)
        if other != arch:
            diff = sorted(k for k in arch if arch[k] != other.get(k))
            raise CheckpointError(
                f"{name}: another architecture than {names[0]} (fields {diff} differ); only checkpoints of one "
                "architecture can be averaged"
            )
        if set(ckpt.state_dict) != set(first.state_dict):
            only = sorted(set(ckpt.state_dict) ^ set(first.state_dict))
            raise CheckpointError(f"{name}: its weights are not the same tensors as {names[0]}'s: {only[:8]}")
    state: dict[str, torch.Tensor] = {}
    for key, ref in first.state_dict.items():
        tensors = [c.state_dict[key] for c in checkpoints]
        for t, name in zip(tensors, names, strict=True):
            if t.shape != ref.shape or t.dtype != ref.dtype:
                raise CheckpointError(
                    f"{name}: {key} is {t.dtype} {tuple(t.shape)}, {names[0]} has {ref.dtype} {tuple(ref.shape)}"
                )
        if not ref.is_floating_point():
            state[key] = ref.clone()
            continue
        acc = torch.zeros_like(ref, dtype=torch.float64)
        for t, w in zip(tensors, weights, strict=True):
            acc += w * t.double()
        if not torch.isfinite(acc).all():
            raise CheckpointError(f"{key}: the average is not finite (an input holds NaN or inf weights)")
        state[key] = acc.to(ref.dtype)
    defaults = {
        f.name: f.default for f in dataclasses.fields(ConverSegConfig) if f.name in CALIBRATION_FIELDS
    }
    meta = {
        "averaged_from": [
            {"checkpoint": name, "weight": w, "presence_threshold": c.config.presence_threshold}
            for name, w, c in zip(names, weights, checkpoints, strict=True)
        ],
        "note": "weight average, uncalibrated: run training.calibrate before gating on presence",
    }
    return Checkpoint(config=first.config.replace(**defaults), state_dict=state, meta=meta)


def average(cfg: AverageConfig) -> Path:
    weights = check_weights(cfg.weights, len(cfg.checkpoints))
    out = Path(cfg.out)
    if out.resolve() in {Path(p).resolve() for p in cfg.checkpoints}:
        raise ValueError(f"--out {out} is one of the inputs; write the average to a new file")
    loaded = [load_checkpoint(p) for p in cfg.checkpoints]
    result = average_checkpoints(loaded, weights, list(cfg.checkpoints))
    write_checkpoint(result, out)
    log.info("averaged %s with weights %s -> %s (uncalibrated)", cfg.checkpoints, weights, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(AverageConfig, __doc__)
    cfg = AverageConfig(**vars(parser.parse_args(argv)))
    try:
        out = average(cfg)
    except (ValueError, CheckpointError) as exc:
        parser.exit(2, f"training.average: error: {exc}\n")
    print(json.dumps({"out": str(out), "checkpoints": cfg.checkpoints}, indent=2))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sys.exit(main())
