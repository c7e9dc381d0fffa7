"""Write a checkpoint's phrasing memory for request anchoring (converseg_core.anchoring) from its training data.

    python -m training.phrasings build --data runs/v2/data/train runs/v4/train --min-cosine 0.0 \
        --out converseg_core/assets/converseg_edge.phrasings.json.gz

The memory holds the distinct requests the model trained on: the training side of each data set (the same
scene split as `training.train`, --val-fraction) and only phrasings a training run may use (held-out
templates never enter it, so held-out phrasings stay unseen when a model is evaluated with anchoring). Each
is marked a concept request when its family is not entities or spatial. Pass the data sets the checkpoint was
trained on; the file goes beside the checkpoint (`<name>.phrasings.json.gz`), where the Segmenter finds it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from converseg_core.anchoring import Phrasings, PhrasingsError

from .records import DatasetError, read_records
from .splits import split_records

# Families whose requests name the objects they want (a substitute phrasing would change the names).
OBJECT_FAMILIES = frozenset({"entities", "spatial"})


def training_phrasings(
    datasets: Sequence[str | Path], *, val_fraction: float, min_cosine: float
) -> Phrasings:
    """The distinct training-side requests of `datasets`, each marked concept or not."""
    concept: dict[str, bool] = {}
    for data in datasets:
        train, _ = split_records(read_records(data), val_fraction=val_fraction)
        for r in train:
            if r.family is None:
                raise DatasetError(
                    f"{data}: a request without a family ({r.prompt!r}): not data engine output"
                )
            concept.setdefault(r.prompt, r.family not in OBJECT_FAMILIES)
    if not concept:
        raise DatasetError(f"{', '.join(map(str, datasets))}: no training requests")
    texts = sorted(concept)
    return Phrasings(tuple(texts), tuple(concept[t] for t in texts), min_cosine)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.phrasings",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser(
        "build",
        help="write a phrasing memory from training data",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    b.add_argument("--data", nargs="+", required=True, help="the data sets the checkpoint trained on")
    b.add_argument("--out", type=Path, required=True, help="memory file, <checkpoint name>.phrasings.json.gz")
    b.add_argument("--val-fraction", type=float, default=0.05, help="the training run's --val-fraction")
    b.add_argument(
        "--min-cosine",
        type=float,
        default=0.0,
        help="cosine a request needs to its nearest concept phrasing to be anchored (chosen on validation)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        phrasings = training_phrasings(args.data, val_fraction=args.val_fraction, min_cosine=args.min_cosine)
        phrasings.save(args.out)
    except (DatasetError, PhrasingsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n_concept = sum(phrasings.concept)
    print(
        f"{args.out}: {len(phrasings.texts)} phrasings ({n_concept} concept requests), "
        f"min cosine {phrasings.min_cosine}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
