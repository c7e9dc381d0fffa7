"""Where the default model lives."""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DEFAULT_CHECKPOINT = ASSETS_DIR / "converseg_edge.pt"


def default_checkpoint() -> Path:
    """The checkpoint the CLI and the ROS node load when none is named."""
    if not DEFAULT_CHECKPOINT.is_file():
        raise CheckpointError(
            f"{DEFAULT_CHECKPOINT}: the default model is not there; pass a checkpoint explicitly, "
            "or train one with `python -m training.reproduce_default` (docs/TRAINING.md)"
        )
    return DEFAULT_CHECKPOINT
