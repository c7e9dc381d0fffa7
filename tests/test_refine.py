"""Mask refinement by the frame's own features (modeling/refine.py): it grows a mask over the places that look
like it, is standardised, works for a shared frame, one frame per request and several masks, changes nothing
when off, exports with parity, and a negative scale is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from converseg_core import build_model
from converseg_core.checkpoint import load_checkpoint, save_checkpoint
from converseg_core.config import inference_default_problems
from converseg_core.modeling.refine import prototype_refinement


def two_objects(g: int = 4, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """1 x g*g x dim tokens: the left half of the frame one object, the right half another (each place its
    object's direction plus a little noise), and the left object's place mask."""
    torch.manual_seed(0)
    a, b = torch.randn(dim), torch.randn(dim)
    left = (torch.arange(g * g) % g) < g // 2
    tokens = torch.where(left[:, None], a, b) + 0.05 * torch.randn(g * g, dim)
    return tokens[None], left


def test_a_mask_on_part_of_an_object_grows_over_all_of_it() -> None:
    tokens, left = two_objects()
    logits = torch.full((1, 1, 4, 4), -4.0)
    logits[0, 0, 0, 0] = 4.0  # the mask covers one place of the left object
    offsets = prototype_refinement(tokens, logits, 4, 4).flatten()
    assert (offsets[left] > 0.5).all() and (offsets[~left] < -0.5).all()
    torch.testing.assert_close(offsets.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)  # standardised
    torch.testing.assert_close(offsets.pow(2).mean(), torch.tensor(1.0), atol=1e-4, rtol=0)
    # At the decoder's resolution (4 x 4 pixels per place) the same, upsampled.
    fine = torch.full((1, 1, 16, 16), -4.0)
    fine[0, 0, :4, :4] = 4.0
    upsampled = prototype_refinement(tokens, fine, 4, 16)
    assert upsampled.shape == (1, 1, 16, 16)
    per_place = torch.nn.functional.avg_pool2d(upsampled, 4).flatten()
    assert (per_place[left] > 0.3).all() and (per_place[~left] < -0.3).all()


def test_shared_and_per_request_frames_and_several_masks_agree() -> None:
    tokens, _ = two_objects()
    torch.manual_seed(1)
    logits = torch.randn(3, 2, 16, 16) * 3
    shared = prototype_refinement(tokens, logits, 4, 16)
    per_request = prototype_refinement(tokens.expand(3, -1, -1), logits, 4, 16)
    torch.testing.assert_close(shared, per_request)
    for q in range(3):
        for m in range(2):
            one = prototype_refinement(tokens, logits[q : q + 1, m : m + 1], 4, 16)
            torch.testing.assert_close(shared[q : q + 1, m : m + 1], one)
    places = torch.nn.functional.avg_pool2d(shared, 4).flatten(2)
    # Standardised per mask: mean 0 (bilinear upsampling of a 4 x 4 map moves the moments a little).
    assert places.mean(dim=-1).abs().max() < 0.2


def test_the_model_adds_the_refinement_at_its_scale_and_nothing_when_off(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model("converseg_edge", img_size=64, pretrained_text=False).eval()
    path = save_checkpoint(model, tmp_path / "m.pt")
    refined = build_model(checkpoint=path, mask_refinement=0.75, pretrained_text=False).eval()
    image = torch.randn(1, 3, 64, 64)
    text, mask = torch.randn(2, 5, 384), torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        context = model.image_context(model.encode_image(image))
        plain = model.decode_context(context, text, mask)
        out = refined.decode_context(context, text, mask)
        offsets = prototype_refinement(
            context.image_tokens, plain.low_res_logits, model.config.embed_size, model.config.low_res_size
        )
    assert offsets.abs().max() > 0.5
    torch.testing.assert_close(out.low_res_logits, plain.low_res_logits + 0.75 * offsets)
    torch.testing.assert_close(out.presence_logits, plain.presence_logits)  # presence reads the plain mask
    assert load_checkpoint(path).config.mask_refinement == 0.0  # old files: off


def test_a_negative_scale_is_refused() -> None:
    from converseg_core.registry import get_config

    config = get_config("converseg_edge")
    assert inference_default_problems(config) == []
    assert any("negative" in p for p in inference_default_problems(config.replace(mask_refinement=-0.5)))
    assert any(
        "finite" in p for p in inference_default_problems(config.replace(mask_refinement=float("nan")))
    )


def test_a_refined_model_exports_with_parity(tmp_path) -> None:
    from converseg_core.segmenter import Segmenter
    from export.export_onnx import export_model

    torch.manual_seed(0)
    model = build_model("converseg_edge_lite", img_size=128, mask_refinement=0.5).eval()
    manifest = export_model(model, tmp_path, source={"model": "converseg_edge_lite", "test": True})
    assert manifest.parity["passed"], manifest.parity
    frame = np.random.default_rng(1).integers(0, 255, size=(96, 128, 3), dtype=np.uint8)
    answers = []
    for segmenter in (
        Segmenter(model, presence_threshold=0.0),
        Segmenter.from_checkpoint(tmp_path, backend="onnxruntime", presence_threshold=0.0),
    ):
        segmenter.set_image(frame)
        answers.append(segmenter.predict(["the red mug"]))
    (a,), (b,) = answers
    assert a.mask.any() and np.mean(a.mask != b.mask) < 1e-3


@pytest.mark.parametrize("scale", [-1.0, float("inf")])
def test_calibrate_refuses_a_bad_refinement_scale(tmp_path, scale) -> None:
    from training.calibrate import CalibrateConfig, calibrate

    with pytest.raises(SystemExit, match="mask-refinement"):
        calibrate(
            CalibrateConfig(checkpoint="a.pt", data="d", out=str(tmp_path / "b.pt"), mask_refinement=[scale])
        )
