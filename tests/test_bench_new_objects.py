"""bench/bench_new_objects.py: requests grouped by whether their targets' 3D models and categories were in the
training scenes, and masks alone averaged per group."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import bench_new_objects as bench  # noqa: E402


def obj(i: int, source: str, category: str) -> dict:
    return {"id": i, "source": source, "category": category}


def write_scene(root: Path, scene: str, objects: list[dict], requests: list[dict]) -> None:
    (root / "shard-00000" / "scenes").mkdir(parents=True, exist_ok=True)
    (root / "shard-00000" / "scenes" / f"{scene}.json").write_text(json.dumps({"objects": objects}))
    with (root / "dataset.jsonl").open("a") as f:
        for r in requests:
            f.write(json.dumps({"scene_graph": f"shard-00000/scenes/{scene}.json", **r}) + "\n")


def test_requests_are_grouped_by_their_targets_models_and_categories(tmp_path):
    train, test = tmp_path / "train", tmp_path / "test"
    write_scene(train, "a", [obj(0, "lib:mug1", "mug"), obj(1, "lib:plate1", "plate")], [])
    objects = [obj(0, "lib:mug1", "mug"), obj(1, "lib:mug2", "mug"), obj(2, "lib:knife1", "knife")]
    ask = dict(negative=False, answer_kind="object", family="entities")
    write_scene(test, "b", objects, [
        {"sample_id": "seen", "targets": [0], **ask},
        {"sample_id": "new model", "targets": [1], **ask},
        {"sample_id": "new category", "targets": [2], **ask},
        {"sample_id": "mixed", "targets": [0, 2], **ask},
        {"sample_id": "both mugs", "targets": [0, 1], **ask},
        {"sample_id": "absent", "targets": [], **{**ask, "negative": True}},
        {"sample_id": "free space", "targets": [0], **{**ask, "answer_kind": "region"}},
    ])
    sources, categories = bench.scene_objects(train)
    assert sources == {"lib:mug1", "lib:plate1"} and categories == {"mug", "plate"}
    groups = bench.request_groups(test, sources, categories)
    assert {k: g for k, (g, _) in groups.items()} == {
        "seen": "training models",
        "new model": "new models, known categories",
        "new category": "new categories",
        "mixed": "mixed",
        "both mugs": "mixed",
    }
    samples = [
        {"id": "seen", "ungated_iou": 0.8},
        {"id": "new model", "ungated_iou": 0.2},
        {"id": "new category", "ungated_iou": 0.1},
        {"id": "mixed", "ungated_iou": 0.5},
        {"id": "both mugs", "ungated_iou": 0.3},
        {"id": "absent", "ungated_iou": 0.0},
    ]
    table = {row["group"]: row for row in bench.summarise(groups, samples)}
    assert table["training models"]["masks alone"] == 80.0
    assert table["new models, known categories"]["masks alone"] == 20.0
    assert table["mixed"]["n"] == 2 and table["mixed"]["masks alone"] == 40.0
    with pytest.raises(SystemExit, match="ungated_iou"):
        bench.summarise(groups, [{"id": "seen", "intersection": 1}])
