"""Segmenter behaviour: results, caching (expensive work once), and every bad input."""

import warnings

import numpy as np
import pytest
import torch

from converseg_core import InputError, SegmentationResult, Segmenter, build_model
from converseg_core.segmenter import MAX_QUERY_CHARS, ModelOutputError, NoImageError

SMALL = 64


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("converseg_edge", img_size=SMALL, max_input_side=2000)


@pytest.fixture()
def seg(model):
    return Segmenter(model)


@pytest.fixture()
def rgb():
    return np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)


def count_calls(obj, method):
    calls = []
    original = getattr(obj, method)

    def wrapped(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(obj, method, wrapped)
    return calls


def test_results_are_typed_and_at_input_resolution(seg, rgb):
    seg.set_image(rgb)
    seg.set_queries(["the red mug", "where can I put the knife?"])
    results = seg.predict()
    assert [r.query for r in results] == ["the red mug", "where can I put the knife?"]
    for r in results:
        assert isinstance(r, SegmentationResult)
        assert r.mask.shape == (48, 80) and r.mask.dtype == bool
        assert 0.0 <= r.presence <= 1.0
        assert r.area == int(r.mask.sum())
        assert (r.box is None) == (r.area == 0)
        assert set(r.timings) == {"image_ms", "decode_ms", "postprocess_ms"}
        x, y = r.peak
        assert 0 <= x < 80 and 0 <= y < 48


def test_the_peak_does_not_depend_on_the_presence_decision(model, rgb):
    absent = Segmenter(model, presence_threshold=1.01).segment(rgb, "a giraffe")
    present = Segmenter(model, presence_threshold=0.0).segment(rgb, "a giraffe")
    assert not absent.present and present.present
    assert absent.peak == present.peak and absent.peak is not None


def test_absent_target_gives_empty_mask(model, rgb):
    # presence_threshold above 1: nothing can be present, so no pixel may be claimed.
    seg = Segmenter(model, presence_threshold=1.01, mask_threshold=-1e9)
    result = seg.segment(rgb, "a giraffe")
    assert not result.present and result.area == 0 and result.box is None and not result.mask.any()
    # and with everything forced present and a threshold that accepts every logit, the mask is full.
    seg = Segmenter(model, presence_threshold=0.0, mask_threshold=-1e9)
    result = seg.segment(rgb, "a giraffe")
    assert result.present and result.area == 48 * 80 and result.box == (0, 0, 79, 47)


def test_text_is_encoded_once_per_distinct_query(seg, rgb):
    text_calls = count_calls(seg.backend, "encode_text")
    image_calls = count_calls(seg.backend, "encode_image")
    seg.set_image(rgb)
    seg.set_query("hand me something to drink from")
    first = seg.predict()[0]
    for _ in range(3):
        seg.predict()
    seg.set_queries(["hand me something to drink from", "  hand me   something to drink from "])
    seg.predict(["hand me something to drink from"])
    assert len(text_calls) == 1, "a query already seen must come from the cache"
    assert len(image_calls) == 1, "the image encoder must run once per frame"
    seg.set_query("the knife")
    assert len(text_calls) == 2
    seg.set_image(rgb)
    assert len(image_calls) == 2
    again = seg.predict(["hand me something to drink from"])[0]
    assert np.array_equal(first.mask, again.mask) and first.presence == pytest.approx(again.presence)


def test_batched_queries_match_single_queries(seg, rgb):
    seg.set_image(rgb)
    batch = seg.predict(["a cup", "the knife on the left of the board, please"])
    single = [seg.predict([q])[0] for q in ("a cup", "the knife on the left of the board, please")]
    for b, s in zip(batch, single, strict=True):
        assert b.presence == pytest.approx(s.presence, abs=1e-5)
        assert np.array_equal(b.mask, s.mask)


def test_camera_resolution_logits_are_made_one_present_query_at_a_time(model, rgb, monkeypatch):
    """Memory stays one frame of float32 logits whatever the number of queries, and an absent target costs
    no upsampling; the masks equal a whole-batch upsampling of the same logits."""
    import converseg_core.segmenter as segmenter_module
    from converseg_core.processing import upsample_logits

    seg = Segmenter(model, presence_threshold=0.0, mask_threshold=-0.05)
    seg.set_image(rgb)
    queries = ["a cup", "the knife", "a plate to put things on"]
    seen = []

    def spy(low_res, **kw):
        seen.append(low_res.shape[0])
        return upsample_logits(low_res, **kw)

    monkeypatch.setattr(segmenter_module, "upsample_logits", spy)
    results = seg.predict(queries)
    assert seen == [1, 1, 1]
    low_res, _, _ = seg.backend.decode(seg._frame, *seg._stack_text(queries))
    image = seg._image
    whole = upsample_logits(
        low_res, img_size=SMALL, input_size=image.input_size, original_size=image.original_size
    )
    for r, logits in zip(results, whole, strict=True):
        assert np.array_equal(r.mask, logits > -0.05)
    seen.clear()
    absent = Segmenter(model, presence_threshold=1.01)
    absent.set_image(rgb)
    assert not any(r.present for r in absent.predict(queries)) and seen == []


@pytest.mark.parametrize(
    "image, problem",
    [
        (np.zeros((10, 10, 3), dtype=np.float32), "dtype must be uint8"),
        (np.zeros((10, 10), dtype=np.uint8), "shape H x W x 3"),
        (np.zeros((10, 10, 4), dtype=np.uint8), "3 channels"),
        (np.zeros((0, 10, 3), dtype=np.uint8), "empty"),
        (np.zeros((10, 2001, 3), dtype=np.uint8), "exceeds the configured limit of 2000"),
        ([[1, 2, 3]], "numpy array"),
    ],
)
def test_bad_images_are_rejected_clearly(seg, image, problem):
    with pytest.raises(InputError, match=problem):
        seg.set_image(image)
    assert not seg.has_image, "a rejected frame must not replace the last good one"


def test_rejected_frame_keeps_the_previous_one(seg, rgb):
    seg.set_image(rgb)
    with pytest.raises(InputError):
        seg.set_image(np.zeros((4, 4), dtype=np.uint8))
    assert seg.predict(["a cup"])[0].mask.shape == (48, 80)


@pytest.mark.parametrize(
    "query, problem",
    [
        ("", "empty or whitespace"),
        ("   \n\t ", "empty or whitespace"),
        ("x" * (MAX_QUERY_CHARS + 1), "characters long"),
        (42, "must be a string"),
        (b"\xff\xfe", "not valid UTF-8"),
    ],
)
def test_bad_queries_are_rejected_clearly(seg, query, problem):
    with pytest.raises(InputError, match=problem):
        seg.set_query(query)


def test_a_query_with_no_readable_word_is_refused(seg):
    with pytest.raises(InputError, match="no word the tokenizer can read"):
        seg.set_queries(["a cup", "\u200b\u200b"])
    assert seg.queries != ["a cup", "\u200b\u200b"]  # the whole call changed nothing


def test_a_very_wide_strip_is_segmented_at_its_own_size(seg):
    strip = np.full((1, 1100, 3), 128, dtype=np.uint8)  # at 512 px SAM's rounding gives a 0-row image
    seg.set_image(strip)
    assert seg.predict(["a cup"])[0].mask.shape == (1, 1100)


def test_non_finite_model_output_is_an_error_not_an_absent_target(model, rgb, monkeypatch):
    seg = Segmenter(model)
    seg.set_image(rgb)
    decode = seg.backend.decode

    def overflowing(*args):
        low_res, iou, presence = decode(*args)
        return low_res, iou, np.full_like(presence, np.nan)

    monkeypatch.setattr(seg.backend, "decode", overflowing)
    with pytest.raises(ModelOutputError, match="non-finite"):
        seg.predict(["a cup"])


def test_long_query_is_truncated_with_a_warning(seg, rgb):
    seg.set_image(rgb)
    long_query = " ".join(["please pick up the small red cup"] * 20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = seg.predict([long_query])[0]
    assert any("truncated" in str(w.message) for w in caught)
    assert result.mask.shape == (48, 80)
    assert result.truncated and not seg.predict(["a cup"])[0].truncated  # reported per result, also cached
    assert seg.predict([long_query])[0].truncated


def test_predict_needs_an_image_and_a_query(model, rgb):
    seg = Segmenter(model)
    with pytest.raises(NoImageError, match="set_image"):
        seg.predict(["a cup"])
    seg.set_image(rgb)
    with pytest.raises(InputError, match="no query"):
        seg.predict()
    with pytest.raises(InputError, match="list of strings"):
        seg.set_queries("a cup")


def test_presence_adds_the_weighted_predicted_iou(model, rgb):
    # config.presence_score_weight w: presence = sigmoid(presence logit + w * predicted IoU); w = 0 is the
    # presence head alone. The masks do not depend on w.
    plain = Segmenter(model, presence_threshold=0.0)
    weighted = Segmenter(model, presence_threshold=0.0)
    weighted.config = weighted.config.replace(presence_score_weight=2.5)
    queries = ["the red mug", "something to drink from"]
    plain.set_image(rgb)
    weighted.set_image(rgb)
    a, b = plain.predict(queries), weighted.predict(queries)
    for x, y in zip(a, b, strict=True):
        logit = np.log(x.presence / (1 - x.presence))
        assert y.presence == pytest.approx(1 / (1 + np.exp(-(logit + 2.5 * x.score))), rel=1e-6)
        assert y.score == pytest.approx(x.score) and np.array_equal(x.mask, y.mask)
    assert a[0].presence != pytest.approx(b[0].presence)
