"""One image reader for every path: the CLI, training, evaluation, export calibration and the ROS node's
compressed frames decode a file the same way (upright, deep grey scaled), and refuse the same bad pixels."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from converseg_core import build_model, save_checkpoint
from converseg_core.cli import main as cli_main
from converseg_core.errors import InputError
from converseg_core.processing import read_rgb, read_size, scale_to_u8
from training.records import SampleError
from training.sample_io import image_hw, load_rgb


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("reader") / "edge.pt"
    save_checkpoint(build_model("converseg_edge", img_size=64, pretrained_text=False), path)
    return path


def phone_photo(path, rotation=6):
    """A JPEG stored sideways (20 x 30) whose EXIF orientation says: turn it 90 degrees to view it (30 x 20)."""
    rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    rgb[:, :10] = (250, 250, 250)  # a white band, on the left of the stored pixels
    rgb[5:15, 18:26] = (200, 30, 30)
    exif = Image.Exif()
    exif[0x0112] = rotation
    Image.fromarray(rgb).save(path, exif=exif, quality=95)
    return path


def compressed(path):
    return SimpleNamespace(format=path.suffix.lstrip("."), data=path.read_bytes())


def test_every_path_reads_an_image_the_same_way(tmp_path):
    from converseg_ros.image_conversion import compressed_to_rgb

    from export.calibration import CalibrationBatcher

    deep = (np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 100).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "depth.png")
    for path in (phone_photo(tmp_path / "phone.jpg"), tmp_path / "depth.png"):
        want = read_rgb(path)
        assert np.array_equal(load_rgb(path), want), f"training reads {path.name} differently"
        assert read_size(path) == image_hw(path) == want.shape[:2], f"the header size of {path.name}"
        assert np.array_equal(compressed_to_rgb(compressed(path), max_side=64), want), path.name
        h, w = want.shape[:2]
        batcher = CalibrationBatcher(
            [path],
            preprocess=lambda rgb: rgb.transpose(2, 0, 1).astype(np.float32),
            input_shape=(1, 3, h, w),
            shuffle=False,
        )
        assert np.array_equal(next(iter(batcher))[0], want.transpose(2, 0, 1)), f"calibration: {path.name}"
    assert read_rgb(tmp_path / "phone.jpg").shape == (30, 20, 3)  # upright


def test_an_exif_rotated_photo_gives_the_same_mask_in_the_cli_and_in_evaluation(checkpoint, tmp_path):
    from training.evaluate import EvalConfig, evaluate

    photo = phone_photo(tmp_path / "phone.jpg")
    argv = ["segment", "--image", str(photo), "--query", "the red box", "--out", str(tmp_path / "cli.png")]
    argv += ["--checkpoint", str(checkpoint), "--presence-threshold", "0"]
    assert cli_main(argv) == 0
    cli_mask = np.asarray(Image.open(tmp_path / "cli.png")) > 0
    assert cli_mask.shape == (30, 20)
    assert 0 < cli_mask.sum() < cli_mask.size, "the test needs a mask that depends on the orientation"
    # The CLI's own answer is the target: evaluation must reproduce it pixel for pixel.
    Image.fromarray(cli_mask.astype(np.uint8) * 255).save(tmp_path / "target.png")
    items = [{"image": "phone.jpg", "mask_merged": "target.png", "prompt": "the red box", "id": "a"}]
    (tmp_path / "items.json").write_text(json.dumps(items))
    evaluate(
        EvalConfig(
            checkpoint=str(checkpoint),
            data=str(tmp_path / "items.json"),
            out_dir=str(tmp_path / "eval"),
            presence_threshold=0.0,
            num_panels=0,
            threads=1,
        )
    )
    (sample,) = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert sample["mask_pixels"] == sample["target_pixels"] == int(cli_mask.sum())
    assert sample["intersection"] == sample["union"] == int(cli_mask.sum())


def float_image(path, value):
    pixels = np.linspace(0.0, 5.0, 20 * 30, dtype=np.float32).reshape(20, 30)
    pixels[3, 4] = value
    Image.fromarray(pixels, mode="F").save(path)
    return path


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_a_float_image_is_refused_on_every_path(value, checkpoint, tmp_path, capsys):
    """One non-finite pixel used to set the scale of the whole frame (all black), which was segmented anyway."""
    from converseg_ros.image_conversion import ImageConversionError, compressed_to_rgb

    path = float_image(tmp_path / "depth.tif", value)
    with pytest.raises(InputError, match="1 of 600 pixels are NaN or infinite"):
        scale_to_u8(np.asarray(Image.open(path)))
    with pytest.raises(InputError, match="depth.tif: 1 of 600 pixels are NaN or infinite"):
        read_rgb(path)
    with pytest.raises(SampleError, match="NaN or infinite"):
        load_rgb(path)
    with pytest.raises(ImageConversionError, match="NaN or infinite") as info:
        compressed_to_rgb(compressed(path), max_side=64)
    assert info.value.reason == "invalid_pixels"
    out = tmp_path / "mask.png"
    argv = ["segment", "--image", str(path), "--query", "the cup", "--out", str(out)]
    assert cli_main(argv + ["--checkpoint", str(checkpoint)]) == 2
    assert "NaN or infinite" in capsys.readouterr().err
    assert not out.exists()
    # A finite float image is still scaled by its maximum.
    assert read_rgb(float_image(tmp_path / "ok.tif", 10.0))[3, 4, 0] == 255
