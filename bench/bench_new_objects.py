"""How a model's masks hold up on 3D models it never saw: rendered test requests grouped by their targets'
models against a training set's.

    .venv/bin/python bench/bench_new_objects.py --train TRAIN_DATA --test TEST_DATA \
        --evals EVAL_A EVAL_B --names "model A" "model B" --out bench/out/new_objects

The data engine's test scenes are new scenes of the same object models its training scenes show, so its test
sets measure new scenes and phrasings, not new objects. Where a test set was rendered with more models than a
model's training set (data engine v4's test scenes against v3's training scenes), its requests split by what
their targets are: every target a model of the training scenes ("training models"); every target a model the
training scenes never showed, of a category they did show ("new models, known categories"); every target of a
category they never showed ("new categories"); anything else ("mixed"). Only requests with object targets
count (not free-space answers, not negatives). Each --evals folder is a `training.evaluate` output on --test;
its "masks alone" (`ungated_iou`, presence ignored) is averaged per group, for all requests and for entity
requests (which name the object). Writes OUT/results.json and OUT/results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a source checkout

GROUPS = ("training models", "new models, known categories", "new categories", "mixed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--train", type=Path, required=True, help="data engine folder the models trained on")
    p.add_argument("--test", type=Path, required=True, help="data engine folder the evaluations ran on")
    p.add_argument("--evals", type=Path, nargs="+", required=True, help="training.evaluate output folders")
    p.add_argument("--names", nargs="*", default=[], help="a label per --evals folder (default: folder names)")
    p.add_argument("--out", type=Path, default=Path("bench/out/new_objects"), help="output folder")
    return p


def scene_objects(root: Path) -> tuple[set[str], set[str]]:
    """Every object model (`source`) and category in a data engine folder's scene graphs."""
    sources, categories = set(), set()
    for path in sorted(root.glob("shard-*/scenes/*.json")):
        for obj in json.loads(path.read_text())["objects"]:
            sources.add(obj["source"])
            categories.add(obj["category"])
    if not sources:
        raise SystemExit(f"{root}: no scene graphs with objects (shard-*/scenes/*.json)")
    return sources, categories


def target_group(targets: list[dict], sources: set[str], categories: set[str]) -> str:
    """The group of a request whose target objects (scene-graph entries) are `targets`."""
    if all(t["source"] in sources for t in targets):
        return "training models"
    if all(t["source"] not in sources and t["category"] in categories for t in targets):
        return "new models, known categories"
    if all(t["category"] not in categories for t in targets):
        return "new categories"
    return "mixed"


def request_groups(test: Path, sources: set[str], categories: set[str]) -> dict[str, tuple[str, str]]:
    """sample_id -> (group, family) for every positive request with object targets of a test folder."""
    out, graphs = {}, {}
    for line in (test / "dataset.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("negative") or row.get("answer_kind") != "object" or not row.get("targets"):
            continue
        graph = row["scene_graph"]
        if graph not in graphs:
            graphs[graph] = {o["id"]: o for o in json.loads((test / graph).read_text())["objects"]}
        targets = [graphs[graph][i] for i in row["targets"]]
        out[row["sample_id"]] = (target_group(targets, sources, categories), row.get("family") or "unknown")
    return out


def summarise(groups: dict[str, tuple[str, str]], samples: list[dict]) -> list[dict]:
    """Per group: request count and mean masks-alone IoU (in %), over all requests and entity requests."""
    all_iou, entity_iou = defaultdict(list), defaultdict(list)
    for s in samples:
        if s["id"] not in groups:
            continue
        if "ungated_iou" not in s:
            raise SystemExit("samples.jsonl without ungated_iou: evaluate again with today's training.evaluate")
        group, family = groups[s["id"]]
        all_iou[group].append(s["ungated_iou"])
        if family == "entities":
            entity_iou[group].append(s["ungated_iou"])

    def mean(v: list[float]) -> float | None:
        return round(100 * sum(v) / len(v), 1) if v else None

    return [
        {
            "group": g,
            "n": len(all_iou[g]),
            "masks alone": mean(all_iou[g]),
            "entities n": len(entity_iou[g]),
            "entities masks alone": mean(entity_iou[g]),
        }
        for g in GROUPS
    ]


def main(argv: list[str] | None = None) -> int:
    from converseg_core.files import atomic_write_text

    args = build_parser().parse_args(argv)
    names = args.names or [p.name for p in args.evals]
    if len(names) != len(args.evals):
        raise SystemExit(f"--names gives {len(names)} labels for {len(args.evals)} --evals folders")
    sources, categories = scene_objects(args.train)
    groups = request_groups(args.test, sources, categories)
    tables = {}
    for name, folder in zip(names, args.evals, strict=True):
        samples = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines() if line]
        tables[name] = summarise(groups, samples)
    lines = [
        f"# Masks on new objects: {args.test} against the models of {args.train}",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {len(sources)} models of {len(categories)} categories "
        "in the training scenes; masks alone (presence ignored), mean IoU in %",
        "",
        "| model | group | n | masks alone | entities n | entities masks alone |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, table in tables.items():
        for row in table:
            cells = ["-" if v is None else str(v) for v in row.values()]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "results.json", json.dumps(tables, indent=1))
    atomic_write_text(args.out / "results.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
