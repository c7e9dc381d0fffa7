"""The frozen-trunk feature cache: features equal the trunk's, mirrored lookups, refusal of a cache made for
another model, a training run that reads it, the neck distillation, and the dense grounding loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_training_run import TINY, tiny_train
from toy_data import write_toy_dataset

from converseg_core import build_model
from converseg_core.checkpoint import save_checkpoint
from converseg_core.processing import preprocess
from converseg_core.registry import get_config
from training.losses import dense_grounding_loss
from training.records import read_records
from training.sample_io import load_rgb
from training.train import train
from training.trunk_cache import TrunkCache, build_cache, distill_neck

SIZE = 64


def lite_config():
    return get_config("converseg_edge_lite").replace(img_size=SIZE)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("toy"), num_scenes=6, size=(80, 60))


@pytest.fixture(scope="module")
def cache_dir(toy, tmp_path_factory):
    images = sorted({r.image for r in read_records(toy)})
    return build_cache(lite_config(), images, tmp_path_factory.mktemp("cache"), threads=1, batch_size=4)


def test_cached_features_are_the_trunks_and_mirror_on_lookup(toy, cache_dir) -> None:
    cache = TrunkCache.open(cache_dir, lite_config())
    model = build_model(lite_config(), pretrained_text=False).eval()
    image = sorted(cache.index)[2]
    x = preprocess(load_rgb(image), img_size=SIZE, pixel_mean=model.config.pixel_mean,
                   pixel_std=model.config.pixel_std).tensor
    with torch.no_grad():
        want = model.image_encoder.trunk.features(torch.from_numpy(x))
    got = cache.lookup([image], [False], torch.device("cpu"))
    mirrored = cache.lookup([image], [True], torch.device("cpu"))
    for g, m, w in zip(got, mirrored, want, strict=True):
        torch.testing.assert_close(g, w, atol=0.05, rtol=0.01)  # float16 storage
        torch.testing.assert_close(m, g.flip(-1))


def test_a_cache_for_another_model_or_an_unfinished_one_is_refused(cache_dir, tmp_path) -> None:
    with pytest.raises(SystemExit, match="made for"):
        TrunkCache.open(cache_dir, get_config("converseg_edge_lite").replace(img_size=2 * SIZE))
    with pytest.raises(SystemExit, match="no trunk cache"):
        TrunkCache.open(tmp_path, lite_config())


def test_training_reads_the_cache_instead_of_running_the_trunk(toy, cache_dir, tmp_path, monkeypatch) -> None:
    from converseg_core.modeling.efficientnet_lite import EfficientNetLite

    calls = []
    real = EfficientNetLite.features
    monkeypatch.setattr(EfficientNetLite, "features", lambda self, x: calls.append(x.shape) or real(self, x))
    cfg = tiny_train(toy, tmp_path, model="converseg_edge_lite", train_image_encoder=True,
                     trunk_cache=str(cache_dir), val_every=100, steps=3)
    result = train(cfg)
    assert result["step"] == 3 and (tmp_path / "model.pt").is_file()
    # Only the final validation runs the trunk (on whole images); the training steps read the cache.
    trunk_calls = len(calls)
    assert trunk_calls <= -(-cfg.val_samples // cfg.batch_size)
    calls.clear()
    train(tiny_train(toy, tmp_path / "plain", model="converseg_edge_lite", train_image_encoder=True,
                     val_every=100, steps=3))
    assert len(calls) >= trunk_calls + 3, "without the cache every step runs the trunk"


def test_neck_distillation_fits_the_teacher_and_keeps_its_heads(toy, cache_dir, tmp_path) -> None:
    torch.manual_seed(0)
    overrides = dict(item.split("=") for item in TINY)
    teacher = build_model("converseg_edge", pretrained_text=False, img_size=SIZE,
                          fusion_mlp_dim=int(overrides["fusion_mlp_dim"]),
                          decoder_mlp_dim=int(overrides["decoder_mlp_dim"]), fusion_depth=1)
    teacher_path = save_checkpoint(teacher, tmp_path / "teacher.pt")
    config = lite_config().replace(fusion_mlp_dim=64, decoder_mlp_dim=64, fusion_depth=1)
    cache = TrunkCache.open(cache_dir, lite_config())
    # The default held-out count (64) is more than this 6-image cache has: a fifth of it is held out instead.
    fit = distill_neck(cache, teacher_path, config, tmp_path / "student.pt", steps=30, batch_size=4, lr=3e-3)
    assert fit["train_r2"] > 0.0, fit
    student = build_model(checkpoint=tmp_path / "student.pt", pretrained_text=False)
    torch.testing.assert_close(student.mask_decoder.iou_token.weight, teacher.mask_decoder.iou_token.weight)
    torch.testing.assert_close(student.fusion.query_tokens, teacher.fusion.query_tokens)


def test_dense_grounding_loss_prefers_pixels_aligned_with_their_request() -> None:
    torch.manual_seed(0)
    text = torch.randn(3, 16)  # three requests about one image; the third is absent
    target = torch.zeros(3, 1, 4, 4)
    target[0, 0, :2] = 1.0  # request 0: the top half
    target[1, 0, 2:] = 1.0  # request 1: the bottom half
    aligned = torch.zeros(1, 16, 4, 4)
    aligned[0, :, :2] = text[0][:, None, None]
    aligned[0, :, 2:] = text[1][:, None, None]
    swapped = aligned.flip(2)
    index = torch.zeros(3, dtype=torch.long)
    good = dense_grounding_loss(aligned, text, target, index)
    bad = dense_grounding_loss(swapped, text, target, index)
    assert good < bad
    pixels = torch.randn(1, 16, 4, 4, requires_grad=True)
    dense_grounding_loss(pixels, text, target, index).backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    assert np.isfinite(float(good))


def test_training_with_the_dense_objective_trains_its_head_and_resumes(toy, tmp_path) -> None:
    cfg = tiny_train(toy, tmp_path, dense_weight=0.5, steps=2, val_every=100)
    first = train(cfg)
    assert first["step"] == 2
    from converseg_core.checkpoint import load_checkpoint

    last = load_checkpoint(tmp_path / "last.pt")
    head = last.extra["dense_head"]
    assert head["proj.weight"].shape == (384, 256, 1, 1)
    train(tiny_train(toy, tmp_path, dense_weight=0.5, steps=3, val_every=100, resume=True))
    moved = load_checkpoint(tmp_path / "last.pt").extra["dense_head"]["proj.weight"]
    assert not torch.equal(moved, head["proj.weight"]), "the resumed run trains the restored head"
    with pytest.raises(SystemExit, match="dense-weight"):
        train(tiny_train(toy, tmp_path, steps=4, val_every=100, resume=True))


def test_a_picture_reached_through_links_reads_its_cached_features(toy, cache_dir, tmp_path) -> None:
    cache = TrunkCache.open(cache_dir, lite_config())
    (tmp_path / "mix").mkdir()
    (tmp_path / "mix" / "shard-00000").symlink_to(toy / "shard-00000", target_is_directory=True)
    image = sorted(cache.index)[1]
    linked = tmp_path / "mix" / "shard-00000" / "images" / Path(image).name
    assert str(linked) not in cache.index and linked in cache
    got = cache.lookup([str(linked)], [False], torch.device("cpu"))
    want = cache.lookup([image], [False], torch.device("cpu"))
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    assert tmp_path / "mix" / "shard-00000" / "images" / "missing.png" not in cache


def test_feature_jitter_redraws_each_maps_statistics_and_keeps_its_content() -> None:
    from training.augment import jitter_feature_statistics

    features = torch.randn(3, 5, 8, 8) * 2.0 + 1.0
    assert jitter_feature_statistics(features, 0.0, torch.Generator().manual_seed(0)) is features
    out = jitter_feature_statistics(features, 0.4, torch.Generator().manual_seed(0))
    again = jitter_feature_statistics(features, 0.4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, again)
    e1, e2 = torch.randn((2, 3, 5, 1, 1), generator=torch.Generator().manual_seed(0))
    mean, spread = features.mean((2, 3), keepdim=True), features.std((2, 3), keepdim=True)
    torch.testing.assert_close(out.std((2, 3), keepdim=True), spread * torch.exp(0.4 * e1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.mean((2, 3), keepdim=True), mean + 0.4 * e2 * spread, rtol=1e-4, atol=1e-4)
    # Each map is an affine function of itself: where things are does not move.
    standardised = (out - out.mean((2, 3), keepdim=True)) / out.std((2, 3), keepdim=True)
    torch.testing.assert_close(standardised, (features - mean) / spread, rtol=1e-3, atol=1e-3)


def test_training_with_feature_jitter_leaves_the_classifier_input_alone(toy, cache_dir, tmp_path, monkeypatch):
    import training.loop as loop

    jittered = []
    real = loop.jitter_feature_statistics
    monkeypatch.setattr(
        loop, "jitter_feature_statistics", lambda f, s, g: jittered.append(f.shape[1]) or real(f, s, g)
    )
    cfg = tiny_train(toy, tmp_path, model="converseg_edge_lite", train_image_encoder=True,
                     trunk_cache=str(cache_dir), val_every=100, steps=2, feature_jitter=0.3)
    assert train(cfg)["step"] == 2
    # EfficientNet-Lite0's stride 4, 8 and 16 maps (24, 40 and 112 channels) once per step; never the stride-32
    # map (320), which feeds the frozen ImageNet classifier.
    assert jittered == [24, 40, 112] * 2
    with pytest.raises(SystemExit, match="--trunk-cache"):
        train(tiny_train(toy, tmp_path / "bad", feature_jitter=0.3))
    with pytest.raises(SystemExit, match="feature-jitter"):
        train(tiny_train(toy, tmp_path / "bad2", trunk_cache=str(cache_dir), feature_jitter=1.5))
