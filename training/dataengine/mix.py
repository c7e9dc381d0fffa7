"""One training set from several rendered sets: a folder of links to their shards behind one index.json.

    python -m training.dataengine.mix --out runs/ae/mix runs/v2/data/train runs/v3p/train runs/v4/train

The mix renders and copies nothing: shard k of the mix links to a finished shard of one source, in the order
given, and index.json lists them, so `training.train --data`, `training.calibrate` and `training.evaluate`
read the mix as one set. Training draws pictures uniformly, so each source weighs in by its number of
pictures. Scene ids are kept: sets rendered from one seed share ids, and a shared id lands on one side of
the train / validation split in every source. A trunk cache built for the sources' pictures, or for another
mix of them, serves the mix (training.trunk_cache finds a picture through its links).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from converseg_core.files import atomic_write_text

from .errors import DataEngineError
from .pipeline import read_index, shard_name


def mix(out: Path, sources: list[Path]) -> dict:
    """Link every listed shard of `sources` into `out` and write its index.json; returns the index.

    Running it again with the same sources changes nothing; `out` holding anything else is an error."""
    if len(sources) < 2:
        raise DataEngineError("a mix needs at least two sources")
    resolved = [str(s.resolve()) for s in sources]
    if len(set(resolved)) != len(resolved):
        raise DataEngineError(f"a source is given twice: {[str(s) for s in sources]}")
    indexes = [read_index(s) for s in sources]
    index_path = out / "index.json"
    if index_path.is_file():
        old = json.loads(index_path.read_text(encoding="utf-8"))
        if [m["path"] for m in old.get("mixed_from", [])] == resolved:
            return old
        raise DataEngineError(f"{out}: holds a mix of other sources; choose another --out")
    if out.exists() and any(out.iterdir()):
        raise DataEngineError(f"{out}: exists and is not empty; a mix is written into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    shards, parts, families = [], [], {}
    samples = scenes = negatives = 0
    licences = []
    for source, path, index in zip(sources, resolved, indexes, strict=True):
        missing = [s for s in index["shards"] if not (source / s / "DONE").is_file()]
        if missing:
            raise DataEngineError(f"{source}: shards listed without a DONE marker: {missing[:5]}")
        first = len(shards)
        for name in index["shards"]:
            link = out / shard_name(len(shards))
            link.symlink_to((source / name).resolve(), target_is_directory=True)
            shards.append(link.name)
        parts.append({"path": path, "shards": [shards[first], shards[-1]], "samples": index["samples"]})
        samples += index["samples"]
        scenes += index.get("scenes", 0)
        negatives += index.get("negatives", 0)
        for family, n in index.get("counts_per_family", {}).items():
            families[family] = families.get(family, 0) + n
        if (source / "ASSET_LICENCES.md").is_file():
            licences.append(f"## {path}\n\n{(source / 'ASSET_LICENCES.md').read_text(encoding='utf-8')}")
    if licences:
        atomic_write_text(
            out / "ASSET_LICENCES.md", "# Models used in the mixed sets\n\n" + "\n".join(licences)
        )
    index = {
        "format": "converseg-dataengine",
        "version": 1,
        "mixed_from": parts,
        "scenes": scenes,
        "samples": samples,
        "shards": shards,
        "counts_per_family": dict(sorted(families.items())),
        "negatives": negatives,
    }
    atomic_write_text(index_path, json.dumps(index, indent=1))  # last: it marks the mix finished
    return index


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.dataengine.mix",
        description="Make one training set of several finished data engine outputs (links, no copies).",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="new folder for the mix (its index.json and links)"
    )
    p.add_argument(
        "sources", type=Path, nargs="+", help="finished data engine output folders, in shard order"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        index = mix(args.out, args.sources)
    except DataEngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{args.out}: {len(index['shards'])} shards, {index['samples']} requests from {len(args.sources)} sets"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
