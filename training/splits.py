"""Train / validation splits by scene: deterministic (crc32 of the scene id), independent of how a path was
typed, with held-out phrasings (templates) never trained on."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

from .records import Record


def _bucket(key: str) -> float:
    return (zlib.crc32(key.encode()) & 0xFFFFFFFF) / 2**32


def split_key(r: Record) -> str:
    """What decides a sample's side: its scene id, else its image's folder and file name. Not the whole
    path: that depends on how --data was typed (`data/x.jsonl`, `./data/x.jsonl`, an absolute path), and
    training and calibration typed differently would then split differently, calibrating on trained images."""
    return r.scene_id or f"{r.image.parent.name}/{r.image.name}"


def _side(r: Record, val_fraction: float, held: set[str]) -> str:
    """'val' (a validation scene), 'train', or 'unused': a held-out-template sample of a training scene."""
    if _bucket(split_key(r)) < val_fraction:
        return "val"
    heldout = r.template_split == "heldout" or (r.template_id is not None and r.template_id in held)
    return "unused" if heldout else "train"


def split_records(
    records: Sequence[Record], *, val_fraction: float, heldout_templates: Sequence[str] = ()
) -> tuple[list[Record], list[Record]]:
    """Split by scene (a scene never lands on both sides), deterministically (crc32 of the scene id).

    Samples whose template is held out never train; they are kept for validation only when their scene is
    a validation scene, so held-out templates are measured on held-out scenes as well.
    """
    held = set(map(str, heldout_templates))
    sides = [_side(r, val_fraction, held) for r in records]
    train = [r for r, side in zip(records, sides, strict=True) if side == "train"]
    val = [r for r, side in zip(records, sides, strict=True) if side == "val"]
    return train, val


def unused_records(
    records: Sequence[Record], *, val_fraction: float, heldout_templates: Sequence[str] = ()
) -> list[Record]:
    """The samples `split_records` puts on neither side: held-out-template requests of training scenes.

    A training run never sees their phrasings, only their scenes, so they measure phrasing generalization
    without the test set, on many more requests than the validation scenes hold."""
    held = set(map(str, heldout_templates))
    return [r for r in records if _side(r, val_fraction, held) == "unused"]
