"""Command lines built from config dataclasses: one flag per field, its help and choices in the field.

Every training script declares its options once, as a dataclass whose fields are made with `arg`; its
`main` parses `config_parser(Config, __doc__)` into that dataclass and calls a typed, importable function.
This module needs no torch, so a numpy-only script (training.compare) starts fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from dataclasses import field
from typing import Any


def arg(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:
    """A dataclass field whose metadata becomes an argparse flag (help, choices, nargs)."""
    meta = {"help": help, **kw}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of `cls`: booleans are store_true, `X | None` and `list[X]` parse as X."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        typ = hints[f.name]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if typ is bool:
            parser.add_argument(flag, action="store_true", help=meta["help"])
            continue
        base = typ
        if typing.get_origin(typ) in (typing.Union, types.UnionType):
            base = next(a for a in typing.get_args(typ) if a is not type(None))
        if typing.get_origin(base) is list:
            base = typing.get_args(base)[0]
        kw = {k: v for k, v in meta.items() if k in ("help", "choices", "nargs")}
        if not required:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kw["default"] = default
        parser.add_argument(flag, type=base, required=required, **kw)


def config_parser(cls: type, doc: str | None) -> argparse.ArgumentParser:
    """The command line of a script: a flag for every field of its config dataclass `cls` (defaults shown in
    --help), described by the first line of the script's docstring `doc`."""
    parser = argparse.ArgumentParser(
        description=(doc or "").split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_dataclass_args(parser, cls)
    return parser


def require_at_least_one(cfg: object, *fields: str) -> None:
    """Exit with the flag's name if a step count or interval is below 1 (an interval of 0 would divide by zero
    mid-run; the last step always logs, validates and saves anyway)."""
    for name in fields:
        value = getattr(cfg, name)
        if value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def require_finite(
    cfg: object, *, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()
) -> None:
    """Exit with the flag's name if a rate or weight is NaN, infinite or out of range: `--lr nan` would train
    to NaN weights and `--lr inf` to infinite ones, and end with exit 0. None (a default) passes."""
    for names, ok, wanted in (
        (positive, lambda v: v > 0, "above 0"),
        (non_negative, lambda v: v >= 0, "0 or more"),
    ):
        for name in names:
            value = getattr(cfg, name)
            if value is not None and not (math.isfinite(value) and ok(value)):
                raise SystemExit(f"--{name.replace('_', '-')} must be a finite number {wanted}, got {value}")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`--override KEY=VALUE ...` -> {key: value}; a value is JSON when it parses (lists become tuples, as
    the model config holds them), else the plain string."""
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--override expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out[key] = tuple(parsed) if isinstance(parsed, list) else parsed
    return out


def plain(obj: Any) -> Any:
    """JSON-clean copy (numpy scalars -> float): checkpoints load with torch.load(weights_only=True)."""
    return json.loads(json.dumps(obj, default=float))
