"""bench/bench_photo_grounding.py: its "model" masks are the ones training.evaluate scores, and its table has
the groups the real-photo set marks."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from converseg_core.weights import DEFAULT_CHECKPOINT
from training.evaluate import EvalConfig, evaluate

REPO = Path(__file__).resolve().parents[1]
SET = REPO / "tests" / "data" / "real_photos"
sys.path.insert(0, str(REPO))
from bench import bench_photo_grounding as bench  # noqa: E402


def test_score_counts_iou_and_where_the_values_peak():
    import numpy as np

    target = np.zeros((4, 4), bool)
    target[:2, :2] = True
    mask = np.zeros_like(target)
    mask[:2, :] = True
    values = np.zeros(target.shape)
    values[3, 3] = 1.0
    assert bench.score(mask, values, target) == (0.5, False)
    values[0, 1] = 2.0
    assert bench.score(mask, values, target) == (0.5, True)
    assert bench.score(np.zeros_like(target), values, np.zeros_like(target))[0] == 1.0


@pytest.mark.skipif(
    not Path(DEFAULT_CHECKPOINT).is_file(), reason="the bundled model is not in this checkout"
)
def test_model_masks_match_evaluate_masks_alone(tmp_path):
    # A copy without its phrasing memory: evaluate then decodes every request with its own words, as the
    # bench does.
    checkpoint = tmp_path / "model.pt"
    shutil.copy(DEFAULT_CHECKPOINT, checkpoint)
    assert (
        bench.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "bench"), "--threads", "1"]) == 0
    )
    result = json.loads((tmp_path / "bench" / "results.json").read_text())
    groups = {row["requests"]: row["n"] for row in result["table"]}
    assert groups == {"all with a target": 64, "rendered kinds": 35, "entities": 25}

    evaluate(
        EvalConfig(
            checkpoint=str(checkpoint), data=str(SET), out_dir=str(tmp_path / "eval"), num_panels=0, threads=1
        )
    )
    rows = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    ungated = {row["id"]: row["ungated_iou"] for row in rows if not row["negative"]}
    ours = {row["id"]: row["model iou"] for row in result["requests"]}
    assert set(ours) == set(ungated)
    assert max(abs(ours[k] - ungated[k]) for k in ours) < 1e-4
    # The learned part and the concepts alone are other masks, not the model's again.
    assert any(row["concepts alone iou"] != row["model iou"] for row in result["requests"])
