"""What a training run keeps and checks about itself: the resumable state in last.pt, and the guards that
stop a run (or keep its model.pt unwritten) when its data or weights cannot be trusted."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from converseg_core.checkpoint import load_checkpoint, load_state_into

from .records import DatasetError
from .train_config import TrainConfig


def check_skipped(skipped: int, seen: int, cfg: TrainConfig, *, final: bool = False) -> None:
    """DatasetError when more than --max-skip-fraction of the samples read were bad: during the run once 64
    were read (a few bad ones early say little), at the end whatever the count (a short run on a dataset of
    unreadable files must not end with a model.pt)."""
    if (final or seen >= 64) and seen and skipped > cfg.max_skip_fraction * seen:
        raise DatasetError(
            f"{skipped} of the {seen} samples read{' in all' if final else ' so far'} were unreadable or "
            "inconsistent (see the warnings above); fix the dataset or raise --max-skip-fraction"
            + ("; model.pt was not written" if final else "")
        )


def non_finite_parameters(model: nn.Module) -> list[str]:
    """Names of the trainable parameters holding NaN or infinite values."""
    return [n for n, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]


def check_run_end(model: nn.Module, nan_run: int, last: Path) -> None:
    """FloatingPointError when the final weights cannot be trusted: non-finite, or followed only by steps
    whose loss was non-finite (--lr 1e30: one update to weights near 1e30, then every step skipped)."""
    bad = non_finite_parameters(model)
    if bad:
        raise FloatingPointError(
            f"{len(bad)} trained tensors hold NaN or infinite values (e.g. {', '.join(bad[:3])}); model.pt "
            f"was not written; lower --lr (last saved checkpoint: {last})"
        )
    if nan_run:
        raise FloatingPointError(
            f"the last {nan_run} step(s) had a non-finite loss, so the final weights are not trusted and "
            f"model.pt was not written; lower --lr or check the data (last saved checkpoint: {last})"
        )


def resume_state(
    last: Path, model: nn.Module, optimizer: torch.optim.Optimizer, dense_head: nn.Module | None = None
) -> int:
    """Restore weights and optimizer from a training checkpoint (last.pt); return its step. The config
    in the file must equal the model's: resuming another model's run would silently mix them."""
    ckpt = load_checkpoint(last)
    if ckpt.config != model.config:
        raise SystemExit(f"{last}: saved for config {ckpt.config.to_dict()}, not the one asked for now")
    load_state_into(model, ckpt.state_dict, source=str(last))
    if (dense_head is None) != ("dense_head" not in ckpt.extra):
        raise SystemExit(f"{last}: saved {'with' if dense_head is None else 'without'} a dense grounding head; "
                         "resume with the same --dense-weight setting (0 or not)")
    if dense_head is not None:
        dense_head.load_state_dict(ckpt.extra["dense_head"])
    optimizer.load_state_dict(ckpt.extra["optimizer"])
    return int(ckpt.extra["step"])
