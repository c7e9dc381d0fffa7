"""The README's main command: `converseg segment --image IMG --query "..." --out mask.png`."""

import builtins
import errno
import json
import os
from pathlib import Path

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


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--out": "m.jpg"}, "losslessly"),
        ({"--out": "m"}, "losslessly"),
        ({"--out": "IMAGE"}, "would be overwritten"),
        ({"--overlay": "m.png"}, "same file"),
        ({"--query": " \u200b "}, "no word the tokenizer can read"),
        ({"--query": "   "}, "empty or whitespace"),
        ({"--presence-threshold": "50"}, "in [0, 1]"),
        ({"--backend": "onnxruntime", "--checkpoint": None}, "pass --checkpoint DIR"),
        ({"--backend": "onnxruntime"}, "not a ConverSeg ONNX manifest"),
    ],
)
def test_bad_arguments_are_refused_with_a_message(change, message, checkpoint, image, tmp_path, capsys):
    args = {"--image": str(image), "--query": "the cup", "--out": "m.png", "--checkpoint": str(checkpoint)}
    args |= change
    if args["--out"] == "IMAGE":
        args["--out"] = str(image)
    for flag in ("--out", "--overlay"):
        if flag in args and not args[flag].startswith("/"):
            args[flag] = str(tmp_path / args[flag])
    argv = ["segment"] + [x for k, v in args.items() if v is not None for x in (k, v)]
    before = image.read_bytes()
    if args.get("--backend") == "onnxruntime":
        pytest.importorskip("onnxruntime")
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert image.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [image.name], "no output written"


def test_images_are_read_upright_and_deep_grey_is_scaled(tmp_path):
    from converseg_core.cli import read_rgb

    rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    rgb[:, :10] = 255  # white on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the viewer turns the stored image 90 degrees clockwise
    Image.fromarray(rgb).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = read_rgb(tmp_path / "phone.jpg")
    assert upright.shape == (30, 20, 3)
    assert upright[:8].mean() > 200 and upright[-8:].mean() < 50  # the white band is now at the top

    deep = (np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 100).astype(np.uint16)  # up to 59,900
    Image.fromarray(deep).save(tmp_path / "depth.png")
    grey = read_rgb(tmp_path / "depth.png")
    assert grey.shape == (20, 30, 3) and grey.dtype == np.uint8
    assert grey[0, 0, 0] == 0 and grey[-1, -1, 0] == 255 and 100 < grey[10, 0, 0] < 155  # scaled, not clipped


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    assert "converseg_edge" in capsys.readouterr().out.split()


def segment_argv(image, checkpoint, out, overlay=None):
    argv = ["segment", "--image", str(image), "--query", "the cup", "--out", str(out)]
    argv += ["--checkpoint", str(checkpoint), "--presence-threshold", "0"]
    return argv + (["--overlay", str(overlay)] if overlay is not None else [])


class FullDisk:
    """A file whose writes fail with `error` once `limit` bytes are in it (a full disk), or at once."""

    def __init__(self, f, limit, error):
        self._f, self._room, self._error = f, limit, error

    def write(self, data):
        if len(data) > self._room:
            self._f.write(bytes(data[: self._room]))
            self._room = 0
            raise OSError(self._error, os.strerror(self._error))
        self._room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def failing_writes(monkeypatch, folder, name, *, limit=100, error=errno.ENOSPC):
    """Every file written in `folder` whose name contains `name` fails after `limit` bytes (limit None: it
    cannot be opened for writing), whichever way it is opened (Pillow's open(), the atomic writer's fdopen)."""
    real_open, real_fdopen = builtins.open, os.fdopen

    def hit(path, mode):
        path = Path(path)
        return any(c in mode for c in "wax+") and path.parent == folder and name in path.name

    def fail_or_wrap(f):
        if limit is None:
            f.close()
            raise OSError(error, os.strerror(error))
        return FullDisk(f, limit, error)

    def fake_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return fail_or_wrap(f) if isinstance(file, (str, Path)) and hit(file, mode) else f

    def fake_fdopen(fd, mode="r", *a, **k):
        f = real_fdopen(fd, mode, *a, **k)
        return fail_or_wrap(f) if hit(os.readlink(f"/proc/self/fd/{fd}"), mode) else f

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "fdopen", fake_fdopen)


def test_out_hard_linked_to_the_input_is_refused_and_the_input_kept(checkpoint, image, tmp_path, capsys):
    link = tmp_path / "mask.png"
    os.link(image, link)
    before = image.read_bytes()
    assert main(segment_argv(image, checkpoint, link)) == 2
    assert "would be overwritten" in capsys.readouterr().err
    assert image.read_bytes() == before


def test_output_that_is_a_folder_is_refused_before_any_work(checkpoint, image, tmp_path, capsys):
    (tmp_path / "mask.png").mkdir()
    assert main(segment_argv(image, checkpoint, tmp_path / "mask.png")) == 2
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "error, limit, message",
    [(errno.ENOSPC, 100, "No space left on device"), (errno.EROFS, None, "Read-only file system")],
)
def test_a_failed_write_keeps_the_previous_mask_and_says_why(
    error, limit, message, checkpoint, image, tmp_path, capsys, monkeypatch
):
    outs = tmp_path / "outs"
    outs.mkdir()
    old = np.zeros((40, 60), dtype=np.uint8)
    Image.fromarray(old).save(outs / "mask.png")
    before = (outs / "mask.png").read_bytes()
    failing_writes(monkeypatch, outs, "mask.png", limit=limit, error=error)
    assert main(segment_argv(image, checkpoint, outs / "mask.png")) == 2
    assert message in capsys.readouterr().err
    assert (outs / "mask.png").read_bytes() == before, "the previous mask was replaced by a partial file"
    assert sorted(p.name for p in outs.iterdir()) == ["mask.png"], "a temporary file was left behind"


def test_when_the_overlay_cannot_be_written_the_mask_is_not_written_either(
    checkpoint, image, tmp_path, capsys, monkeypatch
):
    outs = tmp_path / "outs"
    outs.mkdir()
    failing_writes(monkeypatch, outs, "overlay.png")
    assert main(segment_argv(image, checkpoint, outs / "mask.png", outs / "overlay.png")) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert list(outs.iterdir()) == []
