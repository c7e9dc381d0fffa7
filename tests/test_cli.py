"""The README's main command: `converseg segment --image IMG --query "..." --out mask.png`."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from converseg_core import build_model, save_checkpoint
from converseg_core.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cli") / "edge.pt"
    save_checkpoint(build_model("converseg_edge", img_size=64, pretrained_text=False), path)
    return path


@pytest.fixture()
def image(tmp_path):
    path = tmp_path / "frame.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(path)
    return path


def test_segment_writes_a_mask_at_image_resolution(checkpoint, image, tmp_path, capsys):
    out, overlay = tmp_path / "mask.png", tmp_path / "overlay.png"
    code = main(
        [
            "segment",
            "--image",
            str(image),
            "--query",
            "the cup",
            "--query",
            "something sharp",
            "--out",
            str(out),
            "--overlay",
            str(overlay),
            "--checkpoint",
            str(checkpoint),
            "--presence-threshold",
            "0",
        ]
    )
    assert code == 0
    mask = np.asarray(Image.open(out))
    assert mask.shape == (40, 60) and set(np.unique(mask)) <= {0, 255}
    assert np.asarray(Image.open(overlay)).shape == (40, 60, 3)
    summary = json.loads(capsys.readouterr().out)
    assert [s["query"] for s in summary] == ["the cup", "something sharp"]
    assert all(s["present"] for s in summary)
    assert sum(s["area"] for s in summary) >= int((mask > 0).sum()) >= max(s["area"] for s in summary)


@pytest.mark.parametrize(
    "setup, message",
    [
        ("missing_image", "no such image file"),
        ("not_an_image", "cannot be read as an image"),
        ("missing_checkpoint", "no such checkpoint file"),
    ],
)
def test_bad_input_exits_non_zero_with_a_message(setup, message, checkpoint, image, tmp_path, capsys):
    args = {"image": str(image), "checkpoint": str(checkpoint)}
    if setup == "missing_image":
        args["image"] = str(tmp_path / "nope.png")
    elif setup == "not_an_image":
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"definitely not a png")
        args["image"] = str(bad)
    else:
        args["checkpoint"] = str(tmp_path / "nope.pt")
    code = main(
        [
            "segment",
            "--image",
            args["image"],
            "--query",
            "the cup",
            "--out",
            str(tmp_path / "m.png"),
            "--checkpoint",
            args["checkpoint"],
        ]
    )
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m.png").exists()


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    assert "converseg_edge" in capsys.readouterr().out.split()
